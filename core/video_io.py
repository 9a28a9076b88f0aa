"""Video input and output: a streaming frame reader and an atomic H.264 writer.

Frames are (H, W, 3) uint8 **RGB** arrays everywhere in this project (OpenCV's BGR is
converted at the boundary). Frame indices are 0-based, in decoding order.

* :class:`VideoReader` streams frames with OpenCV (FFmpeg backend); nothing is held in
  memory beyond the current frame. ``frames(start, stop)`` seeks, and checks the seek
  against the frame timestamps recorded on a first full pass when it has them (falling
  back to decoding from the start when the container cannot seek exactly).
* :class:`VideoWriter` encodes H.264 (libx264, yuv420p; yuv444p for odd sizes, which
  4:2:0 cannot hold) through imageio-ffmpeg's bundled ffmpeg, into a temporary file beside
  the target that is renamed only when the video is complete. The source's audio can be
  copied in (re-encoded as AAC).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

__all__ = ["VideoInfo", "VideoReader", "VideoWriter", "probe_video", "has_audio_stream"]

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


def _open_capture(path: str) -> cv2.VideoCapture:
    if not os.path.exists(path):
        raise UserError(f"video '{path}' not found")
    if os.path.isdir(path):
        raise UserError(f"video path '{path}' is a folder; pass a video file")
    if os.path.getsize(path) == 0:
        raise UserError(f"video '{path}' is empty (0 bytes)")
    cap = cv2.VideoCapture(path)
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
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._cap = _open_capture(self.path)
        info = _info_from_capture(self.path, self._cap)
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._cap.release()
            raise UserError(f"video '{self.path}' has no readable frame (empty or corrupt)")
        if info.width <= 0 or info.height <= 0:
            info = VideoInfo(self.path, frame.shape[1], frame.shape[0], info.fps, info.num_frames)
        self.info = info
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

    # -- reading -------------------------------------------------------------------------
    def _restart(self) -> None:
        self._cap.release()
        self._cap = _open_capture(self.path)
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


def has_audio_stream(path: str) -> bool:
    """True when ffmpeg lists an audio stream in ``path`` (False if it cannot tell)."""
    try:
        import imageio_ffmpeg
        res = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path],
                             capture_output=True, text=True, timeout=60)
    except Exception:  # no ffmpeg, timeout: just no audio
        return False
    return re.search(r"Stream #\S+.*: Audio:", res.stderr) is not None


class VideoWriter:
    """H.264 ``.mp4`` writer; the file appears under its name only when complete.

    Args:
        path: the final file name (``.mp4``).
        size: (width, height) of every frame.
        fps: frame rate (kept exact as a fraction, e.g. 30000/1001).
        audio_from: copy the audio of this file (re-encoded AAC) when it has any.
        crf: x264 constant rate factor (lower is better; 18 is visually lossless).

    ``write`` takes (height, width, 3) uint8 RGB frames. ``finish`` completes the
    temporary file, ``commit`` renames it to ``path``; ``abort`` removes it. As a context
    manager it commits on success and aborts on an exception.
    """

    def __init__(self, path: str | os.PathLike, size: Tuple[int, int], fps: float,
                 audio_from: Optional[str] = None, crf: int = 18):
        import imageio_ffmpeg

        self.path = os.fspath(path)
        self.size = (int(size[0]), int(size[1]))
        if self.size[0] < 1 or self.size[1] < 1:
            raise ValueError(f"expected a frame size (width, height) >= 1; got {size}")
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"expected fps > 0; got {fps}")
        self.fps = float(fps)
        self.frames_written = 0
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp.mp4", dir=folder)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        even = self.size[0] % 2 == 0 and self.size[1] % 2 == 0
        audio = audio_from if audio_from and has_audio_stream(audio_from) else None
        self._gen = imageio_ffmpeg.write_frames(
            self.tmp_path, self.size, pix_fmt_in="rgb24", pix_fmt_out="yuv420p" if even else "yuv444p",
            fps=self.fps, codec="libx264", quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf)), "-preset", "veryfast", "-movflags", "+faststart"],
            audio_path=audio, audio_codec="aac" if audio else None)
        try:
            self._gen.send(None)  # start ffmpeg
        except Exception as e:
            self.abort()
            raise UserError(f"cannot start the video encoder for '{self.path}': {_first_line(e)}") from None
        self._finished = False

    def write(self, frame_rgb: np.ndarray) -> None:
        f = np.asarray(frame_rgb)
        if f.shape != (self.size[1], self.size[0], 3) or f.dtype != np.uint8:
            raise ValueError(f"expected a ({self.size[1]}, {self.size[0]}, 3) uint8 frame; got {f.shape} {f.dtype}")
        try:
            self._gen.send(np.ascontiguousarray(f))
        except Exception as e:
            raise UserError(f"writing the video '{self.path}' failed: {_first_line(e)}") from None
        self.frames_written += 1

    def finish(self) -> None:
        """Flush and close the encoder; the temporary file is then complete."""
        if self._finished:
            return
        self._finished = True
        try:
            self._gen.close()
        except Exception as e:
            raise UserError(f"writing the video '{self.path}' failed: {_first_line(e)}") from None

    def commit(self) -> str:
        """Finish and rename the temporary file to ``path``; returns ``path``."""
        self.finish()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Stop the encoder and remove the temporary file."""
        gen = getattr(self, "_gen", None)
        if gen is not None and not getattr(self, "_finished", True):
            self._finished = True
            with contextlib.suppress(Exception):
                gen.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp_path)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
