"""Temporal smoothing of a landmark track before it is fitted.

A landmark detector's points jump by a pixel or two from frame to frame around where they
should be; fitted as they are, that noise becomes the head's jitter. Each point's track is
smoothed with a Savitzky-Golay filter: over a centred window of ``window`` frames, the
least-squares polynomial of degree ``order`` (2: constant acceleration) is evaluated at the
middle frame. It does not lag (a track that is a quadratic in time over the window comes out
unchanged, however fast it moves), unlike a moving average or a causal filter, and at the
ends of a segment the polynomial fitted to its first / last ``window`` frames is used.

Which points: by default the 51 inner points (17-67: brows, nose, eyes, mouth), not the 17
jaw-contour points, which a detector puts on the silhouette and the fit matches to the
model's silhouette vertices frame by frame; smoothing them too measured worse head rotation
on rendered videos with known poses (docs/performance.md).

Segments: a track is smoothed only within runs of consecutive frames with a face, and a
full detection (after the tracker lost the face, e.g. at a cut) starts a new run, so no
smoothing crosses a cut. A run shorter than the window gets the longest odd window it holds
(a run of ``order`` + 1 frames or fewer is fitted exactly by the polynomial: left as it is).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .tracking import SOURCE_DETECT, SOURCE_NONE

__all__ = ["INNER", "track_segments", "savgol", "window_error", "smooth_landmarks"]


def track_segments(source: np.ndarray) -> List[Tuple[int, int]]:
    """[start, stop) runs of frames with a face, each starting at a frame after no face or
    at a full detection. source: (N,) core.landmarks.tracking.SOURCE_* codes."""
    runs: List[Tuple[int, int]] = []
    start = None
    for i, s in enumerate(np.asarray(source).tolist()):
        if start is not None and s in (SOURCE_NONE, SOURCE_DETECT):
            runs.append((start, i))
            start = None
        if start is None and s != SOURCE_NONE:
            start = i
    if start is not None:
        runs.append((start, len(source)))
    return runs


def savgol(y: np.ndarray, window: int, order: int = 2) -> np.ndarray:
    """Savitzky-Golay smoothing of ``y`` (T, ...) along axis 0 (T >= window, window odd >
    order): inside, the least-squares polynomial of degree ``order`` through the centred
    ``window`` samples, evaluated at the middle; within half a window of either end, the one
    through the first / last ``window`` samples, evaluated there (scipy's
    ``savgol_filter(..., mode="interp")``, without importing scipy.signal: 1.3 s here)."""
    y = np.asarray(y, dtype=np.float64)
    h = window // 2
    k = np.arange(-h, h + 1, dtype=np.float64)
    vander = k[:, None] ** np.arange(order + 1)            # (window, order + 1)
    fit = np.linalg.pinv(vander)                            # (order + 1, window): samples -> coefficients

    def end(part: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The polynomial through ``part`` (window samples) at the offsets ``at``."""
        coef = np.tensordot(fit, part, axes=(1, 0))          # (order + 1, ...)
        return np.tensordot(at[:, None] ** np.arange(order + 1), coef, axes=(1, 0))

    out = np.empty_like(y)
    windows = np.lib.stride_tricks.sliding_window_view(y, window, axis=0)  # (T - window + 1, ..., window)
    out[h:len(y) - h] = windows @ fit[0]
    out[:h] = end(y[:window], k[:h])
    out[len(y) - h:] = end(y[-window:], k[h + 1:])
    return out


def window_error(window: int) -> str:
    """What is wrong with a smoothing window ("" when it is 0, off, or an odd number >= 3)."""
    if window == 0 or (window >= 3 and window % 2 == 1):
        return ""
    return f"must be 0 (off) or an odd number of frames >= 3; got {window}"


INNER = slice(17, 68)  # the 68-point layout's inner points (the jaw contour is 0-16)


def smooth_landmarks(landmarks: np.ndarray, source: np.ndarray, window: int, order: int = 2,
                     points=INNER) -> np.ndarray:
    """(N, L, 2) landmarks with ``points`` (an index or slice of L; default the inner
    points of the 68-point layout) smoothed over time (see the module docstring); frames
    without a face (NaN) stay NaN. window: 0 (unchanged) or an odd number of frames >= 3
    (ValueError otherwise, see :func:`window_error`)."""
    window = int(window)
    problem = window_error(window)
    if problem:
        raise ValueError(f"window {problem}")
    if window == 0:
        return np.array(landmarks, copy=True)
    out = np.array(landmarks, dtype=np.float64, copy=True)
    for a, b in track_segments(source):
        n = b - a
        w = min(window, n if n % 2 else n - 1)
        if w < order + 2:
            continue
        out[a:b, points] = savgol(out[a:b, points], w, order)
    return out.astype(np.asarray(landmarks).dtype)
