"""Reading and writing photos as (H, W, 3) uint8 RGB arrays.

Every problem with an input file becomes a one-line ``UserError`` that names the path and
what is wrong with it. Images are decoded from bytes (``np.fromfile`` + ``cv2.imdecode``),
so paths with non-ASCII characters work on every platform.

``cv2.IMREAD_COLOR`` does the normalisation: grayscale and palette images become three
channels, an alpha channel is dropped (not composited), 16-bit samples are scaled to 8 bits
and the EXIF orientation tag is applied, so the array is the photo as a viewer shows it.

Decompression bombs (a small file that declares a huge image, e.g. a 300 kB PNG of
50000 x 50000 zeros) are refused before decoding: the size is read from the file header
(PNG and JPEG here, other formats through Pillow's header parser) and images above
``MAX_PIXELS`` give a ``UserError`` instead of gigabytes of memory or a ``cv2.error``.
"""
from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings

import cv2
import numpy as np

from .atomic import atomic_path
from core.errors import UserError

__all__ = ["read_image", "write_image", "image_size", "SUPPORTED", "MAX_PIXELS"]

SUPPORTED = "jpg, png, bmp, webp, tiff"

_JPEG_QUALITY = 95

# Largest photo accepted, in pixels (100 megapixels: 300 MB as 8-bit RGB, several times that
# while decoding and cropping). Far above any camera's photo, far below a decompression bomb.
MAX_PIXELS = 100_000_000


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a photo as an (H, W, 3) uint8 RGB array.

    Raises ``UserError`` when the path is missing, is a folder, is empty, cannot be read,
    is not an image in a format OpenCV decodes (``SUPPORTED``), is a truncated JPEG, or
    declares more than ``MAX_PIXELS`` pixels (checked on the header, before decoding).
    """
    path = os.fspath(path)

    def fail(problem: str) -> UserError:
        return UserError(f"cannot read image '{path}': {problem}")

    if not os.path.exists(path):
        raise fail("file not found")
    if os.path.isdir(path):
        raise fail("is a directory, not an image file")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise fail(e.strerror or str(e)) from None
    if data.size == 0:
        raise fail("file is empty")
    buf = data.tobytes()
    size = image_size(buf)
    if size is not None:
        _check_pixels(size, fail)
    if _is_jpeg(data) and not _jpeg_complete(buf):
        raise fail("truncated or corrupt JPEG (the file ends before the image data does)")
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as e:  # e.g. OpenCV's own size limits, a decoder assertion
        raise fail(f"OpenCV cannot decode it ({_cv2_reason(e)}); supported: {SUPPORTED}") from None
    except MemoryError:
        raise fail("not enough memory to decode it") from None
    if bgr is None:
        raise fail(f"not an image file, or a corrupt one (supported: {SUPPORTED})")
    if size is None:  # a format whose header we could not read: check after the fact
        _check_pixels((bgr.shape[1], bgr.shape[0]), fail)
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        # IMREAD_COLOR promises 8-bit BGR; guard against decoder surprises all the same.
        raise fail(f"unsupported pixel layout {bgr.shape} {bgr.dtype}; save it as 8-bit RGB")
    return np.ascontiguousarray(bgr[..., ::-1])


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB (or (H, W) gray) array; the extension picks the format.

    The file appears atomically (complete or not at all). JPEG quality is 95.
    Raises ``ValueError`` for a wrong array and ``UserError`` for an unsupported extension
    or a folder that cannot be written.
    """
    path = os.fspath(path)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise ValueError(f"expected an (H, W, 3) or (H, W) uint8 image; got {rgb.shape} {rgb.dtype}")
    ext = os.path.splitext(path)[1].lower()
    image = rgb if rgb.ndim == 2 else rgb[..., ::-1]
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if ext in (".jpg", ".jpeg", ".jpe") else []
    try:
        ok, encoded = cv2.imencode(ext, np.ascontiguousarray(image), params)
    except cv2.error:
        ok = False
    if not ok:
        raise UserError(f"cannot write image '{path}': unsupported extension '{ext}' "
                        f"(supported: {SUPPORTED})")
    try:
        with atomic_path(path) as tmp:
            encoded.tofile(tmp)
    except OSError as e:
        raise UserError(f"cannot write image '{path}': {e.strerror or e}") from None


# --- image size from the header ----------------------------------------------------------

def _megapixels(pixels: float) -> str:
    return f"{pixels / 1e6:.6g}"


def _check_pixels(size: tuple[int, int], fail) -> None:
    """``fail(...)`` is raised when a ``(width, height)`` image exceeds ``MAX_PIXELS``."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise fail(f"{w}x{h} pixels ({_megapixels(w * h)} megapixels) is above the "
                   f"{_megapixels(MAX_PIXELS)}-megapixel limit; scale the image down first")


def _cv2_reason(err: cv2.error) -> str:
    """The one-line core of an OpenCV error (its message spans several lines)."""
    reason = getattr(err, "err", None)
    if not reason:
        lines = str(err).strip().splitlines()
        reason = lines[-1] if lines else type(err).__name__
    return reason


def image_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """``(width, height)`` declared by the header of an encoded image, without decoding it.

    data: the file's bytes (bytes or a uint8 array). PNG and JPEG headers are parsed here;
    other formats go through Pillow's header parser when Pillow is installed. Returns None
    when the size cannot be told (unknown format, damaged header): the decoder decides.
    """
    buf = data.tobytes() if isinstance(data, np.ndarray) else data
    if buf.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(buf) >= 24 and buf[12:16] == b"IHDR":
            return struct.unpack(">II", buf[16:24])
        return None
    if buf[:3] == b"\xff\xd8\xff":
        return _jpeg_size(buf)
    return _pillow_size(buf)


# SOF markers (frame headers) of every JPEG coding process: C0-C3, C5-C7, C9-CB, CD-CF.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(buf: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the segments before the scan."""
    n, pos = len(buf), 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or the scan began without a frame header
            return None
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if marker in _JPEG_SOF:
            if pos + 9 > n:
                return None
            h, w = struct.unpack(">HH", buf[pos + 5:pos + 9])
            return (w, h) if h > 0 else None  # height 0: defined later by a DNL marker
        pos += 2 + length
    return None


# Pillow's bomb guard (Image.MAX_IMAGE_PIXELS, a module global) is lifted around the header
# read so that the exact size can be reported; the lock keeps two of our threads from
# interleaving the save and restore.
_PIL_LOCK = threading.Lock()


def _pillow_size(buf: bytes) -> tuple[int, int] | None:
    try:
        from PIL import Image
    except ImportError:
        return None
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(io.BytesIO(buf)) as im:  # reads the header only
                w, h = im.size
        except Exception:  # not identified or a damaged header: the decoder will judge
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    return int(w), int(h)


# --- JPEG completeness -------------------------------------------------------------------
# OpenCV >= 5 refuses a JPEG that ends early, but OpenCV 4.x (libjpeg) only prints
# "Premature end of JPEG file" and returns the image with its missing part filled grey.
# Walking the marker structure up to the end-of-image marker catches that cheaply (the scan
# data is searched by a C-level regex). Data after EOI (camera trailers, motion photos) is
# allowed; a thumbnail inside APP1 is skipped by its segment length.

_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")  # not stuffing (FF00) nor RSTn


def _is_jpeg(data: np.ndarray) -> bool:
    return data.size >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


def _jpeg_complete(buf: bytes) -> bool:
    """False if the JPEG stream in ``buf`` ends before its EOI marker; True otherwise.

    Only a stream that clearly runs out of data is reported; anything unexpected in the
    structure is left for the decoder to judge (returns True).
    """
    n = len(buf)
    pos = 2  # after SOI
    while True:
        while pos < n and buf[pos] == 0xFF and pos + 1 < n and buf[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 1 >= n:
            return False
        if buf[pos] != 0xFF:
            return True  # not where a marker should be: let the decoder decide
        marker = buf[pos + 1]
        if marker == 0xD9:  # EOI
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            pos += 2
            continue
        if pos + 3 >= n:
            return False
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        end = pos + 2 + length
        if end > n:
            return False
        pos = end
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next real marker
            m = _NEXT_MARKER.search(buf, pos)
            if m is None:
                return False
            pos = m.end() - 2
