"""Video rows: steady-state frames per second and per-frame landmark NME on a real clip,
with 1 and 2 worker processes, through the video pipeline (``core.pipelines.video.run_video``, what
``fit_video.py`` runs).

The clip is cut from a real video (``../shared/data/sample_video.mp4``) and downscaled
(:func:`make_clip`). Every run uses one cache folder, so the landmark pass runs once and
each schedule fits identity and albedo once (on its first run); those stages are reported
as their own rows, never inside the fps.

Steady-state fps: each worker's kept frames are timestamped as they finish; a worker's
rate is (its frames after its first kept frame) / (the time they took), and the rows show
the sum over the workers. So the rate excludes process start-up, each clip's first frame
(fitted with the ``first_*`` iterations) and the ``clip_overlap`` warm-up frames; the
"fitting stage" row includes them (kept frames / wall time of the whole stage).
The timestamps come from the pipeline's own per-frame hook: ``run_video(...,
on_frame=FrameClock())`` receives each kept frame's worker and finish time (taken in the
worker process) in this process.

Per-frame NME: the pipeline's ``<video>_fitting_res.pkl`` is read back, each frame's model
landmarks are projected into its crop and mapped through its ``bbox`` into the frame, and
compared with the landmark pass's landmarks (:func:`bench.common.nme_interocular`).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import time
from dataclasses import fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from core import defaults
from core.fit.config import FitConfig
from core.landmarks.crop import crop_to_photo, photo_to_crop
from core.pipelines.session import Session

from .common import Row, median, nme_interocular
from .rows_synthetic import model_landmarks

log = logging.getLogger("bench")

SECTION = "video"


def video_pipeline():
    """The ``core.pipelines.video`` module, or None when the video pipeline is not available."""
    try:
        import core.pipelines.video as video
    except ImportError as e:
        log.warning("video pipeline not available: %s", e)
        return None
    if not hasattr(video, "run_video"):
        log.warning("video pipeline not available: core.pipelines.video has no run_video")
        return None
    return video


# --- the clip ---------------------------------------------------------------------------------

def make_clip(src: str, dst: str, start: int, frames: int, width: int) -> Dict[str, object]:
    """Write frames [start, start + frames) of ``src``, resized to ``width`` pixels wide
    (aspect kept, even sizes), to ``dst`` (MPEG-4 Part 2, lossless enough for landmarks)."""
    import cv2

    cap = cv2.VideoCapture(src)
    if not cap.isOpened():
        raise RuntimeError(f"cannot open video '{src}'")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    cap.set(cv2.CAP_PROP_POS_FRAMES, start)
    writer, size, n = None, None, 0
    try:
        while n < frames:
            ok, frame = cap.read()
            if not ok:
                break
            if size is None:
                h, w = frame.shape[:2]
                scale = min(1.0, width / w)
                size = (int(round(w * scale / 2)) * 2, int(round(h * scale / 2)) * 2)
                writer = cv2.VideoWriter(dst, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                if not writer.isOpened():
                    raise RuntimeError(f"cannot write '{dst}' (OpenCV has no mp4v encoder?)")
            writer.write(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
            n += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if n == 0:
        raise RuntimeError(f"no frames read from '{src}' at frame {start}")
    return {"source": src, "start": start, "frames": n, "size": list(size), "fps": fps}


# --- per-worker clocks ---------------------------------------------------------------------

class FrameClock:
    """``run_video``'s ``on_frame`` callback that keeps the finish time of every kept frame
    per worker: ``ticks`` = {worker: [time.time() seconds, ...]} (frames restored from a
    checkpoint, which were not fitted in this run, are left out)."""

    def __init__(self) -> None:
        self.ticks: Dict[int, List[float]] = {}

    def __call__(self, event) -> None:
        if not event.restored:
            self.ticks.setdefault(int(event.worker), []).append(float(event.time))

    def per_worker(self) -> Dict[int, List[float]]:
        """{worker: its finish times, sorted}."""
        return {w: sorted(t) for w, t in sorted(self.ticks.items())}


def steady_fps(ticks: Mapping[int, Sequence[float]]) -> Optional[float]:
    """Sum over workers of (frames after the first) / (last - first finish time); None
    when some worker has fewer than two timestamps."""
    if not ticks:
        return None
    total = 0.0
    for times in ticks.values():
        if len(times) < 2 or times[-1] <= times[0]:
            return None
        total += (len(times) - 1) / (times[-1] - times[0])
    return total


# --- NME from the outputs ----------------------------------------------------------------

def per_frame_nme(session: Session, pkl: dict, landmarks: np.ndarray) -> Dict[int, float]:
    """Frame -> NME of the fitted model (pkl) against ``landmarks`` (N, 68, 2), frame pixels."""
    fitter, model = session.fitter, session.model
    dev, dt = session.device, fitter.dtype
    tar = int(pkl.get("tar_size", session.camera.image_size))
    out = {}

    def t(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64)[None], dtype=dt, device=dev)

    for frame, r in sorted(pkl["fitting_res"].items()):
        q = np.asarray(landmarks[frame], dtype=np.float64)
        if not np.all(np.isfinite(q)):
            continue
        box = np.asarray(r["bbox"]).astype(np.int64)
        c = model.layout.zeros(1, dtype=dt, device=dev).replace(
            id=t(pkl["id"]), tex=t(pkl["tex"]), exp=t(r["exp"]), gamma=t(r["gamma"]), angles=t(r["rot"]),
            trans=t(r["trans"]))
        target = t(photo_to_crop(q, box, tar))
        p = model_landmarks(fitter, c, target)[0].cpu().numpy()
        out[int(frame)] = nme_interocular(crop_to_photo(p, box, tar), q)
    return out


# --- the rows -----------------------------------------------------------------------------

def _options(video, **kw):
    names = {f.name for f in fields(video.VideoOptions)}
    return video.VideoOptions(**{k: v for k, v in kw.items() if k in names})


def unavailable_rows(reason: str) -> List[Row]:
    return [Row(SECTION, metric, better=better, missing=reason, note=reason)
            for metric, better in (("steady-state fps, 1 worker", "higher"), ("steady-state fps, 2 workers", "higher"),
                                   ("per-frame landmark NME (%), 1 worker", "lower"))]


def video_rows(model, presets: Mapping[str, FitConfig], device, detector, clip: str, clip_desc: str,
               workers: Sequence[int] = (1, 2), nframes_shape: Optional[int] = None,
               clip_overlap: Optional[int] = None, renderer: str = defaults.RENDERER, tar_size: int = defaults.TAR_SIZE,
               work_dir: Optional[str] = None, threads: Optional[int] = None) -> Tuple[List[Row], Dict[str, object]]:
    """The video rows; ``nframes_shape`` None: each preset's own (``FitConfig.shape_frames``);
    ``clip_overlap`` None: the pipeline's default (``VideoOptions``)."""
    video = video_pipeline()
    if video is None:
        return unavailable_rows("video pipeline not available"), {"available": False}
    defaults = video.VideoOptions()
    clip_overlap = defaults.clip_overlap if clip_overlap is None else clip_overlap
    own_tmp = None
    if work_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="bench_video_")
        work_dir = own_tmp.name
    try:
        return _video_rows(video, model, presets, device, detector, clip, clip_desc, workers, nframes_shape,
                           clip_overlap, renderer, tar_size, work_dir, threads)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def _video_rows(video, model, presets, device, detector, clip, clip_desc, workers, nframes_shape, clip_overlap,
                renderer, tar_size, work_dir, threads):
    cache = os.path.join(work_dir, "cache")
    session_args = dict(model=model, tar_size=tar_size, device=str(device), renderer=renderer, progress=False)
    sessions = {name: Session.create(config=cfg, **session_args) for name, cfg in presets.items()}
    runs: Dict[str, Dict[int, dict]] = {name: {} for name in presets}
    clocked_all = True
    for w in workers:
        for name, session in sessions.items():
            log.info("video: %s, %d worker(s)", name, w)
            out_dir = os.path.join(work_dir, f"out_{name}_{w}")
            os.makedirs(out_dir)
            opts = _options(video, nframes_shape=nframes_shape, nworkers=w, ngpus=1, clip_overlap=clip_overlap,
                            cache_folder=cache, keep_audio=False, checkpoint_s=1e9, threads=threads)
            torch_threads = torch.get_num_threads()
            clock = FrameClock()
            t0 = time.perf_counter()
            try:
                report = video.run_video(session, detector, clip, out_dir, opts, progress=False, on_frame=clock)
            finally:
                torch.set_num_threads(torch_threads)  # the pipeline may set this process's threads
            wall = time.perf_counter() - t0
            ticks = clock.per_worker()
            fps = steady_fps(ticks)
            clocked_all &= fps is not None
            tm = dict(report.timings)
            with open(report.files["pkl"], "rb") as f:
                pkl = pickle.load(f)
            runs[name][w] = {"timings": tm, "wall_s": wall, "steady_fps": fps,
                             "stage_fps": tm.get("fit_frames", 0) / tm["fit_s"] if tm.get("fit_s") else None,
                             "ticks": {k: len(v) for k, v in ticks.items()}, "pkl": pkl,
                             "info_nme": report.info.get("landmark_nme_interocular")}
    # The landmark pass is cached: read it back once for the NME.
    stem = os.path.splitext(os.path.basename(clip))[0]
    track = video.landmark_pass(clip, detector, cache_dir=os.path.join(cache, stem), progress=False)
    for name, per_w in runs.items():
        for w, run in per_w.items():
            nme = per_frame_nme(sessions[name], run.pop("pkl"), track.landmarks)
            run["nme"] = nme
    first = min(workers)
    # Only the first run really ran the landmark pass (the others read its cache).
    lm_s = max((r["timings"].get("landmarks_s", 0.0) for per_w in runs.values() for r in per_w.values()), default=0.0)
    lm_s = lm_s or None
    n_frames = track.num_frames

    def val(name, w, key):
        return runs[name][w][key] if w in runs.get(name, {}) else None

    def nme(name, w):
        per_frame = val(name, w, "nme")
        return None if per_frame is None else _pct(median(list(per_frame.values())))

    rows = []
    steady_note = ("sum over workers of each one's kept frames after its first / their time; excludes the landmark "
                   "pass, identity/albedo fit, process start-up, each clip's first frame and overlap warm-up")
    for w in workers:
        if clocked_all:
            rows.append(Row(SECTION, f"steady-state fps, {w} worker{'s' if w > 1 else ''}",
                            val("original", w, "steady_fps"), val("default", w, "steady_fps"), "higher",
                            note=f"{clip_desc}; " + steady_note if w == first else steady_note))
        rows.append(Row(SECTION, f"fitting-stage fps, {w} worker{'s' if w > 1 else ''}",
                        val("original", w, "stage_fps"), val("default", w, "stage_fps"), "higher",
                        note=("kept frames / wall time of the whole per-frame stage (worker start-up, first frames "
                              "and clip_overlap included)"
                              + ("" if clocked_all else "; no steady-state rate: a worker finished fewer than two "
                                                        "kept frames"))))
    for w in workers:
        rows.append(Row(SECTION, f"per-frame landmark NME (%), {w} worker{'s' if w > 1 else ''}",
                        nme("original", w), nme("default", w), "lower",
                        note="median over frames; the photo rows' NME, from the pkl through each frame's bbox vs "
                             "the landmark pass"))
    rows.append(Row(SECTION, "identity/albedo fit (s, once per schedule)",
                    _shape_s(runs.get("original", {})), _shape_s(runs.get("default", {})), "lower",
                    note=f"nframes_shape {nframes_shape or 'from the preset'}, batched; not in the fps"
                         + (f"; landmark pass {n_frames / lm_s:.1f} fps (both schedules share it)" if lm_s else "")))
    details = {"available": True, "clip": clip_desc, "frames": n_frames, "workers": list(workers),
               "nframes_shape": nframes_shape, "clip_overlap": clip_overlap, "landmarks_s": lm_s,
               "runs": runs}
    return rows, json.loads(json.dumps(details, default=_json_default))


def _shape_s(per_w: Dict[int, dict]) -> Optional[float]:
    vals = [r["timings"].get("shape_s") for r in per_w.values() if r["timings"].get("shape_s", 0) > 0]
    return max(vals) if vals else None


def _pct(v):
    return None if v is None else 100.0 * v


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
