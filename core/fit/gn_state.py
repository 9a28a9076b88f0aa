"""The loss of a batch of frames at one point (:class:`State`: per-frame costs and terms
and the render the Gauss-Newton model reuses) and the per-frame selections the
Levenberg-Marquardt loops make of it: the frames still moving (:func:`take_state`), each
frame's accepted point (:func:`merge_states`), parts evaluated apart put together
(:func:`cat_states`). Shapes: B frames, N vertices, S pixels a side.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from core.models.coeffs import Coeffs


@dataclass
class State:
    """The loss at one point: per-frame totals (B,) and what the linearisation reuses."""

    cost: torch.Tensor    # (B,) each frame's own total (Objective.frame_costs)
    terms: Dict[str, torch.Tensor]  # (B,) each unweighted term (Objective.evaluate)
    coeffs: Coeffs
    out: object          # FaceOutput
    screen: torch.Tensor  # (B, N, 3)
    pix_to_face: torch.Tensor  # (B, S, S)
    keypoints: Optional[torch.Tensor]


def _map_frames(fn, st: State, *others: State) -> State:
    """A state whose per-frame tensors (first dim B = the batch) are ``fn`` of ``st``'s and
    the same fields of ``others`` (states of the same frames, or of other frames with the
    same fields per-frame: :func:`cat_states`); values shared by the frames (batch 1),
    scalars and missing ones (None) are ``st``'s as they are."""
    batch = st.cost.shape[0]

    def each(v, *w):
        per_frame = torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch
        return fn(v, *w) if per_frame and all(torch.is_tensor(x) for x in w) else v

    out = None if st.out is None else dataclasses.replace(st.out, **{
        f.name: each(getattr(st.out, f.name), *(getattr(o.out, f.name) for o in others))
        for f in dataclasses.fields(st.out)})
    return State(cost=each(st.cost, *(o.cost for o in others)),
                 terms={k: each(v, *(o.terms[k] for o in others)) for k, v in st.terms.items()},
                 coeffs=Coeffs(**{k: each(v, *(getattr(o.coeffs, k) for o in others))
                                  for k, v in st.coeffs.as_dict().items()}),
                 out=out, screen=each(st.screen, *(o.screen for o in others)),
                 pix_to_face=each(st.pix_to_face, *(o.pix_to_face for o in others)),
                 keypoints=each(st.keypoints, *(o.keypoints for o in others)))


def take_state(st: State, keep: torch.Tensor) -> State:
    """The state of the frames ``keep`` ((B,) bool or (B',) ids) of a batch: every per-frame
    tensor indexed (values shared by the frames, batch 1, kept as they are)."""
    return _map_frames(lambda v: v[keep], st)


def merge_states(better: torch.Tensor, new: State, old: State) -> State:
    """Frame by frame, ``new`` where ``better`` (B,) bool, else ``old``: two states of the
    same frames (same landmark vertex ids per frame where both have them). Values shared
    by the frames (batch 1) are the same in both and kept. No rendering: the result is
    what evaluating each frame at its chosen point gives."""
    return _map_frames(lambda a, b: torch.where(better.view(-1, *([1] * (a.dim() - 1))), a, b), new, old)


def cat_states(parts: Sequence[State]) -> State:
    """The state of consecutive parts' frames together, in order: every per-frame tensor
    (first dim the part's batch) concatenated, values shared by the frames (batch 1) and
    the rest taken from the first part. Each part must have at least 2 frames (a part of
    one frame cannot tell its per-frame values from the shared ones)."""
    sizes = [int(p.cost.shape[0]) for p in parts]
    if min(sizes) < 2:
        raise ValueError(f"cat_states needs parts of at least 2 frames; got {sizes}")
    return _map_frames(lambda *vs: torch.cat(vs), parts[0], *parts[1:])
