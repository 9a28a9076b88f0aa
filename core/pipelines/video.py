"""The video pipeline (SPEC §5): landmarks, shared identity/albedo, per-frame fits in
worker processes, merged results and a composed video.

Stages (each with a tqdm bar, each cached under ``<cache_folder>/<video name>/``):

1. :func:`landmark_pass`: one streaming pass over the video with a
   :class:`~core.landmarks.tracking.FaceTracker`: 68 landmarks and a face box per frame, or "no
   face". Cached in ``landmarks.npz`` (checkpointed while it runs) under a key of the
   video's path, size and modification time and the detector.
2. :func:`fit_shape`: identity and albedo from ``nframes_shape`` face frames spread over
   the whole video, one batched fit with id/tex shared by all frames (stored with batch 1,
   see :func:`core.fit.fitter.expand`) and per-frame exp/gamma/pose.
3. :func:`fit_clip`, run by :func:`run_workers` in ``nworkers`` processes
   (torch.multiprocessing, spawn), each on a contiguous clip from :func:`split_clips`:
   id/tex fixed, every frame warm-started from the previous frame's fit (its pose carried
   into the new crop by :func:`transfer_pose`) and its pose pulled towards it (SPEC §4
   note), the first frame of a clip and the first after a frame without a face with the
   ``first_*`` iteration counts, the others with ``rest_*``. A clip after the first starts
   ``clip_overlap`` frames early and drops those frames, so the clip-start effect has faded
   by its first kept frame and the result hardly depends on the worker count. Each clip is
   checkpointed; an interrupted run resumes where it stopped, exactly.
4. Merge and write ``<video>_fitting_res.pkl`` (the original layout plus ``bbox`` per frame
   and ``tar_size``, ``fps``, ``frames_without_face``, ``num_frames``),
   ``<video>_recon_video.mp4`` (every source frame, the render pasted on the frames that
   have a fit) and ``<video>_info.json`` (with each frame's landmark NME as
   :func:`core.landmarks.metrics.landmark_nme` defines it for photos), all three renamed into place
   only at the end, the video only once it reads back complete.

``VideoOptions.frame_range`` restricts every stage to source frames [start, stop): the
landmark pass seeks to start, caches are keyed (and named) by the range, frame indices in
the outputs stay source indices. One run at a time uses a cache folder
(:func:`cache_lock`); worker processes end with the main process however it ends
(:func:`_die_with_parent`).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import pickle
import queue as queue_mod
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from core.io.atomic import atomic_path
from core.render.camera import Camera
from core.models.coeffs import Coeffs
from core.fit.config import FitConfig
from core.landmarks.crop import crop_face, crop_to_photo, paste_back, photo_to_crop, square_box
from core.errors import UserError
from core.fit.fitter import Fitter, PoseRef
from core.models.face_model import FaceModel
from .session import Session
from core.landmarks.metrics import landmark_nme
from core.io.outputs import check_writable_folder
from core import threads as thread_control
from core.landmarks.tracking import SOURCE_NONE, FaceTracker
from core.io.video import VideoReader, VideoWriter

log = logging.getLogger(__name__)

__all__ = ["VideoOptions", "LandmarkTrack", "ShapeResult", "ClipJob", "VideoReport", "split_clips",
           "select_shape_frames", "transfer_pose", "landmark_pass", "fit_shape", "fit_clip", "run_workers",
           "run_video", "output_names", "threads_per_worker", "cpu_oversubscription", "parse_frame_range",
           "check_frame_range", "cache_lock"]

PER_FRAME_GROUPS = ("exp", "gamma", "angles", "trans")
CACHE_VERSION = 1



# --- settings and results ---------------------------------------------------------------

@dataclass(frozen=True)
class VideoOptions:
    """Settings of a video run beyond the fit configuration.

    nframes_shape: frames used for identity and albedo. nworkers: fitting processes.
    ngpus: GPUs used round-robin by the workers when the session runs on CUDA.
    clip_overlap: warm-up frames before each clip after the first (0: the original).
    cache_folder: where stages are cached (None: a temporary folder, removed afterwards).
    padding_ratio: face box enlargement for the crop. checkpoint_s: seconds between
    checkpoints of a running stage. keep_audio: copy the source audio into the video.
    threads: torch CPU threads of each process (this one for the shape fit and the
    rendering, and each worker); None: all cores here, cores // nworkers per worker.
    frame_range: (start, stop) 0-based source frame indices, stop exclusive or None for
    the end of the video; only those frames are read, fitted and composed (None: all).
    """

    nframes_shape: int = 16
    nworkers: int = 1
    ngpus: int = 1
    clip_overlap: int = 8
    cache_folder: Optional[str] = "fitting_cache"
    padding_ratio: float = 0.3
    checkpoint_s: float = 30.0
    keep_audio: bool = True
    threads: Optional[int] = None
    frame_range: Optional[Tuple[int, Optional[int]]] = None


@dataclass
class LandmarkTrack:
    """Per-frame results of the landmark pass (N frames: source frames start..start+N-1).

    Arrays are indexed by the position in the pass (0..N-1); source frame index =
    ``start`` + position (``start`` > 0 for a frame range).

    landmarks: (N, 68, 2) float32 photo pixels, NaN where no face.
    face_boxes: (N, 4) float64 detector-style face boxes, NaN where no face.
    source: (N,) int8, core.landmarks.tracking.SOURCE_* (0 = no face).
    timestamps: (N,) float64 ms, the decoder's timestamp of each frame (seek checks).
    fps, width, height: of the source video.
    """

    landmarks: np.ndarray
    face_boxes: np.ndarray
    source: np.ndarray
    timestamps: np.ndarray
    fps: float
    width: int
    height: int
    reused: bool = False  # loaded from the cache
    start: int = 0        # source index of the first frame

    @property
    def num_frames(self) -> int:
        return int(self.source.shape[0])

    @property
    def stop(self) -> int:
        """Source index one past the last frame."""
        return self.start + self.num_frames

    @property
    def has_face(self) -> np.ndarray:
        return self.source != SOURCE_NONE

    @property
    def frames_without_face(self) -> List[int]:
        """Source indices of the frames without a face."""
        return [self.start + int(i) for i in np.flatnonzero(~self.has_face)]

    def source_timestamps(self) -> np.ndarray:
        """Timestamps indexed by source frame (NaN before ``start``), for
        :meth:`core.io.video.VideoReader.frames` seeks."""
        return np.concatenate([np.full(self.start, np.nan), self.timestamps])

    def crop_boxes(self, padding_ratio: float) -> np.ndarray:
        """(N, 4) int64 square crop boxes (SPEC §5), zeros where no face."""
        out = np.zeros((self.num_frames, 4), dtype=np.int64)
        for i in np.flatnonzero(self.has_face):
            out[i] = square_box(self.face_boxes[i], padding_ratio)
        return out


@dataclass
class ShapeResult:
    """Identity and albedo shared by the whole video."""

    id: np.ndarray          # (n_id,) float32
    tex: np.ndarray         # (n_tex,) float32
    frames: np.ndarray      # (F,) frame indices used
    losses: Dict[str, float] = field(default_factory=dict)
    reused: bool = False    # loaded from the cache


@dataclass
class ClipJob:
    """Everything one worker needs to fit frames [start, stop) (see :func:`fit_clip`).

    Frames [fit_start, start) are warm-up: fitted, not kept. ``landmarks`` and
    ``crop_boxes`` cover [fit_start, stop). ``cache_path``: where the result goes;
    ``partial_path``: its checkpoint.
    """

    worker: int
    video_path: str
    timestamps: np.ndarray
    fit_start: int
    start: int
    stop: int
    landmarks: np.ndarray       # (stop - fit_start, 68, 2) float32, NaN = no face
    crop_boxes: np.ndarray      # (stop - fit_start, 4) int64
    id: np.ndarray
    tex: np.ndarray
    model: FaceModel
    config: FitConfig
    tar_size: int
    renderer: str
    device: str
    threads: int
    cache_path: str
    partial_path: str
    key: str
    checkpoint_s: float = 30.0
    adaptive_threads: bool = True  # threads follow the free cores (core.threads), at most ``threads``


@dataclass
class VideoReport:
    """What a run wrote and found."""

    files: Dict[str, str]
    num_frames: int
    frames_without_face: List[int]
    timings: Dict[str, float]
    info: Dict[str, object]


# --- pure helpers -------------------------------------------------------------------------

def split_clips(n_frames: int, n_workers: int) -> List[Tuple[int, int]]:
    """Split frames 0..n_frames-1 into at most ``n_workers`` contiguous clips
    ``[(start, stop), ...]`` of sizes differing by at most one, in order, none empty."""
    if int(n_frames) != n_frames or n_frames < 0:
        raise ValueError(f"n_frames must be an integer >= 0; got {n_frames!r}")
    if int(n_workers) != n_workers or n_workers < 1:
        raise ValueError(f"n_workers must be an integer >= 1; got {n_workers!r}")
    k = min(int(n_workers), int(n_frames))
    bounds = [(i * int(n_frames)) // k for i in range(k + 1)] if k else [0]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def select_shape_frames(has_face: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` face frames spread evenly over the video: the middle frame of each
    of k equal parts of the face frames (all of them when there are no more than k)."""
    faces = np.flatnonzero(np.asarray(has_face, dtype=bool))
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if faces.size <= k:
        return faces
    pos = ((np.arange(k) + 0.5) * faces.size / k).astype(np.int64)
    return faces[np.unique(pos)]


def transfer_pose(angles: np.ndarray, trans: np.ndarray, box_from, box_to, camera: Camera) -> Tuple[np.ndarray, np.ndarray]:
    """Carry a pose fitted in the crop of ``box_from`` into the crop of ``box_to`` so the
    face stays where it was in the photo.

    Both crops are tar_size squares of photo boxes; crop point q0 in the first is
    q1 = k·q0 + (o0 − o1)·s1 in the second (k = s1 / s0, s = tar_size / side, o the box
    corner). Scaling the image by k about the principal point c is (for the face centre,
    exactly; for the rest to first order in depth) dividing the camera depth by k, and the
    shift d = (k − 1)·c + (o0 − o1)·s1 moves x by d_u·z_c / (k·f) and y by −d_row·z_c /
    (k·f) (rows grow downwards). The angles are kept.

    angles, trans: (3,) or (B, 3) arrays. Returns new (angles, trans) of the same shape.
    """
    x0a, y0a, x1a, _ = (float(v) for v in box_from)
    x0b, y0b, x1b, _ = (float(v) for v in box_to)
    size = float(camera.image_size)
    s0, s1 = size / (x1a - x0a), size / (x1b - x0b)
    k = s1 / s0
    c = camera.center
    du = (k - 1.0) * c + (x0a - x0b) * s1
    drow = (k - 1.0) * c + (y0a - y0b) * s1
    t = np.array(trans, dtype=np.float64, copy=True)
    zc = camera.distance - t[..., 2]
    t[..., 0] += du * zc / (k * camera.focal)
    t[..., 1] -= drow * zc / (k * camera.focal)
    t[..., 2] = camera.distance - zc / k
    return np.array(angles, copy=True), t.astype(np.asarray(trans).dtype)


def output_names(video_path: str) -> Dict[str, str]:
    """Output file names of a video: pkl, composed video and info."""
    stem = os.path.splitext(os.path.basename(video_path))[0]
    return {"pkl": f"{stem}_fitting_res.pkl", "video": f"{stem}_recon_video.mp4", "info": f"{stem}_info.json"}


_RANGE_RE = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*$")


def format_frame_range(frame_range: Optional[Tuple[int, Optional[int]]]) -> str:
    """'START:STOP' ('100:' for an open end); '' for None."""
    if frame_range is None:
        return ""
    start, stop = frame_range
    return f"{start}:{'' if stop is None else stop}"


def parse_frame_range(text: str) -> Tuple[int, Optional[int]]:
    """``'START:STOP'`` -> (start, stop): 0-based source frame indices, STOP excluded;
    either side may be empty (``'100:'`` to the end, ``':250'`` from frame 0). Raises
    UserError for anything else or START >= STOP."""
    m = _RANGE_RE.match(text or "")
    if m is None:
        raise UserError(f"--frame_range '{text}' is not START:STOP (0-based frame indices, STOP excluded, "
                        f"either may be empty: 100: or :250)")
    start = int(m.group(1)) if m.group(1) else 0
    stop = int(m.group(2)) if m.group(2) else None
    if stop is not None and start >= stop:
        raise UserError(f"--frame_range '{text}': START must be below STOP")
    return start, stop


def check_frame_range(video_path: str, frame_range: Optional[Tuple[int, Optional[int]]]) -> None:
    """Raise UserError when ``frame_range`` starts beyond the end of the video (checked by
    seeking to its first frame; the container's frame count settles clear cases at once)."""
    if frame_range is None or frame_range[0] == 0:
        return
    start = int(frame_range[0])
    with VideoReader(video_path) as reader:
        n = reader.info.num_frames
        found = False
        if not (n and start >= n + max(10, n // 100)):  # the count can be an estimate: seek to be sure
            found = any(True for _ in reader.frames(start, start + 1, reader.estimated_timestamps(start + 1)))
    if not found:
        count = f" ({n} frames)" if n else ""
        raise UserError(f"--frame_range {format_frame_range(frame_range)} starts beyond the end of the video "
                        f"'{video_path}'{count}")


def cpu_oversubscription(n_workers: int, cores: int, threads: int = 1) -> Optional[str]:
    """The warning for ``n_workers`` CPU worker processes of ``threads`` threads each on
    ``cores`` cores, or None when every worker has a core of its own."""
    if n_workers <= cores:
        return None
    return (f"--nworkers {n_workers}: the {n_workers} CPU workers will compete for {cores} core(s) "
            f"({threads} thread{'s' if threads != 1 else ''} each); fewer workers (at most {cores}) will be faster")


# --- cache helpers ------------------------------------------------------------------------

def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _array_digest(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: FaceModel) -> str:
    """A digest of every buffer of the model (cache keys must change with the model)."""
    return _array_digest(*(b.detach().cpu().numpy() for _, b in sorted(model.named_buffers())))


def _save_npz(path: str, key: str, **arrays) -> None:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, cache_key=np.array(key), **arrays)
    except OSError as e:  # disk full, file-size limit, folder removed
        raise UserError(f"cannot write the cache file '{path}': {e.strerror or e}") from None


LOCK_NAME = "run.lock"


@contextlib.contextmanager
def cache_lock(cache_dir: str):
    """Hold an exclusive lock on ``cache_dir`` (``run.lock`` in it, with this process's
    pid) for the duration of the block. A second run on the same folder fails at once with
    a UserError naming the holder's pid. The lock is an ``fcntl.flock``, so the system
    releases it when the holder dies, however it dies. (No lock where fcntl is missing.)"""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = os.path.join(cache_dir, LOCK_NAME)
    try:
        f = open(path, "a+", encoding="ascii")
    except OSError as e:
        raise UserError(f"cache folder '{cache_dir}' is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = ""
        for _ in range(3):  # the holder writes its pid just after locking
            f.seek(0)
            pid = f.read().strip()
            if pid.isdigit():
                break
            time.sleep(0.05)
        f.close()
        raise UserError(f"another fit_video.py run (pid {pid if pid.isdigit() else 'unknown'}) is using the cache "
                        f"folder '{cache_dir}'; wait for it or pass another --cache_folder") from None
    try:
        with contextlib.suppress(OSError):  # the pid is for the message only
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        yield
    finally:
        f.close()  # releases the lock


def _load_npz(path: str, key: str) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a cache file written with ``key``, or None (missing, stale, unreadable)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["cache_key"]) != key:
                log.debug("cache %s is for other settings; recomputing", path)
                return None
            return {k: data[k] for k in data.files if k != "cache_key"}
    except Exception as e:  # a damaged cache is recomputed, never fatal
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


# --- stage 1: landmarks -------------------------------------------------------------------

def _cache_range(frame_range) -> Optional[Tuple[int, Optional[int]]]:
    """The frame range as caches see it: None for the whole video (also '0:')."""
    if frame_range is None or (int(frame_range[0]) == 0 and frame_range[1] is None):
        return None
    return int(frame_range[0]), None if frame_range[1] is None else int(frame_range[1])


def _landmark_key(video_path: str, detector, frame_range: Optional[Tuple[int, Optional[int]]] = None) -> str:
    frame_range = _cache_range(frame_range)
    st = os.stat(video_path)
    spec = {"v": CACHE_VERSION, "video": os.path.abspath(video_path), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "detector": getattr(detector, "name", type(detector).__name__)}
    if frame_range is not None:  # (the whole video keeps its key: caches of earlier runs stay valid)
        spec["frame_range"] = [int(frame_range[0]), None if frame_range[1] is None else int(frame_range[1])]
    return _digest(spec)


def _range_suffix(frame_range) -> str:
    """'' for the whole video, '_START_STOP' ('_START_end') for a frame range."""
    frame_range = _cache_range(frame_range)
    if frame_range is None:
        return ""
    return f"_{frame_range[0]}_{'end' if frame_range[1] is None else frame_range[1]}"


def _landmark_files(cache_dir: Optional[str], frame_range) -> Tuple[Optional[str], Optional[str]]:
    """(final, partial) cache files of a landmark pass; one pair per frame range."""
    if not cache_dir:
        return None, None
    stem = "landmarks" + _range_suffix(frame_range)
    return os.path.join(cache_dir, f"{stem}.npz"), os.path.join(cache_dir, f"{stem}.partial.npz")


def landmark_pass(video_path: str, detector, cache_dir: Optional[str] = None, progress: bool = True,
                  checkpoint_s: float = 30.0, tracker: Optional[FaceTracker] = None,
                  frame_range: Optional[Tuple[int, Optional[int]]] = None) -> LandmarkTrack:
    """Stage 1: landmarks and face box of every frame (see :mod:`core.landmarks.tracking`), or of
    the source frames ``frame_range`` = (start, stop or None) only (the reader seeks to
    start; the track's ``start`` is then ``start``).

    With ``cache_dir``, a finished pass is reused and an interrupted one resumes from its
    last checkpoint (each frame range has its own cache). Raises UserError for an
    unreadable video or a range that holds no frame.
    """
    key = _landmark_key(video_path, detector, frame_range)
    final, partial = _landmark_files(cache_dir, frame_range)
    first = int(frame_range[0]) if frame_range else 0
    last = frame_range[1] if frame_range else None
    if final:
        cached = _load_npz(final, key)
        if cached is not None:
            log.info("landmarks: reusing %s", final)
            track = _track_from_arrays(cached)
            track.reused = True
            return track
    tracker = tracker or FaceTracker(detector)
    lms, boxes, src, ts = [], [], [], []
    resume_from = 0
    saved = _load_npz(partial, key) if partial else None
    with VideoReader(video_path) as reader:
        info = reader.info
        if saved is not None:
            resume_from = int(saved["source"].shape[0])
            lms, boxes = list(saved["landmarks"]), list(saved["face_boxes"])
            src, ts = list(saved["source"]), list(saved["timestamps"])
            log.info("landmarks: resuming at frame %d from %s", first + resume_from, partial)
        end = info.num_frames or None
        if last is not None:
            end = last if end is None else min(end, last)
        total = end - first if end is not None and end > first else None
        bar = tqdm(total=total, initial=resume_from, desc="landmarks", unit="frame", disable=not progress)
        last_save = time.monotonic()
        # Seek checks: recorded timestamps of the frames done, else those a constant rate gives.
        if ts:
            seek_ts = np.concatenate([np.full(first, np.nan), np.asarray(ts, dtype=np.float64)])
        else:
            seek_ts = reader.estimated_timestamps(first + 1) if first > 0 else None
        begin = first + max(0, resume_from - 1)
        for index, frame in reader.frames(begin, last, seek_ts):
            if index < first + resume_from:  # the frame before the checkpoint: restore the tracker
                tracker.relation = np.asarray(saved["relation"], dtype=np.float64)
                if src[index - first] != SOURCE_NONE:
                    tracker.resume(frame, lms[index - first])
                continue
            face = tracker.update(frame)
            ts.append(reader.last_timestamp)
            if face is None:
                lms.append(np.full((68, 2), np.nan, dtype=np.float32))
                boxes.append(np.full(4, np.nan))
                src.append(SOURCE_NONE)
            else:
                lms.append(face.landmarks.astype(np.float32))
                boxes.append(np.asarray(face.box, dtype=np.float64))
                src.append(face.source)
            bar.update(1)
            if partial and time.monotonic() - last_save > checkpoint_s:
                _save_npz(partial, key, **_track_arrays(lms, boxes, src, ts, info, first),
                          relation=tracker.relation)
                last_save = time.monotonic()
        bar.close()
    if not src:
        if frame_range is not None:
            raise UserError(f"--frame_range {format_frame_range(frame_range)} holds no frame of the video "
                            f"'{video_path}' ({info.num_frames} frames)")
        raise UserError(f"video '{video_path}' has no readable frame")
    if frame_range is None and info.num_frames and len(src) != info.num_frames:
        log.warning("video '%s': the container says %d frames, %d were decoded; using %d",
                    video_path, info.num_frames, len(src), len(src))
    arrays = _track_arrays(lms, boxes, src, ts, info, first)
    if final:
        _save_npz(final, key, **arrays)
        with contextlib.suppress(OSError):
            os.remove(partial)
    return _track_from_arrays(arrays)


def _track_arrays(lms, boxes, src, ts, info, start: int = 0) -> Dict[str, np.ndarray]:
    n = len(src)
    return {
        "landmarks": np.asarray(lms, dtype=np.float32).reshape(n, 68, 2),
        "face_boxes": np.asarray(boxes, dtype=np.float64).reshape(n, 4),
        "source": np.asarray(src, dtype=np.int8).reshape(n),
        "timestamps": np.asarray(ts, dtype=np.float64).reshape(n),
        "meta": np.array([info.fps, info.width, info.height], dtype=np.float64),
        "start": np.array(int(start), dtype=np.int64),
    }


def _track_from_arrays(a: Dict[str, np.ndarray]) -> LandmarkTrack:
    fps, w, h = (float(v) for v in a["meta"])
    start = int(a["start"]) if "start" in a else 0
    return LandmarkTrack(landmarks=a["landmarks"], face_boxes=a["face_boxes"], source=a["source"],
                         timestamps=a["timestamps"], fps=fps, width=int(w), height=int(h), start=start)


# --- stage 2: identity and albedo ---------------------------------------------------------

def read_frames(video_path: str, indices: Sequence[int], timestamps: Optional[np.ndarray] = None) -> Dict[int, np.ndarray]:
    """The frames ``indices`` of a video as {index: RGB frame} (seeks where it can)."""
    out: Dict[int, np.ndarray] = {}
    with VideoReader(video_path) as reader:
        for i in sorted(set(int(v) for v in indices)):
            for _, frame in reader.frames(i, i + 1, timestamps):
                out[i] = frame
    missing = sorted(set(int(v) for v in indices) - set(out))
    if missing:
        raise UserError(f"video '{video_path}' could not be read again at frames {missing[:5]}")
    return out


def _crops(frames: Dict[int, np.ndarray], track: LandmarkTrack, boxes: np.ndarray, indices, tar_size: int):
    crops = np.stack([crop_face(frames[i], boxes[i], tar_size) for i in indices])
    lms = np.stack([photo_to_crop(track.landmarks[i], boxes[i], tar_size) for i in indices])
    return crops, lms


def fit_shape(session: Session, track: LandmarkTrack, video_path: str, options: VideoOptions,
              cache_dir: Optional[str] = None, cache_key_base: str = "") -> ShapeResult:
    """Stage 2: id and tex from ``nframes_shape`` face frames, one batched fit with id/tex
    shared (batch 1) and exp/gamma/pose per frame, with the ``first_*`` iteration counts.
    The result's ``frames`` are source frame indices."""
    fitter, model = session.fitter, session.model
    indices = select_shape_frames(track.has_face, options.nframes_shape)  # positions in the track
    key = _digest({"base": cache_key_base, "frames": (indices + track.start).tolist(), "stage": "shape"})
    path = os.path.join(cache_dir, f"shape{_range_suffix(options.frame_range)}.npz") if cache_dir else None
    if path:
        cached = _load_npz(path, key)
        if cached is not None:
            log.info("identity/albedo: reusing %s", path)
            return ShapeResult(id=cached["id"], tex=cached["tex"], frames=cached["frames"],
                               losses=json.loads(str(cached["losses"])), reused=True)
    log.info("identity/albedo from %d frames: %s", len(indices), (indices + track.start).tolist())
    boxes = track.crop_boxes(options.padding_ratio)
    by_source = read_frames(video_path, indices + track.start, track.source_timestamps())
    frames = {int(i): by_source[int(i) + track.start] for i in indices}
    crops, lms = _crops(frames, track, boxes, indices, session.camera.image_size)
    dev, dt = session.device, fitter.dtype
    n = len(indices)
    zeros = fitter.zeros(n)
    init = zeros.replace(id=torch.zeros(1, model.layout.n_id, dtype=dt, device=dev),
                         tex=torch.zeros(1, model.layout.n_tex, dtype=dt, device=dev))
    res = fitter.fit(torch.as_tensor(lms, dtype=dt, device=dev), torch.as_tensor(crops, dtype=dt, device=dev),
                     init=init)
    result = ShapeResult(id=res.coeffs.id[0].cpu().numpy().astype(np.float32),
                         tex=res.coeffs.tex[0].cpu().numpy().astype(np.float32),
                         frames=indices + track.start, losses=res.losses)
    if path:
        _save_npz(path, key, id=result.id, tex=result.tex, frames=result.frames,
                  losses=np.array(json.dumps(res.losses)))
    return result


# --- stage 3: per-frame fitting in workers ------------------------------------------------

def fit_clip(job: ClipJob, progress: Optional[Callable[[int], None]] = None) -> Dict[str, np.ndarray]:
    """Fit frames [job.fit_start, job.stop) one after the other and keep [start, stop).

    Returns (and writes to ``job.cache_path``) arrays over the kept frames: ``frames``
    (K,), ``fitted`` (K,) bool, and ``exp``, ``gamma``, ``angles``, ``trans`` (K, n),
    float32 (zeros where no face). ``progress(n)`` is called as kept frames finish.
    Runs with at most ``job.threads`` torch threads: fewer while other programs hold
    cores when ``job.adaptive_threads`` and a :mod:`core.threads` governor is installed
    (the scripts and the workers install one), else exactly that many; restored afterwards.
    """

    before = torch.get_num_threads()
    governor = thread_control.current() if job.adaptive_threads else None
    limit = governor.max_threads if governor is not None else None
    if governor is not None:
        governor.max_threads = max(1, job.threads)
        governor.update(force=True)
    else:
        torch.set_num_threads(max(1, job.threads))
    try:
        return _fit_clip(job, progress or (lambda n: None))
    finally:
        if governor is not None:
            governor.max_threads = limit
        torch.set_num_threads(before)


def _fit_clip(job: ClipJob, progress: Callable[[int], None]) -> Dict[str, np.ndarray]:
    device = torch.device(job.device)
    session = Session.create(job.model, job.config, tar_size=job.tar_size, device=job.device,
                             renderer=job.renderer, progress=False)
    fitter, model, cam = session.fitter, session.model, session.camera
    rest_fitter = fitter
    if job.config.following_frames() != job.config:
        rest_fitter = Fitter(model, session.renderer, cam, job.config.following_frames(), progress=False)
    dt = fitter.dtype
    total = job.stop - job.fit_start
    sizes = model.layout.sizes()
    out = {g: np.zeros((total, sizes[g]), dtype=np.float32) for g in PER_FRAME_GROUPS}
    fitted = np.zeros(total, dtype=bool)
    done = 0
    saved = _load_npz(job.partial_path, job.key)
    if saved is not None:
        done = int(saved["done"])
        fitted[:done] = saved["fitted"][:done]
        for g in PER_FRAME_GROUPS:
            out[g][:done] = saved[g][:done]
        kept_done = max(0, job.fit_start + done - job.start)
        if kept_done:
            progress(kept_done)
        log.info("worker %d: resuming clip [%d, %d) at frame %d", job.worker, job.start, job.stop, job.fit_start + done)

    id_t = torch.as_tensor(job.id, dtype=dt, device=device)[None]
    tex_t = torch.as_tensor(job.tex, dtype=dt, device=device)[None]

    def coeffs_of(j: int) -> Coeffs:
        d = {g: torch.as_tensor(out[g][j], dtype=dt, device=device)[None] for g in PER_FRAME_GROUPS}
        return Coeffs(id=id_t, tex=tex_t, **d)

    last_save = time.monotonic()
    if done < total:
        with VideoReader(job.video_path) as reader:
            for index, frame in reader.frames(job.fit_start + done, job.stop, job.timestamps):
                j = index - job.fit_start
                lms = job.landmarks[j]
                if np.all(np.isfinite(lms)):
                    box = job.crop_boxes[j]
                    crop = crop_face(frame, box, job.tar_size)
                    lm_crop = photo_to_crop(lms, box, job.tar_size)
                    if j > 0 and fitted[j - 1]:
                        prev = coeffs_of(j - 1)
                        ang, tr = transfer_pose(out["angles"][j - 1], out["trans"][j - 1],
                                                job.crop_boxes[j - 1], box, cam)
                        ang_t = torch.as_tensor(ang, dtype=dt, device=device)[None]
                        tr_t = torch.as_tensor(tr, dtype=dt, device=device)[None]
                        init = prev.replace(angles=ang_t, trans=tr_t)
                        pose_ref = PoseRef(angles=ang_t, trans=tr_t)
                        rf, nrf, stage = job.config.rest_rf_iters, job.config.rest_nrf_iters, rest_fitter
                    else:
                        init = fitter.zeros(1).replace(id=id_t, tex=tex_t)
                        pose_ref = None
                        rf, nrf, stage = job.config.first_rf_iters, job.config.first_nrf_iters, fitter
                    res = stage.fit(torch.as_tensor(lm_crop[None], dtype=dt, device=device),
                                     torch.as_tensor(crop[None], dtype=dt, device=device),
                                     init=init, rf_iters=rf, nrf_iters=nrf,
                                     nonrigid_groups=PER_FRAME_GROUPS, pose_ref=pose_ref, losses=False)
                    for g in PER_FRAME_GROUPS:
                        out[g][j] = getattr(res.coeffs, g)[0].detach().cpu().numpy()
                    fitted[j] = True
                done = j + 1
                if index >= job.start:
                    progress(1)
                if time.monotonic() - last_save > job.checkpoint_s and done < total:
                    _save_npz(job.partial_path, job.key, done=np.array(done), fitted=fitted, **out)
                    last_save = time.monotonic()
        if done < total:
            raise UserError(f"video '{job.video_path}' ended at frame {job.fit_start + done}, "
                            f"expected {job.stop} frames")
    keep = slice(job.start - job.fit_start, total)
    result = {"frames": np.arange(job.start, job.stop), "fitted": fitted[keep],
              **{g: v[keep] for g, v in out.items()}}
    _save_npz(job.cache_path, job.key, **result)
    with contextlib.suppress(OSError):
        os.remove(job.partial_path)
    return result


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """End this worker process as soon as the process that started it (``parent_pid``)
    is gone, however it ended (even SIGKILL, which runs no clean-up there).

    On Linux the kernel sends SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG); the
    parent may have died before that was set, so its pid is checked once afterwards; and a
    daemon thread polls os.getppid() every ``poll_s`` seconds everywhere (the portable
    fallback: an orphan is re-parented, so its parent pid changes)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as e:
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", e)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_entry(job: ClipJob, messages, parent_pid: Optional[int] = None) -> None:
    """Process target: run :func:`fit_clip`, report progress, completion or the error.
    The worker ends with the main process ``parent_pid`` (see :func:`_die_with_parent`)."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    thread_control.install(None if job.adaptive_threads else job.threads, max_threads=job.threads)
    try:
        fit_clip(job, progress=lambda n: messages.put(("progress", job.worker, n)))
    except BaseException as e:  # report everything, including KeyboardInterrupt
        text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        messages.put(("error", job.worker, text.splitlines()[0] if text else type(e).__name__,
                      traceback.format_exc()))
        raise SystemExit(1)
    messages.put(("done", job.worker))


def run_workers(jobs: Sequence[ClipJob], progress: Optional[Callable[[int], None]] = None,
                in_process: Optional[bool] = None, poll_s: float = 0.2) -> None:
    """Run :func:`fit_clip` for every job, each in its own spawned process (one job: in
    this process unless ``in_process`` is False). Any failing worker stops the others and
    raises ``UserError("worker k failed: ...")``; results are in the jobs' cache files."""
    progress = progress or (lambda n: None)
    if in_process is None:
        in_process = len(jobs) == 1
    if in_process:
        for job in jobs:
            try:
                fit_clip(job, progress)
            except UserError as e:
                raise UserError(f"worker {job.worker} failed: {e}") from None
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = {job.worker: ctx.Process(target=_worker_entry, args=(job, messages, os.getpid()),
                                     name=f"fit-worker-{job.worker}", daemon=True) for job in jobs}
    finished = set()
    try:
        for p in procs.values():
            p.start()
        while len(finished) < len(procs):
            try:
                msg = messages.get(timeout=poll_s)
            except queue_mod.Empty:
                msg = None
            if msg is not None:
                kind, worker = msg[0], msg[1]
                if kind == "progress":
                    progress(msg[2])
                elif kind == "done":
                    finished.add(worker)
                elif kind == "error":
                    log.debug("worker %d traceback:\n%s", worker, msg[3])
                    raise UserError(f"worker {worker} failed: {msg[2]}")
                continue
            for worker, p in procs.items():
                if worker not in finished and p.exitcode is not None:
                    # Give a last message time to arrive before calling it a silent death.
                    with contextlib.suppress(queue_mod.Empty):
                        while True:
                            msg = messages.get(timeout=1.0)
                            if msg[0] == "error":
                                log.debug("worker %d traceback:\n%s", msg[1], msg[3])
                                raise UserError(f"worker {msg[1]} failed: {msg[2]}")
                            if msg[0] == "done":
                                finished.add(msg[1])
                            elif msg[0] == "progress":
                                progress(msg[2])
                    if worker not in finished:
                        raise UserError(f"worker {worker} failed: the process exited with code {p.exitcode} "
                                        f"(killed, e.g. out of memory?)")
        for worker, p in procs.items():
            p.join(timeout=60)
            if p.exitcode not in (0, None):
                raise UserError(f"worker {worker} failed: the process exited with code {p.exitcode}")
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
        for p in procs.values():
            p.join(timeout=10)
        messages.close()


# --- the whole pipeline -------------------------------------------------------------------

def _worker_devices(session: Session, n: int, ngpus: int) -> List[str]:
    """Worker i on cuda:(i mod ngpus) when the session runs on CUDA (its own card when
    ngpus is 1), else on the CPU."""
    if session.device.type != "cuda":
        return ["cpu"] * n
    if ngpus <= 1:
        return [str(session.device)] * n
    available = torch.cuda.device_count()
    if ngpus > available:
        log.warning("--ngpus %d but torch sees %d GPU(s); using %d", ngpus, available, available)
        ngpus = available
    return [f"cuda:{i % ngpus}" for i in range(n)]


def threads_per_worker(cores: int, nworkers: int) -> int:
    """CPU threads for each of ``nworkers`` processes sharing ``cores`` cores."""
    return max(1, int(cores) // max(1, int(nworkers)))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_video(session: Session, detector, video_path: str, res_folder: str,
              options: VideoOptions = VideoOptions(), info_extra: Optional[dict] = None,
              progress: bool = True) -> VideoReport:
    """Fit every frame of ``video_path`` (or of ``options.frame_range``) and write the
    outputs into ``res_folder``. The cache folder is locked for the run (see
    :func:`cache_lock`)."""
    if options.nworkers < 1 or options.ngpus < 1 or options.nframes_shape < 1 or options.clip_overlap < 0 \
            or (options.threads is not None and options.threads < 1):
        raise UserError("--nworkers, --ngpus, --nframes_shape and --threads must be >= 1 and --clip_overlap >= 0")
    if options.frame_range is not None:
        start, stop = options.frame_range
        if start < 0 or (stop is not None and stop <= start):
            raise UserError(f"--frame_range {format_frame_range(options.frame_range)}: expected 0 <= START < STOP")
    t_start = time.perf_counter()
    VideoReader(video_path).close()  # fail early on a missing / corrupt / empty video
    check_frame_range(video_path, options.frame_range)
    check_writable_folder(res_folder, "output folder")
    names = output_names(video_path)
    with contextlib.ExitStack() as stack:
        if options.cache_folder:
            cache_dir = os.path.join(options.cache_folder, os.path.splitext(os.path.basename(video_path))[0])
            check_writable_folder(cache_dir, "cache folder")
            os.makedirs(cache_dir, exist_ok=True)
            stack.enter_context(cache_lock(cache_dir))
            log.info("cache: %s (re-runs reuse it; --cache_folder '' for none)", os.path.abspath(cache_dir))
        else:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fit_video_"))
        threads = torch.get_num_threads()
        if options.threads:
            torch.set_num_threads(options.threads)
        try:
            return _run(session, detector, video_path, res_folder, options, info_extra or {}, progress,
                        cache_dir, names, t_start)
        finally:
            torch.set_num_threads(threads)


def _run(session, detector, video_path, res_folder, options, info_extra, progress, cache_dir, names, t_start):
    timings: Dict[str, float] = {}
    cfg = session.fitter.cfg
    tar_size = session.camera.image_size

    # 1. landmarks
    t0 = time.perf_counter()
    track = landmark_pass(video_path, detector, cache_dir, progress=progress, checkpoint_s=options.checkpoint_s,
                          frame_range=options.frame_range)
    timings["landmarks_s"] = time.perf_counter() - t0
    n, first = track.num_frames, track.start
    source_ts = track.source_timestamps()
    no_face = track.frames_without_face
    n_face = n - len(no_face)
    span = f"the {n} frames of '{video_path}'" if options.frame_range is None else \
        f"the {n} frames {first}-{track.stop - 1} of '{video_path}'"
    if n_face == 0:
        raise UserError(f"no face found in any of {span}")
    if no_face:
        log.warning("%d of %d frames have no face (they get no fit and show the original frame): %s",
                    len(no_face), n, _ranges(no_face))
    boxes = track.crop_boxes(options.padding_ratio)

    # 2. identity and albedo
    t0 = time.perf_counter()
    base_key = _digest({"v": CACHE_VERSION, "landmarks": _landmark_key(video_path, detector, options.frame_range),
                        "config": cfg.as_dict(), "tar_size": tar_size, "padding": options.padding_ratio,
                        "model": model_fingerprint(session.model), "renderer": session.renderer.backend})
    shape = fit_shape(session, track, video_path, options, cache_dir, base_key)
    timings["shape_s"] = time.perf_counter() - t0

    # 3. per-frame fits (clip bounds in source frame indices)
    t0 = time.perf_counter()
    clips = [(first + a, first + b) for a, b in split_clips(n, options.nworkers)]
    devices = _worker_devices(session, len(clips), options.ngpus)
    cores = _cpu_count()
    threads = options.threads or threads_per_worker(cores, len(clips))
    shape_key = _digest({"base": base_key, "id": _array_digest(shape.id, shape.tex)})
    model_cpu = session.model if session.device.type == "cpu" else copy.deepcopy(session.model).cpu()
    jobs, results = [], {}
    for k, (start, stop) in enumerate(clips):
        fit_start = max(first, start - options.clip_overlap)
        key = _digest({"shape": shape_key, "fit_start": fit_start, "start": start, "stop": stop,
                       "rest_nrf_lr": cfg.rest_nrf_lr})
        cache_path = os.path.join(cache_dir, f"clip_{start:07d}_{stop:07d}.npz")
        cached = _load_npz(cache_path, key)
        if cached is not None:
            results[k] = cached
            continue
        jobs.append(ClipJob(
            worker=k, video_path=video_path, timestamps=source_ts, fit_start=fit_start, start=start,
            stop=stop, landmarks=track.landmarks[fit_start - first:stop - first],
            crop_boxes=boxes[fit_start - first:stop - first], id=shape.id, tex=shape.tex, model=model_cpu,
            config=cfg, tar_size=tar_size, renderer=session.renderer.backend, device=devices[k], threads=threads,
            cache_path=cache_path, partial_path=os.path.join(cache_dir, f"clip_{start:07d}_{stop:07d}.partial.npz"),
            key=key, checkpoint_s=options.checkpoint_s, adaptive_threads=options.threads is None))
    reused = len(clips) - len(jobs)
    todo = sum(j.stop - j.start for j in jobs)
    if not jobs:
        log.info("fitting: all %d clip%s reused from %s", len(clips), "s" if len(clips) > 1 else "", cache_dir)
    else:
        if reused:
            log.info("fitting: reusing %d of %d finished clips from %s", reused, len(clips), cache_dir)
        log.info("fitting %d frames in %d clip(s) on %s (%s%d thread(s) each)", todo, len(jobs),
                 ", ".join(sorted(set(j.device for j in jobs))), "adaptive, at most " if options.threads is None else "",
                 threads)
        n_cpu = sum(j.device == "cpu" for j in jobs)
        warning = cpu_oversubscription(n_cpu, cores, threads) if n_cpu > 1 else None
        if warning:
            log.warning("%s", warning)
    with tqdm(total=todo, desc="fitting", unit="frame", disable=not progress or not jobs) as bar:
        run_workers(jobs, progress=bar.update)
    for job in jobs:
        loaded = _load_npz(job.cache_path, job.key)
        if loaded is None:
            raise UserError(f"worker {job.worker} failed: its result {job.cache_path} is missing")
        results[job.worker] = loaded
    timings["fit_s"] = time.perf_counter() - t0
    timings["fit_frames"] = todo

    # 4. merge and write (merged arrays by position in the track; pkl keys are source indices)
    merged = _merge(results, len(clips), first, n)
    fitted = merged["fitted"]
    lost = np.flatnonzero(track.has_face & ~fitted)
    if lost.size:
        raise UserError(f"internal error: frames {(lost[:5] + first).tolist()} have a face but no fit")
    fitting_res = {}
    for i in np.flatnonzero(fitted):
        fitting_res[first + int(i)] = {"rot": merged["angles"][i].copy(), "trans": merged["trans"][i].copy(),
                                       "gamma": merged["gamma"][i].copy(), "exp": merged["exp"][i].copy(),
                                       "bbox": boxes[i].astype(np.int64)}
    pkl = {"id": shape.id.astype(np.float32), "tex": shape.tex.astype(np.float32), "fitting_res": fitting_res,
           "tar_size": int(tar_size), "fps": float(track.fps), "frames_without_face": no_face,
           "num_frames": int(n)}
    if options.frame_range is not None:
        pkl["frame_range"] = [int(first), int(track.stop)]

    t0 = time.perf_counter()
    final = {key: os.path.join(res_folder, name) for key, name in names.items()}
    audio = {}
    if options.frame_range is not None and options.keep_audio:
        audio = {"audio_start": max(0.0, float(track.timestamps[0]) / 1000.0) if first else 0.0,
                 "audio_duration": n / float(track.fps)}
    try:
        os.makedirs(res_folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder '{res_folder}': {e.strerror or e}") from None
    writer = VideoWriter(final["video"], (track.width, track.height), track.fps,
                         audio_from=video_path if options.keep_audio else None, **audio)
    try:
        nme = _render_video(session, video_path, track, boxes, shape, merged, writer, progress)
        writer.finish()
        if writer.frames_written != n:
            raise UserError(f"the composed video has {writer.frames_written} frames, expected {n}")
        timings["render_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        info = _info(session, detector, video_path, track, shape, options, timings, nme, len(jobs), devices,
                     threads, reused, info_extra)
        try:
            with atomic_path(final["info"]) as tmp_info, atomic_path(final["pkl"]) as tmp_pkl:
                with open(tmp_pkl, "wb") as f:
                    pickle.dump(pkl, f)
                with open(tmp_info, "w", encoding="utf-8") as f:
                    json.dump(info, f, indent=2)
                writer.commit()
        except OSError as e:  # disk full, file-size limit
            raise UserError(f"cannot write the outputs in '{res_folder}': {e.strerror or e}") from None
    except BaseException:
        writer.abort()
        raise
    log.info("%d frames (%d with a fit, %d without a face) -> %s, %s, %s", n, int(fitted.sum()), len(no_face),
             final["pkl"], final["video"], final["info"])
    speeds = ", ".join(f"{stage} " + ("reused" if info["fps"][stage] is None else f"{info['fps'][stage]:.{d}f} fps")
                       for stage, d in (("landmarks", 1), ("fitting", 2), ("rendering", 1)))
    log.info("speed: %s; landmark NME %.1f%% of the inter-ocular distance (mean over frames)", speeds,
             100.0 * nme["mean"])
    return VideoReport(files=final, num_frames=n, frames_without_face=no_face, timings=timings, info=info)


def _merge(results: Dict[int, Dict[str, np.ndarray]], n_clips: int, first: int, n: int) -> Dict[str, np.ndarray]:
    """The clips' results over the source frames [first, first + n), concatenated."""
    parts = [results[k] for k in range(n_clips)]
    frames = np.concatenate([p["frames"] for p in parts])
    if not np.array_equal(frames, np.arange(first, first + n)):
        raise UserError("internal error: the clips do not cover the video exactly")
    return {k: np.concatenate([p[k] for p in parts]) for k in ("fitted",) + PER_FRAME_GROUPS}


def _render_video(session: Session, video_path: str, track: LandmarkTrack, boxes: np.ndarray, shape: ShapeResult,
                  merged: Dict[str, np.ndarray], writer: VideoWriter, progress: bool,
                  batch: int = 8) -> Dict[str, object]:
    """Stage 5: paste each fitted frame's render into it and write every frame of the
    track in order. Returns the landmark NME of each fitted frame ({source index: value},
    :func:`core.landmarks.metrics.landmark_nme` with its default points, model vs tracked, as for
    photos) and its mean, median, p95 and max."""
    fitter, cam = session.fitter, session.camera
    dev, dt = session.device, fitter.dtype
    tar = cam.image_size
    first = track.start
    pending: List[Tuple[int, np.ndarray]] = []  # (position in the track, frame)
    per_frame: Dict[int, float] = {}

    def flush():
        thread_control.tick()
        todo = [i for i, _ in pending if merged["fitted"][i]]
        composed = {}
        if todo:
            d = {g: torch.as_tensor(merged[g][todo], dtype=dt, device=dev) for g in PER_FRAME_GROUPS}
            b = len(todo)
            c = Coeffs(id=torch.as_tensor(shape.id, dtype=dt, device=dev)[None].expand(b, -1),
                       tex=torch.as_tensor(shape.tex, dtype=dt, device=dev)[None].expand(b, -1), **d)
            with torch.no_grad():
                rgba, out = fitter.render(c)
                model_lms = cam.project_points(out.landmarks).cpu().numpy()
            rgba = rgba.cpu().numpy()
            frames = dict(pending)
            for k, i in enumerate(todo):
                composed[i] = paste_back(frames[i], np.clip(rgba[k, ..., :3], 0, 255).astype(np.uint8),
                                         rgba[k, ..., 3], boxes[i])
                p = crop_to_photo(model_lms[k], boxes[i], tar)
                per_frame[first + i] = landmark_nme(p, track.landmarks[i])
        for i, frame in pending:
            writer.write(composed.get(i, frame))
        pending.clear()

    with VideoReader(video_path) as reader, tqdm(total=track.num_frames, desc="rendering", unit="frame",
                                                 disable=not progress) as bar:
        n_fit = 0
        for index, frame in reader.frames(first, track.stop, track.source_timestamps()):
            i = index - first
            pending.append((i, frame))
            n_fit += bool(merged["fitted"][i])
            if n_fit >= batch or len(pending) >= 4 * batch:
                flush()
                n_fit = 0
            bar.update(1)
        flush()
    e = np.asarray(list(per_frame.values())) if per_frame else np.zeros(1)
    return {"mean": float(e.mean()), "median": float(np.median(e)), "p95": float(np.percentile(e, 95)),
            "max": float(e.max()), "per_frame": per_frame}


def _info(session, detector, video_path, track, shape, options, timings, nme, n_jobs, devices, threads, reused,
          extra) -> Dict[str, object]:
    n = track.num_frames
    n_face = int(track.has_face.sum())

    def rate(frames, key):
        s = timings.get(key, 0.0)
        return round(frames / s, 3) if s > 0 else None

    info = {
        "video": os.path.abspath(video_path),
        "num_frames": n,
        "frame_range": [track.start, track.stop],
        "fps_source": track.fps,
        "frame_size": [track.width, track.height],
        "frames_with_fit": n_face,
        "frames_without_face": track.frames_without_face,
        "landmarks": {"detector": getattr(detector, "name", "?"),
                      "detected_frames": int((track.source == 1).sum()),
                      "tracked_frames": int((track.source == 2).sum())},
        "shape_frames": [int(v) for v in shape.frames],
        "shape_losses": {k: round(v, 6) for k, v in shape.losses.items()},
        "tar_size": session.camera.image_size,
        "padding_ratio": options.padding_ratio,
        "recon_model": session.model.name,
        "device": str(session.device),
        "worker_devices": devices,
        "nworkers": options.nworkers,
        "ngpus": options.ngpus,
        "threads_per_worker": threads,
        "clip_overlap": options.clip_overlap,
        "clips_fitted": n_jobs,
        "clips_reused": reused,
        "cache": {"folder": os.path.abspath(options.cache_folder) if options.cache_folder else None,
                  "landmarks_reused": track.reused, "shape_reused": shape.reused, "clips_reused": reused},
        "renderer": session.renderer.backend,
        "fit_config": session.fitter.cfg.as_dict(),
        "rest_nrf_lr": session.fitter.cfg.rest_nrf_lr or session.fitter.cfg.nrf_lr,
        # core.landmarks.metrics.landmark_nme (chin + 51 inner points, / eye-centre distance) as for photos:
        # a fraction; per_frame by source frame index (JSON keys are strings).
        "landmark_nme_interocular": {**{k: round(float(nme[k]), 5) for k in ("mean", "median", "p95", "max")},
                                     "per_frame": {str(i): round(v, 6) for i, v in sorted(nme["per_frame"].items())}},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        # frames per second of each stage; null for a stage reused from the cache
        "fps": {"landmarks": None if track.reused else rate(n, "landmarks_s"),
                "fitting": rate(timings.get("fit_frames", 0), "fit_s") if n_jobs else None,
                "rendering": rate(n, "render_s"), "overall": rate(n, "total_s")},
    }
    info.update(extra)
    return info


def _ranges(indices: Sequence[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]."""
    out, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(out)
