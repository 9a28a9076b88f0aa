"""fit_video.py and core.pipelines.video end to end on a short real clip with blank frames: the pkl
layout, the composed video, 1 vs 2 CPU workers, cache reuse and exact resumption, the cache
lock, frame ranges, failing workers and encoders, workers ending with the main process,
every bad input; and the pure helpers (clip split, shape frames, pose transfer).

The clip is cut from ../shared's sample video when it is there, else made from a photo;
FIT3DMM_NO_SHARED=1 forces the photo clip (as in a clone without ../shared)."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import scipy.io as sio
import torch

import fit_video
from core.pipelines import video as V
from core.pipelines.session import SessionSpec
from core.pipelines.video import run as video_run  # where run_video looks its stages up (monkeypatched)
from core.render.camera import Camera
from core.pipelines.cli import run_main
from core.fit.config import get_preset
from core.errors import UserError
from core.landmarks.metrics import landmark_nme
from core.models.synthetic import make_face_model
from core.landmarks.tracking import interocular
from core.io.video import VideoReader, VideoWriter, probe_video
from tests.helpers import REPO, SHARED, synthetic_arrays

N_FRAMES = 16
BLANKS = (3, 4)
FAST = ["--device", "cpu", "--threads", "1", "--lm_detector", "dlib", "--quiet", "--preset", "default", "--tar_size", "64",
        "--nframes_shape", "3", "--first_rf_iters", "6", "--first_nrf_iters", "3", "--rest_rf_iters", "3",
        "--rest_nrf_iters", "2"]
LOUD = [a for a in FAST if a != "--quiet"]  # the same run, with its INFO messages


# --- fixtures -------------------------------------------------------------------------------

def _moving_photo_frames(n: int, size=(480, 360)):
    """Fallback clip without ../shared: data/astronaut.jpg moved by known similarities."""
    from core.io.image import read_image
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
    downscaled to 640x360 when it is there (and FIT3DMM_NO_SHARED is not 1), else a moved
    photo."""
    path = str(tmp_path_factory.mktemp("clip") / "talk.mp4")
    sample = SHARED / "data" / "sample_video.mp4"
    n_real = N_FRAMES - len(BLANKS)
    if sample.is_file() and os.environ.get("FIT3DMM_NO_SHARED") != "1":
        with VideoReader(str(sample)) as r:
            real = [cv2.resize(f, (640, 360), interpolation=cv2.INTER_AREA) for _, f in r.frames(100, 100 + n_real)]
    else:
        real = _moving_photo_frames(n_real)
    h, w = real[0].shape[:2]
    frames = list(real)
    for b in BLANKS:
        frames.insert(b, np.zeros((h, w, 3), np.uint8))
    with VideoWriter(path, (w, h), 25.0, preset="veryfast", crf=18) as wr:  # a source video, not an overlay
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


def _output_lines(capsys):
    """The stripped, non-empty lines a run printed (stdout and stderr: where INFO goes is
    core.pipelines.cli's business), progress-bar redraws split apart."""
    cap = capsys.readouterr()
    return [ln.strip() for ln in re.split(r"[\r\n]", cap.out + "\n" + cap.err) if ln.strip()]


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
    for stage in ("landmarks", "fitting", "overall"):
        assert info["fps"][stage] > 0
    # every frame was composed while fitted (by the clip's worker): no rendering stage after it
    assert info["timings_s"]["composed_while_fitting"] == N_FRAMES and info["fps"]["rendering"] is None
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


def test_pkl_dtypes(runs):
    """The pkl's arrays: per frame 'rot', 'trans', 'gamma', 'exp' float32 and 'bbox' int64
    (4,); 'id' and 'tex' float32."""
    _, (pkl, _) = runs["w1"]
    assert pkl["id"].dtype == np.float32 and pkl["tex"].dtype == np.float32
    for e in pkl["fitting_res"].values():
        for k in ("rot", "trans", "gamma", "exp"):
            assert isinstance(e[k], np.ndarray) and e[k].dtype == np.float32, (k, e[k].dtype)
        assert isinstance(e["bbox"], np.ndarray) and e["bbox"].dtype == np.int64 and e["bbox"].shape == (4,)


def _check_landmark_nme(pkl, info, model_path, tracked, first=0):
    """info's per-frame landmark NME = core.landmarks.metrics.landmark_nme (its default points, as for
    photos) of the pkl's coefficients (SPEC formulas) against the tracked landmarks
    (``tracked[i - first]`` for source frame i); returns the values."""
    nme = info["landmark_nme_interocular"]
    per = {int(k): v for k, v in nme["per_frame"].items()}
    assert sorted(per) == sorted(pkl["fitting_res"])
    for i in pkl["fitting_res"]:
        expected = landmark_nme(spec_landmarks(model_path, pkl, i), tracked[i - first])
        assert per[i] == pytest.approx(expected, rel=1e-3, abs=2e-6), (i, per[i], expected)
    values = np.array(list(per.values()))
    assert nme["mean"] == pytest.approx(values.mean(), abs=2e-5)
    assert nme["max"] == pytest.approx(values.max(), abs=2e-5)
    assert nme["median"] == pytest.approx(np.median(values), abs=2e-5)
    return values


def test_landmarks_follow_the_face(runs, model_path):
    """The saved coefficients, recomputed with SPEC's formulas through each frame's bbox,
    keep the landmarks near the tracked ones (a small synthetic model, few iterations), and
    info.json reports exactly that error per frame, with the photos' definition."""
    res, (pkl, info) = runs["w1"]
    tracked = np.load(os.path.join(runs["cache"], "talk", "landmarks.npz"))["landmarks"]
    values = _check_landmark_nme(pkl, info, model_path, tracked)
    assert values.max() < 0.2, values
    all68 = [landmark_nme(spec_landmarks(model_path, pkl, i), tracked[i], points=None) for i in pkl["fitting_res"]]
    assert abs(np.mean(all68) - values.mean()) > 1e-3  # the definition matters: not all 68 points


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


def test_rerun_reuses_every_stage(runs, clip, model_path, tmp_path, capsys):
    res = str(tmp_path / "again")
    args = ["--v_path", clip, "--res_folder", res, "--cache_folder", runs["cache"], "--model_path", model_path]
    assert run_main(fit_video.main, args + LOUD + ["--nworkers", "2", "--clip_overlap", "0"]) == 0
    _, info = _load(res, "talk")
    assert info["clips_reused"] == 2 and info["timings_s"]["fit_frames"] == 0
    # Reused stages report no speed; the messages say what was reused and where the cache is.
    assert info["fps"]["landmarks"] is None and info["fps"]["fitting"] is None and info["fps"]["rendering"] > 0
    lines = _output_lines(capsys)
    cache_dir = os.path.join(runs["cache"], "talk")
    assert lines.count(f"cache: {os.path.abspath(cache_dir)} (re-runs reuse it; --cache_folder '' for none)") == 1
    assert f"fitting: all 2 clips reused from {cache_dir}" in lines
    speed = [ln for ln in lines if ln.startswith("speed: ")]
    mean = info["landmark_nme_interocular"]["mean"]
    assert len(speed) == 1 and re.fullmatch(
        r"speed: landmarks reused, fitting reused, rendering [0-9.]+ fps; landmark NME "
        + re.escape(f"{100 * mean:.1f}") + r"% of the inter-ocular distance \(mean over frames\)", speed[0]), speed
    assert not [ln for ln in lines if re.match(r"fitting \d+ frames", ln)]
    assert info["cache"] == {"folder": os.path.abspath(runs["cache"]), "landmarks_reused": True,
                             "shape_reused": True, "clips_reused": 2}
    assert not runs["w1"][1][1]["cache"]["landmarks_reused"]
    assert runs["w2"][1][1]["cache"]["shape_reused"] and runs["w2"][1][1]["cache"]["clips_reused"] == 0
    p_old, _ = runs["w2"][1]
    p_new, _ = _load(res, "talk")
    for i in p_old["fitting_res"]:
        np.testing.assert_array_equal(p_old["fitting_res"][i]["exp"], p_new["fitting_res"][i]["exp"])


def _cache_copy(runs, tmp_path) -> str:
    """A copy of the runs' cache (landmarks, shape and clips of the FAST settings)."""
    dst = tmp_path / "cache"
    shutil.copytree(runs["cache"], dst)
    return str(dst)


def _video_frames(path) -> list:
    with VideoReader(path) as r:
        return [f for _, f in r.frames()]


@pytest.mark.parametrize("cached", ["all", "one"])
def test_clips_composed_while_fitting_or_after_make_the_same_video(runs, clip, model_path, tmp_path, cached):
    """The 2-worker run composed each clip while fitting it; the same run again from its
    cache (all clips reused: composed after, in this process), or with one clip's cache
    removed (one composed while fitting, one after, joined), writes the same video: every
    frame, within x264's re-encoding noise of the first run and closer to its own frame there
    than to any other (tests below: identical before encoding), the same per-frame NMEs
    (tests/test_export.py: the meshes)."""
    res0, (_, info0) = runs["w2"]
    cache = _cache_copy(runs, tmp_path)
    second = os.path.join(cache, "talk", "clip_0000008_0000016.npz")  # w2's second clip
    assert os.path.isfile(second) and os.path.isfile(os.path.join(cache, "talk", "clip_0000000_0000008.npz"))
    if cached == "one":
        os.remove(second)
    res = tmp_path / "res"
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(res), "--cache_folder", cache,
                                   "--model_path", model_path, "--nworkers", "2", "--clip_overlap", "0"] + FAST)
    assert rc == 0
    _, info = _load(str(res), "talk")
    assert info["timings_s"]["composed_while_fitting"] == (0 if cached == "all" else 8)
    assert info["fps"]["rendering"] > 0
    assert info["landmark_nme_interocular"] == info0["landmark_nme_interocular"]
    a, b = _video_frames(os.path.join(res0, "talk_recon_video.mp4")), _video_frames(res / "talk_recon_video.mp4")
    assert len(a) == len(b) == N_FRAMES
    # Each frame is the first run's frame k, within the two encodings' noise (the clips were
    # encoded as two parts, then as one: keyframes differ), and nearer to it than to any frame
    # that differs from it by more than that noise. (Frames of the ../shared clip, downscaled,
    # differ from their neighbours by 1.3-1.4 grey levels on average: no lossy encoding tells
    # them apart; the photo clip's by >= 11.6.) Measured: 0-2.1 to frame k.
    noise = 2.5
    for k, y in enumerate(b):
        d = [np.abs(x.astype(float) - y).mean() for x in a]
        apart = [j for j, x in enumerate(a) if np.abs(x.astype(float) - a[k]).mean() > 2 * noise]
        assert d[k] < noise and all(d[k] < d[j] for j in apart), (k, d)
    assert not glob.glob(os.path.join(cache, "talk", "compose_*"))  # the run's segments are gone


def test_composer_in_the_worker_writes_what_the_main_process_writes(track, clip, tmp_path, monkeypatch):
    """Frame by frame, before encoding: a clip composed by fit_clip while it fits equals
    the same frames composed afterwards by render_video from its results."""
    from core.pipelines.video import clips as clips_mod, compose

    written = {}

    class Recorder:
        def __init__(self, path, size, fps, **kw):
            self.path, self.frames_written = str(path), 0
            written[self.path] = []

        def write(self, frame):
            written[self.path].append(frame.copy())
            self.frames_written += 1

        def finish(self):
            pass

        def commit(self):
            open(self.path, "wb").close()

        def abort(self):
            pass

    monkeypatch.setattr(clips_mod, "VideoWriter", Recorder)
    job = _job(track, clip, tmp_path, worker=0, start=2, stop=9)  # frames 3 and 4: no face
    job.segment, job.frame_size, job.fps = str(tmp_path / "seg.mp4"), (track.width, track.height), track.fps
    res = V.fit_clip(job)
    arrays = np.load(clips_mod.segment_arrays_path(job.segment))
    assert arrays["frames"].tolist() == [2, 5, 6, 7, 8]
    session = job.session.build()
    merged = {"fitted": np.zeros(track.num_frames, bool), **{g: np.zeros((track.num_frames, res[g].shape[1]), np.float32)
                                                             for g in V.PER_FRAME_GROUPS}}
    merged["fitted"][2:9] = res["fitted"]
    for g in V.PER_FRAME_GROUPS:
        merged[g][2:9] = res[g]
    shape = V.ShapeResult(id=job.id, tex=job.tex, frames=[], losses={}, reused=False)
    main = Recorder(str(tmp_path / "main.mp4"), None, None)
    here = compose.render_video(session, clip, track, track.crop_boxes(0.3), shape, merged, main, False, span=(2, 9))
    assert len(written[job.segment]) == len(written[main.path]) == 7
    for x, y in zip(written[job.segment], written[main.path]):
        np.testing.assert_array_equal(x, y)
    assert sorted(here) == sorted(k for k in arrays if k != "cache_key") == ["frames", "landmarks", "nme"]
    for k in here:
        np.testing.assert_array_equal(arrays[k], here[k])


def test_a_prepared_reader_is_taken_once_by_the_job_reading_from_its_frame(track, clip, tmp_path):
    """A worker's reader opened and positioned before its job (clips.prepare_reader, sent
    by WorkerPool.prepare) is what the job's compose reads from when the video, frame and
    decoder threads match; once; nothing is kept for a video that cannot be read."""
    from core.io.video import VideoReader
    from core.pipelines.video import clips as K

    job = _job(track, clip, tmp_path, start=5, stop=10)
    threads = K.decoder_threads(job)
    K._PREPARED.clear()
    K.prepare_reader(str(tmp_path / "missing.mp4"), 5, None, threads)
    assert not K._PREPARED
    K.prepare_reader(clip, 5, track.timestamps, threads)
    prepared = K._PREPARED[(clip, 5, threads)]
    with K.open_reader(job, 4) as other:
        assert other is not prepared  # another frame: a reader of its own
    with K.open_reader(job, 5) as r:
        assert r is prepared and not K._PREPARED
        got = [f for _, f in r.frames(5, 8, track.timestamps)]
    with VideoReader(clip) as fresh:
        want = [f for _, f in fresh.frames(5, 8)]
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == 3
    with K.open_reader(job, 5) as again:
        assert again is not prepared


def test_composer_pastes_the_render_of_the_videos_identity_into_the_frame():
    """The composer renders with the video's identity and albedo computed once: the frames
    it writes are the model's full render (id and tex through the model) pasted back, and
    it pastes into the frames it was given."""
    import torch

    from core.landmarks.crop import paste_back
    from core.models.coeffs import Coeffs
    from core.pipelines.session import Session
    from core.pipelines.video.composer import Composer

    session = Session.create(make_face_model(600), get_preset("default"), tar_size=48, device="cpu",
                             renderer="builtin", progress=False)
    rng = np.random.default_rng(5)
    lay = session.model.layout
    id_, tex = rng.normal(0, 1, lay.n_id).astype(np.float32), rng.normal(0, 1, lay.n_tex).astype(np.float32)
    written = []

    class Recorder:
        def write(self, frame):
            written.append(frame)

    composer = Composer(session, id_, tex, None, Recorder(), batch=2)
    frames = [rng.integers(0, 255, (80, 100, 3), dtype=np.uint8) for _ in range(2)]
    given = [f.copy() for f in frames]
    coeffs = [{"exp": rng.normal(0, 0.5, lay.n_exp).astype(np.float32), "gamma": np.r_[0.5, np.zeros(26)].astype(np.float32),
               "angles": np.array([0.1 * k, -0.2, 0.05], np.float32), "trans": np.array([0, 0, 0], np.float32)}
              for k in range(2)]
    boxes = [np.array([20, 10, 70, 60]), np.array([30, 15, 90, 75])]
    for k in range(2):
        composer.add(k, given[k], coeffs[k], boxes[k], np.zeros((68, 2), np.float32))
    assert len(written) == 2 and all(w is g for w, g in zip(written, given))  # pasted in place
    c = Coeffs(id=torch.as_tensor(id_)[None].expand(2, -1), tex=torch.as_tensor(tex)[None].expand(2, -1),
               **{g: torch.as_tensor(np.stack([x[g] for x in coeffs])) for g in coeffs[0]})
    with torch.no_grad():
        rgba = session.fitter.render(c)[0].numpy()
    assert rgba[..., 3].mean() > 0.2  # the face covers the crops
    for k in range(2):
        want = paste_back(frames[k], np.clip(rgba[k, ..., :3], 0, 255).astype(np.uint8), rgba[k, ..., 3], boxes[k])
        assert not np.array_equal(want, frames[k])
        d = np.abs(written[k].astype(int) - want.astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())


def test_a_part_without_any_fitted_frame_gathers_with_meshes(tmp_path):
    """A clip whose frames all lack a face, composed with meshes: no rows, but rows of the
    model's vertex count, so its (empty) part gathers with the others."""
    from core.pipelines.session import Session
    from core.pipelines.video.composer import Composer, gather_parts

    session = Session.create(make_face_model(600), get_preset("default"), tar_size=48, device="cpu",
                             renderer="builtin", progress=False)
    written = []

    class Recorder:
        def write(self, frame):
            written.append(frame)

    composer = Composer(session, np.zeros(80, np.float32), np.zeros(80, np.float32), None, Recorder(), meshes=True)
    frame = np.zeros((40, 60, 3), np.uint8)
    for k in range(3):
        composer.add(5 + k, frame, None)
    composer.flush()
    part = composer.arrays()
    v = session.model.num_vertices
    assert len(written) == 3 and part["vertices"].shape == (0, v, 3) and part["landmarks"].shape == (0, 68, 2)
    meshes = np.full((3, v, 3), np.nan, np.float16)
    figures = gather_parts([part], 5, 3, meshes)
    assert figures["per_frame"] == {} and np.isnan(figures["landmarks"]).all()
    assert np.isnan(meshes.astype(np.float32)).all()


# --- frame ranges ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("100:", (100, None)), (":250", (0, 250)), ("3:7", (3, 7)),
                                           (" 0 : 1 ", (0, 1)), (":", (0, None))])
def test_parse_frame_range(text, expected):
    assert V.parse_frame_range(text) == expected


@pytest.mark.parametrize("text,message", [("abc", "is not START:STOP"), ("5", "is not START:STOP"),
                                          ("1:2:3", "is not START:STOP"), ("-1:5", "is not START:STOP"),
                                          ("", "is not START:STOP"), ("7:3", "START must be below STOP"),
                                          ("4:4", "START must be below STOP")])
def test_parse_frame_range_rejects(text, message):
    with pytest.raises(UserError) as e:
        V.parse_frame_range(text)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def range_run(tmp_path_factory, runs, clip, model_path):
    """The clip's frames 2..11 (with the blank frames 3 and 4) by 2 workers, on a copy of
    the runs' cache; then frames 5..11 on the same cache."""
    base = tmp_path_factory.mktemp("range")
    cache = _cache_copy(runs, base)
    out = {"cache": cache}
    for name, text, extra in (("a", "2:12", ["--nworkers", "2"]), ("b", "5:12", ["--nworkers", "1"])):
        res = str(base / name)
        rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", res, "--cache_folder", cache,
                                       "--model_path", model_path, "--frame_range", text] + FAST + extra)
        assert rc == 0
        out[name] = (res, _load(res, "talk"))
    return out


def test_frame_range_fits_and_composes_only_the_range(range_run, clip, model_path):
    res, (pkl, info) = range_run["a"]
    assert pkl["frame_range"] == info["frame_range"] == [2, 12] and pkl["num_frames"] == info["num_frames"] == 10
    assert sorted(pkl["fitting_res"]) == [2] + list(range(5, 12))  # source frame indices
    assert pkl["frames_without_face"] == info["frames_without_face"] == [3, 4]
    assert all(2 <= i < 12 for i in info["shape_frames"])
    assert not info["cache"]["landmarks_reused"]  # the whole video's landmarks are not the range's
    with VideoReader(os.path.join(res, "talk_recon_video.mp4")) as r:
        frames = [f for _, f in r.frames()]
    assert len(frames) == 10
    assert [k for k, f in enumerate(frames) if f.max() < 30] == [1, 2]  # source frames 3 and 4
    with VideoReader(clip) as r:
        src = dict(r.frames())
    for k, f in enumerate(frames):
        i = 2 + k
        if i in pkl["fitting_res"]:  # source frame i outside the face box, the render inside
            x0, y0, x1, y1 = (int(v) for v in pkl["fitting_res"][i]["bbox"])
            outside = np.ones(f.shape[:2], bool)
            outside[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = False
            diffs = [np.abs(f.astype(int) - src[j].astype(int)).mean(axis=2) for j in range(N_FRAMES)]
            # the source frame i, or one as close as it within the encoder's noise (the sample clip
            # repeats some frames: 5 and 6 differ by 0.1 levels; a frame one off elsewhere is 0.6+ worse)
            away = [d[outside].mean() for d in diffs]
            assert away[i] <= min(away) + 0.15, (k, away)
            assert diffs[i][outside].mean() < 3 and (diffs[i][~outside] > 40).mean() > 0.005, k
    tracked = np.load(os.path.join(range_run["cache"], "talk", "landmarks_2_12.npz"))["landmarks"]
    assert tracked.shape == (10, 68, 2)
    values = _check_landmark_nme(pkl, info, model_path, tracked, first=2)
    assert values.max() < 0.2, values


def test_frame_range_caches_key_on_the_range(range_run, runs):
    _, (pkl, info) = range_run["b"]
    assert sorted(pkl["fitting_res"]) == list(range(5, 12)) and pkl["frame_range"] == [5, 12]
    assert not info["cache"]["landmarks_reused"] and not info["cache"]["shape_reused"]
    assert info["clips_reused"] == 0 and info["frames_without_face"] == []
    files = sorted(os.listdir(os.path.join(range_run["cache"], "talk")))
    assert {"landmarks.npz", "landmarks_2_12.npz", "landmarks_5_12.npz", "shape.npz", "shape_2_12.npz",
            "shape_5_12.npz"} <= set(files)
    # The whole video's caches are untouched by the range runs.
    for name in ("landmarks.npz", "shape.npz"):
        with open(os.path.join(range_run["cache"], "talk", name), "rb") as a, \
                open(os.path.join(runs["cache"], "talk", name), "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("text,message", [
    ("abc", "--frame_range 'abc' is not START:STOP"), ("9:2", "START must be below STOP"),
    ("16:", "--frame_range 16: starts beyond the end of the video"),  # checked by seeking
    ("500:900", "--frame_range 500:900 starts beyond the end of the video"),  # by the frame count
])
def test_bad_frame_range_is_one_line_error(text, message, clip, model_path, tmp_path, capsys):
    res = tmp_path / "res"
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(res), "--cache_folder",
                                   str(tmp_path / "cache"), "--model_path", model_path, "--frame_range", text] + FAST)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not res.exists()


# --- one run per cache folder, CPU workers ------------------------------------------------

def test_a_second_run_on_the_same_cache_fails_at_once(runs, clip, model_path, tmp_path, monkeypatch, capsys):
    """While a run is fitting, a second run on its cache folder stops before doing
    anything, naming the first run's pid; the first run is unaffected."""
    cache = _cache_copy(runs, tmp_path)
    args = ["--v_path", clip, "--cache_folder", cache, "--model_path", model_path] + FAST
    calls, second = [], {}
    real_pass, real_shape = V.landmark_pass, V.fit_shape

    def counted_pass(*a, **kw):
        calls.append(1)
        return real_pass(*a, **kw)

    def shape_then_second_run(*a, **kw):
        second["rc"] = run_main(fit_video.main, args + ["--res_folder", str(tmp_path / "second")])
        second["landmark_passes"] = len(calls)
        return real_shape(*a, **kw)

    monkeypatch.setattr(video_run, "landmark_pass", counted_pass)
    monkeypatch.setattr(video_run, "fit_shape", shape_then_second_run)
    assert run_main(fit_video.main, args + ["--res_folder", str(tmp_path / "first")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    lock_dir = os.path.join(cache, "talk")
    assert second == {"rc": 2, "landmark_passes": 1}
    assert err[-1] == (f"error: another fit_video.py run (pid {os.getpid()}) is using the cache folder "
                       f"'{lock_dir}'; wait for it or pass another --cache_folder"), err
    assert not (tmp_path / "second").exists()  # not even created
    assert len(os.listdir(tmp_path / "first")) == 3


LOCK_HOLDER = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"{os.getpid()}\\n"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_the_cache_lock_dies_with_its_holder(runs, clip, model_path, tmp_path, capsys):
    cache = _cache_copy(runs, tmp_path)
    args = ["--v_path", clip, "--res_folder", str(tmp_path / "res"), "--cache_folder", cache,
            "--model_path", model_path] + FAST
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, os.path.join(cache, "talk", "run.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_main(fit_video.main, args) == 2
        assert f"another fit_video.py run (pid {holder.pid}) is using" in capsys.readouterr().err
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
        holder.stdout.close()
    assert run_main(fit_video.main, args) == 0


def test_cpu_oversubscription_message():
    assert V.cpu_oversubscription(2, 2) is None and V.cpu_oversubscription(1, 8) is None
    msg = V.cpu_oversubscription(3, 2)
    assert msg == ("--nworkers 3: the 3 CPU workers will compete for 2 core(s) (1 thread each); "
                   "fewer workers (at most 2) will be faster")
    assert "(2 threads each)" in V.cpu_oversubscription(5, 4, threads=2)
    # a fixed --threads per worker that adds up to more threads than cores
    assert V.cpu_oversubscription(2, 4, threads=2) is None
    assert V.cpu_oversubscription(2, 2, threads=2) == (
        "--threads 2 is per process: the 2 CPU workers run 4 threads on 2 core(s) and wait for each other's "
        "(several times slower); --threads 1, or no --threads, fits the cores")


@pytest.mark.parametrize("cores,warned", [(1, True), (4, False)])
def test_more_cpu_workers_than_cores_warns(cores, warned, runs, clip, model_path, tmp_path, monkeypatch, capsys):
    seen = []

    def stop(jobs, on_frame=None, **kw):
        seen.extend(jobs)
        raise UserError("stopped before fitting")

    monkeypatch.setattr(video_run, "cpu_count", lambda: cores)
    monkeypatch.setattr(video_run, "run_workers", stop)
    no_threads = [a for i, a in enumerate(FAST) if a != "--threads" and FAST[i - 1] != "--threads"]
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(tmp_path / "res"), "--cache_folder",
                                   _cache_copy(runs, tmp_path), "--model_path", model_path, "--nworkers", "3"]
                  + no_threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == "error: stopped before fitting"
    assert len(seen) == 3 and all(j.session.device == "cpu" for j in seen)
    assert [j.threads for j in seen] == [max(1, cores // 3)] * 3
    expected = V.cpu_oversubscription(3, cores)
    assert (expected in err) == warned and (expected is not None) == warned


# --- workers, resumption, failures ----------------------------------------------------------

@pytest.fixture(scope="module")
def track(clip) -> V.LandmarkTrack:
    from core.landmarks.detect import DlibDetector
    return V.landmark_pass(clip, DlibDetector(), progress=False)


def _job(track, clip, tmp_path, worker=0, start=0, stop=6, video=None) -> V.ClipJob:
    boxes = track.crop_boxes(0.3)
    cfg = get_preset("default").with_overrides(first_rf_iters=4, first_nrf_iters=2, rest_rf_iters=2,
                                               rest_nrf_iters=1)
    spec = SessionSpec(model=make_face_model(600), config=cfg, tar_size=48, renderer="builtin", device="cpu")
    return V.ClipJob(worker=worker, session=spec, video_path=video or clip, timestamps=track.timestamps,
                     fit_start=start, start=start, stop=stop, landmarks=track.landmarks[start:stop],
                     crop_boxes=boxes[start:stop], id=np.zeros(80, np.float32), tex=np.zeros(80, np.float32),
                     threads=1, cache_path=str(tmp_path / f"clip{worker}.npz"), key="k", checkpoint_s=0.0)


def test_session_spec_pickles_and_rebuilds_the_session():
    """What a worker receives: the session as a picklable spec, rebuilt on its device."""
    from core.pipelines.session import Session

    cfg = get_preset("default")
    session = Session.create(make_face_model(600), cfg, tar_size=48, device="cpu", renderer="builtin", progress=False)
    spec = pickle.loads(pickle.dumps(SessionSpec.of(session)))
    again = spec.build()
    assert (again.camera.image_size, again.renderer.backend, str(again.device)) == (48, session.renderer.backend, "cpu")
    assert again.fitter.cfg == cfg
    for (name, a), (_, b) in zip(sorted(session.model.named_buffers()), sorted(again.model.named_buffers())):
        assert torch.equal(a, b), name
    rest = again.fitter.following()
    assert rest.cfg == cfg.following_frames() and rest.model is again.model and rest.camera is again.camera


def _interrupted_tracker(detector, at_call: int):
    """A FaceTracker that raises KeyboardInterrupt on its ``at_call``-th update (1-based)."""
    from core.landmarks.tracking import FaceTracker

    class Interrupted(FaceTracker):
        calls = 0

        def update(self, image):
            Interrupted.calls += 1
            if Interrupted.calls == at_call:
                raise KeyboardInterrupt
            return super().update(image)

    return Interrupted(detector)


def test_interrupted_landmark_pass_resumes_exactly(clip, track, tmp_path):
    from core.landmarks.detect import DlibDetector

    det = DlibDetector()
    with pytest.raises(KeyboardInterrupt):
        V.landmark_pass(clip, det, str(tmp_path), progress=False, checkpoint_s=0.0,
                        tracker=_interrupted_tracker(det, 10))
    assert (tmp_path / "landmarks.partial.npz").exists() and not (tmp_path / "landmarks.npz").exists()
    assert np.load(tmp_path / "landmarks.partial.npz")["source"].shape == (9,)
    resumed = V.landmark_pass(clip, det, str(tmp_path), progress=False)
    assert not resumed.reused and (tmp_path / "landmarks.npz").exists()
    assert not (tmp_path / "landmarks.partial.npz").exists()
    np.testing.assert_array_equal(resumed.landmarks, track.landmarks)
    np.testing.assert_array_equal(resumed.source, track.source)
    np.testing.assert_array_equal(resumed.timestamps, track.timestamps)
    assert V.landmark_pass(clip, det, str(tmp_path), progress=False).reused


def test_interrupted_frame_range_pass_resumes_exactly(clip, track, tmp_path):
    """A landmark pass over frames 5..11 seeks to frame 5 and, as frame 5 is a fresh
    detection after the blank frames in the whole pass too, finds the same landmarks; an
    interruption resumes exactly; the range has its own cache file."""
    from core.landmarks.detect import DlibDetector

    det = DlibDetector()
    with pytest.raises(KeyboardInterrupt):
        V.landmark_pass(clip, det, str(tmp_path), progress=False, checkpoint_s=0.0,
                        tracker=_interrupted_tracker(det, 4), frame_range=(5, 12))
    assert np.load(tmp_path / "landmarks_5_12.partial.npz")["source"].shape == (3,)
    got = V.landmark_pass(clip, det, str(tmp_path), progress=False, frame_range=(5, 12))
    assert (got.start, got.stop, got.reused) == (5, 12, False)
    assert sorted(os.listdir(tmp_path)) == ["landmarks_5_12.npz"]
    np.testing.assert_array_equal(got.source, track.source[5:12])
    np.testing.assert_array_equal(got.timestamps, track.timestamps[5:12])
    np.testing.assert_allclose(got.landmarks, track.landmarks[5:12], atol=1e-4)
    again = V.landmark_pass(clip, det, str(tmp_path), progress=False, frame_range=(5, 12))
    assert again.reused and again.start == 5
    assert not V.landmark_pass(clip, det, str(tmp_path), progress=False, frame_range=(5, 11)).reused


def _interrupt_then_resume(job, after: int):
    """fit_clip stopped (KeyboardInterrupt) at its ``after``-th reported frame, which leaves
    its checkpoint and no result, then run again: (its result, the second run's FrameDone
    events)."""
    calls = []

    def stop(event):
        calls.append(event)
        if len(calls) == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        V.fit_clip(job, on_frame=stop)
    assert os.path.exists(job.partial_path) and not os.path.exists(job.cache_path)
    seen = []
    return V.fit_clip(job, on_frame=seen.append), seen


def test_interrupted_clip_resumes_exactly(track, clip, tmp_path):
    job = _job(track, clip, tmp_path, stop=8)
    whole = V.fit_clip(job)
    assert whole["fitted"].tolist() == [i not in BLANKS for i in range(8)]
    os.remove(job.cache_path)

    resumed, seen = _interrupt_then_resume(job, after=6)
    # The 5 frames already done are reported at once (restored), then 3 more.
    assert [(e.worker, e.frame, e.restored) for e in seen] == [(0, i, i < 5) for i in range(8)]
    assert [e.fitted for e in seen] == whole["fitted"].tolist()
    assert not os.path.exists(job.partial_path)
    for g in ("exp", "gamma", "angles", "trans"):
        np.testing.assert_array_equal(resumed[g], whole[g])


def test_clip_overlap_fades_the_clip_start(track, clip, tmp_path):
    """A clip started a few frames early (warm-up frames fitted and dropped) is closer to
    the one-worker result than a clip started cold at its first frame.

    Compared where the fit is determined: the model landmarks in the crop (the clip start
    shows there, and the overlap exists to remove it). The coefficients themselves are not
    a fair yardstick here: with these few iterations the depth / expression trade-off of a
    cold start persists for many frames whatever the warm-up, on either clip. Also exact:
    a warm-up reaching back to the one-worker clip's own start gives that clip's results
    (the warm-up frames are really fitted and carried over)."""
    model, cam = make_face_model(600), Camera(image_size=48)

    def landmarks(res, k):
        c = model.layout.zeros(1).replace(**{g: torch.as_tensor(res[g][k:k + 1]) for g in ("exp", "angles", "trans")})
        with torch.no_grad():
            return cam.project_points(model.landmarks_3d(c))[0].numpy()

    def clip_from(fit_start, worker):
        job = _job(track, clip, tmp_path, worker=worker, start=12, stop=16)
        job.fit_start, job.landmarks = fit_start, track.landmarks[fit_start:16]
        job.crop_boxes = track.crop_boxes(0.3)[fit_start:16]
        return V.fit_clip(job)

    ref = V.fit_clip(_job(track, clip, tmp_path, worker=0, start=5, stop=16))  # one worker from 5
    cold = V.fit_clip(_job(track, clip, tmp_path, worker=1, start=12, stop=16))
    warm = clip_from(8, worker=2)
    assert warm["frames"].tolist() == cold["frames"].tolist() == list(range(12, 16))
    whole = clip_from(5, worker=3)
    for g in V.PER_FRAME_GROUPS:
        np.testing.assert_array_equal(whole[g], ref[g][7:])
    d_cold = np.linalg.norm(landmarks(cold, 0) - landmarks(ref, 7), axis=1).mean()
    d_warm = np.linalg.norm(landmarks(warm, 0) - landmarks(ref, 7), axis=1).mean()
    assert d_warm < 0.5 * d_cold, (d_warm, d_cold)  # measured: 0.35 (../shared clip), 0.25 (photo clip)


def test_spawned_workers_report_every_kept_frame(track, clip, tmp_path):
    """run_workers' on_frame hook, in this process, for the frames of two worker processes."""
    jobs = [_job(track, clip, tmp_path, worker=0, stop=3), _job(track, clip, tmp_path, worker=1, start=5, stop=8)]
    jobs[1].fit_start, jobs[1].landmarks = 4, track.landmarks[4:8]  # frame 4 (no face): warm-up, not reported
    jobs[1].crop_boxes = track.crop_boxes(0.3)[4:8]
    events = []
    V.run_workers(jobs, on_frame=events.append, in_process=False)
    assert {w: [e.frame for e in events if e.worker == w] for w in (0, 1)} == {0: [0, 1, 2], 1: [5, 6, 7]}
    assert all(e.fitted and not e.restored for e in events)
    for w in (0, 1):
        times = [e.time for e in events if e.worker == w]
        assert times == sorted(times)


def test_a_pool_started_ahead_runs_the_jobs_and_ends_its_idle_process(track, clip, tmp_path):
    """Worker processes started before their jobs (as run_video does before the landmark
    pass), asked to open their readers ahead: two of the three get a job and fit it exactly
    as in this process; the idle one ends when the pool closes, on its own (exit status 0,
    not terminated)."""
    jobs = [_job(track, clip, tmp_path, worker=0, stop=3), _job(track, clip, tmp_path, worker=1, start=5, stop=7)]
    events = []
    with V.WorkerPool(3) as pool:
        pool.wait_started()
        procs = list(pool._procs)
        # readers opened ahead where the jobs start reading (the third for a video that is not there)
        pool.prepare([(clip, 0, track.timestamps, 1), (clip, 5, track.timestamps, 1),
                      (str(tmp_path / "gone.mp4"), 3, track.timestamps, 1)])
        V.run_workers(jobs, on_frame=events.append, pool=pool)
        assert sorted(p.exitcode for p in procs[:2]) == [0, 0] and procs[2].is_alive()
    assert procs[2].exitcode == 0
    assert [(e.worker, e.frame) for e in events if e.worker == 0] == [(0, 0), (0, 1), (0, 2)]
    assert [(e.worker, e.frame) for e in events if e.worker == 1] == [(1, 5), (1, 6)]
    for job in jobs:
        pooled = dict(np.load(job.cache_path))
        here = V.fit_clip(dataclasses.replace(job, cache_path=str(tmp_path / f"again{job.worker}.npz")))
        for g in ("fitted",) + V.PER_FRAME_GROUPS:
            np.testing.assert_array_equal(pooled[g], here[g])


def test_ctrl_c_reaches_an_idle_pool_process_without_a_traceback(capfd):
    """Ctrl-C in a terminal signals the whole process group: a worker started ahead and
    still waiting for its job (during the landmark pass) ends without printing a
    KeyboardInterrupt traceback (the main process reports "error: interrupted")."""
    with V.WorkerPool(1) as pool:
        pool.wait_started()
        proc = pool._procs[0]
        time.sleep(0.5)  # waiting in inbox.get()
        os.kill(proc.pid, signal.SIGINT)
        proc.join(timeout=60)
        assert proc.exitcode == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_pool_process_ignores_ctrl_c_when_the_main_process_does(tmp_path):
    """Started where SIGINT is ignored (nohup, a script's background job), the main process
    does not stop on a SIGINT to the group; its workers do not either (else the run fails
    with a worker reported killed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {root!r})
signal.signal(signal.SIGINT, signal.SIG_IGN)
from core.pipelines.video.workers import WorkerPool
with WorkerPool(1) as pool:
    pool.wait_started()
    proc = pool._procs[0]
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(1.0)
    print("alive" if proc.is_alive() else f"ended {{proc.exitcode}}")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "alive", res.stdout + res.stderr


def test_ctrl_c_while_the_forkserver_imports_prints_no_traceback(tmp_path):
    """The pool's forkserver imports torch and this project before it serves (about a
    second, during the landmark pass); a Ctrl-C then (the terminal signals the whole
    process group) is ignored there, as it is once the server serves: no traceback, and
    the pool still starts its worker."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {root!r})
from multiprocessing import forkserver
from core.pipelines.video.workers import WorkerPool
pool = WorkerPool(1)
t0 = time.time()
while forkserver._forkserver._forkserver_pid is None and time.time() - t0 < 60:
    time.sleep(0.001)
time.sleep(0.3)  # its interpreter has started and imports the preloaded modules (torch: a second)
os.kill(forkserver._forkserver._forkserver_pid, signal.SIGINT)
pool.wait_started()
proc = pool._procs[0]
pool.close()
print("worker", proc.exitcode)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "worker 0"
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("size", ["small", "larger than a pipe's buffer"])
def test_a_pool_process_lost_before_its_job_is_a_one_line_failure(track, clip, tmp_path, size):
    """A worker process gone before its job arrives: one-line failure, and no hang however
    large the job (the real ones carry their clip's crops: megabytes, which nobody reads)."""
    with V.WorkerPool(2) as pool:
        pool.wait_started()
        pool._procs[1].kill()
        pool._procs[1].join()
        jobs = [_job(track, clip, tmp_path, worker=0, stop=2), _job(track, clip, tmp_path, worker=1, start=2, stop=4)]
        if size != "small":
            jobs[1].crops = np.zeros((2, 256, 256, 3), np.uint8)  # 384 KB; a pipe holds 64 KB
        outcome = []

        def run():
            try:
                V.run_workers(jobs, pool=pool)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 (asserted below)
                outcome.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(timeout=120)
        assert not t.is_alive(), "run_workers hung on the lost process's job"
        assert isinstance(outcome[0], UserError), outcome
        assert re.match(r"^worker 1 failed: the process exited with code -9 \(killed", str(outcome[0]))
        assert not pool._procs[0].is_alive()  # the other one was stopped


def test_failing_worker_stops_the_run(track, clip, tmp_path):
    good = _job(track, clip, tmp_path, worker=0, stop=2)
    bad = _job(track, clip, tmp_path, worker=1, start=2, stop=4, video=str(tmp_path / "gone.mp4"))
    with pytest.raises(UserError, match=r"^worker 1 failed: video '.*gone\.mp4' not found$"):
        V.run_workers([good, bad])
    assert not os.path.exists(bad.cache_path)


@pytest.mark.parametrize("where", ["after", "while fitting"])
def test_encoder_failure_is_an_error_and_leaves_nothing(runs, clip, model_path, tmp_path, where):
    """The composed video cannot be written (a file-size limit: a full disk), composed
    after the fitting (all clips cached) or by the workers while they fit: fit_video.py
    exits 2 with one error line, ffmpeg's own messages stay hidden, and the output folder
    is left empty (no pkl, info, video or temporary file)."""
    limit = 12 * 1024  # the pkl and info would fit; the video (checked below) does not
    assert os.path.getsize(os.path.join(runs["w1"][0], "talk_recon_video.mp4")) > 4 * limit
    res = tmp_path / "res"
    cache = _cache_copy(runs, tmp_path)
    if where != "after":  # the clips are fitted again (their cache files stay under the limit)
        for c in glob.glob(os.path.join(cache, "talk", "clip_*.npz")):
            os.remove(c)
    cmd = [sys.executable, str(REPO / "fit_video.py"), "--v_path", clip, "--res_folder", str(res), "--cache_folder",
           cache, "--model_path", model_path, "--nworkers", "1"] + FAST

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, preexec_fn=limited, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert all(ln.startswith(f"{len(BLANKS)} of {N_FRAMES} frames have no face") for ln in lines[:-1]), lines
    video = r"talk_recon_video\.mp4" if where == "after" else r"clip_0000000_0000016\.mp4"  # (the worker's part)
    assert re.fullmatch(r"error: (worker 0 failed: )?writing the video '.*" + video + "' failed: .*File too large.*",
                        errors[0]), errors[0]
    assert not os.path.exists(res) or os.listdir(res) == []
    assert not glob.glob(os.path.join(cache, "talk", "compose_*"))


def test_full_shared_memory_is_one_line(runs, clip, model_path, tmp_path):
    """Worker processes get the face model through shared memory files: when those cannot
    be written (a full /dev/shm; here a file-size limit), one line and exit 2."""
    cache = _cache_copy(runs, tmp_path)
    for c in glob.glob(os.path.join(cache, "talk", "clip_*.npz")):
        os.remove(c)
    cmd = [sys.executable, str(REPO / "fit_video.py"), "--v_path", clip, "--res_folder", str(tmp_path / "res"),
           "--cache_folder", cache, "--model_path", model_path, "--nworkers", "2"] + FAST

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (12 * 1024, 12 * 1024))

    proc = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, preexec_fn=limited, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and re.fullmatch(r"error: cannot hand the jobs to the worker processes through "
                                                 r"shared memory \(.+\): free space in /dev/shm, or use "
                                                 r"--nworkers 1", lines[-1]), proc.stderr


def _proc_stat(pid: int):
    """(parent pid, state, start time) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], fields[19]


def _workers_of(pid: int) -> list:
    """The worker processes below ``pid``: its children started by multiprocessing
    (spawn) and those of its forkserver (the server itself included: it has the same
    command line as the workers it forks)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _proc_stat(int(d))):
            parents[int(d)] = st[0]
    below, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        below += kids
        todo += kids
    out = []
    for p in below:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"multiprocessing" in f.read():
                    out.append(p)
        except OSError:
            pass
    return out


def _has_open(pid: int, path: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_workers_end_with_the_main_process(runs, clip, model_path, tmp_path):
    """SIGKILL of fit_video.py (no clean-up runs there) ends its worker processes (and the
    forkserver that started them) at once, in the middle of their clips (long ones: 2000
    Adam iterations per frame)."""
    cache = tmp_path / "cache" / "talk"
    cache.mkdir(parents=True)
    shutil.copy(os.path.join(runs["cache"], "talk", "landmarks.npz"), cache)
    cmd = [sys.executable, str(REPO / "fit_video.py"), "--v_path", clip, "--res_folder", str(tmp_path / "res"),
           "--cache_folder", str(tmp_path / "cache"), "--model_path", model_path, "--device", "cpu", "--threads", "1",
           "--lm_detector", "dlib", "--quiet", "--tar_size", "64", "--nframes_shape", "3", "--preset", "original",
           "--first_rf_iters", "6", "--first_nrf_iters", "3", "--rest_rf_iters", "2000", "--rest_nrf_iters", "2000",
           "--nworkers", "2", "--clip_overlap", "0"]
    main = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    video = os.path.realpath(clip)
    workers = []
    try:
        deadline = time.monotonic() + 180
        while True:  # both workers started and fitting (they have the video open)
            assert main.poll() is None, f"fit_video.py ended early with status {main.returncode}"
            workers = [p for p in _workers_of(main.pid) if _has_open(p, video)]
            if len(workers) == 2:
                break
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        workers = sorted(set(workers) | set(_workers_of(main.pid)))  # and the forkserver, if any
        started = {p: _proc_stat(p)[2] for p in workers}
        main.kill()
        main.wait()
        t0 = time.monotonic()

        def running():  # still there and not a zombie (the same process: its start time)
            return [p for p in workers if (st := _proc_stat(p)) and st[1] != "Z" and st[2] == started[p]]

        while running() and time.monotonic() - t0 < 3.0:
            time.sleep(0.05)
        assert running() == [], "workers outlived the main process"
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
        for p in workers:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def test_no_half_written_outputs_when_a_worker_fails(clip, model_path, tmp_path, monkeypatch, capsys):
    def boom(jobs, on_frame=None, **kw):
        raise UserError("worker 1 failed: simulated")

    monkeypatch.setattr(video_run, "run_workers", boom)
    res = tmp_path / "res"
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(res), "--cache_folder",
                                   str(tmp_path / "cache"), "--model_path", model_path] + FAST)
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: worker 1 failed: simulated"
    assert not os.path.exists(res) or os.listdir(res) == []


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
                "no_face": "no face found in any of the 3 frames", "unwritable": "--res_folder",
                "unwritable_cache": "--cache_folder"}[kind]
    if kind.startswith("unwritable"):
        assert "not writable" in err[0]
    assert expected in err[0]
    assert not os.path.exists(res) or os.listdir(res) == []


def test_presets_and_defaults():
    """--preset original is the original schedule (one learning rate everywhere, first/rest
    iterations 1000/500 and 50/30); the fast preset refines warm-started frames gently."""
    from core.pipelines import cli
    from core.fit.config import PRESETS

    p = fit_video.build_parser()
    args = p.parse_args(["--v_path", "x.mp4", "--res_folder", "r", "--preset", "original"])
    cfg = cli.fit_config_from_args(args)
    assert cfg == PRESETS["original"]
    assert (cfg.first_rf_iters, cfg.first_nrf_iters, cfg.rest_rf_iters, cfg.rest_nrf_iters) == (1000, 500, 50, 30)
    opts = fit_video.video_options(args)
    assert cfg.rest_nrf_lr is None  # = nrf_lr
    assert (opts.nframes_shape, opts.nworkers, opts.ngpus, opts.cache_folder) == (None, 1, 1, "fitting_cache")
    assert cfg.shape_frames == 16 and PRESETS["default"].shape_frames == 8   # None: the preset's
    # The flags' defaults are the library's, but for the cache folder, which only the script puts in the
    # working directory (the library's default is a temporary folder).
    assert opts == dataclasses.replace(V.VideoOptions(), cache_folder=fit_video.CACHE_FOLDER)
    assert V.VideoOptions().cache_folder is None
    fast = cli.fit_config_from_args(p.parse_args(["--v_path", "x", "--res_folder", "r"]))
    assert fast.rest_nrf_lr == PRESETS["default"].rest_nrf_lr
    given = p.parse_args(["--v_path", "x", "--res_folder", "r", "--rest_nrf_lr", "0.02", "--rest_nrf_iters", "7",
                          "--cache_folder", ""])
    assert cli.fit_config_from_args(given).rest_nrf_lr == 0.02 and fit_video.video_options(given).cache_folder is None
    assert cli.fit_config_from_args(given).rest_nrf_iters == 7


def test_identity_frames_and_settings_come_from_the_preset():
    """--nframes_shape unset: the preset's (original 16, SPEC; default 8, at 64 px without
    full-size steps); given: as given. The identity fit's settings are shape_stage()'s."""
    from core.fit.config import PRESETS
    from core.pipelines.video.options import resolve_options

    assert resolve_options(V.VideoOptions(), PRESETS["original"]).nframes_shape == 16
    assert resolve_options(V.VideoOptions(), PRESETS["default"]).nframes_shape == 8
    assert resolve_options(V.VideoOptions(nframes_shape=5), PRESETS["default"]).nframes_shape == 5
    # The landmark track's smoothing: off in the original, 5 frames by default, as given.
    assert resolve_options(V.VideoOptions(), PRESETS["original"]).lm_smooth == 0
    assert resolve_options(V.VideoOptions(), PRESETS["default"]).lm_smooth == 5
    assert resolve_options(V.VideoOptions(lm_smooth=0), PRESETS["default"]).lm_smooth == 0
    shape = PRESETS["default"].shape_stage()
    assert (shape.coarse_size, shape.fine_iters) == (64, 0)
    assert PRESETS["original"].shape_stage() == PRESETS["original"]


@pytest.mark.parametrize("flag", ["--nworkers", "--ngpus", "--nframes_shape", "--threads"])
def test_bad_counts(flag, clip, capsys):
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", "x", flag, "0"])
    assert rc == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["4", "1"])
def test_bad_smoothing_window(value, clip, tmp_path, capsys):
    rc = run_main(fit_video.main, ["--v_path", clip, "--res_folder", str(tmp_path / "r"), "--lm_smooth", value])
    err = capsys.readouterr().err
    assert rc == 2 and "--lm_smooth must be 0 (off) or an odd number" in err and "Traceback" not in err


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
    from core.landmarks.crop import crop_to_photo

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


def test_the_landmark_pass_keeps_the_planned_identity_frames(clip, tmp_path):
    """The frames the identity fit will use (every frame with a face) are kept decoded by
    the landmark pass, equal to what seeking back to them reads; a reused pass keeps none."""
    from core.landmarks.detect import make_detector
    from core.pipelines.video.shape import planned_shape_frames, read_frames
    plan = planned_shape_frames(N_FRAMES, 0, 4)
    assert plan == [2, 6, 10, 14]
    det = make_detector("dlib")
    track = V.landmark_pass(clip, det, str(tmp_path), progress=False, keep=plan)
    assert sorted(track.frames) == plan
    again = read_frames(clip, plan, track.source_timestamps())
    for i in plan:
        assert np.array_equal(track.frames[i], again[i])
    assert V.landmark_pass(clip, det, str(tmp_path), progress=False, keep=plan).frames == {}
