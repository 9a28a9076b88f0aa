"""Adam on the objective (the original's solver for every stage)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from core import threads
from core.models.coeffs import Coeffs
from .objective import Objective, PoseRef, shared_groups

# A schedule: (photo camera or None for the crop camera, images or None, iterations) stages.
Schedule = Sequence[Tuple[object, Optional[torch.Tensor], int]]


def adam(objective: Objective, coeffs: Coeffs, landmarks: torch.Tensor, schedule, groups: Tuple[str, ...],
         lr: float, pose_ref: Optional[PoseRef] = None, photo: bool = False, progress: bool = False,
         desc: str = "adam") -> Coeffs:
    """Minimise the objective over ``groups`` with one Adam state throughout.

    Args:
        coeffs: the start (per-frame or shared groups; the others are held).
        landmarks: (B, L, 2) targets in crop pixels.
        schedule: an iteration count (landmark and prior terms only) or a list of
            (photo camera or None, images (B, T, T, 3), iterations) run one after the other.
        lr: the learning rate; the light's is ``lr · cfg.gamma_lr_scale``.
        photo: with the photometric terms (rendering every iteration).
    """
    if isinstance(schedule, int):
        schedule = [(None, None, schedule)]
    leaves = {g: getattr(coeffs, g).detach().clone().requires_grad_(True) for g in groups}
    params = []
    for g, t in leaves.items():
        scale = objective.cfg.gamma_lr_scale if g == "gamma" else 1.0
        params.append({"params": [t], "lr": lr * scale})
    opt = torch.optim.Adam(params, lr=lr)
    fixed = {k: v.detach() for k, v in coeffs.as_dict().items() if k not in leaves}
    cached = objective.fixed_pieces(fixed) if photo else {}
    batch = landmarks.shape[0]
    bar = tqdm(total=sum(n for _, _, n in schedule), desc=desc, disable=not progress, leave=False)
    for cam, images, iters in schedule:
        for _ in range(iters):
            threads.tick()
            c = Coeffs(**fixed, **leaves)
            kp = objective.keypoints(c, landmarks)
            ev = objective.evaluate(c, landmarks, images if photo else None, pose_ref=pose_ref, keypoints=kp,
                                    photo_camera=cam, cached=cached)
            total = objective.total(ev.terms, shared_groups(c, batch))
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            bar.update(1)
    bar.close()
    return Coeffs(**fixed, **{k: v.detach() for k, v in leaves.items()})
