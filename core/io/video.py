"""Video input and output: a streaming frame reader and an atomic H.264 writer.

Frames are (H, W, 3) uint8 **RGB** arrays everywhere in this project (OpenCV's BGR is
converted at the boundary). Frame indices are 0-based, in decoding order.

* :class:`VideoReader` streams frames with OpenCV (FFmpeg backend); nothing is held in
  memory beyond the current frame. ``frames(start, stop)`` seeks, and checks the seek
  against the frame timestamps recorded on a first full pass when it has them (falling
  back to decoding from the start when the container cannot seek exactly).
* :class:`VideoWriter` encodes H.264 (libx264, yuv420p, converted before the pipe; yuv444p
  for odd sizes, which 4:2:0 cannot hold) with imageio-ffmpeg's bundled ffmpeg binary fed
  through a pipe, into a temporary file beside the target that is renamed only when ffmpeg
  succeeded and the file decodes with every frame written. The source's audio can be copied in (re-encoded
  as AAC). ffmpeg's messages are captured; a failure is a one-line UserError.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Deque, Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

from .atomic import ignore_file_size_signal
from core.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["VideoInfo", "VideoReader", "VideoWriter", "probe_video", "has_audio_stream", "check_video_file"]

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
    """H.264 ``.mp4`` writer; the file appears under its name only when complete and checked.

    Args:
        path: the final file name (``.mp4``).
        size: (width, height) of every frame.
        fps: frame rate (kept exact as a fraction, e.g. 30000/1001).
        audio_from: copy the audio of this file (re-encoded AAC) when it has any.
        audio_start: seconds into ``audio_from`` where the copied audio starts.
        audio_duration: seconds of audio to copy (None: all of it from ``audio_start``).
        crf: x264 constant rate factor (lower is better; 18 is visually lossless).

    The bundled ffmpeg (imageio-ffmpeg) runs as a child process reading raw rgb24 frames
    from a pipe; its messages are captured, never shown, and the last meaningful one goes
    into the error when it fails. ``write`` takes (height, width, 3) uint8 RGB frames.
    ``finish`` closes the pipe, waits for ffmpeg and checks its exit status and the
    temporary file (it must open and hold exactly the frames written); ``commit`` finishes
    and renames it to ``path``; ``abort`` stops ffmpeg and removes it. As a context manager
    it commits on success and aborts on an exception. Every failure of the encoder (it
    died, the disk is full, a file-size limit) is a UserError naming the file, and nothing
    is left behind under ``path``.
    """

    def __init__(self, path: str | os.PathLike, size: Tuple[int, int], fps: float,
                 audio_from: Optional[str] = None, crf: int = 18, audio_start: float = 0.0,
                 audio_duration: Optional[float] = None):
        import imageio_ffmpeg

        self.path = os.fspath(path)
        self.size = (int(size[0]), int(size[1]))
        if self.size[0] < 1 or self.size[1] < 1:
            raise ValueError(f"expected a frame size (width, height) >= 1; got {size}")
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"expected fps > 0; got {fps}")
        self.fps = float(fps)
        self.frames_written = 0
        self._proc: Optional[subprocess.Popen] = None
        self._finished = False  # the pipe is closed (finish() ran or the encoder stopped)
        self._ok = False  # finish() succeeded: the temporary file is complete
        self._closed = False  # committed or aborted
        ignore_file_size_signal()
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, self.tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp.mp4",
                                                 dir=folder)
        except OSError as e:
            raise UserError(f"cannot write the video '{self.path}': {e.strerror or e}") from None
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        even = self.size[0] % 2 == 0 and self.size[1] % 2 == 0
        # Even sizes: frames go down the pipe as 4:2:0 already (OpenCV's BT.601 conversion, as
        # ffmpeg's own would do it): half the bytes, and about 15 % less encoder CPU than
        # ffmpeg's RGB scaler. Odd sizes stay RGB for yuv444p.
        self._yuv420 = even
        audio = audio_from if audio_from and has_audio_stream(audio_from) else None
        rate = Fraction(self.fps).limit_denominator(100000)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "yuv420p" if even else "rgb24", "-s", f"{self.size[0]}x{self.size[1]}",
               "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0"]
        if audio:
            if audio_start > 0:
                cmd += ["-ss", f"{audio_start:.6f}"]
            if audio_duration is not None:
                cmd += ["-t", f"{max(audio_duration, 0.0):.6f}"]
            cmd += ["-i", audio, "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac"]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", str(int(crf)),
                "-pix_fmt", "yuv420p" if even else "yuv444p", "-movflags", "+faststart", "-f", "mp4", self.tmp_path]
        log.debug("video encoder: %s", " ".join(cmd))
        self._stderr_tail: Deque[str] = collections.deque(maxlen=40)
        try:
            # restore_signals=False: ffmpeg keeps ignoring SIGXFSZ and SIGPIPE as Python does, so a
            # file-size limit is an error it reports ("File too large"), not a silent kill.
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, restore_signals=False)
        except OSError as e:
            self.abort()
            raise UserError(f"cannot start the video encoder for '{self.path}': {e.strerror or e}") from None
        self._drain = threading.Thread(target=self._read_stderr, name="ffmpeg-stderr", daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        stream = self._proc.stderr
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._stderr_tail.append(line)
        stream.close()

    def _ffmpeg_message(self) -> str:
        """ffmpeg's last meaningful line (its log prefix removed), or ''."""
        for line in reversed(self._stderr_tail):
            text = _without_ffmpeg_prefix(line)
            if text and not re.match(r"(Last message repeated|Conversion failed|Exiting normally)", text):
                return text
        return ""

    def _failure(self, what: str) -> UserError:
        """Wait for ffmpeg (briefly) and build the error for ``what`` with its message."""
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            self._drain.join(timeout=5)
        detail = self._ffmpeg_message()
        if proc is not None and proc.returncode is not None and proc.returncode < 0:
            try:
                name = signal.Signals(-proc.returncode).name
            except ValueError:
                name = f"signal {-proc.returncode}"
            detail = detail or f"ffmpeg was killed by {name}"
        elif proc is not None and proc.returncode not in (None, 0):
            detail = detail or f"ffmpeg exited with status {proc.returncode}"
        return UserError(f"writing the video '{self.path}' failed: {what}" + (f" ({detail})" if detail else ""))

    def write(self, frame_rgb: np.ndarray) -> None:
        f = np.asarray(frame_rgb)
        if f.shape != (self.size[1], self.size[0], 3) or f.dtype != np.uint8:
            raise ValueError(f"expected a ({self.size[1]}, {self.size[0]}, 3) uint8 frame; got {f.shape} {f.dtype}")
        if self._finished or self._proc is None:
            raise ValueError(f"the video '{self.path}' is already finished")
        data = cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420) if self._yuv420 else np.ascontiguousarray(f)
        try:
            self._proc.stdin.write(data.data)
            self._proc.stdin.flush()  # a dead encoder shows at this frame, not a buffer later
        except (BrokenPipeError, ValueError, OSError):
            self._finished = True
            with contextlib.suppress(OSError, ValueError):
                self._proc.stdin.close()
            raise self._failure("the encoder stopped") from None
        self.frames_written += 1

    def finish(self) -> None:
        """Flush and close the encoder, then check that the temporary file is complete:
        ffmpeg exited with status 0 and the file reads back with exactly
        ``frames_written`` frames (:func:`check_video_file`). Raises UserError otherwise."""
        if self._finished:
            if not self._ok:
                raise UserError(f"writing the video '{self.path}' failed: the encoder was stopped")
            return
        self._finished = True
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            rc = self._proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            raise self._failure("the encoder did not finish within 10 minutes") from None
        self._drain.join(timeout=10)
        if rc != 0:
            raise self._failure("the encoder failed")
        if self.frames_written == 0:
            raise UserError(f"writing the video '{self.path}' failed: no frame was written")
        problem = check_video_file(self.tmp_path, self.frames_written)
        if problem:
            raise UserError(f"writing the video '{self.path}' failed: the encoded file is incomplete ({problem})")
        self._ok = True

    def commit(self) -> str:
        """Finish, check and rename the temporary file to ``path``; returns ``path``."""
        try:
            self.finish()
            os.replace(self.tmp_path, self.path)
        except UserError:
            self.abort()
            raise
        except OSError as e:
            self.abort()
            raise UserError(f"cannot write the video '{self.path}': {e.strerror or e}") from None
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Stop the encoder and remove the temporary file."""
        if self._closed:
            return
        self._closed = True
        self._finished = True
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            self._drain.join(timeout=5)
        with contextlib.suppress(OSError):
            os.remove(self.tmp_path)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def check_video_file(path: str, expected_frames: int) -> Optional[str]:
    """What is wrong with a finished video file, or None when it is complete: ffmpeg reads
    every video packet of it without an error (no decoding: cheap, and its messages are
    captured), there are ``expected_frames`` of them, and OpenCV opens it, reads its first
    frame and counts the same number of frames."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", path,
           "-map", "0:v:0", "-c", "copy", "-f", "null", "-progress", "pipe:1", "-"]
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                             timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"it could not be checked ({e})"
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()]
    if res.returncode != 0 or lines:
        detail = _without_ffmpeg_prefix(lines[-1]) if lines else f"ffmpeg status {res.returncode}"
        return f"it cannot be read back: {detail}"
    counts = re.findall(r"^frame=\s*(\d+)", res.stdout, flags=re.M)
    packets = int(counts[-1]) if counts else 0
    if packets != expected_frames:
        return f"it holds {packets} frames, {expected_frames} were written"
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened() or not cap.grab():
            return "OpenCV cannot read it"
        n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        if not (math.isfinite(n) and int(n) == expected_frames):
            return f"OpenCV counts {n:g} frames in it, {expected_frames} were written"
    finally:
        cap.release()
    return None


def _without_ffmpeg_prefix(line: str) -> str:
    """An ffmpeg log line without its ``[component @ 0x...]`` prefixes."""
    return re.sub(r"^(\[[^\]]*\]\s*)+", "", line).strip()
