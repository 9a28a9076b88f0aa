"""Tests for core.landmarks.crop: the box, the point mapping, crop_face and paste_back agree."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.landmarks.crop import crop_face, crop_to_photo, paste_back, photo_to_crop, square_box


def _blob_image(h, w, centres, sigma):
    """uint8 (h, w, 3) black image with Gaussian blobs (peak 250) at (x, y) centres,
    integer = pixel centre."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for cx, cy in centres:
        img += 250 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
    return np.repeat(np.clip(np.rint(img), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _centroid(channel, around, radius):
    """Intensity centroid (x, y) of the pixels within ``radius`` of ``around``."""
    yy, xx = np.mgrid[0:channel.shape[0], 0:channel.shape[1]].astype(np.float64)
    wgt = channel.astype(np.float64) * (((xx - around[0]) ** 2 + (yy - around[1]) ** 2) <= radius ** 2)
    return np.array([(wgt * xx).sum(), (wgt * yy).sum()]) / wgt.sum()


def _smooth_image(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    g = 128 + 100 * np.cos((xx + yy) / 40.0)
    b = 40 + 0.5 * yy % 200
    return np.clip(np.rint(np.stack([r, g, b], axis=2)), 0, 255).astype(np.uint8)


# --- square_box -----------------------------------------------------------------------------

def test_square_box_side_and_centre():
    box = square_box([100.0, 50.0, 200.0, 250.0], padding_ratio=0.3)  # w 100, h 200
    x0, y0, x1, y1 = box
    assert all(isinstance(v, int) for v in box)
    assert x1 - x0 == y1 - y0 == 260
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == (150.0, 150.0)
    assert square_box([0, 0, 10, 10], 0.0) == (0, 0, 10, 10)
    assert square_box([0.2, 0.4, 10.7, 9.1], 0.0)[2] - square_box([0.2, 0.4, 10.7, 9.1], 0.0)[0] == 10  # round(10.5)


def test_square_box_may_leave_the_photo():
    x0, y0, x1, y1 = square_box([-20, -10, 40, 50], 0.5)
    assert x0 < 0 and y0 < 0 and x1 - x0 == 90


@pytest.mark.parametrize("bad", [[0, 0, 0, 10], [5, 5, 1, 10], [0, 0, np.nan, 1], [0, 0, 1]])
def test_square_box_rejects_bad_boxes(bad):
    with pytest.raises(ValueError):
        square_box(bad)


def test_square_box_rejects_bad_padding():
    with pytest.raises(ValueError, match="padding_ratio"):
        square_box([0, 0, 10, 10], -1.0)


# --- mapping ----------------------------------------------------------------------------------

def test_mapping_formula_and_round_trip():
    box, tar = (40, -10, 240, 190), 256  # side 200
    p = np.array([[40.0, -10.0], [140.0, 90.0], [239.0, 189.0], [0.0, 0.0]])
    q = photo_to_crop(p, box, tar)
    np.testing.assert_allclose(q[0], [0, 0])
    np.testing.assert_allclose(q[1], [128, 128])
    np.testing.assert_allclose(q[3], [-40 * 1.28, 10 * 1.28])
    np.testing.assert_allclose(crop_to_photo(q, box, tar), p, atol=1e-12)
    batch = np.random.default_rng(0).uniform(-50, 300, size=(3, 68, 2))
    np.testing.assert_allclose(crop_to_photo(photo_to_crop(batch, box, tar), box, tar), batch, atol=1e-9)
    assert photo_to_crop(batch, box, tar).shape == (3, 68, 2)


def test_mapping_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        photo_to_crop(np.zeros((1, 2)), (0, 0, 10, 20), 256)
    with pytest.raises(ValueError, match="integer box"):
        photo_to_crop(np.zeros((1, 2)), (0.5, 0, 10.5, 10), 256)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        crop_to_photo(np.zeros((1, 3)), (0, 0, 10, 10), 256)
    with pytest.raises(ValueError, match="tar_size"):
        crop_face(np.zeros((10, 10, 3), np.uint8), (0, 0, 10, 10), 0)


# --- crop_face --------------------------------------------------------------------------------

def test_crop_at_scale_one_is_a_slice():
    img = _smooth_image(120, 100)
    np.testing.assert_array_equal(crop_face(img, (10, 20, 74, 84), 64), img[20:84, 10:74])


@pytest.mark.parametrize("box,tar", [((30, 50, 330, 350), 256),   # shrink 1.17x, no blur
                                     ((0, 10, 400, 410), 100),    # shrink 4x, blurred first
                                     ((100, 120, 164, 184), 256)],  # enlarge 4x
                         ids=["shrink", "shrink4x", "enlarge"])
def test_features_land_where_the_mapping_says(box, tar):
    centres = [(200.3, 90.6), (250.0, 300.25), (130.8, 150.1)]  # > 15 sigma apart
    img = _blob_image(420, 420, centres, sigma=6.0)
    crop = crop_face(img, box, tar)
    assert crop.shape == (tar, tar, 3) and crop.dtype == np.uint8
    s = tar / (box[2] - box[0])
    checked = 0
    for c in centres:
        q = photo_to_crop(np.array(c), box, tar)
        if not (3 * 6 * s < q[0] < tar - 3 * 6 * s and 3 * 6 * s < q[1] < tar - 3 * 6 * s):
            continue  # blob not wholly inside the crop
        found = _centroid(crop[..., 0], q, radius=3 * 6 * s)
        np.testing.assert_allclose(found, q, atol=0.05 * max(1.0, s))
        checked += 1
    assert checked >= 1


def test_box_outside_the_photo_is_padded_black_not_shrunk():
    img = np.full((100, 80, 3), 200, np.uint8)
    crop = crop_face(img, (-20, -40, 80, 60), 100)  # scale 1: photo covers crop x >= 20, y >= 40
    assert crop.shape == (100, 100, 3)
    assert np.all(crop[:40] == 0) and np.all(crop[:, :20] == 0)
    assert np.all(crop[40:, 20:] == 200)
    crop = crop_face(img, (-200, -200, -100, -100), 50)  # wholly outside
    assert crop.shape == (50, 50, 3) and not crop.any()


def test_big_shrink_is_antialiased():
    """A 1-pixel checkerboard shrunk 5x must come out as flat grey, not moire."""
    yy, xx = np.mgrid[0:500, 0:500]
    img = np.repeat((((xx + yy) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    crop = crop_face(img, (0, 0, 500, 500), 100)
    inner = crop[5:-5, 5:-5].astype(float)
    assert abs(inner.mean() - 127.5) < 2 and inner.std() < 3


def test_crop_keeps_gray_and_float():
    gray = _smooth_image(60, 60)[..., 0]
    assert crop_face(gray, (0, 0, 60, 60), 30).shape == (30, 30)
    f = gray.astype(np.float32) / 255
    assert crop_face(f, (0, 0, 60, 60), 60).dtype == np.float32


# --- paste_back -------------------------------------------------------------------------------

def test_paste_back_of_the_crop_itself_reproduces_the_photo():
    img = _smooth_image(300, 260)
    box, tar = (60, 40, 210, 190), 256  # side 150: enlarge 1.7x, then shrink back
    crop = crop_face(img, box, tar)
    out = paste_back(img, crop, np.ones((tar, tar), np.float32), box)
    inside = (slice(40, 189), slice(60, 209))
    err = np.abs(out[inside].astype(int) - img[inside].astype(int))
    assert err.max() <= 3 and err.mean() < 0.6
    outside = np.ones(img.shape[:2], bool)
    outside[40:190, 60:210] = False
    np.testing.assert_array_equal(out[outside], img[outside])


def test_paste_back_at_scale_one_is_exact_and_uses_the_mask():
    img = _smooth_image(100, 100)
    box = (20, 30, 84, 94)
    render = np.full((64, 64, 3), 7, np.uint8)
    mask = np.zeros((64, 64, 1), bool)
    mask[10:20, 5:15] = True
    out = paste_back(img, render, mask, box)
    assert out is not img and np.array_equal(img, _smooth_image(100, 100))  # input untouched
    changed = np.any(out != img, axis=2)
    expect = np.zeros((100, 100), bool)
    expect[40:50, 25:35] = True  # (y0 + 10 .. y0 + 20, x0 + 5 .. x0 + 15)
    np.testing.assert_array_equal(changed, expect)
    assert np.all(out[expect] == 7)


def _paste_back_numpy(img, render, mask, box):
    """paste_back's definition in plain numpy (premultiplied warp, quotient, rint, clip)."""
    x0, y0, x1, _ = box
    side = x1 - x0
    T = render.shape[0]
    s = T / side
    H, W = img.shape[:2]
    out = img.copy()
    px0, py0, px1, py1 = max(0, x0), max(0, y0), min(W, x0 + side), min(H, y0 + side)
    if px0 >= px1 or py0 >= py1:
        return out
    inv = np.array([[s, 0.0, (px0 - x0) * s], [0.0, s, (py0 - y0) * s]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    m32 = np.asarray(mask, np.float32)
    rend = cv2.warpAffine(np.asarray(render, np.float32) * m32[..., None], inv, (px1 - px0, py1 - py0), flags=flags)
    msk = cv2.warpAffine(m32, inv, (px1 - px0, py1 - py0), flags=flags)
    colour = np.clip(np.rint(np.divide(rend, np.maximum(msk, np.float32(1e-12))[..., None], dtype=np.float32)), 0, 255)
    window = out[py0:py1, px0:px1]
    face = msk > 0.5
    window[face] = colour.astype(np.uint8)[face]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_paste_back_is_its_numpy_definition(seed):
    """OpenCV's channel arithmetic gives exactly the numpy formula's pixels: uint8 and float
    renders (out of range too), float and bool masks, boxes partly outside the photo."""
    rng = np.random.default_rng(seed)
    for t in range(40):
        H, W = (int(v) for v in rng.integers(40, 200, 2))
        img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        T = int(rng.integers(8, 64))
        render = rng.uniform(-20, 280, (T, T, 3)).astype([np.uint8, np.float32, np.float64][t % 3])
        if render.dtype == np.uint8:
            render = rng.integers(0, 256, (T, T, 3)).astype(np.uint8)
        mask = rng.uniform(0, 1, (T, T)) if t % 2 else rng.uniform(0, 1, (T, T)) > 0.3
        side = int(rng.integers(5, 2 * max(H, W)))
        x0, y0 = int(rng.integers(-side, W)), int(rng.integers(-side, H))
        box = (x0, y0, x0 + side, y0 + side)
        np.testing.assert_array_equal(paste_back(img, render, mask, box), _paste_back_numpy(img, render, mask, box))


def test_paste_back_in_place_writes_into_the_photo_the_same_pixels():
    rng = np.random.default_rng(3)
    img = _smooth_image(120, 100)
    render = rng.uniform(0, 255, (48, 48, 3)).astype(np.float32)
    mask = np.zeros((48, 48), np.float32)
    mask[8:40, 10:30] = 1
    box = (-7, 12, 81, 100)  # scale 48 / 88, partly left of the photo
    want = paste_back(img, render, mask, box)
    target = img.copy()
    out = paste_back(target, render, mask, box, inplace=True)
    assert out is target and np.array_equal(out, want) and not np.array_equal(want, img)
    view = img.copy()[:, ::-1]  # not contiguous: a copy after all, the input untouched
    out = paste_back(view, render, mask, box, inplace=True)
    assert out is not view and np.array_equal(view, img[:, ::-1])


def test_paste_back_box_leaving_the_photo_is_clipped():
    img = _smooth_image(80, 80)
    box, tar = (-40, 50, 60, 150), 50  # side 100, scale 0.5; photo part x 0..59, y 50..79
    out = paste_back(img, np.full((tar, tar, 3), 255.0), np.ones((tar, tar)), box)
    assert out.shape == img.shape
    assert np.all(out[50:80, 0:59] == 255)
    np.testing.assert_array_equal(out[:50], img[:50])
    np.testing.assert_array_equal(out[:, 61:], img[:, 61:])


def test_crop_and_paste_back_are_inverse_maps():
    """A blob placed in the render at crop point q appears in the photo at crop_to_photo(q)."""
    tar, box = 128, (30, 10, 230, 210)  # side 200
    q = np.array([[40.3, 70.6]])
    render = _blob_image(tar, tar, q, sigma=4.0)
    out = paste_back(np.zeros((240, 240, 3), np.uint8), render, np.ones((tar, tar)), box)
    p = crop_to_photo(q, box, tar)[0]
    np.testing.assert_allclose(_centroid(out[..., 0], p, radius=4 * 4 * 200 / 128), p, atol=0.1)


def test_paste_back_rejects_mismatched_inputs():
    img = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="mask"):
        paste_back(img, np.zeros((32, 32, 3)), np.zeros((16, 16)), (0, 0, 32, 32))
    with pytest.raises(ValueError, match="render"):
        paste_back(img, np.zeros((32, 16, 3)), np.zeros((32, 16)), (0, 0, 32, 32))
    with pytest.raises(ValueError, match="uint8"):
        paste_back(img.astype(float), np.zeros((32, 32, 3)), np.zeros((32, 32)), (0, 0, 32, 32))


@pytest.mark.parametrize("side", [150, 97, 40, 23])  # 64 -> 150 / 97 px: enlarge; 40 / 23: shrink
@pytest.mark.parametrize("mask_dtype", [bool, np.float32])
def test_paste_back_edge_has_no_background_colour(side, mask_dtype):
    """A constant-colour face on the renderer's black background: every pasted pixel has the
    face colour (bilinear mixing with the background used to leave a dark 1-px outline)."""
    T, colour = 64, np.array([200, 100, 50])
    yy, xx = np.mgrid[0:T, 0:T].astype(np.float64)
    cx, cy, r = 31.3, 33.8, 22.5  # crop coordinates, integer = pixel centre
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
    render = np.zeros((T, T, 3), np.uint8)
    render[disc] = colour
    photo = np.zeros((220, 240, 3), np.uint8)
    photo[:] = (10, 220, 240)
    box = (37, 21, 37 + side, 21 + side)
    out = paste_back(photo, render, disc.astype(mask_dtype), box)
    pasted = np.any(out != photo, axis=2)
    assert np.abs(out[pasted].astype(int) - colour).max() <= 1
    # The pasted area follows the disc: its area scaled by (side / T)^2, and nothing
    # pasted farther from the mapped centre than the mapped radius (plus a pixel).
    s = T / side
    area = np.pi * (r / s) ** 2
    assert abs(pasted.sum() - area) <= 2 * np.pi * (r / s) * 0.5 + 2, (pasted.sum(), area)
    py, px = np.nonzero(pasted)
    centre = crop_to_photo([cx, cy], box, T)
    assert np.hypot(px - centre[0], py - centre[1]).max() <= r / s + 1
    # ... and everything well inside it is pasted.
    pyy, pxx = np.mgrid[0:220, 0:240]
    inner = np.hypot(pxx - centre[0], pyy - centre[1]) <= r / s - 1.5
    assert pasted[inner].all()


def test_paste_back_soft_mask_weights_the_colours():
    """Fractional mask values weight the render's (straight, not premultiplied) colours:
    two face columns of different colour, one half covered, one fully; outside is black."""
    T = 32
    render = np.zeros((T, T, 3), np.float32)
    render[:, 15] = (100, 100, 100)
    render[:, 16] = (200, 200, 200)
    mask = np.zeros((T, T), np.float32)
    mask[:, :16] = 1.0
    mask[:, 16] = 0.5
    render[:, :15] = (100, 100, 100)
    out = paste_back(np.full((64, 64, 3), 255, np.uint8), render, mask, (0, 0, 64, 64))  # s = 0.5
    # photo x = 31 samples crop x = 15.5: weights 0.5 * 1.0 (colour 100) and 0.5 * 0.5
    # (colour 200), so (50 + 50) / 0.75 = 133.3; without premultiplying, 150 (plain average).
    np.testing.assert_array_equal(out[:63, 31], 133)
    np.testing.assert_array_equal(out[:63, :31], 100)
    # x = 32 samples crop x = 16 (mask 0.5, not > 0.5); the last row samples half outside.
    np.testing.assert_array_equal(out[:, 32:], 255)
    np.testing.assert_array_equal(out[63], 255)
