"""The square face crop: choose the box, crop and resize it, map points, paste results back.

Conventions (one place, pinned by tests/test_crop.py):

* Photo and crop coordinates are (x, y) = (column, row) in pixels with the **integer =
  pixel centre** convention, the same as the dlib / FAN landmarks they carry.
* A crop box ``(x0, y0, x1, y1)`` is an integer square, side = x1 - x0 = y1 - y0; like a
  slice, it covers the photo pixels x0 .. x1 - 1 and y0 .. y1 - 1. It may extend past the
  photo: the missing part is black (we pad, never shrink or shift the box).
* Resizing the box to ``tar_size`` pixels uses the scale ``s = tar_size / side`` and maps

      photo point p  ->  crop point q = (p - (x0, y0)) * s
      crop point q   ->  photo point p = (x0, y0) + q / s

  ``crop_face`` samples crop pixel q at photo position (x0, y0) + q / s, so a landmark
  mapped with ``photo_to_crop`` sits on the same image content in the crop as in the photo,
  and ``paste_back`` uses the exact inverse. When side == tar_size the crop is exactly
  ``image[y0:y1, x0:x1]`` (zero-padded).

Note that SPEC §3's renderer puts pixel centres at (i + 0.5, j + 0.5) of its projection
coordinates while landmarks are used at face value (integer = centre), as in the original;
that half-pixel offset belongs to the camera model, not to this module.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from core import defaults

__all__ = ["square_box", "photo_to_crop", "crop_to_photo", "crop_face", "paste_back"]

Box = tuple[int, int, int, int]


def square_box(face_box, padding_ratio: float = defaults.PADDING_RATIO) -> Box:
    """Square crop box around a face box.

    face_box: (4,) [x0, y0, x1, y1] in photo pixels (any floats, x1 > x0, y1 > y0).
    Returns integer (x0, y0, x1, y1) of side round(max(w, h) * (1 + padding_ratio)), centred
    on the face box centre (to the nearest pixel). The box may leave the photo.
    """
    b = np.asarray(face_box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ValueError(f"expected a face box [x0, y0, x1, y1] of 4 finite numbers; got {face_box!r}")
    w, h = b[2] - b[0], b[3] - b[1]
    if w <= 0 or h <= 0:
        raise ValueError(f"face box must have x1 > x0 and y1 > y0; got {b.tolist()}")
    if not (math.isfinite(padding_ratio) and padding_ratio > -1):
        raise ValueError(f"padding_ratio must be a number > -1; got {padding_ratio!r}")
    side = max(1, int(round(max(w, h) * (1.0 + padding_ratio))))
    cx, cy = (b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0
    x0 = int(round(cx - side / 2.0))
    y0 = int(round(cy - side / 2.0))
    return x0, y0, x0 + side, y0 + side


def _check_box(box) -> tuple[int, int, int]:
    b = np.asarray(box).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)) or np.any(b != np.round(b)):
        raise ValueError(f"expected an integer box (x0, y0, x1, y1) as square_box returns; got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in b)
    side = x1 - x0
    if side <= 0 or y1 - y0 != side:
        raise ValueError(f"expected a square box (x0, y0, x1, y1) with x1 - x0 = y1 - y0 > 0; "
                         f"got {tuple(box)}")
    return x0, y0, side


def _check_size(tar_size: int) -> int:
    if int(tar_size) != tar_size or tar_size < 1:
        raise ValueError(f"tar_size must be a positive integer; got {tar_size!r}")
    return int(tar_size)


def photo_to_crop(points, box, tar_size: int) -> np.ndarray:
    """Map photo points (..., 2) (x, y) into the tar_size crop of ``box``: (p - (x0, y0)) * s."""
    x0, y0, side = _check_box(box)
    s = _check_size(tar_size) / side
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-1:] != (2,):
        raise ValueError(f"expected points of shape (..., 2); got {p.shape}")
    return (p - np.array([x0, y0], dtype=np.float64)) * s


def crop_to_photo(points, box, tar_size: int) -> np.ndarray:
    """Map crop points (..., 2) (x, y) back to the photo: (x0, y0) + q / s."""
    x0, y0, side = _check_box(box)
    s = _check_size(tar_size) / side
    q = np.asarray(points, dtype=np.float64)
    if q.shape[-1:] != (2,):
        raise ValueError(f"expected points of shape (..., 2); got {q.shape}")
    return q / s + np.array([x0, y0], dtype=np.float64)


def _antialias_sigma(s: float) -> float:
    """Gaussian sigma (photo pixels) to blur with before sampling at scale s < 1.

    (1/s - 1) / 2 is scikit-image's ``rescale(anti_aliasing=True)`` default: about half the
    new pixel spacing minus the half pixel that bilinear sampling already averages. It
    suppresses the moire that plain bilinear sampling gives when shrinking a lot, and since
    the kernel is symmetric it moves nothing: the point mapping stays exact.
    """
    return max(0.0, (1.0 / s - 1.0) / 2.0)


def crop_face(image: np.ndarray, box, tar_size: int) -> np.ndarray:
    """Crop the square ``box`` from ``image`` and resize it to (tar_size, tar_size).

    image: (H, W, C) or (H, W) array (uint8 photos; float works too), photo pixels.
    Crop pixel q samples photo position (x0, y0) + q / s (bilinear), s = tar_size / side;
    parts of the box outside the photo are black. When shrinking by more than 1.6x the
    region is Gaussian-blurred first (sigma from ``_antialias_sigma``), only around the box.
    Returns (tar_size, tar_size[, C]) of the input dtype.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"expected an (H, W) or (H, W, C) image; got shape {img.shape}")
    x0, y0, side = _check_box(box)
    tar_size = _check_size(tar_size)
    s = tar_size / side
    H, W = img.shape[:2]

    # Work on the part of the photo the box touches (plus a margin for the blur and the
    # bilinear footprint): blurring a whole 12-megapixel frame for a small face is waste.
    sigma = _antialias_sigma(s)
    blur = sigma >= 0.3
    margin = int(math.ceil(4 * sigma)) + 2 if blur else 2
    rx0, ry0 = max(0, x0 - margin), max(0, y0 - margin)
    rx1, ry1 = min(W, x0 + side + margin), min(H, y0 + side + margin)
    out_shape = (tar_size, tar_size) + img.shape[2:]
    if rx0 >= rx1 or ry0 >= ry1:  # the box misses the photo entirely
        return np.zeros(out_shape, dtype=img.dtype)
    region = img[ry0:ry1, rx0:rx1]
    if blur:
        region = cv2.GaussianBlur(region, (0, 0), sigmaX=sigma, sigmaY=sigma,
                                  borderType=cv2.BORDER_REFLECT_101)
    # Destination -> source map (WARP_INVERSE_MAP), i.e. the inverse of
    # M = [[s, 0, -s*x0], [0, s, -s*y0]], expressed in region coordinates.
    inv = np.array([[1.0 / s, 0.0, x0 - rx0],
                    [0.0, 1.0 / s, y0 - ry0]], dtype=np.float64)
    out = cv2.warpAffine(np.ascontiguousarray(region), inv, (tar_size, tar_size),
                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(out_shape)


def paste_back(image: np.ndarray, render_rgb: np.ndarray, mask: np.ndarray, box, inplace: bool = False) -> np.ndarray:
    """Composite a tar_size render of ``box`` back into the photo.

    image: (H, W, 3) uint8 photo. render_rgb: (T, T, 3) in 0..255 (uint8 or float).
    mask: (T, T) or (T, T, 1), 1 = face (bool or float). box: the crop box of the render.
    Photo pixel p samples the render and the mask at crop position (p - (x0, y0)) * s
    (bilinear; the exact inverse of ``crop_face``); where the interpolated mask > 0.5 the
    render replaces the photo. The colour is interpolated premultiplied, over the face
    pixels only (warp(render * mask) / warp(mask)), so the background of the render (black)
    never bleeds into the pasted pixels: no dark outline along the face's edge at any scale.
    Parts of the box outside the photo are dropped.
    Returns a new (H, W, 3) uint8 image, the input unmodified; with ``inplace``, the input
    itself (a writable C-contiguous array), pasted into.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image; got {img.shape} {img.dtype}")
    render = np.asarray(render_rgb)
    T = render.shape[0] if render.ndim == 3 else -1
    if render.ndim != 3 or render.shape != (T, T, 3):
        raise ValueError(f"expected a (T, T, 3) render; got {render.shape}")
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[..., 0]
    if m.shape != (T, T):
        raise ValueError(f"expected a ({T}, {T}) mask to match the render; got {np.shape(mask)}")
    x0, y0, side = _check_box(box)
    s = T / side
    H, W = img.shape[:2]
    out = img if inplace and img.flags.writeable and img.flags.c_contiguous else img.copy()
    # Only the photo pixels inside the box can change.
    px0, py0 = max(0, x0), max(0, y0)
    px1, py1 = min(W, x0 + side), min(H, y0 + side)
    if px0 >= px1 or py0 >= py1:
        return out
    # Destination (photo sub-window, origin at (px0, py0)) -> source (crop) map.
    inv = np.array([[s, 0.0, (px0 - x0) * s],
                    [0.0, s, (py0 - y0) * s]], dtype=np.float64)
    size = (px1 - px0, py1 - py0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    m32 = np.ascontiguousarray(m, dtype=np.float32)
    src = np.ascontiguousarray(render if render.dtype == np.uint8 else np.asarray(render, dtype=np.float32))
    # OpenCV's per-channel arithmetic (the same float32 products and quotients as numpy's
    # broadcasting, a third of the time): premultiplied colour, warped with the mask.
    premul = cv2.multiply(src, cv2.merge([m32, m32, m32]), dtype=cv2.CV_32F)
    rend = cv2.warpAffine(premul, inv, size, flags=flags,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    msk = cv2.warpAffine(m32, inv, size, flags=flags,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    face = msk > 0.5
    # Back from premultiplied (the quotient only matters where face is set), whole-window
    # array operations: faster than gathering the face pixels, the same values there;
    # rounded to nearest (ties to even) and saturated to 0..255, as np.rint and np.clip
    # (negative colours, from a float render, clamped first: 0, not their absolute value).
    np.maximum(rend, np.float32(0), out=rend)
    den = np.maximum(msk, np.float32(1e-12))
    colour = cv2.convertScaleAbs(cv2.divide(rend, cv2.merge([den, den, den])))
    window = out[py0:py1, px0:px1]
    pasted = cv2.copyTo(colour, face.view(np.uint8), window)  # in place, masked
    if not np.shares_memory(pasted, out):  # OpenCV made a new array after all
        window[...] = pasted
    return out
