"""Tests for core.io.video: streaming reads, exact seeks, the atomic H.264 writer and
one-line errors for bad videos."""
from __future__ import annotations

import os
import resource
import subprocess
from fractions import Fraction

import cv2
import numpy as np
import pytest

from core.errors import UserError
from core.io.video import VideoReader, VideoWriter, check_video_file, has_audio_stream, probe_video


def _frame(k: int, w: int = 96, h: int = 64) -> np.ndarray:
    """A frame whose grey level and bar position encode k (robust to H.264 loss)."""
    img = np.full((h, w, 3), 20 + 9 * k, np.uint8)
    x = 4 + 3 * k
    img[:, x:x + 6] = (250, 40, 40)
    return img


def _decode_index(frame: np.ndarray) -> int:
    return int(round((float(np.median(frame[:, :, 1])) - 20) / 9))


def _write(path, n, w=96, h=64, fps=25.0) -> str:
    with VideoWriter(path, (w, h), fps) as wr:
        for k in range(n):
            wr.write(_frame(k, w, h))
    return str(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("video") / "clip.mp4", 20)


def test_round_trip_counts_size_fps_and_content(clip):
    info = probe_video(clip)
    assert (info.width, info.height, info.num_frames) == (96, 64, 20)
    assert info.fps == pytest.approx(25.0)
    with VideoReader(clip) as r:
        got = list(r.frames())
    assert [i for i, _ in got] == list(range(20))
    for i, f in got:
        assert f.shape == (64, 96, 3) and f.dtype == np.uint8
        assert _decode_index(f) == i
        # RGB order: the bar is red.
        bar = f[:, 4 + 3 * i + 2]
        assert bar[:, 0].mean() > 200 and bar[:, 2].mean() < 90


def test_frames_range_with_and_without_seek(clip):
    with VideoReader(clip) as r:
        ts = []
        for _, _f in r.frames():
            ts.append(r.last_timestamp)
    assert np.all(np.diff(ts) > 0)
    with VideoReader(clip) as r:
        plain = [(i, _decode_index(f)) for i, f in r.frames(7, 11)]
        seeked = [(i, _decode_index(f)) for i, f in r.frames(13, 15, ts)]
        back = [(i, _decode_index(f)) for i, f in r.frames(2, 4, ts)]  # backwards
        tail = [i for i, _ in r.frames(18, None, ts)]
    assert plain == [(i, i) for i in range(7, 11)]
    assert seeked == [(13, 13), (14, 14)]
    assert back == [(2, 2), (3, 3)]
    assert tail == [18, 19]


def test_prepare_does_the_seek_of_frames_ahead(clip):
    """prepare(start) seeks now: frames(start, ...) then reads on without moving the
    capture (its calls counted) and gives the same frames; before or at the position it
    does nothing."""

    class Counting:
        def __init__(self, cap):
            self.cap, self.calls = cap, []

        def __getattr__(self, name):
            if name in ("set", "grab", "read", "release"):
                self.calls.append(name)
            return getattr(self.cap, name)

    with VideoReader(clip) as r:
        est = r.estimated_timestamps(20)
        r._cap = Counting(r._cap)
        r.prepare(12, est)
        assert "set" in r._cap.calls  # the seek happened here
        r._cap.calls.clear()
        got = [(i, _decode_index(f)) for i, f in r.frames(12, 15, est)]
        assert set(r._cap.calls) == {"read"}  # no seek, no frame skipped
    assert got == [(12, 12), (13, 13), (14, 14)]
    with VideoReader(clip) as r:
        r.prepare(0)
        r.prepare(1)  # at the position: nothing to decode
        assert [(i, _decode_index(f)) for i, f in r.frames(0, 2)] == [(0, 0), (1, 1)]
        r.prepare(1, est)  # behind the position: frames(1) goes back as usual
        assert [(i, _decode_index(f)) for i, f in r.frames(1, 2, est)] == [(1, 1)]


def test_seek_checked_against_constant_rate_timestamps(clip):
    """Without a recorded pass, a seek is checked against the timestamps a constant frame
    rate gives: exact here, so it stays a seek; a range past the end yields nothing."""
    with VideoReader(clip) as r:
        est = r.estimated_timestamps(14)
        assert est[0] == r.first_timestamp and np.allclose(np.diff(est), 40.0)
        got = [(i, _decode_index(f)) for i, f in r.frames(13, 16, est)]
        assert r._seek_exact  # the seek landed where the timestamps said
        assert list(r.frames(25, None, r.estimated_timestamps(26))) == []
    assert got == [(13, 13), (14, 14), (15, 15)]


def test_inexact_seek_falls_back_to_decoding(clip):
    wrong = np.arange(20) * 1000.0 + 7.0  # timestamps no seek can match
    with VideoReader(clip) as r:
        got = [(i, _decode_index(f)) for i, f in r.frames(12, 14, wrong)]
        again = [(i, _decode_index(f)) for i, f in r.frames(5, 6, wrong)]
    assert got == [(12, 12), (13, 13)]
    assert again == [(5, 5)]


def test_writer_is_atomic_and_abort_leaves_nothing(tmp_path):
    path = tmp_path / "out.mp4"
    w = VideoWriter(path, (32, 32), 10)
    w.write(_frame(1, 32, 32))
    assert not path.exists()  # not under its name until committed
    w.finish()
    assert not path.exists()
    w.commit()
    assert path.exists() and probe_video(str(path)).num_frames == 1
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)

    path2 = tmp_path / "failed.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(path2, (32, 32), 10) as w2:
            w2.write(_frame(0, 32, 32))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]


def _noise(k: int, w: int = 96, h: int = 64) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # incompressible


def test_writer_file_size_limit_is_a_user_error(tmp_path, capfd):
    """A disk that fills up (here: a file-size limit on the encoder) is a one-line
    UserError with ffmpeg's reason, ffmpeg's messages never reach the terminal, and
    nothing is left: no target, no temporary file."""
    path = tmp_path / "big.mp4"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # inherited by the encoder only
    try:
        w = VideoWriter(path, (96, 64), 25)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with pytest.raises(UserError) as e:
        with w:
            for k in range(40):  # about 12 kB a frame
                w.write(_noise(k))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "File too large" in msg, msg
    assert os.listdir(tmp_path) == []
    assert capfd.readouterr().err == ""


def test_writer_encoder_death_is_a_user_error(tmp_path):
    path = tmp_path / "x.mp4"
    w = VideoWriter(path, (32, 32), 10)
    w.write(_frame(0, 32, 32))
    w._proc.kill()
    w._proc.wait()
    with pytest.raises(UserError, match=r"^writing the video '.*x\.mp4' failed: the encoder stopped \(ffmpeg was "
                                        r"killed by SIGKILL\)$"):
        w.write(_frame(1, 32, 32))
    with pytest.raises(UserError, match="x\\.mp4"):
        w.commit()
    assert os.listdir(tmp_path) == []


def test_writer_checks_the_file_before_the_rename(tmp_path, monkeypatch):
    """ffmpeg's exit status is not trusted alone: a file that does not read back with
    every frame written is not renamed into place."""
    import core.io.video_out as vio  # where the writer looks the check up

    real = vio.check_video_file
    seen = []

    def damaged(path, n):
        seen.append((os.path.exists(path), n))
        with open(path, "r+b") as f:  # what a disk losing the end of the file would leave
            f.truncate(os.path.getsize(path) // 3)
        return real(path, n)

    monkeypatch.setattr(vio, "check_video_file", damaged)
    with pytest.raises(UserError, match=r"^writing the video '.*cut\.mp4' failed: the encoded file is incomplete"):
        with VideoWriter(tmp_path / "cut.mp4", (96, 64), 25) as w:
            for k in range(12):
                w.write(_noise(k))
    assert seen == [(True, 12)] and os.listdir(tmp_path) == []


def test_check_video_file_finds_missing_frames(tmp_path, clip):
    assert check_video_file(clip, 20) is None
    assert check_video_file(clip, 21) == "it holds 20 frames, 21 were written"
    data = open(clip, "rb").read()
    for frac in (0.2, 0.5):
        cut = tmp_path / f"cut{frac}.mp4"
        cut.write_bytes(data[:int(len(data) * frac)])
        assert check_video_file(str(cut), 20) is not None
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    assert check_video_file(str(tmp_path / "junk.mp4"), 20).startswith("it cannot be read back")


def test_writer_keeps_odd_sizes_and_fractional_fps(tmp_path):
    path = _write(tmp_path / "odd.mp4", 5, w=45, h=33, fps=30000 / 1001)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (45, 33, 5)
    assert Fraction(info.fps).limit_denominator(1001) == Fraction(30000, 1001)


def test_writer_rejects_wrong_frames(tmp_path):
    with VideoWriter(tmp_path / "x.mp4", (32, 32), 10) as w:
        with pytest.raises(ValueError, match="expected a \\(32, 32, 3\\) uint8 frame"):
            w.write(np.zeros((32, 30, 3), np.uint8))
        w.write(np.zeros((32, 32, 3), np.uint8))


def test_writer_copies_audio(tmp_path):
    import imageio_ffmpeg

    src = tmp_path / "with_audio.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
           "color=c=gray:s=32x32:r=10:d=1", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(src)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert has_audio_stream(str(src))
    assert not has_audio_stream(_write(tmp_path / "silent.mp4", 2, 32, 32))
    out = tmp_path / "copy.mp4"
    with VideoWriter(out, (32, 32), 10, audio_from=str(src)) as w:
        for k in range(10):
            w.write(_frame(k, 32, 32))
    assert has_audio_stream(str(out))
    assert probe_video(str(out)).num_frames == 10


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "text", "truncated"])
def test_bad_videos_are_one_line_user_errors(tmp_path, clip, kind):
    path = tmp_path / "bad.mp4"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "truncated":
        path.write_bytes(open(clip, "rb").read()[:300])
    with pytest.raises(UserError) as e:
        VideoReader(path)
    msg = str(e.value)
    assert "\n" not in msg and "bad.mp4" in msg


def test_reader_streams_bgr_sources_written_by_opencv(tmp_path):
    """A video written by OpenCV (mp4v, BGR in) reads back as RGB."""
    path = str(tmp_path / "cv.mp4")
    vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 12.0, (48, 32))
    img = np.zeros((32, 48, 3), np.uint8)
    img[..., 2] = 230  # red in BGR
    for _ in range(3):
        vw.write(img)
    vw.release()
    with VideoReader(path) as r:
        assert r.info.fps == pytest.approx(12.0)
        frames = [f for _, f in r.frames()]
    assert len(frames) == 3
    assert frames[0][..., 0].mean() > 200 and frames[0][..., 2].mean() < 40


@pytest.mark.parametrize("size", [(96, 64), (95, 63)])
def test_colours_round_trip(tmp_path, size):
    """Even sizes go down the pipe as 4:2:0 (OpenCV's conversion), odd ones as RGB: both
    decode to the colours written (a wrong matrix or range would be off by 10-40 levels)."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.float32)[None].round().astype(np.uint8)
    img[..., 1] = np.linspace(255, 0, h, dtype=np.float32)[:, None].round().astype(np.uint8)
    img[..., 2] = 128
    img[8:24, 8:24] = (250, 40, 40)
    img[8:24, 40:56] = (30, 200, 60)
    img[40:56, 8:24] = (255, 255, 255)
    img[40:56, 40:56] = (0, 0, 0)
    path = tmp_path / "c.mp4"
    with VideoWriter(path, (w, h), 10) as wr:
        for _ in range(3):
            wr.write(img)
    with VideoReader(path) as r:
        frames = [f for _, f in r.frames()]
    assert len(frames) == 3
    err = np.abs(frames[1].astype(float) - img)
    assert err.mean() < 2.5
    for y, x, colour in ((16, 16, (250, 40, 40)), (16, 48, (30, 200, 60)), (48, 16, (255, 255, 255)), (48, 48, (0, 0, 0))):
        assert np.abs(frames[1][y - 3:y + 4, x - 3:x + 4].reshape(-1, 3).mean(0) - colour).max() < 6


def test_concat_joins_segments_in_order_with_the_audio(tmp_path):
    """Segments written by separate VideoWriters (one per clip of a video) joined without
    re-encoding: every frame, in order, the source's audio copied in; the joined file
    appears only at commit. A name with a quote survives the concat list's quoting."""
    import imageio_ffmpeg
    from core.io.video import VideoConcat

    src = tmp_path / "with_audio.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "color=c=gray:s=96x64:r=25:d=1", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(src)],
                   check=True, capture_output=True)
    parts = [(tmp_path / "a.mp4", range(0, 7)), (tmp_path / "it's b.mp4", range(7, 9)), (tmp_path / "c.mp4", range(9, 20))]
    for path, ks in parts:
        with VideoWriter(path, (96, 64), 25) as wr:
            for k in ks:
                wr.write(_frame(k))
    out = tmp_path / "joined.mp4"
    joined = VideoConcat(out, [str(p) for p, _ in parts], [len(ks) for _, ks in parts], audio_from=str(src))
    assert joined.frames_written == 20 and not out.exists()
    joined.commit()
    assert probe_video(str(out)).num_frames == 20 and has_audio_stream(str(out))
    with VideoReader(out) as r:
        assert [_decode_index(f) for _, f in r.frames()] == list(range(20))
    assert sorted(os.listdir(tmp_path)) == sorted(["a.mp4", "it's b.mp4", "c.mp4", "joined.mp4", "with_audio.mp4"])


def test_concat_failure_is_one_line_and_leaves_nothing(tmp_path):
    from core.io.video import VideoConcat

    _write(tmp_path / "a.mp4", 3)
    (tmp_path / "b.mp4").write_bytes(b"not a video")
    out = tmp_path / "joined.mp4"
    with pytest.raises(UserError, match=r"^writing the video '.*joined\.mp4' failed: ") as e:
        with VideoConcat(out, [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")], [3, 3]):
            pass
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"]
    with pytest.raises(UserError, match="incomplete"):  # a frame count that does not add up
        VideoConcat(out, [str(tmp_path / "a.mp4")], [4]).commit()
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"]


def _audio_md5(path) -> str:
    """The md5 of the audio packets of ``path`` as stored (no decoding)."""
    import imageio_ffmpeg
    res = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path),
                          "-map", "0:a:0", "-c", "copy", "-f", "md5", "-"], check=True, capture_output=True, text=True)
    return res.stdout.strip()


@pytest.mark.parametrize("codec, start, copied", [("aac", 0.0, True), ("aac", 0.5, False), ("libmp3lame", 0.0, True),
                                                  ("pcm_s16le", 0.0, False)])
def test_writer_copies_aac_and_mp3_audio_as_it_is(tmp_path, codec, start, copied):
    """AAC or MP3 audio from the source's start goes in untouched (no encoding: the same
    packets); from a later start (a frame range), or in another codec, it is encoded as AAC."""
    import imageio_ffmpeg
    from core.io.video_out import audio_codec

    src = tmp_path / ("src.mov" if codec == "pcm_s16le" else "src.mp4")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "color=c=gray:s=32x32:r=10:d=2", "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", codec, "-shortest", str(src)],
                   check=True, capture_output=True)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, (32, 32), 10, audio_from=str(src), audio_start=start) as w:
        for k in range(int(round((2.0 - start) * 10))):
            w.write(_frame(k, 32, 32))
    want = {"aac": "aac", "libmp3lame": "mp3", "pcm_s16le": "aac"}[codec] if copied else "aac"
    assert audio_codec(str(out)) == want
    assert (_audio_md5(out) == _audio_md5(src)) == copied


def test_a_damaged_stream_reads_without_ffmpeg_noise(tmp_path):
    """A video cut short decodes what it can, without FFmpeg's per-packet messages on stderr
    (OpenCV passes them through unless OPENCV_FFMPEG_LOGLEVEL says otherwise)."""
    import os
    import sys

    full = _write(tmp_path / "full.mp4", 26, 96, 64)
    data = open(full, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}
    code = (f"import sys; sys.path.insert(0, {root!r})\n"
            "from core.io.video import VideoReader\n"
            f"with VideoReader({str(cut)!r}) as r: print(sum(1 for _ in r.frames()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 0 < int(proc.stdout) < 26
    assert "@ 0x" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("ignored", [False, True])
def test_the_encoder_leaves_the_process_group_when_sigint_is_ignored(tmp_path, ignored):
    """ffmpeg handles SIGINT itself whatever it inherits: in a run that ignores SIGINT
    (nohup, a script's background job) a SIGINT to the process group stopped its encoders
    and failed the run. There the encoder runs in a session of its own (out of the group's
    reach); in a run that takes Ctrl-C it stays in the group, as usual. Either way it writes
    the video."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.default_int_handler)
    try:
        w = VideoWriter(tmp_path / "out.mp4", (32, 32), 10)
        try:
            own = os.getsid(w._proc.pid) != os.getsid(0)
            for k in range(3):
                w.write(_frame(k, 32, 32))
            w.finish()
            w.commit()
        except BaseException:
            w.abort()
            raise
    finally:
        signal.signal(signal.SIGINT, before)
    assert own == ignored
    with VideoReader(tmp_path / "out.mp4") as r:
        assert len(list(r.frames())) == 3
