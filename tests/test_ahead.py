"""core/pipelines/video/ahead.py: a helper process tracking the second half of the
landmark pass; the pass's results are exactly those of one tracker alone."""
from __future__ import annotations

import time

import numpy as np
import pytest

import core.pipelines.video.landmarks as L
from core.io.video_out import VideoWriter
from core.landmarks.detect import DlibDetector
from core.landmarks.tracking import FaceTracker, TrackerState
from core.pipelines.video.ahead import Ahead, AheadResult
from tests.test_tracking import CANVAS, moving_photo_clip

N = 40


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A 40-frame clip of a moving face, and the same with frames 18-23 blank (the
    helper's first frames then have no face)."""
    _, frames, _ = moving_photo_clip(N)
    out = {}
    for name, blank in (("face", ()), ("gap", range(18, 24))):
        path = str(tmp_path_factory.mktemp(name) / f"{name}.mp4")
        with VideoWriter(path, CANVAS, 25.0) as w:
            for k, f in enumerate(frames):
                w.write(np.zeros_like(f) if k in blank else f)
        out[name] = path
    return out


@pytest.fixture
def short_passes(monkeypatch):
    """The helper for passes of 20 frames and more (not 300), starting at the middle;
    records what it handed over."""
    monkeypatch.setattr(L, "MIN_FRAMES", 20)
    monkeypatch.setattr(L, "HELPER_LAG_FRAMES", 0)
    handed = []
    real = Ahead.rest

    def rest(self, *a, **k):
        r = real(self, *a, **k)
        if r is not None:
            handed.append((self.mid, r.start, r.num_frames))
        return r

    monkeypatch.setattr(Ahead, "rest", rest)
    return handed


class _SlowAfterMiddle(FaceTracker):
    """The pass's tracker, slowed down past the middle so that the helper (which first
    starts a process, in a first test the forkserver too, and loads the detector) is done
    before the pass ends: up to 10 s, though the pass stops as soon as the helper's frames
    are in."""

    def __init__(self, detector, **settings):
        super().__init__(detector, **settings)
        self.calls = 0

    def update(self, image):
        self.calls += 1
        if self.calls > N // 2:
            time.sleep(0.5)
        return super().update(image)


@pytest.mark.parametrize("name", ["face", "gap"])
def test_the_pass_with_a_helper_gives_exactly_the_pass_alone(videos, short_passes, name):
    det = DlibDetector()
    kw = dict(progress=False, crops=(0.3, 64), crop_bytes=1 << 30, keep={5, 30, 38})
    alone = L.landmark_pass(videos[name], det, **kw)
    helped = L.landmark_pass(videos[name], det, ahead=True, tracker=_SlowAfterMiddle(det), **kw)
    assert short_passes and short_passes[0][0] == N // 2  # the helper started at the middle ...
    mid, start, n = short_passes[0]
    assert start > mid and start + n == N                   # ... and gave the frames after the meeting point
    for field in ("landmarks", "face_boxes", "source", "timestamps", "crops"):
        np.testing.assert_array_equal(getattr(helped, field), getattr(alone, field), err_msg=field)
    assert sorted(helped.frames) == [5, 30, 38]
    for i in helped.frames:
        np.testing.assert_array_equal(helped.frames[i], alone.frames[i])
    if name == "gap":
        assert not alone.has_face[18:24].any() and alone.has_face[24:].all()


def test_the_helper_tracks_with_the_pass_trackers_settings(videos, short_passes):
    det = DlibDetector()
    alone = L.landmark_pass(videos["face"], det, progress=False, tracker=FaceTracker(det, refine=0))
    helped = L.landmark_pass(videos["face"], det, progress=False, ahead=True,
                             tracker=_SlowAfterMiddle(det, refine=0))
    assert short_passes
    np.testing.assert_array_equal(helped.landmarks, alone.landmarks)
    default = L.landmark_pass(videos["face"], det, progress=False)
    assert not np.array_equal(default.landmarks, alone.landmarks)  # the setting matters here


def test_no_helper_for_a_detector_that_uses_every_core(videos, short_passes, monkeypatch):
    started = []
    monkeypatch.setattr(L, "Ahead", lambda *a, **k: started.append(1))
    det = DlibDetector()
    det.single_core = False
    L.landmark_pass(videos["face"], det, progress=False, ahead=True)
    assert not started
    L.landmark_pass(videos["face"], DlibDetector(), progress=False, ahead=False)
    assert not started


def _state(x: float) -> TrackerState:
    return TrackerState(landmarks=np.full((68, 2), x, np.float32), patch=np.full((24, 24), x),
                        relation=np.array([0.0, -0.1, 1.0, 1.0]))


def test_the_pass_stops_only_where_it_stands_exactly_where_the_helper_stood():
    """Ahead.rest: the helper's frames after ``index`` only when the pass's tracker state,
    the frame's timestamp and its crop equal the helper's there, and something is left."""
    a = Ahead.__new__(Ahead)  # the decision alone, without a process
    a.mid, a.failed = 10, False
    n = 5
    crops = np.arange(n * 2 * 2 * 3, dtype=np.uint8).reshape(n, 2, 2, 3)
    a.result = AheadResult(start=10, landmarks=np.zeros((n, 68, 2), np.float32), boxes=np.zeros((n, 4)),
                           source=np.full(n, 2, np.int8), timestamps=400.0 + 40.0 * np.arange(n),
                           states=[_state(k).key() for k in range(n)], crops=crops, kept={11: "f11", 13: "f13"})
    assert a.rest(9, _state(0), 400.0) is None                      # before the helper's first frame
    assert a.rest(11, _state(0), 440.0, crops[1]) is None           # another state
    assert a.rest(11, _state(1), 440.5, crops[1]) is None           # another timestamp
    assert a.rest(11, _state(1), 440.0, crops[0]) is None           # another crop
    r = a.rest(11, _state(1), 440.0, crops[1])
    assert r.start == 12 and r.num_frames == 3 and r.kept == {13: "f13"}
    np.testing.assert_array_equal(r.crops, crops[2:])
    assert a.rest(14, _state(4), 560.0, crops[4]) is None           # nothing left after the helper's last frame
    none = TrackerState(landmarks=None, patch=None, relation=np.array([0.0, -0.1, 1.0, 1.0]))
    assert none.key() == TrackerState(None, None, none.relation.copy()).key() != _state(0).key()
    moved = _state(0)
    moved.landmarks[3, 1] = np.nextafter(np.float32(0), np.float32(1))  # the smallest change counts
    assert moved.key() != _state(0).key()


def test_a_helper_that_dies_leaves_the_pass_to_track_alone(videos, short_passes):
    """The helper's process killed before it sends anything: the pass tracks every frame
    itself, with the same results."""
    import os
    import signal

    det = DlibDetector()
    alone = L.landmark_pass(videos["face"], det, progress=False)

    class KillHelper(FaceTracker):
        calls = 0

        def update(self, image):
            self.calls += 1
            if self.calls == 2:
                helper = next(h for h in _live_helpers() if h.is_alive())
                os.kill(helper.pid, signal.SIGKILL)
            return super().update(image)

    helped = L.landmark_pass(videos["face"], det, progress=False, ahead=True, tracker=KillHelper(det))
    assert not short_passes
    np.testing.assert_array_equal(helped.landmarks, alone.landmarks)
    np.testing.assert_array_equal(helped.source, alone.source)


def _live_helpers():
    import multiprocessing
    import time as t

    deadline = t.time() + 60
    while t.time() < deadline:
        found = [p for p in multiprocessing.active_children() if p.name == "landmarks-ahead"]
        if found:
            return found
        t.sleep(0.01)
    raise AssertionError("no helper process started")
