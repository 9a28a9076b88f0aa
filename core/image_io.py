"""Reading and writing photos as (H, W, 3) uint8 RGB arrays.

Every problem with an input file becomes a one-line ``UserError`` that names the path and
what is wrong with it. Images are decoded from bytes (``np.fromfile`` + ``cv2.imdecode``),
so paths with non-ASCII characters work on every platform.

``cv2.IMREAD_COLOR`` does the normalisation: grayscale and palette images become three
channels, an alpha channel is dropped (not composited), 16-bit samples are scaled to 8 bits
and the EXIF orientation tag is applied, so the array is the photo as a viewer shows it.
"""
from __future__ import annotations

import os
import re

import cv2
import numpy as np

from core.atomic import atomic_path
from core.errors import UserError

__all__ = ["read_image", "write_image", "SUPPORTED"]

SUPPORTED = "jpg, png, bmp, webp, tiff"

_JPEG_QUALITY = 95


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a photo as an (H, W, 3) uint8 RGB array.

    Raises ``UserError`` when the path is missing, is a folder, is empty, cannot be read,
    is not an image in a format OpenCV decodes (``SUPPORTED``), or is a truncated JPEG.
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
    if _is_jpeg(data) and not _jpeg_complete(data.tobytes()):
        raise fail("truncated or corrupt JPEG (the file ends before the image data does)")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise fail(f"not an image file, or a corrupt one (supported: {SUPPORTED})")
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
