"""Temporal smoothing of a landmark track before it is fitted.

A landmark detector's points jump by a pixel or two from frame to frame around where they
should be; fitted as they are, that noise becomes the head's jitter. Each point's track is
smoothed with a Savitzky-Golay filter: over a centred window of ``window`` frames, the
least-squares polynomial of degree ``order`` (2: constant acceleration) is evaluated at the
middle frame. It does not lag (a track that is a quadratic in time over the window comes out
unchanged, however fast it moves), unlike a moving average or a causal filter, and at the
ends of a segment the polynomial fitted to its first / last ``window`` frames is used.

Segments: a track is smoothed only within runs of consecutive frames with a face, and a
full detection (after the tracker lost the face, e.g. at a cut) starts a new run, so no
smoothing crosses a cut. A run shorter than the window gets the longest odd window it holds
(a run of ``order`` + 1 frames or fewer is fitted exactly by the polynomial: left as it is).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .tracking import SOURCE_DETECT, SOURCE_NONE

__all__ = ["track_segments", "smooth_landmarks"]


def track_segments(source: np.ndarray) -> List[Tuple[int, int]]:
    """[start, stop) runs of frames with a face, each starting at a frame after no face or
    at a full detection. source: (N,) core.landmarks.tracking.SOURCE_* codes."""
    source = np.asarray(source)
    runs: List[Tuple[int, int]] = []
    start = None
    for i, s in enumerate(source.tolist()):
        if s == SOURCE_NONE or (s == SOURCE_DETECT and start is not None):
            if start is not None:
                runs.append((start, i))
            start = None if s == SOURCE_NONE else i
        elif start is None:
            start = i
    if start is not None:
        runs.append((start, len(source)))
    return runs


def smooth_landmarks(landmarks: np.ndarray, source: np.ndarray, window: int, order: int = 2) -> np.ndarray:
    """(N, L, 2) landmarks smoothed over time (see the module docstring); frames without a
    face (NaN) stay NaN. window: odd number of frames (0 or 1: unchanged)."""
    from scipy.signal import savgol_filter

    window = int(window)
    if window not in (0, 1) and (window < 3 or window % 2 == 0):
        raise ValueError(f"window must be 0 (off) or an odd number of frames >= 3; got {window}")
    out = np.array(landmarks, dtype=np.float64, copy=True)
    if window <= 1:
        return out.astype(np.asarray(landmarks).dtype)
    for a, b in track_segments(source):
        n = b - a
        w = min(window, n if n % 2 else n - 1)
        if w < order + 2:
            continue
        out[a:b] = savgol_filter(out[a:b], w, order, axis=0, mode="interp")
    return out.astype(np.asarray(landmarks).dtype)
