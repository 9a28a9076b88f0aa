"""fit_video.py with one frame camera: --focal, --export nerf and --save_meshes end to end.

The exported cameras are checked the way a consumer uses them: the model's landmarks
(SPEC §1-2 from the .mat model and the pkl's id / exp) moved into camera space with the
inverse of each frame's transform_matrix and projected with (cx + f·x/−z, cy − f·y/−z)
land where the pkl's pose in the frame camera puts them, and on the tracked landmarks
with the run's own landmark error."""
from __future__ import annotations

import glob
import json
import os
import pickle

import numpy as np
import pytest
import scipy.io as sio
import torch

import fit_video
from core.landmarks.metrics import landmark_nme
from core.pipelines.cli import run_main
from core.pipelines.video.export import camera_to_world, split_train_val
from core.render.camera import FrameCamera
from tests.test_video import FAST, BLANKS, N_FRAMES, clip, model_path  # noqa: F401 (fixtures)

PHOTO_FAST = ["--device", "cpu", "--threads", "1", "--lm_detector", "dlib", "--quiet", "--preset", "default",
              "--tar_size", "64", "--first_rf_iters", "6", "--first_nrf_iters", "3"]


def _rotation(angles):
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _model_landmarks(model_file, id_, exp):
    """(68, 3) model-space landmark vertices (SPEC §1-2), centred."""
    m = sio.loadmat(model_file)
    kp = m["keypoints"].reshape(-1).astype(int) - 1
    n = m["meanshape"].size // 3
    s = m["meanshape"].reshape(-1) + m["idBase"] @ id_ + m["exBase"] @ exp
    return (s.reshape(n, 3) - m["meanshape"].reshape(n, 3).mean(0))[kp]


@pytest.fixture(scope="module")
def export_run(tmp_path_factory, clip, model_path):
    res = str(tmp_path_factory.mktemp("export"))
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", res, "--cache_folder", "",
                                   "--model_path", model_path, "--export", "nerf", "--save_meshes"] + FAST)
    assert rc == 0
    with open(os.path.join(res, "talk_fitting_res.pkl"), "rb") as f:
        pkl = pickle.load(f)
    with open(os.path.join(res, "talk_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    return res, pkl, info


def test_nerf_export_layout_and_split(export_run):
    res, pkl, info = export_run
    folder = os.path.join(res, "talk_nerf")
    assert info["camera"]["model"] == "frame" and info["camera"]["focal_source"] in ("estimated", "assumed")
    assert info["exports"] == ["nerf", "meshes"]
    cam = info["camera"]
    assert (cam["cx"], cam["cy"]) == (cam["width"] / 2, cam["height"] / 2)
    assert cam["intrinsics"] == [[cam["focal"], 0, cam["cx"]], [0, cam["focal"], cam["cy"]], [0, 0, 1]]
    assert pkl["camera"]["focal"] == cam["focal"]
    fitted = sorted(pkl["fitting_res"])
    assert len(fitted) == N_FRAMES - len(BLANKS)
    docs = {}
    for name in ("transforms_train.json", "transforms_val.json"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            docs[name] = json.load(f)
        d = docs[name]
        assert (d["focal_len"], d["cx"], d["cy"], d["w"], d["h"]) == (cam["focal"], cam["cx"], cam["cy"],
                                                                     cam["width"], cam["height"])
    train = [fr["img_id"] for fr in docs["transforms_train.json"]["frames"]]
    val = [fr["img_id"] for fr in docs["transforms_val.json"]["frames"]]
    assert train + val == fitted and len(train) == split_train_val(len(fitted)) and len(val) >= 1
    params = torch.load(os.path.join(folder, "track_params.pt"))
    assert params["id"].shape == (1, pkl["id"].size) and params["exp"].shape == (len(fitted), 64)
    assert params["focal"].tolist() == pytest.approx([cam["focal"]])
    assert params["frames"].tolist() == fitted
    for k, i in enumerate(fitted):
        e = pkl["fitting_res"][i]
        assert np.allclose(params["euler"][k].numpy(), e["rot"])
        assert np.allclose(params["trans"][k].numpy(), e["trans"] - np.array([0, 0, 10.0]), atol=1e-6)
    lms = np.load(os.path.join(folder, "landmarks.npy"))
    assert lms.shape == (len(fitted), 68, 2)
    assert np.allclose(np.loadtxt(os.path.join(folder, "lms", f"{fitted[-1]}.lms")), lms[-1], atol=1e-3)
    assert oct(os.stat(folder).st_mode & 0o777) != oct(0o700)


def test_exported_cameras_reproject_the_model_onto_the_fitted_landmarks(export_run, model_path):
    res, pkl, info = export_run
    folder = os.path.join(res, "talk_nerf")
    frames = []
    for name in ("transforms_train.json", "transforms_val.json"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            d = json.load(f)
        frames += d["frames"]
    f, cx, cy = d["focal_len"], d["cx"], d["cy"]
    lms = np.load(os.path.join(folder, "landmarks.npy"))
    nme = info["landmark_nme_interocular"]["per_frame"]
    for k, fr in enumerate(frames):
        i = fr["img_id"]
        e = pkl["fitting_res"][i]
        world = _model_landmarks(model_path, pkl["id"], e["exp"])
        c2w = np.asarray(fr["transform_matrix"])
        cam_pts = (np.linalg.inv(c2w) @ np.c_[world, np.ones(68)].T).T[:, :3]
        assert (cam_pts[:, 2] < 0).all()  # in front of an OpenGL camera
        px = np.stack([cx + f * cam_pts[:, 0] / -cam_pts[:, 2], cy - f * cam_pts[:, 1] / -cam_pts[:, 2]], 1)
        # The pose in the pkl, in the frame camera (SPEC §3 with the frame's focal and principal point).
        v = world @ _rotation(e["rot"]).T + e["trans"]
        zc = 10 - v[:, 2]
        ref = np.stack([cx + f * v[:, 0] / zc, cy - f * v[:, 1] / zc], 1)
        assert np.abs(px - ref).max() < 1e-3
        assert landmark_nme(px, lms[k]) == pytest.approx(nme[str(i)], abs=2e-4)
        assert landmark_nme(px, lms[k]) < 0.2


def test_meshes_hold_every_frame_posed(export_run, model_path):
    res, pkl, info = export_run
    meshes = np.load(os.path.join(res, "talk_meshes.npy"))
    m = sio.loadmat(model_path)
    assert meshes.dtype == np.float16 and meshes.shape == (N_FRAMES, m["meanshape"].size // 3, 3)
    for b in BLANKS:
        assert np.isnan(meshes[b]).all()
    kp = m["keypoints"].reshape(-1).astype(int) - 1
    for i, e in pkl["fitting_res"].items():
        v = _model_landmarks(model_path, pkl["id"], e["exp"]) @ _rotation(e["rot"]).T + e["trans"]
        assert np.abs(meshes[i][kp].astype(np.float64) - v).max() < 2e-3


def test_meshes_composed_while_fitting_or_after_are_the_same(tmp_path, clip, model_path):
    """Two workers compose their clips (and keep their meshes) while fitting; with one
    clip's cache removed, a re-run fits that one again (composing it while fitting) and
    this process renders the other: the same meshes, exactly."""
    cache, out = tmp_path / "cache", {}
    for name in ("fresh", "mixed"):
        if name == "mixed":
            os.remove(sorted(glob.glob(str(cache / "talk" / "clip_*.npz")))[0])
        rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(tmp_path / name), "--cache_folder",
                                       str(cache), "--model_path", model_path, "--save_meshes", "--nworkers", "2"]
                      + FAST)
        assert rc == 0
        with open(tmp_path / name / "talk_info.json", encoding="utf-8") as f:
            out[name] = (np.load(tmp_path / name / "talk_meshes.npy"), json.load(f))
    (fresh, info_f), (mixed, info_m) = out["fresh"], out["mixed"]
    assert info_f["timings_s"]["composed_while_fitting"] == N_FRAMES
    assert 0 < info_m["timings_s"]["composed_while_fitting"] < N_FRAMES
    np.testing.assert_array_equal(fresh, mixed)
    assert np.isnan(fresh[list(BLANKS)].astype(np.float32)).all()
    assert np.isfinite(np.delete(fresh, list(BLANKS), axis=0).astype(np.float32)).all()


def test_a_given_focal_and_principal_point_are_kept(tmp_path, clip, model_path):
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(tmp_path), "--cache_folder", "",
                                   "--model_path", model_path, "--focal", "500", "--principal", "300.5,170",
                                   "--export", "nerf", "--frame_range", "5:9"] + FAST)
    assert rc == 0
    with open(tmp_path / "talk_info.json", encoding="utf-8") as f:
        info = json.load(f)
    cam = info["camera"]
    assert cam["focal"] == 500.0 and cam["focal_source"] == "given" and cam["model"] == "frame"
    assert (cam["cx"], cam["cy"]) == (300.5, 170.0) and cam["intrinsics"][0][2] == 300.5
    assert not (tmp_path / "talk_meshes.npy").exists()
    # The poses are in that camera: SPEC's landmarks with its focal and principal point give
    # the run's own landmark error against the tracked landmarks.
    with open(tmp_path / "talk_fitting_res.pkl", "rb") as f:
        pkl = pickle.load(f)
    lms = np.load(tmp_path / "talk_nerf" / "landmarks.npy")
    for k, i in enumerate(sorted(pkl["fitting_res"])):
        e = pkl["fitting_res"][i]
        v = _model_landmarks(model_path, pkl["id"], e["exp"]) @ _rotation(e["rot"]).T + e["trans"]
        zc = 10 - v[:, 2]
        px = np.stack([300.5 + 500 * v[:, 0] / zc, 170 - 500 * v[:, 1] / zc], 1)
        assert landmark_nme(px, lms[k]) == pytest.approx(info["landmark_nme_interocular"]["per_frame"][str(i)],
                                                         abs=2e-4)


@pytest.mark.parametrize("flags, message", [
    (["--focal", "-3"], "--focal"),
    (["--focal", "wide"], "--focal"),
    (["--principal", "12"], "--principal"),
])
def test_bad_camera_flags_are_one_line_errors(flags, message, tmp_path, clip, model_path, capsys):
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(tmp_path), "--cache_folder", "",
                                   "--model_path", model_path] + FAST + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1] and "Traceback" not in "\n".join(err)


def test_camera_to_world_inverts_the_pose():
    cam = FrameCamera(focal=800.0, width=640, height=480)
    angles = np.array([[0.1, -0.4, 0.2]])
    trans = np.array([[0.3, -0.2, 1.5]])
    c2w = camera_to_world(angles, trans, cam)[0]
    x = np.array([0.2, 0.5, -0.3])
    cam_pt = _rotation(angles[0]) @ x + trans[0] - [0, 0, 10]
    assert np.allclose(c2w @ np.r_[cam_pt, 1], np.r_[x, 1])
    assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3))


@pytest.mark.parametrize("focal", ["800", "auto"])
def test_photo_with_its_own_camera(focal, tmp_path, model_path):
    """fit_single_img.py --focal: the pose in the coefficients is in the photo's camera
    (principal point at the photo centre): SPEC's landmarks from the .npy coefficients with
    that camera are the model landmarks info.json reports."""
    import fit_single_img
    from tests.helpers import REPO
    rc = run_main(fit_single_img.main, ["--img_path", str(REPO / "data" / "astronaut.jpg"), "--res_folder",
                                        str(tmp_path), "--model_path", model_path, "--focal", focal] + PHOTO_FAST)
    assert rc == 0
    with open(tmp_path / "astronaut_info.json", encoding="utf-8") as f:
        info = json.load(f)
    cam = info["camera"]
    assert cam["model"] == "frame" and (cam["cx"], cam["cy"]) == (256.0, 256.0)
    assert cam["focal_source"] in (("given",) if focal != "auto" else ("estimated", "assumed"))
    if focal != "auto":
        assert cam["focal"] == pytest.approx(800.0, rel=1e-6)
    c = np.load(tmp_path / "astronaut_coeffs.npy").astype(np.float64)
    v = _model_landmarks(model_path, c[:80], c[80:144]) @ _rotation(c[224:227]).T + c[254:257]
    zc = 10 - v[:, 2]
    px = np.stack([cam["cx"] + cam["focal"] * v[:, 0] / zc, cam["cy"] - cam["focal"] * v[:, 1] / zc], 1)
    assert np.abs(px - np.asarray(info["landmarks_model"])).max() < 0.01


def test_a_failing_export_leaves_no_outputs(tmp_path, clip, model_path, monkeypatch, capsys):
    """The export cannot be written (a full disk): one error line, exit 2, and nothing in
    the output folder (no pkl, info, video, meshes, nerf folder or temporary file)."""
    import errno
    from core.pipelines.video import run as video_run

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video_run, "write_nerf", full)
    res = tmp_path / "res"
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(res), "--cache_folder", "",
                                   "--model_path", model_path, "--export", "nerf", "--save_meshes",
                                   "--frame_range", "5:9"] + FAST)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "No space left on device" in err[-1] and err[-1].startswith("error:")
    assert not res.exists() or os.listdir(res) == []


def test_a_rerun_reuses_the_frame_camera_fit(tmp_path, clip, model_path, capsys):
    """A second run on the same cache reuses the identity fit (with its focal) and the
    clips: the same cameras and poses are exported."""
    cache = str(tmp_path / "cache")
    docs = []
    for k in range(2):
        res = tmp_path / f"r{k}"
        rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(res), "--cache_folder", cache,
                                       "--model_path", model_path, "--export", "nerf", "--frame_range", "5:10"]
                      + FAST)
        assert rc == 0
        with open(res / "talk_nerf" / "transforms_train.json", encoding="utf-8") as f:
            docs.append(json.load(f))
        with open(res / "talk_info.json", encoding="utf-8") as f:
            info = json.load(f)
    assert info["cache"]["shape_reused"] and info["clips_reused"] >= 1
    assert docs[0] == docs[1]
