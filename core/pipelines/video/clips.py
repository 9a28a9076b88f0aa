"""Stage 3 of the video pipeline: fitting one contiguous clip of frames
(:func:`fit_clip`), with identity and albedo fixed.

Every frame is warm-started from the previous frame's fit (its pose carried into the new
crop by :func:`~.chains.transfer_pose`) and its pose pulled towards it (SPEC §4 note); the first
frame of a clip and the first after a frame without a face get the ``first_*`` iteration
counts, the others ``rest_*``. A clip after the first starts ``clip_overlap`` frames early
and drops those frames, so the clip-start effect has faded by its first kept frame and the
result hardly depends on the worker count. A clip is checkpointed while it runs; an
interrupted clip resumes where it stopped, exactly.

With seeds (:attr:`ClipJob.seeds`: identity frames) a clip is several chains of
warm-started frames fitted in lockstep (:mod:`~core.pipelines.video.chains`) and composed
afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from core import threads as thread_control
from core.fit.fitter import PoseRef
from core.io.video import VideoReader, VideoWriter
from core.landmarks.crop import crop_face, photo_to_crop
from core.models.coeffs import Coeffs
from core.render.camera import FrameCamera

from ..session import SessionSpec
from .chains import PER_FRAME_GROUPS, decoder_threads, fit_chains, frame_fitter, start_pose, video_ended
from .composer import Composer
from .cache import load_npz, partial_path, save_npz

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class FrameDone:
    """One kept frame of a clip is finished (the argument of the ``on_frame`` callbacks of
    :func:`fit_clip`, :func:`~core.pipelines.video.workers.run_workers` and
    :func:`~core.pipelines.video.run.run_video`).

    worker: the clip's :attr:`ClipJob.worker`. frame: its source frame index. time: when it
    finished, ``time.time()`` seconds in the worker's process. fitted: False for a frame
    without a face. restored: read back from the clip's checkpoint (an interrupted run
    resumed), not fitted now; such frames are reported at once when the clip starts.
    Warm-up frames (before :attr:`ClipJob.start`) are not reported.
    """

    worker: int
    frame: int
    time: float
    fitted: bool
    restored: bool = False


@dataclass
class ClipJob:
    """Everything one worker needs to fit frames [start, stop) (see :func:`fit_clip`).

    Frames [fit_start, start) are warm-up: fitted, not kept. ``landmarks`` and
    ``crop_boxes`` cover [fit_start, stop); ``timestamps`` are the track's, indexed by
    source frame (seek checks). ``session`` rebuilds the fitting session in the worker, on
    its device. ``cache_path``: where the result goes, written with ``key``
    (``partial_path``: its checkpoint, every ``checkpoint_s`` seconds).
    """

    worker: int
    session: SessionSpec
    video_path: str
    timestamps: np.ndarray
    fit_start: int
    start: int
    stop: int
    landmarks: np.ndarray       # (stop - fit_start, 68, 2) float32 photo pixels, NaN = no face
    crop_boxes: np.ndarray      # (stop - fit_start, 4) int64
    id: np.ndarray              # (n_id,) float32, shared by every frame
    tex: np.ndarray             # (n_tex,) float32
    threads: int
    cache_path: str
    key: str
    checkpoint_s: float = 30.0
    adaptive_threads: bool = True  # threads follow the free cores (core.threads), at most ``threads``
    camera: Optional[FrameCamera] = None  # the video's frame camera (None: the original's crop camera)
    # Compose frames [start, stop) into this video as they are fitted (see fit_clip); None: not here.
    segment: Optional[str] = None
    frame_size: Tuple[int, int] = (0, 0)  # (width, height) of the source frames, for the segment
    fps: float = 25.0                     # of the source, for the segment
    meshes: bool = False                  # keep each composed frame's posed vertices in the segment's arrays
    # The detector's landmarks (like ``landmarks``) when the fits aim at smoothed ones: the
    # composed frames' NMEs are measured against these (None: ``landmarks``).
    target_landmarks: Optional[np.ndarray] = None
    # Identity frames in (fit_start, stop) with their identity-fit coefficients, {source
    # frame: {group: (n,) float32}}: each starts a chain of its own (see fit_clip), whose
    # first ``seed_warmup`` frames are fitted and dropped (the chain before keeps going
    # over them); empty: one chain from fit_start, frames fitted in order.
    seeds: Dict[int, Dict[str, np.ndarray]] = field(default_factory=dict)
    seed_warmup: int = 8
    # With seeds: fit the first chain backwards, from the first seed's chain's first kept
    # frame down to fit_start (core.pipelines.video.chains.first_chain_back), instead of
    # from a cold start at fit_start.
    first_back: bool = False
    # The crops of frames [fit_start, stop) as the landmark pass cut them ((n, T, T, 3)
    # uint8, crop_face of each frame in ``crop_boxes``; zeros where no face), or None: the
    # chains (``seeds``) then take them from here instead of decoding the video for them.
    crops: Optional[np.ndarray] = None

    @property
    def partial_path(self) -> str:
        return partial_path(self.cache_path)


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


def fit_clip(job: ClipJob, on_frame: Optional[Callable[[FrameDone], None]] = None) -> Dict[str, np.ndarray]:
    """Fit frames [job.fit_start, job.stop) one after the other and keep [start, stop).

    Returns (and writes to ``job.cache_path``) arrays over the kept frames: ``frames``
    (K,), ``fitted`` (K,) bool, and ``exp``, ``gamma``, ``angles``, ``trans`` (K, n),
    float32 (zeros where no face). ``on_frame`` receives a :class:`FrameDone` as each kept
    frame finishes: in frame order for one chain; with seeds, a step's frames together
    (one per chain), so not in frame order.

    With ``job.segment``, a clip fitted from its first frame in this call (not resumed
    from a checkpoint) also composes its kept frames as it goes, from the frames it has
    decoded anyway (:class:`~core.pipelines.video.composer.Composer`, exactly what the main
    process would write for them), into the video ``job.segment``, and then writes
    :func:`segment_arrays_path` with each composed fitted frame's ``frames`` (source
    index), ``nme``, model ``landmarks`` (frame pixels) and, with ``job.meshes``,
    ``vertices`` (float16), under ``job.key``. Nothing is left under either name when it
    fails.
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
        return _fit_clip(job, on_frame or (lambda event: None))
    finally:
        if governor is not None:
            governor.max_threads = limit
        torch.set_num_threads(before)


def _fit_clip(job: ClipJob, on_frame: Callable[[FrameDone], None]) -> Dict[str, np.ndarray]:
    session = job.session.build()
    total = job.stop - job.fit_start
    sizes = session.model.layout.sizes()
    out = {g: np.zeros((total, sizes[g]), dtype=np.float32) for g in PER_FRAME_GROUPS}
    fitted = np.zeros(total, dtype=bool)
    done_mask = np.zeros(total, dtype=bool)  # frames fitted, or found without a face
    saved = load_npz(job.partial_path, job.key)
    if saved is not None:
        done_mask = saved["done_mask"].astype(bool)
        fitted[done_mask] = saved["fitted"][done_mask]
        for g in PER_FRAME_GROUPS:
            out[g][done_mask] = saved[g][done_mask]
        now = time.time()
        for index in range(job.start, job.stop):
            j = index - job.fit_start
            if done_mask[j]:
                on_frame(FrameDone(job.worker, index, now, bool(fitted[j]), restored=True))
        log.info("worker %d: resuming clip [%d, %d) with %d of its %d frames done", job.worker, job.start, job.stop,
                 int(done_mask.sum()), total)

    composer = None
    if job.segment and total > 0 and not done_mask.any():  # fitted from its first frame in this call
        # One encoder thread: on the CPU the workers keep every core busy already.
        writer = VideoWriter(job.segment, job.frame_size, job.fps, threads=1 if job.session.device == "cpu" else 0)
        composer = Composer(session, job.id, job.tex, job.camera, writer, meshes=job.meshes)
    try:
        checkpoints = _Checkpoints(job, out, fitted, done_mask)
        if job.seeds:
            def finished(positions) -> None:
                for j in positions:
                    done_mask[j] = True
                    if j >= job.start - job.fit_start:
                        on_frame(FrameDone(job.worker, job.fit_start + j, time.time(), bool(fitted[j])))
                checkpoints.tick()

            fit_chains(job, session, out, fitted, done_mask, finished)
            if composer is not None:
                _compose_clip(job, out, fitted, composer)
        elif not done_mask.all():
            _fit_frames(job, session, out, fitted, done_mask, composer, on_frame, checkpoints)
        if composer is not None:
            composer.flush()
            composer.writer.finish()
    except BaseException:
        if composer is not None:
            composer.writer.abort()
        raise
    keep = slice(job.start - job.fit_start, total)
    result = {"frames": np.arange(job.start, job.stop), "fitted": fitted[keep],
              **{g: v[keep] for g, v in out.items()}}
    save_npz(job.cache_path, job.key, **result)
    with contextlib.suppress(OSError):
        os.remove(job.partial_path)
    if composer is not None:
        _commit_segment(job, composer)
    return result


def segment_arrays_path(segment: str) -> str:
    """Where :func:`fit_clip` keeps the arrays of the composed video ``segment``."""
    return segment + ".npz"


def _commit_segment(job: ClipJob, composer: Composer) -> None:
    """Rename the finished segment into place, then write its arrays (their file marks
    the segment complete)."""
    composer.writer.commit()
    try:
        save_npz(segment_arrays_path(job.segment), job.key, **composer.arrays())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(job.segment)
        raise


def _fit_frames(job: ClipJob, session, out, fitted, done_mask, composer, on_frame, checkpoints) -> None:
    """Fit the frames after the done ones (``done_mask``, a prefix) in order, filling
    ``out``, ``fitted`` and ``done_mask``, checkpointing, composing the kept ones with
    ``composer``."""
    fitter, device = session.fitter, session.device
    tar_size = session.camera.image_size
    dt = fitter.dtype
    total = job.stop - job.fit_start
    id_t = torch.as_tensor(job.id, dtype=dt, device=device)[None]
    tex_t = torch.as_tensor(job.tex, dtype=dt, device=device)[None]
    # The last fitted frame's exp and gamma, kept on the device as the next frame's start,
    # rounded to float32 as ``out`` stores them (exactly what reading ``out`` back gives).
    last: Optional[Tuple[int, Dict[str, torch.Tensor]]] = None

    def start_of(j: int) -> Dict[str, torch.Tensor]:
        """Frame j's fitted exp and gamma, (1, n) tensors."""
        if last is not None and last[0] == j:
            return last[1]
        return {g: torch.as_tensor(out[g][j], dtype=dt, device=device)[None] for g in ("exp", "gamma")}

    done = int(done_mask.sum())
    with open_reader(job, job.fit_start + done) as reader:
        for index, frame in reader.frames(job.fit_start + done, job.stop, job.timestamps):
            j = index - job.fit_start
            lms = job.landmarks[j]
            if np.all(np.isfinite(lms)):
                box = job.crop_boxes[j]
                crop = crop_face(frame, box, tar_size)
                lm_crop = photo_to_crop(lms, box, tar_size)
                if j > 0 and fitted[j - 1]:
                    ang, tr = start_pose(job, session.camera, j, out["angles"][j - 1], out["trans"][j - 1])
                    ang_t = torch.as_tensor(ang, dtype=dt, device=device)[None]
                    tr_t = torch.as_tensor(tr, dtype=dt, device=device)[None]
                    init = Coeffs(id=id_t, tex=tex_t, angles=ang_t, trans=tr_t, **start_of(j - 1))
                    pose_ref = PoseRef(angles=ang_t, trans=tr_t)
                else:
                    init = fitter.zeros(1).replace(id=id_t, tex=tex_t)
                    pose_ref = None
                # A following frame (warm-started, pose prior) gets Fitter.following()'s
                # settings and rest_* iterations; the first one the first_* schedule.
                res = frame_fitter(job, session, box[None]).fit(
                    torch.as_tensor(lm_crop[None], dtype=dt, device=device),
                    torch.as_tensor(crop[None], dtype=dt, device=device), init=init,
                    nonrigid_groups=PER_FRAME_GROUPS, pose_ref=pose_ref, following=pose_ref is not None, losses=False)
                for g in PER_FRAME_GROUPS:
                    out[g][j] = getattr(res.coeffs, g)[0].detach().cpu().numpy()
                last = j, {g: getattr(res.coeffs, g).detach()[:1].to(torch.float32).to(dt)
                           for g in ("exp", "gamma")}
                fitted[j] = True
            done = j + 1
            done_mask[j] = True
            if index >= job.start:
                if composer is not None:
                    _compose_frame(job, composer, index, frame, out, fitted)
                on_frame(FrameDone(job.worker, index, time.time(), bool(fitted[j])))
            checkpoints.tick()
    if done < total:
        raise video_ended(job, job.fit_start + done)


class _Checkpoints:
    """A clip's progress (``done_mask``, ``fitted``, ``out``) saved to its partial file
    every ``job.checkpoint_s`` seconds while frames remain."""

    def __init__(self, job: ClipJob, out, fitted, done_mask):
        self.job, self.out, self.fitted, self.done_mask = job, out, fitted, done_mask
        self.last = time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self.last > self.job.checkpoint_s and not self.done_mask.all():
            save_npz(self.job.partial_path, self.job.key, done_mask=self.done_mask, fitted=self.fitted, **self.out)
            self.last = time.monotonic()


def _compose_frame(job: ClipJob, composer: Composer, index: int, frame: np.ndarray, out, fitted) -> None:
    """Hand source frame ``index`` and its fit (if any) to ``composer``; its NME is
    measured against the detector's landmarks."""
    j = index - job.fit_start
    target = job.landmarks[j] if job.target_landmarks is None else job.target_landmarks[j]
    composer.add(index, frame, {g: out[g][j] for g in PER_FRAME_GROUPS} if fitted[j] else None,
                 job.crop_boxes[j], target)


# A reader positioned ahead of the job (prepare_reader): {(video path, frame, threads): reader}.
_PREPARED: Dict[Tuple[str, int, int], VideoReader] = {}


def prepare_reader(video_path: str, start: int, timestamps, threads: int) -> None:
    """Open ``video_path`` with ``threads`` decoder threads and seek to frame ``start`` now
    (:meth:`VideoReader.prepare`), for a job of this process that will read from there
    (:func:`open_reader`): a worker waiting for its job does its seek (up to a keyframe
    interval of decoding) while the identity fit keeps only one core busy. Does nothing
    for a video it cannot read (the job reports that)."""
    with contextlib.suppress(Exception):
        reader = VideoReader(video_path, threads=threads)
        try:
            reader.prepare(int(start), timestamps)
        except BaseException:
            reader.close()
            raise
        old = _PREPARED.pop((video_path, int(start), int(threads)), None)
        if old is not None:
            old.close()
        _PREPARED[(video_path, int(start), int(threads))] = reader


def open_reader(job: ClipJob, start: int) -> VideoReader:
    """A reader of the job's video for reading from frame ``start``: the one
    :func:`prepare_reader` positioned there, if any (taken), else a new one."""
    threads = decoder_threads(job)
    reader = _PREPARED.pop((job.video_path, int(start), int(threads)), None)
    return reader if reader is not None else VideoReader(job.video_path, threads=threads)


def _compose_clip(job: ClipJob, out, fitted, composer: Composer) -> None:
    """Compose the kept frames [start, stop) in order from their fits (read again)."""
    n = 0
    with open_reader(job, job.start) as reader:
        for index, frame in reader.frames(job.start, job.stop, job.timestamps):
            _compose_frame(job, composer, index, frame, out, fitted)
            n += 1
    if n < job.stop - job.start:
        raise video_ended(job, job.start + n)
