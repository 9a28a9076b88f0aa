"""Video output (re-exported by :mod:`core.io.video`): an atomic H.264 writer and the
join of finished parts.

* :class:`VideoWriter` encodes H.264 (libx264, yuv420p, converted before the pipe; yuv444p
  for odd sizes, which 4:2:0 cannot hold) with imageio-ffmpeg's bundled ffmpeg binary fed
  through a pipe, into a temporary file beside the target that is renamed only when ffmpeg
  succeeded and the file decodes with every frame written. The source's audio can be
  copied in (as it is when AAC or MP3, else encoded as AAC). ffmpeg's messages are
  captured; a failure is a one-line UserError.
* :class:`VideoConcat` joins such files (the clips of a video, composed by several
  processes) without re-encoding, under the same contract.
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
from fractions import Fraction
from typing import Deque, Optional, Sequence, Tuple

import cv2
import numpy as np

from .atomic import ignore_file_size_signal
from .interrupts import sigint_ignored
from core import defaults
from core.errors import UserError

log = logging.getLogger("core.io.video")


def _own_session() -> bool:
    """Whether an ffmpeg child runs in a session of its own: when this process ignores
    SIGINT (started under nohup or in a script's background; a video worker of such a run,
    core.pipelines.video.workers._pool_entry), so that a SIGINT to the process group leaves
    it running as it leaves this process (ffmpeg installs its own SIGINT handler, whatever
    it inherits, and stopped the run's encoders). Else it shares the group, as usual."""
    return sigint_ignored()

__all__ = ["VideoWriter", "VideoConcat", "has_audio_stream", "audio_codec", "check_video_file"]

# Audio codecs an .mp4 takes as they are (see _audio_args).
COPIED_AUDIO = ("aac", "mp3")


def audio_codec(path: str) -> Optional[str]:
    """The codec of the first audio stream ffmpeg lists in ``path`` (e.g. "aac"), or None
    when it has none (or ffmpeg cannot tell)."""
    try:
        import imageio_ffmpeg
        res = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path],
                             capture_output=True, text=True, timeout=60, start_new_session=_own_session())
    except Exception:  # no ffmpeg, timeout: just no audio
        return None
    found = re.search(r"Stream #\S+.*: Audio: (\w+)", res.stderr)
    return found.group(1) if found else None


def has_audio_stream(path: str) -> bool:
    """True when ffmpeg lists an audio stream in ``path`` (False if it cannot tell)."""
    return audio_codec(path) is not None


class VideoWriter:
    """H.264 ``.mp4`` writer; the file appears under its name only when complete and checked.

    Args:
        path: the final file name (``.mp4``).
        size: (width, height) of every frame.
        fps: frame rate (kept exact as a fraction, e.g. 30000/1001).
        audio_from: copy the audio of this file when it has any (as it is when AAC or MP3
            from its start, else encoded as AAC).
        audio_start: seconds into ``audio_from`` where the copied audio starts.
        audio_duration: seconds of audio to copy (None: all of it from ``audio_start``).
        crf: x264 constant rate factor (lower is better; 18 is visually lossless).
        preset: x264 preset (faster presets: less CPU, bigger files at the same crf).
        threads: x264 threads (0: x264's choice, 1.5 per core). 1 where the cores are kept
            busy anyway (video workers composing on the CPU): the same output for about a
            sixth less encoder CPU (250 frames of 720p at ultrafast: 0.77 against 0.91-0.98 s).

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
                 audio_from: Optional[str] = None, crf: int = defaults.VIDEO_CRF, audio_start: float = 0.0,
                 audio_duration: Optional[float] = None, preset: str = defaults.VIDEO_PRESET, threads: int = 0):
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
        self.tmp_path = _temp_beside(self.path)
        even = self.size[0] % 2 == 0 and self.size[1] % 2 == 0
        # Even sizes: frames go down the pipe as 4:2:0 already (OpenCV's BT.601 conversion, as
        # ffmpeg's own would do it): half the bytes, and about 15 % less encoder CPU than
        # ffmpeg's RGB scaler. Odd sizes stay RGB for yuv444p.
        self._yuv420 = even
        rate = Fraction(self.fps).limit_denominator(100000)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "yuv420p" if even else "rgb24", "-s", f"{self.size[0]}x{self.size[1]}",
               "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0"]
        cmd += _audio_args(audio_from, audio_start, audio_duration)
        cmd += ["-c:v", "libx264", "-preset", str(preset), "-crf", str(int(crf)), "-threads", str(int(threads)),
                "-pix_fmt", "yuv420p" if even else "yuv444p", "-movflags", "+faststart", "-f", "mp4", self.tmp_path]
        log.debug("video encoder: %s", " ".join(cmd))
        self._stderr_tail: Deque[str] = collections.deque(maxlen=40)
        try:
            # restore_signals=False: ffmpeg keeps ignoring SIGXFSZ and SIGPIPE as Python does, so a
            # file-size limit is an error it reports ("File too large"), not a silent kill.
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, restore_signals=False,
                                          start_new_session=_own_session())
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


class VideoConcat(VideoWriter):
    """Video segments joined into one ``.mp4`` without re-encoding (ffmpeg's concat
    demuxer, stream copy), with the same contract as :class:`VideoWriter`: the file
    appears under ``path`` only by ``commit``, once it reads back with every frame of the
    segments; ``abort`` leaves nothing. The segments are :class:`VideoWriter` files of one
    size and rate (e.g. the clips of a video composed by several processes); the audio of
    ``audio_from`` is copied in as :class:`VideoWriter` does. ``frames``: the segments'
    frame counts, in order (``frames_written`` is their sum). ``write`` is not allowed."""

    def __init__(self, path: str | os.PathLike, segments: Sequence[str], frames: Sequence[int],
                 audio_from: Optional[str] = None, audio_start: float = 0.0, audio_duration: Optional[float] = None):
        if not segments or len(segments) != len(frames):
            raise ValueError(f"expected one frame count per segment; got {len(segments)} segments, {len(frames)} counts")
        self.path = os.fspath(path)
        self.segments = [os.path.abspath(p) for p in segments]
        self.frames_written = int(sum(int(n) for n in frames))
        self._audio = (audio_from, audio_start, audio_duration)
        self._proc = None
        self._finished = self._ok = self._closed = False
        self._stderr_tail: Deque[str] = collections.deque(maxlen=40)
        self.tmp_path = _temp_beside(self.path)

    def write(self, frame_rgb: np.ndarray) -> None:
        raise ValueError("a VideoConcat joins finished segments; it takes no frames")

    def finish(self) -> None:
        """Join the segments into the temporary file and check it (UserError otherwise)."""
        if self._finished:
            if not self._ok:
                raise UserError(f"writing the video '{self.path}' failed: the join was stopped")
            return
        self._finished = True
        import imageio_ffmpeg

        listing = self.tmp_path + ".txt"
        try:
            with open(listing, "w", encoding="utf-8") as f:
                for seg in self.segments:  # the concat demuxer's quoting: ' -> '\''
                    f.write("file '" + seg.replace("'", "'\\''") + "'\n")
            cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
                   "-y", "-f", "concat", "-safe", "0", "-i", listing]
            cmd += _audio_args(*self._audio)
            cmd += ["-c:v", "copy", "-movflags", "+faststart", "-f", "mp4", self.tmp_path]
            log.debug("video join: %s", " ".join(cmd))
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                                 timeout=600, restore_signals=False, start_new_session=_own_session())
        except OSError as e:
            raise UserError(f"writing the video '{self.path}' failed: {e.strerror or e}") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"writing the video '{self.path}' failed: joining its parts took over 10 minutes") from None
        finally:
            with contextlib.suppress(OSError):
                os.remove(listing)
        if res.returncode != 0:
            self._stderr_tail.extend(ln.strip() for ln in res.stderr.splitlines() if ln.strip())
            detail = self._ffmpeg_message() or f"ffmpeg exited with status {res.returncode}"
            raise UserError(f"writing the video '{self.path}' failed: joining its parts failed ({detail})")
        problem = check_video_file(self.tmp_path, self.frames_written)
        if problem:
            raise UserError(f"writing the video '{self.path}' failed: the joined file is incomplete ({problem})")
        self._ok = True


def _temp_beside(path: str) -> str:
    """A new empty temporary ``.tmp.mp4`` file beside ``path`` (the usual permissions),
    renamed to ``path`` once complete; UserError when the folder is not writable."""
    ignore_file_size_signal()
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp.mp4", dir=folder)
    except OSError as e:
        raise UserError(f"cannot write the video '{path}': {e.strerror or e}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    return tmp


def _audio_args(audio_from: Optional[str], start: float = 0.0, duration: Optional[float] = None) -> list:
    """ffmpeg arguments after the video input that add the audio of ``audio_from`` (from
    ``start`` seconds, ``duration`` long), or [] when it has none. Audio already in a codec
    of COPIED_AUDIO is copied as it is when it starts at 0 (ends are cut at a packet, tens
    of milliseconds: encoding 20 s of AAC again cost 0.4 s at the end of every run); other
    audio, or audio from a later start (exact to the sample), is encoded as AAC."""
    codec = audio_codec(audio_from) if audio_from else None
    if codec is None:
        return []
    cmd = []
    if start > 0:
        cmd += ["-ss", f"{start:.6f}"]
    if duration is not None:
        cmd += ["-t", f"{max(duration, 0.0):.6f}"]
    copy = codec in COPIED_AUDIO and start <= 0
    return cmd + ["-i", audio_from, "-map", "0:v:0", "-map", "1:a:0", "-c:a", "copy" if copy else "aac"]


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
                             timeout=600, start_new_session=_own_session())
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
