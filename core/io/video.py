"""Video input and output: a streaming frame reader here; the atomic H.264 writer and the
join of finished parts in :mod:`core.io.video_out`, re-exported here.

Frames are (H, W, 3) uint8 **RGB** arrays everywhere in this project (OpenCV's BGR is
converted at the boundary). Frame indices are 0-based, in decoding order.

* :class:`VideoReader` streams frames with OpenCV (FFmpeg backend); nothing is held in
  memory beyond the current frame. ``frames(start, stop)`` seeks, and checks the seek
  against the frame timestamps recorded on a first full pass when it has them (falling
  back to decoding from the start when the container cannot seek exactly).
* :class:`VideoWriter`, :class:`VideoConcat`, :func:`check_video_file` and
  :func:`has_audio_stream`: see :mod:`core.io.video_out`.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

from core.errors import UserError
from .video_out import VideoConcat, VideoWriter, check_video_file, has_audio_stream

log = logging.getLogger(__name__)

# FFmpeg's own messages from inside OpenCV: a damaged stream printed a line per bad packet
# on stderr ("[h264 @ 0x...] Invalid NAL unit size"), between the progress bars. Silenced
# (read when OpenCV first uses FFmpeg); the reader says what matters once (frames missing,
# an unreadable video). An OPENCV_FFMPEG_LOGLEVEL already set is kept.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

__all__ = ["VideoInfo", "VideoReader", "VideoWriter", "VideoConcat", "probe_video", "has_audio_stream", "check_video_file"]

DEFAULT_FPS = 25.0


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video.

    width, height: frame size in pixels. fps: frames per second (``DEFAULT_FPS`` when the
    container has no usable rate). num_frames: the container's frame count, which can be
    approximate (a full decoding pass counts exactly).
    """

    path: str
    width: int
    height: int
    fps: float
    num_frames: int


def _open_capture(path: str, threads: int = 0) -> cv2.VideoCapture:
    if not os.path.exists(path):
        raise UserError(f"video '{path}' not found")
    if os.path.isdir(path):
        raise UserError(f"video path '{path}' is a folder; pass a video file")
    if os.path.getsize(path) == 0:
        raise UserError(f"video '{path}' is empty (0 bytes)")
    cap = cv2.VideoCapture(path, cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, int(threads)]) if threads > 0 \
        else cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        raise UserError(f"cannot read video '{path}': not a video file OpenCV/FFmpeg can decode "
                        f"(corrupt, truncated or an unsupported format)")
    return cap


def _info_from_capture(path: str, cap: cv2.VideoCapture) -> VideoInfo:
    w = int(round(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
    h = int(round(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        log.warning("video '%s' reports no usable frame rate (%r); assuming %g fps", path, fps, DEFAULT_FPS)
        fps = DEFAULT_FPS
    n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    n = int(n) if math.isfinite(n) and n > 0 else 0
    return VideoInfo(path=path, width=w, height=h, fps=fps, num_frames=n)


def probe_video(path: str) -> VideoInfo:
    """Open ``path``, decode its first frame, and return its :class:`VideoInfo`.

    Raises UserError for a missing, empty, corrupt or frameless video.
    """
    with VideoReader(path) as reader:
        return reader.info


class VideoReader:
    """Streaming RGB frame reader (a context manager).

    Example::

        with VideoReader("clip.mp4") as r:
            for index, frame in r.frames():
                ...

    ``threads``: the decoder's threads (0: OpenCV's choice, one per core). One where the
    cores are busy otherwise (fitting workers, two trackers side by side): a second
    decoding thread costs about 40 % more decoder CPU (1.49 against 1.09 CPU-s for the
    501 frames of the 720p sample) for no quicker decoding on its own; it pays only where
    it overlaps work of the same process on an idle core.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        self.path = os.fspath(path)
        self.threads = max(0, int(threads))
        self._cap = _open_capture(self.path, self.threads)
        info = _info_from_capture(self.path, self._cap)
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._cap.release()
            raise UserError(f"video '{self.path}' has no readable frame (empty or corrupt)")
        if info.width <= 0 or info.height <= 0:
            info = VideoInfo(self.path, frame.shape[1], frame.shape[0], info.fps, info.num_frames)
        self.info = info
        self.first_timestamp = float(self._cap.get(cv2.CAP_PROP_POS_MSEC))  # decoder timestamp (ms) of frame 0
        self.last_timestamp = float("nan")  # decoder timestamp (ms) of the last frame read
        self._seek_exact = True  # until a seek lands on the wrong frame
        self._restart()  # back to frame 0 (reopening is exact where seeking may not be)

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    @property
    def seeks_exactly(self) -> bool:
        """False once a checked seek landed on the wrong frame (this reader then decodes
        from the start to reach a frame instead)."""
        return self._seek_exact

    # -- reading -------------------------------------------------------------------------
    def _restart(self) -> None:
        self._cap.release()
        self._cap = _open_capture(self.path, self.threads)
        self._next = 0

    def _read(self) -> Tuple[Optional[np.ndarray], float]:
        ok, frame = self._cap.read()
        if not ok or frame is None:
            return None, float("nan")
        self._next += 1
        self.last_timestamp = float(self._cap.get(cv2.CAP_PROP_POS_MSEC))
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), self.last_timestamp

    def _seek(self, start: int, timestamps: Optional[Sequence[float]]) -> Tuple[Optional[np.ndarray], float]:
        """Position at frame ``start`` and return it (None past the end)."""
        if start == self._next:
            return self._read()
        if timestamps is not None and self._seek_exact and 0 < start < len(timestamps):
            # Fast path: let FFmpeg seek, then check the frame's timestamp.
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, start)
            frame, ts = self._read()
            tol = 0.25 * 1000.0 / self.info.fps
            if frame is not None and abs(ts - timestamps[start]) <= tol:
                self._next = start + 1
                return frame, ts
            if frame is None:  # past the end, or a container that cannot seek there: decode to be sure
                log.debug("video '%s': seeking to frame %d found no frame; decoding from the start instead",
                          self.path, start)
            else:
                log.info("video '%s' cannot seek exactly (frame %d: timestamp %.3f ms, expected %.3f); "
                         "decoding from the start instead", self.path, start, ts, timestamps[start])
            self._restart()
            self._seek_exact = False
        if start < self._next:
            self._restart()
        while self._next < start:
            if not self._cap.grab():
                return None, float("nan")
            self._next += 1
        return self._read()

    def prepare(self, start: int, timestamps: Optional[Sequence[float]] = None) -> None:
        """Do now the seek that :meth:`frames` ``(start, ...)`` would do: afterwards the next
        frame read is ``start`` (frame ``start`` - 1 is decoded and dropped here; nothing
        happens for a frame at or before the reader's position). ``timestamps`` as for
        :meth:`frames`."""
        if start - 1 >= self._next:
            self._seek(start - 1, timestamps)

    def estimated_timestamps(self, n: int) -> np.ndarray:
        """(n,) timestamps (ms) of frames 0..n-1 at the container's constant frame rate, for
        checking a seek where no full pass recorded the real ones (``frames(start, stop,
        reader.estimated_timestamps(start + 1))``): a seek that lands elsewhere (a variable
        frame rate, an inexact container) falls back to decoding from the start."""
        t0 = self.first_timestamp if math.isfinite(self.first_timestamp) else 0.0
        return t0 + np.arange(int(n), dtype=np.float64) * (1000.0 / self.info.fps)

    def frames(self, start: int = 0, stop: Optional[int] = None,
               timestamps: Optional[Sequence[float]] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(index, rgb_frame)`` for frames ``start <= index < stop`` (or to the end).

        timestamps: per-frame timestamps in ms from an earlier full pass (``last_timestamp``
            after each frame); when given, a seek is verified against them (and seeking is
            given up for this reader when it is inexact), else frames before ``start`` are
            decoded and dropped (exact, slower).
        """
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"expected 0 <= start <= stop; got start={start}, stop={stop}")
        if stop is not None and stop == start:
            return
        frame, _ = self._seek(start, timestamps)
        index = start
        while frame is not None:
            yield index, frame
            index += 1
            if stop is not None and index >= stop:
                return
            frame, _ = self._read()
