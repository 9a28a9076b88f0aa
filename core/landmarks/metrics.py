"""Landmark accuracy measures, in one place (outputs, video report, benchmarks)."""
from __future__ import annotations

import numpy as np

# The 50 inner iBUG points used for NME: the chin (8, 0-based) and 17-67 (brows, nose,
# eyes, mouth); the jaw line is left out because its points slide along the contour.
INNER_POINTS = np.r_[8, 17:68]


def interocular(landmarks: np.ndarray) -> float:
    """Distance between the two eye centres (iBUG 36-41 and 42-47), pixels."""
    p = np.asarray(landmarks, dtype=np.float64)
    return float(np.linalg.norm(p[36:42].mean(0) - p[42:48].mean(0)))


def landmark_nme(pred: np.ndarray, ref: np.ndarray, points=INNER_POINTS) -> float:
    """Mean point distance over ``points`` divided by ``ref``'s inter-ocular distance.

    pred, ref: (68, 2) in the same pixels; points: indices, or None for all 68.
    """
    p, q = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if points is not None:
        p, q = p[points], q[points]
    return float(np.linalg.norm(p - q, axis=1).mean() / max(interocular(ref), 1e-9))
