"""Tests for core.landmarks.tracking: the tracker follows a face moved by a known similarity
transform, reports blank frames as "no face" and detects again after them and after a cut,
and the plausibility checks and box relation behave."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from core.landmarks.detect import DlibDetector
from core.io.image import read_image
from core.landmarks.tracking import (SOURCE_DETECT, SOURCE_TRACK, FaceTracker, apply_box_relation, box_relation,
                           interocular, landmarks_box, landmarks_plausible)

REPO = Path(__file__).resolve().parents[1]
CANVAS = (480, 360)  # width, height


def _similarity(t: float) -> np.ndarray:
    """(2, 3) photo -> canvas transform at time t in [0, 1]: a smooth drift, turn and zoom."""
    angle = 8.0 * np.sin(np.pi * t)
    scale = 0.75 * (1.0 + 0.12 * t)
    centre = (256.0, 230.0)  # about the astronaut's face
    m = cv2.getRotationMatrix2D(centre, angle, scale)
    m[:, 2] += (CANVAS[0] / 2 - centre[0] + 50 * t, CANVAS[1] / 2 - centre[1] + 20 * np.sin(2 * np.pi * t))
    return m


def moving_photo_clip(n: int = 12):
    """Frames of data/astronaut.jpg moved by known similarities, and those transforms."""
    photo = read_image(REPO / "data" / "astronaut.jpg")
    mats = [_similarity(k / max(n - 1, 1)) for k in range(n)]
    frames = [cv2.warpAffine(photo, m, CANVAS, flags=cv2.INTER_LINEAR) for m in mats]
    return photo, frames, mats


@pytest.fixture(scope="module")
def detector():
    return DlibDetector()


@pytest.fixture(scope="module")
def clip():
    return moving_photo_clip()


def _apply(m, pts):
    return np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]


def test_follows_known_motion(detector, clip):
    photo, frames, mats = clip
    ref = detector.detect(photo)[0].landmarks
    tracker = FaceTracker(detector)
    sources = []
    for frame, m in zip(frames, mats):
        face = tracker.update(frame)
        assert face is not None
        sources.append(face.source)
        truth = _apply(m, ref)
        err = np.linalg.norm(face.landmarks - truth, axis=1).mean() / interocular(truth)
        assert err < 0.06, (len(sources), err)
        # The face box is of the detector's kind: near a fresh detection's box.
        det = detector.detect(frame)[0]
        side = det.box[2] - det.box[0]
        assert np.abs(face.box - det.box).max() < 0.2 * side
    assert sources[0] == SOURCE_DETECT
    # Mostly tracked: a track that goes astray on fast motion is caught and re-detected.
    assert sources.count(SOURCE_TRACK) >= 0.75 * len(frames)
    assert tracker.num_detections == sources.count(SOURCE_DETECT)


def test_blank_frames_are_no_face_and_the_face_is_found_again(detector, clip):
    _, frames, _ = clip
    blank = np.zeros_like(frames[0])
    grey = np.full_like(frames[0], 128)
    seq = frames[:4] + [blank, grey] + frames[6:10]
    tracker = FaceTracker(detector)
    out = [tracker.update(f) for f in seq]
    assert [o is None for o in out] == [False] * 4 + [True, True] + [False] * 4
    assert out[6].source == SOURCE_DETECT  # found again by a full detection
    assert SOURCE_TRACK in [o.source for o in out[7:]]  # and tracked from there
    assert tracker.tracking


def test_a_cut_to_another_face_is_detected_again(detector, clip):
    _, frames, _ = clip
    other = read_image(REPO / "data" / "grace_hopper.jpg")
    other = cv2.resize(other, (300, 352))
    canvas = np.zeros_like(frames[0])
    canvas[4:356, 90:390] = other
    truth = detector.detect(canvas)[0].landmarks
    tracker = FaceTracker(detector)
    for f in frames[:3]:
        tracker.update(f)
    face = tracker.update(canvas)
    assert face is not None and face.source == SOURCE_DETECT
    assert np.linalg.norm(face.landmarks - truth, axis=1).mean() < 0.05 * interocular(truth)
    assert tracker.num_losses == 1


def test_no_face_at_all(detector):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
    tracker = FaceTracker(detector)
    assert tracker.update(noise) is None
    assert tracker.update(np.zeros_like(noise)) is None
    assert not tracker.tracking


def test_plausibility(detector, clip):
    photo, _, _ = clip
    lms = detector.detect(photo)[0].landmarks
    assert landmarks_plausible(lms, photo.shape)
    flipped = lms.copy()
    flipped[:, 1] = 511 - flipped[:, 1]  # upside down: brows below the mouth
    assert not landmarks_plausible(flipped)
    assert not landmarks_plausible(np.full((68, 2), np.nan))
    assert not landmarks_plausible(lms * 0.01)  # a few pixels: too small
    collapsed = lms.copy()
    collapsed[48:68] = collapsed[30]  # mouth on the nose tip
    assert not landmarks_plausible(collapsed)
    assert not landmarks_plausible(lms + 2000, photo.shape)  # outside the image
    assert not landmarks_plausible(lms[:60])


def test_box_relation_round_trip():
    rng = np.random.default_rng(1)
    lms = rng.uniform(100, 200, size=(68, 2))
    box = np.array([90.0, 80.0, 215.0, 205.0])
    rel = box_relation(lms, box)
    np.testing.assert_allclose(apply_box_relation(lms, rel), box, atol=1e-9)
    # The relation moves and scales with the landmarks.
    moved = lms * 2.0 + 30.0
    np.testing.assert_allclose(apply_box_relation(moved, rel), box * 2.0 + 30.0, atol=1e-9)
    np.testing.assert_allclose(landmarks_box(lms), [lms[:, 0].min(), lms[:, 1].min(), lms[:, 0].max(), lms[:, 1].max()])
