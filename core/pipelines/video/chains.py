"""Chains of warm-started frames (part of stage 3, :func:`~core.pipelines.video.clips.fit_clip`):
which identity frames start chains (:func:`chain_seeds`), a clip's chains
(:func:`chain_bounds`) and fitting them in lockstep (:func:`fit_chains`), and the helpers
every per-frame fit uses (:func:`transfer_pose`, :func:`frame_fitter`).

A chain is a run of frames each warm-started from the one before. With seeds (the
identity frames, whose identity fit already gave them expression, light and pose) a clip
is several chains, each from its start (the clip's first frame, or a seed, warm-started
from its identity-fit coefficients): a seed's chain keeps its frames from ``seed_warmup``
frames after the seed (its start effect faded, as a clip's) up to where the next chain's
kept frames begin, and the chain before it keeps going up to there. The chains are
independent, so they are fitted in lockstep, one batch of frames per step (batched
Gauss-Newton: on a CPU a frame costs about a quarter less than alone at 5-9 chains; on a
GPU the batch is nearly free).

The clip's first chain (the frames before the first seed's chain keeps its own) can run
backwards instead (``ClipJob.first_back``, :func:`first_chain_back`): from the first
seed's chain's first kept frame, once that is fitted, down to the clip's first frame,
each frame warm-started from the one after it. It then needs neither a cold start (the
first_* schedule, about a photo's fit) nor warm-up frames before the clip.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from core.errors import UserError
from core.fit.fitter import PoseRef
from core.io.video import VideoReader
from core.landmarks.crop import crop_face, photo_to_crop
from core.models.coeffs import Coeffs
from core.render.camera import Camera

# The per-frame coefficient groups of a video (identity and albedo are the video's).
PER_FRAME_GROUPS = ("exp", "gamma", "angles", "trans")

# The crops a worker keeps to fit chains in lockstep (see fit_clip): at most this many
# bytes (256 px crops: about 1,300 frames).
CHAIN_CROP_BYTES = 256 << 20
# A seed's chain is at least this many warm-ups long (see chain_seeds).
CHAIN_MIN_WARMUPS = 3


def decoder_threads(job) -> int:
    """A CPU worker's video decoder threads (:class:`core.io.video.VideoReader`): its share
    of the cores (``job.threads``, as its torch threads); OpenCV's choice beside a GPU."""
    return max(1, int(job.threads)) if job.session.device == "cpu" else 0


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


def start_pose(job, camera: Camera, j: int, angles: np.ndarray, trans: np.ndarray,
               prev: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Frame ``prev``'s (default j - 1) fitted pose (``angles``, ``trans``) as frame j's
    start: carried into frame j's crop for the crop camera (:func:`transfer_pose`); in
    the video's frame camera, as it is."""
    if job.camera is None:
        return transfer_pose(angles, trans, job.crop_boxes[j - 1 if prev is None else prev], job.crop_boxes[j], camera)
    return angles, trans


def video_ended(job, frame: int) -> UserError:
    """The error for a video that ended at source frame ``frame``, before ``job.stop``."""
    return UserError(f"video '{job.video_path}' ended at frame {frame}, expected {job.stop} frames")


def frame_fitter(job, session, boxes: np.ndarray):
    """The fitter of frames with crop ``boxes`` (B, 4): the session's (the crop camera), or
    with the video's frame camera seen through those crops."""
    f = session.fitter
    if job.camera is None:
        return f
    return f.with_camera(job.camera.crop(boxes, session.camera.image_size, dtype=f.dtype, device=session.device))


def chain_seeds(frames, first: int, stop: int, warmup: int) -> List[int]:
    """The identity frames (source indices ``frames``) a video of source frames [first,
    stop) starts chains at: in order, each at least CHAIN_MIN_WARMUPS warm-ups
    (``warmup`` frames, at least 1) after the video's first frame and the seed before it,
    and more than ``warmup`` frames before the end (shorter chains cost more in warm-up
    than fitting them in lockstep saves). Chosen for the whole video, so a clip's chains
    do not depend on the worker count."""
    gap = CHAIN_MIN_WARMUPS * max(int(warmup), 1)
    out: List[int] = []
    prev = int(first)
    for f in sorted(int(v) for v in frames):
        if f - prev >= gap and f + warmup < stop:
            out.append(f)
            prev = f
    return out


def chain_bounds(job) -> List[Tuple[int, int, int]]:
    """The clip's chains as (a, k, b) positions in [0, stop - fit_start): each fits [a, b)
    and keeps [k, b); one from the first frame (k = a = 0) and one from each seed after it
    (k = a + seed_warmup); the kept ranges tile the clip."""
    return _bounds(job.fit_start, job.stop, job.seeds, job.seed_warmup)


def _bounds(fit_start: int, stop: int, seeds, warmup: int) -> List[Tuple[int, int, int]]:
    """:func:`chain_bounds` of a clip fitting source frames [fit_start, stop) with ``seeds``."""
    total = stop - fit_start
    w = max(0, int(warmup))
    starts = sorted({int(f) - fit_start for f in seeds if fit_start < int(f) < stop})
    starts = [a for a in starts if a + w < total]
    keeps = [0] + [a + w for a in starts] + [total]
    return [(a, keeps[i], keeps[i + 1]) for i, a in enumerate([0] + starts)]


def lockstep_pays(fit_start: int, stop: int, seeds, warmup: int, tar_size: int) -> bool:
    """Whether a clip of source frames [fit_start, stop) with ``seeds`` has chains to fit
    side by side: some group of them within CHAIN_CROP_BYTES holds two or more. Else
    (a long video's chains are each longer than that) it is better fitted as one chain,
    composed as it is read."""
    spans = [(a, b) for a, _, b in _bounds(fit_start, stop, seeds, warmup)]
    return any(len(g) > 1 for g in _groups(spans, _budget(tar_size)))


def first_chain_back(fit_start: int, stop: int, seeds, warmup: int, tar_size: int) -> bool:
    """Whether a clip of source frames [fit_start, stop) with ``seeds`` can fit its first
    chain backwards (see the module docstring): it has a seed's chain, and the two
    chains' crops are kept together (the first group of :func:`lockstep_pays` holds both)."""
    spans = [(a, b) for a, _, b in _bounds(fit_start, stop, seeds, warmup)]
    return len(spans) > 1 and 1 in _groups(spans, _budget(tar_size))[0]


def _budget(tar_size: int) -> int:
    """Frames whose crops fit in CHAIN_CROP_BYTES."""
    return max(1, CHAIN_CROP_BYTES // (tar_size * tar_size * 3))


def _groups(spans: List[Tuple[int, int]], budget: int) -> List[List[int]]:
    """Indices of consecutive spans [(start, stop)] grouped so that a group covers at most
    ``budget`` frames (a span longer than that is a group of its own)."""
    groups: List[List[int]] = []
    for i, (a, b) in enumerate(spans):
        if groups and max([b] + [spans[j][1] for j in groups[-1]]) - spans[groups[-1][0]][0] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def fit_chains(job, session, out, fitted, done_mask, finished: Callable[[List[int]], None]) -> None:
    """Fit the clip's chains (:func:`chain_bounds`; ``job`` a
    :class:`~core.pipelines.video.clips.ClipJob`), each from its first kept frame not done
    (``done_mask``) yet, warm-started there from the frame before when that one is fitted
    (the first chain with ``job.first_back``: from its last frame not done, down, from the
    frame after it once that is done). Fills ``out`` ({group: (N, n)}) and ``fitted``
    (N,) at the kept frames and calls ``finished(positions)`` with those of each step
    (which must mark them in ``done_mask``). The video is read once, in order
    (no seeking back), in groups of chains whose crops fit in CHAIN_CROP_BYTES: the
    group's crops are kept, then its chains are fitted in lockstep, one batch per step (a
    chain longer than that is fitted as it is read). With ``job.crops`` (the landmark pass
    cut them) the video is not read at all."""
    tar = session.camera.image_size
    todo = []
    for i, (a, k, b) in enumerate(chain_bounds(job)):
        if done_mask[k:b].all():
            continue
        if i == 0 and job.first_back and b < len(done_mask):
            # backwards: the frames not done yet are [0, x) (a resumed chain did [x, b))
            todo.append(_Chain(a, k, int(np.flatnonzero(~done_mask[:b])[-1]) + 1, back=True))
            continue
        seed = job.seeds.get(job.fit_start + a)
        last = None
        if done_mask[k:b].any():  # resumed: from the first kept frame not done, after the one before
            a = k = k + int(np.argmin(done_mask[k:b]))
            seed = None
            if a > 0 and fitted[a - 1]:
                last = (a - 1, {g: out[g][a - 1] for g in PER_FRAME_GROUPS})
        todo.append(_Chain(a, k, b, seed, last))

    with contextlib.ExitStack() as stack:
        reader = None if job.crops is not None else \
            stack.enter_context(VideoReader(job.video_path, threads=decoder_threads(job)))
        for idx in _groups([(c.start, c.stop) for c in todo], _budget(tar)):
            group = [todo[i] for i in idx]
            for c in group:
                if c.back and not (done_mask[c.stop] or any(not o.back and o.start <= c.stop < o.stop for o in group)):
                    c.back = False  # the frame it would start from comes later: from a cold start
            frames = _read_crops(reader, job, group[0].start, max(c.stop for c in group), tar)
            if len(group) == 1 and not group[0].back:  # one chain: fitted as it is read
                for j, crop in frames:
                    finished(_fit_step(job, session, [(group[0], j, crop)], out, fitted))
                continue
            crops = dict(frames)
            while True:
                step = [(c, j, crops.get(j)) for c in group for j in [c.advance(done_mask, out, fitted)] if j is not None]
                if not step:
                    break
                finished(_fit_step(job, session, step, out, fitted))


@dataclass
class _Chain:
    """A chain of frames being fitted: positions [start, stop), kept from ``keep``; the
    identity-fit coefficients of its first frame (``seed``, or None: it starts cold or from
    ``last``) and its last fitted frame, (position, {group: (n,) array}) or None.
    ``back``: fitted from stop - 1 down to start (every frame kept), starting once frame
    ``stop`` is done, from that frame's fit."""

    start: int
    keep: int
    stop: int
    seed: Optional[Dict[str, np.ndarray]] = None
    last: Optional[Tuple[int, Dict[str, np.ndarray]]] = None
    back: bool = False
    at: Optional[int] = None  # the position fitted last (None: none yet)

    def advance(self, done_mask: np.ndarray, out, fitted: np.ndarray) -> Optional[int]:
        """The position to fit next (and taken as fitted), or None: the chain is finished
        or (``back``) waits for frame ``stop``."""
        if not self.back:
            j = self.start if self.at is None else self.at + 1
        elif self.at is None:
            if not done_mask[self.stop]:
                return None
            if fitted[self.stop]:
                self.last = (self.stop, {g: out[g][self.stop] for g in PER_FRAME_GROUPS})
            j = self.stop - 1
        else:
            j = self.at - 1
        if not self.start <= j < self.stop:
            return None
        self.at = j
        return j


def _read_crops(reader: Optional[VideoReader], job, a: int, b: int, tar: int):
    """(position, crop (tar, tar, 3) uint8, or None without a face) of positions [a, b),
    read in order (UserError when the video ends early); from ``job.crops`` when the
    landmark pass cut them (``reader`` None)."""
    if reader is None:
        for j in range(a, b):
            yield j, job.crops[j] if np.all(np.isfinite(job.landmarks[j])) else None
        return
    j = a
    for index, frame in reader.frames(job.fit_start + a, job.fit_start + b, job.timestamps):
        j = index - job.fit_start
        has_face = np.all(np.isfinite(job.landmarks[j]))
        yield j, crop_face(frame, job.crop_boxes[j], tar) if has_face else None
        j += 1
    if j < b:
        raise video_ended(job, job.fit_start + j)


def _fit_step(job, session, step, out, fitted) -> List[int]:
    """Fit one frame of each chain, ``step`` = [(:class:`_Chain`, position, crop or None)]: a
    seed from its identity-fit coefficients and a frame after a fitted one from it (one
    batch, the following-frame schedule, the pose pulled towards the start), a frame after
    none (the chain's first, or the first after frames without a face) from zero with the
    first_* schedule (a batch of its own). Frames without a face (None) are left
    unfitted. Writes the kept frames' results into ``out`` and ``fitted``; returns their
    positions."""
    fitter, device = session.fitter, session.device
    dt, tar = fitter.dtype, session.camera.image_size
    warm, cold = [], []
    for st, j, crop in step:
        if crop is None:
            st.last = None
        elif st.seed is not None and j == st.start:
            warm.append((st, j, crop, st.seed))
        elif st.last is not None and abs(st.last[0] - j) == 1:  # the frame before it in the chain
            prev = st.last[1]
            ang, tr = start_pose(job, session.camera, j, prev["angles"], prev["trans"], prev=st.last[0])
            warm.append((st, j, crop, {**prev, "angles": ang, "trans": tr}))
        else:
            cold.append((st, j, crop, None))
    for group, following in ((warm, True), (cold, False)):
        if not group:
            continue
        pos = [j for _, j, _, _ in group]
        crops = np.stack([crop for _, _, crop, _ in group])
        lms = np.stack([photo_to_crop(job.landmarks[j], job.crop_boxes[j], tar) for j in pos])
        n = len(group)
        ident = {g: torch.as_tensor(getattr(job, g), dtype=dt, device=device)[None].expand(n, -1) for g in ("id", "tex")}
        if following:
            start = {g: torch.as_tensor(np.stack([s[g] for _, _, _, s in group]), dtype=dt, device=device)
                     for g in PER_FRAME_GROUPS}
            init = Coeffs(**ident, **start)
            pose_ref = PoseRef(angles=start["angles"], trans=start["trans"])
        else:
            init, pose_ref = fitter.zeros(n).replace(**ident), None
        res = frame_fitter(job, session, job.crop_boxes[pos]).fit(
            torch.as_tensor(lms, dtype=dt, device=device), torch.as_tensor(crops, dtype=dt, device=device),
            init=init, nonrigid_groups=PER_FRAME_GROUPS, pose_ref=pose_ref, following=following, losses=False)
        coeffs = {g: getattr(res.coeffs, g).detach().cpu().numpy().astype(np.float32) for g in PER_FRAME_GROUPS}
        for i, (st, j, _, _) in enumerate(group):
            st.last = (j, {g: v[i] for g, v in coeffs.items()})
            if j >= st.keep:
                for g in PER_FRAME_GROUPS:
                    out[g][j] = coeffs[g][i]
                fitted[j] = True
    return [j for st, j, _ in step if j >= st.keep]
