"""core.landmarks.smoothing: a landmark track smoothed over time without lag, never across
a cut or a frame without a face."""
import numpy as np
import pytest

from core.landmarks.smoothing import smooth_landmarks, track_segments
from core.landmarks.tracking import SOURCE_DETECT, SOURCE_NONE, SOURCE_TRACK


def _track(n, rng=None, noise=0.0):
    """(n, 68, 2) points moving along quadratics in time (a turning, accelerating head)."""
    t = np.arange(n, dtype=np.float64)[:, None, None]
    base = np.random.default_rng(0).uniform(100, 300, size=(1, 68, 2))
    vel = np.random.default_rng(1).uniform(-4, 4, size=(1, 68, 2))
    acc = np.random.default_rng(2).uniform(-0.1, 0.1, size=(1, 68, 2))
    clean = base + vel * t + acc * t ** 2
    noisy = clean + (rng.normal(0.0, noise, clean.shape) if noise else 0.0)
    return clean, noisy


def test_segments_split_at_frames_without_a_face_and_at_re_detections():
    D, T, N = SOURCE_DETECT, SOURCE_TRACK, SOURCE_NONE
    src = np.array([D, T, T, N, N, T, T, D, T, T, T, N])
    assert track_segments(src) == [(0, 3), (5, 7), (7, 11)]
    assert track_segments(np.array([N, N])) == []
    assert track_segments(np.array([D] * 3)) == [(0, 1), (1, 2), (2, 3)]


def test_motion_along_a_quadratic_comes_out_unchanged():
    """No lag, however fast: a track that is a quadratic in time is its own smoothing
    (a moving average of the same window would lag by pixels here)."""
    clean, _ = _track(40)
    src = np.full(40, SOURCE_TRACK)
    src[0] = SOURCE_DETECT
    out = smooth_landmarks(clean, src, 5, points=slice(None))
    assert np.abs(out - clean).max() < 1e-9
    lagged = np.stack([clean[max(0, i - 2):i + 3].mean(0) for i in range(40)])
    assert np.abs(lagged - clean)[2:-2].max() > 0.05


def test_detector_noise_is_reduced():
    """White noise of 1 px on the points: the smoothed track is closer to the true one
    (window 5, quadratic: the noise's std about 0.7x in the middle of a run)."""
    clean, noisy = _track(300, rng=np.random.default_rng(3), noise=1.0)
    src = np.full(300, SOURCE_TRACK)
    src[0] = SOURCE_DETECT
    out = smooth_landmarks(noisy.astype(np.float32), src, 5)
    assert out.dtype == np.float32 and out.shape == noisy.shape
    raw = np.abs(noisy - clean)[5:-5, 17:].std()
    smooth = np.abs(out - clean)[5:-5, 17:].std()
    assert smooth < 0.8 * raw
    # The jaw contour (0-16) is left as detected by default.
    assert np.array_equal(out[:, :17], noisy.astype(np.float32)[:, :17])


def test_no_smoothing_across_a_cut_or_a_gap():
    """A jump at a re-detection (a cut) stays a jump (smoothing over it would bend the
    frames around it); frames without a face stay NaN and split the track."""
    D, T, N = SOURCE_DETECT, SOURCE_TRACK, SOURCE_NONE
    lms = np.zeros((20, 68, 2))
    lms[8:] = 100.0                     # the cut: a re-detection at frame 8
    lms[14] = np.nan                    # no face at frame 14
    lms[15:17] += np.array([3.0, -2.0])  # a 2-frame run after the gap
    src = np.array([D] + [T] * 7 + [D] + [T] * 5 + [N] + [T] * 2 + [N] * 3)
    lms[17:] = np.nan
    out = smooth_landmarks(lms, src, 5, points=slice(None))
    assert np.array_equal(np.isnan(out), np.isnan(lms))
    ok = ~np.isnan(lms)
    assert np.abs(out[ok] - lms[ok]).max() < 1e-9


@pytest.mark.parametrize("window", [2, 4, -1])
def test_window_must_be_odd(window):
    with pytest.raises(ValueError, match="odd"):
        smooth_landmarks(np.zeros((10, 68, 2)), np.full(10, SOURCE_TRACK), window)


def test_window_0_is_off():
    _, noisy = _track(20, rng=np.random.default_rng(4), noise=1.0)
    assert np.array_equal(smooth_landmarks(noisy, np.full(20, SOURCE_TRACK), 0), noisy)


@pytest.mark.parametrize("n,window", [(40, 5), (9, 7), (7, 7), (30, 3)])
def test_savgol_is_scipys_interp_mode(n, window):
    """The filter without scipy.signal (a 1.3 s import) is scipy's savgol_filter, mode "interp"."""
    from scipy.signal import savgol_filter

    from core.landmarks.smoothing import savgol

    y = np.random.default_rng(n).normal(size=(n, 68, 2)) * 3 + np.arange(n)[:, None, None] ** 1.5
    assert np.abs(savgol(y, window, 2) - savgol_filter(y, window, 2, axis=0, mode="interp")).max() < 1e-9
