"""A batch's independent frames fitted side by side, one part per free CPU core.

On a CPU one photo's fit is a long chain of tensor operations, each too small for torch's
own threads to pay: on 2 cores a photo took 0.69 s with 2 threads and the same with 1.
The frames of a batch whose groups are all per-frame are independent problems, so a batch
is split into ``lanes`` contiguous parts, each fitted by its own Python thread running torch
at one thread (torch lets go of Python's lock inside its operations): every free core
then works on its own frames. Measured on 2 cores (8 photos, docs/performance.md): 0.62 s
a photo alone, 0.43 s in one batch, 0.28 s in two lanes of 4.

:func:`cpu_lanes` says how many: one per thread torch may use (the thread governor of
:mod:`core.threads` keeps that at the cores other programs leave free), at most one per
frame, and 1 off the CPU (a GPU batch is one set of kernels). Each part's result is exactly
that part fitted alone at one thread; :func:`fit_in_lanes` joins them into the batch's.
"""
from __future__ import annotations

import copy
import functools
import threading
from typing import Callable, List, Optional, Sequence, TypeVar

import torch

from core import threads
from core.models.coeffs import Coeffs
from .objective import shared_groups

__all__ = ["cpu_lanes", "splittable", "fit_in_lanes", "frame_parts", "run_lanes", "take_rows"]

T = TypeVar("T")


def cpu_lanes(device, batch: int) -> int:
    """Lanes for a batch of ``batch`` frames on ``device``: one per torch thread on a CPU,
    at most one per frame; 1 on any other device."""
    if torch.device(device).type != "cpu" or batch < 2:
        return 1
    return max(1, min(int(batch), torch.get_num_threads()))


def splittable(batch: int, init: Optional[Coeffs], pose_ref) -> bool:
    """Whether the frames are independent: no group of ``init`` shared by the batch
    (:func:`core.fit.objective.shared_groups`, as in the video identity fit) and
    ``pose_ref`` per frame."""
    if init is not None and shared_groups(init, batch):
        return False
    return pose_ref is None or all(t.shape[0] == batch for t in (pose_ref.angles, pose_ref.trans))


def fit_in_lanes(fitter, lanes: int, landmarks: torch.Tensor, images: Optional[torch.Tensor],
                 init: Optional[Coeffs] = None, pose_ref=None, **fit_kw):
    """``fitter.fit`` of the B frames (every group per-frame, :func:`splittable`) in
    ``lanes`` threads, each fitting a contiguous part at one torch thread; the parts'
    results joined in frame order (a :class:`core.fit.fitter.FitResult`; its timings are
    each stage's longest over the lanes, which ran at the same time; ``lanes`` the count).

    landmarks: (B, L, 2); images: (B, T, T, 3) or None; init: optional (B, ...) groups;
    pose_ref: optional (B, 3) angles / trans; ``fit_kw``: the rest of ``Fitter.fit``'s."""
    parts = frame_parts(landmarks.shape[0], lanes, landmarks.device)

    def part(k: int, idx: torch.Tensor):
        sub = fitter.with_camera(fitter.camera.take(idx)) if fitter.camera.batched else fitter
        if k > 0 and sub.progress:  # one progress bar: the first lane's
            sub = copy.copy(sub)
            sub.progress = False
        return sub.fit(landmarks[idx], None if images is None else images[idx], init=take_rows(init, idx),
                       pose_ref=take_rows(pose_ref, idx), lanes=1, **fit_kw)

    results = run_lanes([functools.partial(part, k, idx) for k, idx in enumerate(parts)], name="fit-lane")
    return join_results(fitter, results)


def frame_parts(batch: int, lanes: int, device=None) -> List[torch.Tensor]:
    """The frames 0..batch-1 in at most ``lanes`` contiguous parts of sizes differing by at
    most one, none empty: a list of (B_k,) long tensors."""
    return [idx for idx in torch.arange(batch, device=device).tensor_split(max(1, int(lanes))) if idx.numel()]


def run_lanes(tasks: Sequence[Callable[[], T]], name: str = "lane") -> List[T]:
    """Call each of ``tasks`` in a thread of its own, each at one torch thread and out of
    the thread governor's reach (:func:`core.threads.one_thread`), all at the same time;
    their results in order. The first error of any is raised here once all have ended;
    this thread's torch thread count is restored. The threads are named ``name-k``."""
    results: List[Optional[T]] = [None] * len(tasks)
    errors: List[BaseException] = []
    before = torch.get_num_threads()

    def run(k: int) -> None:
        try:
            with threads.one_thread():
                results[k] = tasks[k]()
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    workers = [threading.Thread(target=run, args=(k,), daemon=True, name=f"{name}-{k}") for k in range(len(tasks))]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(before)
    if errors:
        raise errors[0]
    return results


def take_rows(value, idx: torch.Tensor):
    """The frames ``idx`` of a per-frame Coeffs / PoseRef (None stays None)."""
    if value is None:
        return None
    return type(value)(**{k: v[idx] for k, v in vars(value).items()})


def _cat(tensors: Sequence[Optional[torch.Tensor]], sizes: Sequence[int]) -> Optional[torch.Tensor]:
    """The parts' (B_k, ...) tensors in frame order; a part's (1, ...) broadcast row
    expanded to its B_k frames."""
    if any(t is None for t in tensors):
        return None
    return torch.cat([t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t for t, n in zip(tensors, sizes)])


def join_results(fitter, results: Sequence[object]):
    """One FitResult for the frames of ``results`` (FitResults of consecutive parts), as
    if fitted together by ``fitter``: the batch's losses recomputed from the frames' own
    terms (:meth:`core.fit.objective.Objective.batch_terms`)."""
    sizes = [r.coeffs.batch_size for r in results]
    coeffs = Coeffs(**{g: _cat([getattr(r.coeffs, g) for r in results], sizes) for g in vars(results[0].coeffs)})
    out = type(results[0])(coeffs=coeffs, losses={}, camera=fitter.camera, lanes=len(results),
                           keypoints=_cat([r.keypoints for r in results], sizes),
                           renders=_cat([r.renders for r in results], sizes))
    out.timings = {k: max(r.timings.get(k, 0.0) for r in results) for k in results[0].timings}
    if results[0].output is not None:
        first = results[0].output
        out.output = type(first)(**{k: _cat([getattr(r.output, k) for r in results], sizes) for k in vars(first)})
    if results[0].frame_losses:
        out.frame_losses = {k: _cat([r.frame_losses[k] for r in results], sizes) for k in results[0].frame_losses}
        terms = {k: v for k, v in out.frame_losses.items() if k != "total"}
        out.losses = {k: float(v) for k, v in fitter.objective.batch_terms(terms).items()}
    return out
