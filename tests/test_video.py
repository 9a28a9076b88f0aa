"""fit_video.py and core.video end to end on a short real clip with blank frames: the pkl
layout, the composed video, 1 vs 2 CPU workers, cache reuse and exact resumption, failing
workers, every bad input; and the pure helpers (clip split, shape frames, pose transfer)."""
from __future__ import annotations

import json
import os
import pickle

import cv2
import numpy as np
import pytest
import scipy.io as sio
import torch

import fit_video
from core import video as V
from core.camera import Camera
from core.cli import run_main
from core.config import get_preset
from core.errors import UserError
from core.synthetic import make_face_model
from core.tracking import interocular
from core.video_io import VideoReader, VideoWriter, probe_video
from tests.helpers import REPO, SHARED, synthetic_arrays

N_FRAMES = 16
BLANKS = (3, 4)
FAST = ["--device", "cpu", "--threads", "1", "--lm_detector", "dlib", "--quiet", "--preset", "default", "--tar_size", "64",
        "--nframes_shape", "3", "--first_rf_iters", "6", "--first_nrf_iters", "3", "--rest_rf_iters", "3",
        "--rest_nrf_iters", "2"]


# --- fixtures -------------------------------------------------------------------------------

def _moving_photo_frames(n: int, size=(480, 360)):
    """Fallback clip without ../shared: data/astronaut.jpg moved by known similarities."""
    from core.image_io import read_image
    photo = read_image(REPO / "data" / "astronaut.jpg")
    out = []
    for k in range(n):
        t = k / max(n - 1, 1)
        m = cv2.getRotationMatrix2D((256.0, 230.0), 5.0 * np.sin(np.pi * t), 0.75)
        m[:, 2] += (size[0] / 2 - 256 + 30 * t, size[1] / 2 - 230)
        out.append(cv2.warpAffine(photo, m, size))
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """A 16-frame clip with black frames 3 and 4: cut from ../shared's sample video and
    downscaled to 640x360 when it is there, else a moved photo."""
    path = str(tmp_path_factory.mktemp("clip") / "talk.mp4")
    sample = SHARED / "data" / "sample_video.mp4"
    n_real = N_FRAMES - len(BLANKS)
    if sample.is_file():
        with VideoReader(str(sample)) as r:
            real = [cv2.resize(f, (640, 360), interpolation=cv2.INTER_AREA) for _, f in r.frames(100, 100 + n_real)]
    else:
        real = _moving_photo_frames(n_real)
    h, w = real[0].shape[:2]
    frames = list(real)
    for b in BLANKS:
        frames.insert(b, np.zeros((h, w, 3), np.uint8))
    with VideoWriter(path, (w, h), 25.0) as wr:
        for f in frames:
            wr.write(f)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "synthetic.mat"
    sio.savemat(path, synthetic_arrays(1500))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, clip, model_path):
    """The clip fitted with 1 worker, then with 2 (clip_overlap 0: the original clip start)
    sharing the first run's cache; returns {name: (res_folder, pkl, info)}."""
    base = tmp_path_factory.mktemp("runs")
    cache = str(base / "cache")
    out = {}
    for name, extra in (("w1", ["--nworkers", "1"]), ("w2", ["--nworkers", "2", "--clip_overlap", "0"])):
        res = str(base / name)
        rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", res, "--cache_folder", cache,
                                       "--model_path", model_path] + FAST + extra)
        assert rc == 0
        out[name] = (res, _load(res, "talk"))
    out["cache"] = cache
    return out


def _load(folder, stem):
    with open(os.path.join(folder, f"{stem}_fitting_res.pkl"), "rb") as f:
        pkl = pickle.load(f)
    with open(os.path.join(folder, f"{stem}_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    return pkl, info


def spec_landmarks(model_file: str, pkl: dict, frame: int) -> np.ndarray:
    """(68, 2) photo-pixel landmarks of a frame, from the pkl with SPEC §1-3 alone."""
    m = sio.loadmat(model_file)
    e = pkl["fitting_res"][frame]
    kp = m["keypoints"].reshape(-1).astype(int) - 1
    n = m["meanshape"].size // 3
    s = m["meanshape"].reshape(-1) + m["idBase"] @ pkl["id"] + m["exBase"] @ e["exp"]
    s = s.reshape(n, 3) - m["meanshape"].reshape(n, 3).mean(0)
    cx, cy, cz = np.cos(e["rot"])
    sx, sy, sz = np.sin(e["rot"])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    v = s[kp] @ (rz @ ry @ rx).T + e["trans"]
    t = pkl["tar_size"]
    zc = 10 - v[:, 2]
    u = 1015 * v[:, 0] / zc + t / 2
    row = t - (1015 * v[:, 1] / zc + t / 2)
    b = e["bbox"]
    side = b[2] - b[0]
    return np.stack([b[0] + u * side / t, b[1] + row * side / t], 1)


# --- end to end -----------------------------------------------------------------------------

def test_pkl_layout(runs):
    res, (pkl, info) = runs["w1"]
    assert set(pkl) == {"id", "tex", "fitting_res", "tar_size", "fps", "frames_without_face", "num_frames"}
    assert pkl["id"].shape == (80,) and pkl["id"].dtype == np.float32
    assert pkl["tex"].shape == (80,) and pkl["tex"].dtype == np.float32
    assert pkl["tar_size"] == 64 and pkl["fps"] == pytest.approx(25.0) and pkl["num_frames"] == N_FRAMES
    assert pkl["frames_without_face"] == list(BLANKS)
    assert sorted(pkl["fitting_res"]) == [i for i in range(N_FRAMES) if i not in BLANKS]
    shapes = {"rot": (3,), "trans": (3,), "gamma": (27,), "exp": (64,)}
    for i, e in pkl["fitting_res"].items():
        assert set(e) == set(shapes) | {"bbox"}
        for k, s in shapes.items():
            assert e[k].shape == s and e[k].dtype == np.float32 and np.all(np.isfinite(e[k]))
        x0, y0, x1, y1 = (int(v) for v in e["bbox"])
        assert x1 - x0 == y1 - y0 > 20
    assert np.abs(pkl["id"]).sum() > 0  # identity was estimated
    assert sorted(os.listdir(res)) == ["talk_fitting_res.pkl", "talk_info.json", "talk_recon_video.mp4"]


def test_info_reports_stages_devices_and_timings(runs):
    _, (_, info) = runs["w1"]
    assert info["nworkers"] == 1 and info["worker_devices"] == ["cpu"] and info["device"] == "cpu"
    assert info["detector"] == "dlib" and info["frames_without_face"] == list(BLANKS)
    assert len(info["shape_frames"]) == 3 and not set(info["shape_frames"]) & set(BLANKS)
    for stage in ("landmarks", "fitting", "rendering", "overall"):
        assert info["fps"][stage] > 0
    _, (_, info2) = runs["w2"]
    assert info2["nworkers"] == 2 and info2["worker_devices"] == ["cpu", "cpu"]
    assert info2["threads_per_worker"] == 1  # --threads


def test_threads_per_worker_split_the_cores():
    assert [V.threads_per_worker(8, k) for k in (1, 2, 3, 4, 8, 16)] == [8, 4, 2, 2, 1, 1]
    assert V.threads_per_worker(2, 2) == 1


def test_composed_video_has_every_frame_at_the_source_rate(runs, clip):
    res, _ = runs["w1"]
    out = os.path.join(res, "talk_recon_video.mp4")
    src, got = probe_video(clip), probe_video(out)
    assert (got.width, got.height) == (src.width, src.height)
    assert got.fps == pytest.approx(src.fps)
    with open(out, "rb") as f:
        assert b"avc1" in f.read(4096 * 16)  # H.264
    with VideoReader(clip) as a, VideoReader(out) as b:
        pairs = list(zip(a.frames(), b.frames()))
    assert len(pairs) == N_FRAMES == sum(1 for _ in VideoReader(out).frames())
    for (i, fa), (_, fb) in pairs:
        diff = np.abs(fa.astype(int) - fb.astype(int)).max(axis=2)
        if i in BLANKS:
            assert fb.max() < 30  # the original (black) frame is shown
        else:
            assert (diff > 40).mean() > 0.005  # the render is pasted on the face


def test_landmarks_follow_the_face(runs, model_path):
    """The saved coefficients, recomputed with SPEC's formulas through each frame's bbox,
    keep the landmarks near the tracked ones (a small synthetic model, few iterations)."""
    res, (pkl, info) = runs["w1"]
    cache = os.path.join(runs["cache"], "talk", "landmarks.npz")
    tracked = np.load(cache)["landmarks"]
    errs = []
    for i in pkl["fitting_res"]:
        p = spec_landmarks(model_path, pkl, i)
        errs.append(np.linalg.norm(p - tracked[i], axis=1).mean() / interocular(tracked[i]))
    assert max(errs) < 0.2, errs
    assert info["landmark_nme_interocular"]["max"] == pytest.approx(max(errs), rel=1e-3, abs=1e-4)


def test_one_and_two_workers_agree_away_from_the_clip_start(runs, model_path):
    (_, (p1, _)), (_, (p2, i2)) = runs["w1"], runs["w2"]
    clips = V.split_clips(N_FRAMES, 2)
    assert i2["clips_reused"] == 0 and clips == [(0, 8), (8, 16)]
    for i in sorted(p1["fitting_res"]):
        a, b = spec_landmarks(model_path, p1, i), spec_landmarks(model_path, p2, i)
        d = np.linalg.norm(a - b, axis=1).max()
        np.testing.assert_array_equal(p1["fitting_res"][i]["bbox"], p2["fitting_res"][i]["bbox"])
        if i < 8:  # the same computation, only the thread count differs
            assert d < 0.05, (i, d)
        elif i >= 12:  # the second clip started afresh at frame 8; 4 frames later it agrees
            iod = interocular(a)
            assert d < 0.1 * iod, (i, d, iod)
    np.testing.assert_array_equal(p1["id"], p2["id"])  # the shape stage was reused


def test_rerun_reuses_every_stage(runs, clip, model_path, tmp_path):
    res = str(tmp_path / "again")
    args = ["--v_path", clip, "--res_folder", res, "--cache_folder", runs["cache"], "--model_path", model_path]
    assert fit_video.main(args + FAST + ["--nworkers", "2", "--clip_overlap", "0"]) == 0
    _, info = _load(res, "talk")
    assert info["clips_reused"] == 2 and info["timings_s"]["fit_frames"] == 0
    assert info["cache"] == {"folder": os.path.abspath(runs["cache"]), "landmarks_reused": True,
                             "shape_reused": True, "clips_reused": 2}
    assert not runs["w1"][1][1]["cache"]["landmarks_reused"]
    assert runs["w2"][1][1]["cache"]["shape_reused"] and runs["w2"][1][1]["cache"]["clips_reused"] == 0
    p_old, _ = runs["w2"][1]
    p_new, _ = _load(res, "talk")
    for i in p_old["fitting_res"]:
        np.testing.assert_array_equal(p_old["fitting_res"][i]["exp"], p_new["fitting_res"][i]["exp"])


# --- workers, resumption, failures ----------------------------------------------------------

@pytest.fixture(scope="module")
def track(clip) -> V.LandmarkTrack:
    from core.detect import DlibDetector
    return V.landmark_pass(clip, DlibDetector(), progress=False)


def _job(track, clip, tmp_path, worker=0, start=0, stop=6, video=None) -> V.ClipJob:
    det_track = track
    model = make_face_model(600)
    boxes = det_track.crop_boxes(0.3)
    cfg = get_preset("default").with_overrides(first_rf_iters=4, first_nrf_iters=2, rest_rf_iters=2,
                                               rest_nrf_iters=1)
    return V.ClipJob(worker=worker, video_path=video or clip, timestamps=det_track.timestamps, fit_start=start,
                     start=start, stop=stop, landmarks=det_track.landmarks[start:stop],
                     crop_boxes=boxes[start:stop], id=np.zeros(80, np.float32), tex=np.zeros(80, np.float32),
                     model=model, config=cfg, tar_size=48, renderer="builtin", device="cpu", threads=1,
                     cache_path=str(tmp_path / f"clip{worker}.npz"),
                     partial_path=str(tmp_path / f"clip{worker}.partial.npz"), key="k", checkpoint_s=0.0)


def test_interrupted_landmark_pass_resumes_exactly(clip, track, tmp_path):
    from core.detect import DlibDetector
    from core.tracking import FaceTracker

    class Interrupted(FaceTracker):
        calls = 0

        def update(self, image):
            Interrupted.calls += 1
            if Interrupted.calls == 10:
                raise KeyboardInterrupt
            return super().update(image)

    det = DlibDetector()
    with pytest.raises(KeyboardInterrupt):
        V.landmark_pass(clip, det, str(tmp_path), progress=False, checkpoint_s=0.0, tracker=Interrupted(det))
    assert (tmp_path / "landmarks.partial.npz").exists() and not (tmp_path / "landmarks.npz").exists()
    assert np.load(tmp_path / "landmarks.partial.npz")["source"].shape == (9,)
    resumed = V.landmark_pass(clip, det, str(tmp_path), progress=False)
    assert not resumed.reused and (tmp_path / "landmarks.npz").exists()
    assert not (tmp_path / "landmarks.partial.npz").exists()
    np.testing.assert_array_equal(resumed.landmarks, track.landmarks)
    np.testing.assert_array_equal(resumed.source, track.source)
    np.testing.assert_array_equal(resumed.timestamps, track.timestamps)
    assert V.landmark_pass(clip, det, str(tmp_path), progress=False).reused


def test_interrupted_clip_resumes_exactly(track, clip, tmp_path):
    job = _job(track, clip, tmp_path, stop=8)
    whole = V.fit_clip(job)
    assert whole["fitted"].tolist() == [i not in BLANKS for i in range(8)]
    os.remove(job.cache_path)

    calls = []

    def stop_after_six(n):
        calls.append(n)
        if len(calls) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        V.fit_clip(job, progress=stop_after_six)
    assert os.path.exists(job.partial_path) and not os.path.exists(job.cache_path)
    seen = []
    resumed = V.fit_clip(job, progress=seen.append)
    assert sum(seen) == 8  # the 5 frames already done are reported at once, then 3 more
    assert not os.path.exists(job.partial_path)
    for g in ("exp", "gamma", "angles", "trans"):
        np.testing.assert_array_equal(resumed[g], whole[g])


def test_clip_overlap_fades_the_clip_start(track, clip, tmp_path):
    """A clip started a few frames early (warm-up frames fitted and dropped) is closer to
    the one-worker result than a clip started cold at its first frame."""
    ref = V.fit_clip(_job(track, clip, tmp_path, worker=0, start=5, stop=16))  # one worker from 5
    cold = V.fit_clip(_job(track, clip, tmp_path, worker=1, start=12, stop=16))
    warm_job = _job(track, clip, tmp_path, worker=2, start=12, stop=16)
    warm_job.fit_start, warm_job.landmarks = 8, track.landmarks[8:16]
    warm_job.crop_boxes = track.crop_boxes(0.3)[8:16]
    warm = V.fit_clip(warm_job)
    assert warm["frames"].tolist() == cold["frames"].tolist() == list(range(12, 16))
    ref_exp, ref_trans = ref["exp"][7:], ref["trans"][7:]
    d_cold = np.abs(cold["trans"] - ref_trans).max(1) + np.abs(cold["exp"] - ref_exp).max(1)
    d_warm = np.abs(warm["trans"] - ref_trans).max(1) + np.abs(warm["exp"] - ref_exp).max(1)
    assert d_warm[0] < 0.5 * d_cold[0], (d_warm, d_cold)


def test_failing_worker_stops_the_run(track, clip, tmp_path):
    good = _job(track, clip, tmp_path, worker=0, stop=2)
    bad = _job(track, clip, tmp_path, worker=1, start=2, stop=4, video=str(tmp_path / "gone.mp4"))
    with pytest.raises(UserError, match=r"^worker 1 failed: video '.*gone\.mp4' not found$"):
        V.run_workers([good, bad])
    assert not os.path.exists(bad.cache_path)


def test_no_half_written_outputs_when_a_worker_fails(clip, model_path, tmp_path, monkeypatch, capsys):
    def boom(jobs, progress=None, **kw):
        raise UserError("worker 1 failed: simulated")

    monkeypatch.setattr(V, "run_workers", boom)
    res = tmp_path / "res"
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(res), "--cache_folder",
                                   str(tmp_path / "cache"), "--model_path", model_path] + FAST)
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: worker 1 failed: simulated"
    assert os.listdir(res) == []


# --- bad input ------------------------------------------------------------------------------

def _noise_video(path: str) -> str:
    rng = np.random.default_rng(0)
    with VideoWriter(path, (160, 120), 10) as w:
        for _ in range(3):
            w.write(rng.integers(0, 255, size=(120, 160, 3), dtype=np.uint8))
    return path


@pytest.mark.parametrize("kind", ["missing", "corrupt", "empty", "no_face", "unwritable", "unwritable_cache"])
def test_bad_input_is_one_line_error(kind, tmp_path, clip, model_path, capsys):
    video, res, cache = str(tmp_path / "v.mp4"), str(tmp_path / "res"), str(tmp_path / "cache")
    if kind == "corrupt":
        with open(video, "wb") as f:
            f.write(os.urandom(2000))
    elif kind == "empty":
        open(video, "wb").close()
    elif kind == "no_face":
        _noise_video(video)
    elif kind == "unwritable":
        video = clip
        blocker = tmp_path / "file"
        blocker.write_text("x")
        res = str(blocker / "res")
    elif kind == "unwritable_cache":
        video = clip
        blocker = tmp_path / "file"
        blocker.write_text("x")
        cache = str(blocker / "cache")
    rc = run_main(fit_video.main, ["--v_path", video, "--res_folder", res, "--cache_folder", cache,
                                   "--model_path", model_path] + FAST)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    expected = {"missing": "not found", "corrupt": "cannot read video", "empty": "empty",
                "no_face": "no face found in any of the 3 frames", "unwritable": "output folder",
                "unwritable_cache": "cache folder"}[kind]
    if kind.startswith("unwritable"):
        assert "not writable" in err[0]
    assert expected in err[0]
    assert not os.path.exists(res) or os.listdir(res) == []


def test_presets_and_defaults():
    """--preset original is the original schedule (one learning rate everywhere, first/rest
    iterations 1000/500 and 50/30); the fast preset refines warm-started frames gently."""
    from core import cli
    from core.config import PRESETS

    p = fit_video.build_parser()
    args = p.parse_args(["--v_path", "x.mp4", "--res_folder", "r", "--preset", "original"])
    cfg = cli.fit_config_from_args(args)
    assert cfg == PRESETS["original"]
    assert (cfg.first_rf_iters, cfg.first_nrf_iters, cfg.rest_rf_iters, cfg.rest_nrf_iters) == (1000, 500, 50, 30)
    opts = fit_video.video_options(args)
    assert cfg.rest_nrf_lr is None  # = nrf_lr
    assert (opts.nframes_shape, opts.nworkers, opts.ngpus, opts.cache_folder) == (16, 1, 1, "fitting_cache")
    fast = cli.fit_config_from_args(p.parse_args(["--v_path", "x", "--res_folder", "r"]))
    assert fast.rest_nrf_lr == PRESETS["default"].rest_nrf_lr
    given = p.parse_args(["--v_path", "x", "--res_folder", "r", "--rest_nrf_lr", "0.02", "--rest_nrf_iters", "7",
                          "--cache_folder", ""])
    assert cli.fit_config_from_args(given).rest_nrf_lr == 0.02 and fit_video.video_options(given).cache_folder is None
    assert cli.fit_config_from_args(given).rest_nrf_iters == 7


@pytest.mark.parametrize("flag", ["--nworkers", "--ngpus", "--nframes_shape", "--threads"])
def test_bad_counts(flag, clip, capsys):
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", "x", flag, "0"])
    assert rc == 2 and "must be at least 1" in capsys.readouterr().err


# --- pure helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,expected", [
    (10, 1, [(0, 10)]), (10, 2, [(0, 5), (5, 10)]), (10, 3, [(0, 3), (3, 6), (6, 10)]),
    (3, 5, [(0, 1), (1, 2), (2, 3)]), (0, 4, []), (1, 1, [(0, 1)]),
])
def test_split_clips(n, k, expected):
    assert V.split_clips(n, k) == expected


def test_split_clips_covers_every_frame_once():
    for n in range(0, 60, 7):
        for k in range(1, 9):
            clips = V.split_clips(n, k)
            assert len(clips) == min(n, k)
            assert [i for a, b in clips for i in range(a, b)] == list(range(n))
            sizes = [b - a for a, b in clips]
            assert not sizes or (min(sizes) >= 1 and max(sizes) - min(sizes) <= 1)
    for bad in [(-1, 2), (5, 0), (2.5, 1)]:
        with pytest.raises(ValueError):
            V.split_clips(*bad)


def test_select_shape_frames_spreads_over_face_frames():
    has = np.ones(100, bool)
    has[:10] = False
    got = V.select_shape_frames(has, 4)
    assert len(got) == 4 and has[got].all()
    assert got.min() < 25 and got.max() > 85  # spread over the whole video, not its start
    assert np.all(np.diff(got) > 15)
    few = np.zeros(20, bool)
    few[[3, 7]] = True
    assert V.select_shape_frames(few, 16).tolist() == [3, 7]


def test_transfer_pose_keeps_the_face_in_place():
    """The model landmarks, mapped to the photo through each crop's box, stay put when the
    pose is carried from one box to another: exactly at the face centre, and to a small
    fraction of a pixel elsewhere for frame-to-frame box changes (a few per cent)."""
    from core.crop import crop_to_photo

    model = make_face_model(600)
    cam = Camera(image_size=128)
    c = model.layout.zeros(1).replace(angles=torch.tensor([[0.1, -0.3, 0.05]]),
                                      trans=torch.tensor([[0.2, -0.1, 0.5]]))

    def photo_points(coeffs, box):
        with torch.no_grad():
            pts = cam.project_points(model.landmarks_3d(coeffs))[0].numpy()
        return crop_to_photo(pts, box, 128)

    def centre(trans, box):
        p = cam.project_points(torch.as_tensor(trans, dtype=torch.float32).reshape(1, 3))[0].numpy()
        return crop_to_photo(p, box, 128)

    a_box = (100, 80, 300, 280)
    for b_box, tol in (((104, 77, 308, 281), 0.5), ((120, 60, 340, 280), 2.0)):  # +2 % and +10 %
        ang, tr = V.transfer_pose(c.angles.numpy()[0], c.trans.numpy()[0], a_box, b_box, cam)
        np.testing.assert_array_equal(ang, c.angles.numpy()[0])
        np.testing.assert_allclose(centre(tr, b_box), centre(c.trans.numpy()[0], a_box), atol=1e-3)
        moved = c.replace(angles=torch.as_tensor(ang)[None], trans=torch.as_tensor(tr)[None])
        err = np.abs(photo_points(c, a_box) - photo_points(moved, b_box)).max()
        assert err < tol, (b_box, err)
    # The same box: nothing moves.
    ang, tr = V.transfer_pose(c.angles.numpy()[0], c.trans.numpy()[0], a_box, a_box, cam)
    np.testing.assert_allclose(tr, c.trans.numpy()[0], atol=1e-6)
