"""The focal length of a frame camera from the landmarks: a profile of the landmark fit
over candidate focal lengths.

The focal length of a face seen from one side trades against its depth and distance, and a
3DMM's identity can absorb much of what is left (the face's depth), so the photometric
term, whose appearance model rarely explains a real face exactly, pulls the estimate far
off (measured: a 800 px truth estimated at 290-380 px by a joint Gauss-Newton step on
landmarks + colours). The landmarks alone carry the perspective cue more faithfully: for
each candidate focal the landmark fit (rigid, then pose + identity + expression with the
priors, no rendering, a fraction of a second) is run, and the focal that leaves the
smallest landmark term wins, refined by a parabola in log focal through the best candidate
and its neighbours.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import numpy as np
import torch

from core.models.coeffs import Coeffs
from core.render.camera import Camera

# Candidate focal lengths, as factors of the start; then a finer pass around the best.
COARSE_FACTORS = tuple(np.geomspace(0.35, 3.0, 11))
FINE_STEPS = 4
# The landmarks determine the focal when the landmark term at focal lengths CONTRAST_STEP
# times shorter and longer than the estimate is at least MIN_CONTRAST (relative) higher.
# Measured on synthetic views: exact landmarks give 0.02-0.8 (low when a strong identity
# keeps the priors' share of the fit high); dlib's on a rendered Surrey face 0.007, its
# systematic errors against the model's landmark vertices then move the minimum by 100 %.
CONTRAST_STEP = 1.4
MIN_CONTRAST = 0.015


def profile_focal(fitter, camera_at: Callable[[float], Camera], landmarks: torch.Tensor, init: Coeffs,
                  start: float, shared: bool = True,
                  factors: Sequence[float] = COARSE_FACTORS) -> Tuple[np.ndarray, dict]:
    """The focal length(s) in the frame camera's pixels that minimise the landmark term.

    Args:
        fitter: a :class:`core.fit.fitter.Fitter`.
        camera_at: the crop camera (per-frame for a batch) of a frame focal length.
        landmarks: (B, L, 2) target landmarks in crop pixels.
        init: the starting coefficients (shared groups with batch 1 stay shared).
        start: the focal length the candidates are factors of.
        shared: one focal for the batch (the landmark term averaged over the frames), else
            one per frame.
    Returns the focal length(s), (1,) or (B,), and the profile {"focal": (K,), "lm": (K, B),
    "contrast": (1,) or (B,), "determined": (1,) or (B,) bool}: the contrast is the smaller
    relative rise of the landmark term at CONTRAST_STEP times shorter and longer focal
    lengths; below MIN_CONTRAST the landmarks do not determine the focal.
    """
    def costs(focals: np.ndarray) -> np.ndarray:
        out = []
        for f in focals:
            res = fitter.with_camera(camera_at(float(f))).fit(landmarks, None, init=init)
            out.append(res.frame_losses["lm"].detach().cpu().numpy().astype(np.float64))
        return np.asarray(out)  # (K, B)

    focals = start * np.asarray(factors, dtype=np.float64)
    lm = costs(focals)
    curve = lm.mean(1, keepdims=True) if shared else lm
    # A finer pass between each frame's (or the batch's) neighbours of the best candidate.
    fine_focals = []
    for b in range(curve.shape[1]):
        k = int(np.argmin(curve[:, b]))
        lo, hi = np.log(focals[max(k - 1, 0)]), np.log(focals[min(k + 1, len(focals) - 1)])
        fine_focals.append(np.exp(np.linspace(lo, hi, FINE_STEPS + 2)[1:-1]))
    grid = np.unique(np.concatenate(fine_focals))
    fine = costs(grid)
    all_f = np.concatenate([focals, grid])
    all_lm = np.concatenate([lm, fine])
    order = np.argsort(all_f)
    all_f, all_lm = all_f[order], all_lm[order]
    curve = all_lm.mean(1, keepdims=True) if shared else all_lm
    logf = np.log(all_f)
    out = np.array([_parabola_min(logf, curve[:, b]) for b in range(curve.shape[1])])
    contrast = []
    for b, x in enumerate(out):
        at = np.interp([x - np.log(CONTRAST_STEP), x, x + np.log(CONTRAST_STEP)], logf, curve[:, b])
        contrast.append(min(at[0], at[2]) / max(at[1], 1e-30) - 1.0)
    contrast = np.asarray(contrast)
    return np.exp(out), {"focal": all_f, "lm": all_lm, "contrast": contrast, "determined": contrast >= MIN_CONTRAST}


def _parabola_min(x: np.ndarray, y: np.ndarray) -> float:
    """The minimum of the parabola through the lowest sample and its two neighbours (the
    lowest sample itself at an end of the range or when the parabola opens downwards)."""
    k = int(np.argmin(y))
    if k == 0 or k == len(x) - 1:
        return float(x[k])
    x0, x1, x2 = x[k - 1:k + 2]
    y0, y1, y2 = y[k - 1:k + 2]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    if a <= 0:
        return float(x1)
    return float(np.clip(-b / (2 * a), x0, x2))

