"""Tests for core.io.image: formats, normalisation to RGB uint8, and one-line errors."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.errors import UserError
from core.io.image import _jpeg_complete, read_image, write_image

REPO = Path(__file__).resolve().parents[1]


def _pattern(h=40, w=60):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 200  # red
    img[: h // 2, :, 2] = 100  # blue in the top half
    return img


def _encode(ext, bgr_or_gray, params=()):
    ok, buf = cv2.imencode(ext, bgr_or_gray, list(params))
    assert ok
    return buf.tobytes()


def test_sample_photos_are_rgb():
    astronaut = read_image(REPO / "data" / "astronaut.jpg")
    assert astronaut.shape == (512, 512, 3) and astronaut.dtype == np.uint8
    # The suit is white, the background dark: a BGR mix-up would show in the flag's red
    # stripes; check the channel order against skimage's original instead.
    skimage_data = pytest.importorskip("skimage.data")
    diff = np.abs(astronaut.astype(int) - skimage_data.astronaut().astype(int)).mean()
    assert diff < 4
    assert read_image(str(REPO / "data" / "grace_hopper.jpg")).shape == (600, 512, 3)


def test_png_round_trip_and_channel_order(tmp_path):
    img = _pattern()
    write_image(tmp_path / "a.png", img)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), img)
    bgr = cv2.imread(str(tmp_path / "a.png"))
    np.testing.assert_array_equal(bgr[..., ::-1], img)


def test_jpeg_write_quality_and_atomic(tmp_path):
    img = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    path = tmp_path / "b.jpg"
    write_image(path, img)
    q95 = _encode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert path.read_bytes() == q95
    assert os.listdir(tmp_path) == ["b.jpg"]  # no temporary left behind


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "c.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(UserError, match="unsupported extension '.xyz'"):
        write_image(tmp_path / "c.xyz", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="cannot write image"):
        write_image(tmp_path / "no" / "such" / "dir.png", np.zeros((4, 4, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_gray_rgba_and_16bit_become_rgb8(tmp_path):
    gray = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    (tmp_path / "g.png").write_bytes(_encode(".png", gray))
    out = read_image(tmp_path / "g.png")
    assert out.shape == (4, 6, 3) and np.all(out == gray[..., None])

    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[..., 2], bgra[..., 3] = 180, 0  # red, fully transparent: alpha is dropped
    (tmp_path / "a.png").write_bytes(_encode(".png", bgra))
    out = read_image(tmp_path / "a.png")
    assert out.shape == (4, 6, 3) and np.all(out[..., 0] == 180) and not out[..., 1:].any()

    deep = np.full((4, 6, 3), 40000, np.uint16)
    (tmp_path / "d.png").write_bytes(_encode(".png", deep))
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8 and np.all(out == 40000 >> 8)


def test_exif_orientation_is_applied(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    img = _pattern(40, 60)
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    pil.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "o.jpg")
    assert out.shape == (60, 40, 3)
    assert out[:, -5:, 2].mean() > 80 and out[:, :5, 2].mean() < 20  # top half is now on the right


def test_non_ascii_path(tmp_path):
    path = tmp_path / "visage é 顔.png"
    write_image(path, _pattern())
    assert read_image(path).shape == (40, 60, 3)


def _assert_one_line_error(path, *fragments):
    with pytest.raises(UserError) as err:
        read_image(path)
    msg = str(err.value)
    assert "\n" not in msg and f"'{path}'" in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_missing_file(tmp_path):
    _assert_one_line_error(str(tmp_path / "nope.jpg"), "file not found")


def test_directory(tmp_path):
    _assert_one_line_error(str(tmp_path), "directory")


def test_empty_file(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    _assert_one_line_error(str(tmp_path / "e.jpg"), "empty")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "t.jpg").write_text("this is not a photo\n")
    _assert_one_line_error(str(tmp_path / "t.jpg"), "not an image file", "supported: jpg, png")


def test_truncated_jpeg(tmp_path):
    data = (REPO / "data" / "grace_hopper.jpg").read_bytes()
    for i, cut in enumerate([0.6, 0.05]):
        path = tmp_path / f"cut{i}.jpg"
        path.write_bytes(data[: int(len(data) * cut)])
        _assert_one_line_error(str(path), "JPEG")


def test_truncated_png(tmp_path):
    data = _encode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "p.png").write_bytes(data[: len(data) // 2])
    _assert_one_line_error(str(tmp_path / "p.png"), "not an image file")


def test_jpeg_completeness_check():
    """The structural check OpenCV 4.x needs (it decodes truncated JPEGs with a grey fill)."""
    img = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    baseline = _encode(".jpg", img)
    progressive = _encode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    with_restarts = _encode(".jpg", img, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    for full in (baseline, progressive, with_restarts):
        assert _jpeg_complete(full)
        assert _jpeg_complete(full + b"\x00" * 100 + b"trailer data")  # e.g. motion photos
        for cut in (len(full) - 2, len(full) // 2, 20, 3):
            assert not _jpeg_complete(full[:cut])
    photo = (REPO / "data" / "grace_hopper.jpg").read_bytes()
    assert _jpeg_complete(photo)


# --- decompression bombs ------------------------------------------------------------------

def _png_of_zeros(width: int, height: int, rows_per_chunk: int = 100) -> bytes:
    """A valid 8-bit grey PNG of zeros, built without ever holding the pixels.

    The IDAT stream repeats one deflate block sequence: after Z_FULL_FLUSH the compressor
    forgets its history, so compressing the same chunk again gives the same bytes. The
    zlib trailer's Adler-32 of n zero bytes is (n mod 65521) << 16 | 1.
    """
    import struct
    import zlib

    row = width + 1  # filter byte + pixels
    total = row * height
    chunk = bytes(row * min(rows_per_chunk, height))
    c = zlib.compressobj(9)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    unit = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert unit == c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    k, rest = divmod(total, len(chunk))
    tail = c.compress(bytes(rest)) + c.flush(zlib.Z_FULL_FLUSH) if rest else b""
    idat = first + unit * (k - 1) + tail + b"\x03\x00" + struct.pack(">I", ((total % 65521) << 16) | 1)

    def png_chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def test_png_of_zeros_helper_is_a_valid_png():
    data = _png_of_zeros(301, 203, rows_per_chunk=7)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (203, 301) and not img.any()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_png_of_zeros(50000, 50000))
    return path


def test_decompression_bomb_is_refused_from_the_header(bomb):
    import time
    assert bomb.stat().st_size < 3_000_000
    t0 = time.perf_counter()
    _assert_one_line_error(str(bomb), "50000x50000 pixels (2500 megapixels) is above the 100-megapixel limit")
    assert time.perf_counter() - t0 < 0.5  # no decoding (decoding would take seconds and 7.5 GB)


def test_opencv_errors_become_user_errors(bomb, monkeypatch):
    # With our limit lifted the file reaches cv2.imdecode, whose own limit (2^30 pixels)
    # raises cv2.error; that must be a one-line UserError too, not a traceback.
    monkeypatch.setattr("core.io.image.MAX_PIXELS", 10**12)
    _assert_one_line_error(str(bomb), "OpenCV cannot decode it", "CV_IO_MAX_IMAGE_PIXELS")


def _with_size(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """Encoded image ``data`` with its header changed to declare w x h pixels."""
    import struct
    b = bytearray(data)
    if fmt == "jpg":
        pos = 2
        while b[pos + 1] not in (0xC0, 0xC1, 0xC2):
            pos += 2 + int.from_bytes(b[pos + 2:pos + 4], "big")
        b[pos + 5:pos + 9] = struct.pack(">HH", h, w)
    elif fmt == "bmp":
        b[18:26] = struct.pack("<ii", w, h)
    return bytes(b)


@pytest.mark.parametrize("fmt", ["jpg", "bmp"])
def test_huge_declared_size_in_other_formats(tmp_path, fmt):
    small = _encode(f".{fmt}", _pattern()[..., ::-1])
    path = tmp_path / f"huge.{fmt}"
    path.write_bytes(_with_size(small, fmt, 60000, 50000))
    _assert_one_line_error(str(path), "60000x50000 pixels (3000 megapixels) is above the 100-megapixel limit")


@pytest.mark.parametrize("fmt, via", [("png", "header"), ("jpg", "header"), ("bmp", "pillow"),
                                      ("bmp", "after decoding")])
def test_pixel_limit_boundary(tmp_path, monkeypatch, fmt, via):
    img = _pattern(40, 60)  # 2400 pixels
    path = tmp_path / f"p.{fmt}"
    path.write_bytes(_encode(f".{fmt}", img[..., ::-1]))
    if via == "after decoding":  # no header reader for the format (e.g. Pillow missing)
        monkeypatch.setattr("core.io.image._pillow_size", lambda buf: None)
    monkeypatch.setattr("core.io.image.MAX_PIXELS", 2400)
    assert read_image(path).shape == (40, 60, 3)
    monkeypatch.setattr("core.io.image.MAX_PIXELS", 2399)
    _assert_one_line_error(str(path), "60x40 pixels (0.0024 megapixels) is above the 0.002399-megapixel limit")


def test_header_size_matches_the_decoded_size(tmp_path):
    from core.io.image import image_size
    img = _pattern(37, 53)
    for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp"):
        assert image_size(_encode(ext, img)) == (53, 37), ext
    progressive = _encode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert image_size(progressive) == (53, 37)
    assert image_size(b"not an image at all") is None
    assert image_size(b"\x89PNG\r\n\x1a\n") is None  # header cut short
    assert image_size(b"\xff\xd8\xff\xe0\x00") is None


def test_pillow_bomb_guard_is_left_as_it_was():
    Image = pytest.importorskip("PIL.Image")
    before = Image.MAX_IMAGE_PIXELS
    from core.io.image import image_size
    bmp = _with_size(_encode(".bmp", _pattern()), "bmp", 60000, 50000)
    assert image_size(bmp) == (60000, 50000)  # read although Pillow would call it a bomb
    assert Image.MAX_IMAGE_PIXELS == before
