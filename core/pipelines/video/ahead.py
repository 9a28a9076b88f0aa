"""A second face tracker ahead of the landmark pass, in a helper process: the pass's
results unchanged, in about half the time on a second core.

The landmark pass tracks one face frame after frame (:class:`~core.landmarks.tracking.FaceTracker`:
each frame's landmarks start from the previous frame's), so it cannot simply be cut in two.
But a tracker's next frame depends only on its :class:`~core.landmarks.tracking.TrackerState`
(the previous landmarks, face patch and box relation), and two trackers that meet in
the same state stay together. So while the pass (this process) tracks from the first
frame, a helper process (:class:`Ahead`, forked from the workers' forkserver, which has
imported everything) starts a tracker at the middle frame ``mid`` (a detection there,
with the box relation the pass has from its own first frame) and tracks to the end. The
pass goes on past ``mid``; at the first frame where its state, the frame's timestamp and
crop equal the helper's, it takes the helper's results for every frame after it and
stops. Where the two never meet (the pass detected again before ``mid``, a decoder that
does not seek exactly), the pass tracks every frame itself: the results are always the
ones a single pass gives. On the sample video the two met 1-21 frames after the start
of the helper, at 19 starting points tried.

Only for detectors that work on one core (``single_core``: dlib; FAN's network already
uses every core) and only when the forkserver already runs (a first run with worker
processes, :class:`~core.pipelines.video.workers.WorkerPool`): otherwise the helper's
start (imports) would cost more than it saves.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Optional, Tuple

import numpy as np

from core.io.video import VideoReader
from core.landmarks.crop import crop_face, square_box
from core.landmarks.tracking import FaceTracker, TrackerState, face_arrays

log = logging.getLogger(__name__)

# The helper pays on passes at least this long: its start (loading the detector, two
# detections, a seek) is worth about 150 frames of tracking on 2 cores.
MIN_FRAMES = 300


@dataclass
class AheadResult:
    """The helper's results for source frames ``start`` .. ``start`` + n - 1 (n frames,
    arrays as in :func:`~core.pipelines.video.landmarks.landmark_pass`): ``landmarks``
    (n, 68, 2) float32, ``boxes`` (n, 4) float64, ``source`` (n,) int8, ``timestamps`` (n,)
    float64, ``states`` the key (:meth:`~core.landmarks.tracking.TrackerState.key`) of the
    tracker's state after each frame, ``crops`` (n, T, T, 3) uint8
    or None, ``kept`` {source index: frame} of the frames asked to be kept."""

    start: int
    landmarks: np.ndarray
    boxes: np.ndarray
    source: np.ndarray
    timestamps: np.ndarray
    states: List[bytes]
    crops: Optional[np.ndarray] = None
    kept: Dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.source.shape[0])

    def after(self, index: int) -> "AheadResult":
        """The results of the frames after source frame ``index``."""
        k = index + 1 - self.start
        return AheadResult(start=index + 1, landmarks=self.landmarks[k:], boxes=self.boxes[k:],
                           source=self.source[k:], timestamps=self.timestamps[k:], states=self.states[k:],
                           crops=None if self.crops is None else self.crops[k:],
                           kept={i: f for i, f in self.kept.items() if i > index})


def track_ahead(video_path: str, detector, first: int, mid: int, stop: Optional[int],
                crops: Optional[Tuple[float, int]] = None, keep: Collection[int] = (),
                settings: Optional[dict] = None) -> AheadResult:
    """Track source frames ``mid`` .. ``stop`` - 1 (or to the end) as the helper does (see the
    module docstring): the box relation of frame ``first`` (the pass's first frame), a
    detection at ``mid``, then tracking. ``crops`` = (padding_ratio, tar_size): each
    frame's crop as the pass cuts it; ``keep``: source indices of frames to keep;
    ``settings``: the pass's tracker's (:meth:`~core.landmarks.tracking.FaceTracker.settings`)."""
    tracker = FaceTracker(detector, **(settings or {}))
    keep = set(int(i) for i in keep)
    lms, boxes, src, ts, states, cut, kept = [], [], [], [], [], [], {}
    with VideoReader(video_path, threads=1) as reader:  # beside the pass: a core each
        seek_ts = reader.estimated_timestamps(mid + 1)
        for _, frame in reader.frames(first, first + 1, seek_ts if first > 0 else None):
            tracker.update(frame)  # as the pass's first frame: a detection, which sets the relation
        relation = tracker.relation.copy()
        tracker.reset()
        for index, frame in reader.frames(mid, stop, seek_ts):
            if not reader.seeks_exactly:  # it decoded from the start: slower than the pass itself
                raise RuntimeError(f"cannot seek exactly to frame {mid}")
            face = tracker.update(frame)
            if index == mid:  # a detection: track on with the pass's relation
                tracker.relation = relation.copy()
            ts.append(reader.last_timestamp)
            states.append(tracker.state().key())
            if index in keep:
                kept[index] = frame
            face_lms, face_box, face_src = face_arrays(face)
            lms.append(face_lms)
            boxes.append(face_box)
            src.append(face_src)
            if crops is not None:
                t = int(crops[1])
                cut.append(np.zeros((t, t, 3), np.uint8) if face is None
                           else crop_face(frame, square_box(boxes[-1], crops[0]), t))
    n = len(src)
    return AheadResult(start=mid, landmarks=np.asarray(lms, dtype=np.float32).reshape(n, 68, 2),
                       boxes=np.asarray(boxes, dtype=np.float64).reshape(n, 4),
                       source=np.asarray(src, dtype=np.int8).reshape(n),
                       timestamps=np.asarray(ts, dtype=np.float64).reshape(n), states=states,
                       crops=np.stack(cut) if crops is not None and cut else None, kept=kept)


def _entry(conn, main_pid: int, args: tuple) -> None:
    """The helper process: :func:`track_ahead` of ``args``, its result (or its error's
    line) sent on ``conn``; ends with the main process ``main_pid``."""
    from .workers import _die_with_parent

    _die_with_parent(main_pid)
    try:
        message = ("ok", track_ahead(*args))
    except BaseException as e:  # the pass goes on alone
        message = ("error", f"{type(e).__name__}: {e}")
    with contextlib.suppress(OSError, ValueError):
        conn.send(message)
        conn.close()


class Ahead:
    """The pass's handle on a helper tracking source frames ``mid`` .. ``stop`` - 1 (see the
    module docstring); ``args`` as :func:`track_ahead`'s. Started at once (a process from
    the workers' forkserver); :meth:`rest` says when the pass may stop; :meth:`close`
    ends the helper."""

    def __init__(self, video_path: str, detector, first: int, mid: int, stop: Optional[int],
                 crops: Optional[Tuple[float, int]] = None, keep: Collection[int] = (),
                 settings: Optional[dict] = None):
        from core.pipelines import forkserver

        self.mid = int(mid)
        self.result: Optional[AheadResult] = None
        self.failed = False
        ctx = forkserver.context()
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_entry, name="landmarks-ahead", daemon=True,
                                 args=(child, os.getpid(), (video_path, detector, first, mid, stop, crops,
                                                            tuple(keep), settings)))
        # Started from a thread: a forkserver still importing (a slow host) would otherwise
        # hold up the pass, which starts at once.
        self._starter = threading.Thread(target=self._start, args=(child,), name="landmarks-ahead-start",
                                         daemon=True)
        self._starter.start()

    def _start(self, child) -> None:
        try:
            self._proc.start()
        except BaseException as e:  # the pass goes on alone
            log.debug("landmarks: the helper did not start: %s", e)
        finally:
            child.close()  # (the helper has its own copy: no result means it ended)

    def rest(self, index: int, state: TrackerState, timestamp: float,
             crop: Optional[np.ndarray] = None) -> Optional[AheadResult]:
        """The helper's results for the frames after source frame ``index``, once the pass,
        having just done that frame (its tracker now in ``state``; the frame's
        ``timestamp`` and ``crop`` as the pass recorded them), stands where the helper
        stood after it: then the pass stops and takes them. None until then (the helper not
        finished, not met yet, failed, or nothing left after ``index``)."""
        if self.failed or index < self.mid:
            return None
        if self.result is None:
            try:
                if not self._conn.poll():
                    return None
                kind, value = self._conn.recv()
            except (EOFError, OSError) as e:  # the helper died: the pass goes on alone
                kind, value = "error", "its process ended without a result" + (f" ({e})" if str(e) else "")
            if kind != "ok":
                log.debug("landmarks: the helper tracking from frame %d failed: %s", self.mid, value)
                self.failed = True
                self.close()
                return None
            self.result = value
        r = self.result
        j = index - r.start
        if j >= r.num_frames - 1:
            return None
        if not (state.key() == r.states[j] and timestamp == r.timestamps[j]):
            return None
        if crop is not None and (r.crops is None or not np.array_equal(crop, r.crops[j])):
            return None
        return r.after(index)

    def close(self) -> None:
        """End the helper (at once if still running) and free the pipe."""
        self._starter.join()
        with contextlib.suppress(OSError, ValueError):
            self._conn.close()
        if self._proc.pid is None:  # it never started
            return
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(timeout=10)
