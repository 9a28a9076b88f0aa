"""A synthetic face-like morphable model in the converted BFM09 layout.

For tests, demos and benchmarks where the Basel model cannot be: a height-field face
(an ellipsoid cap with a nose) whose 68 landmark vertices sit where the iBUG-68 points
of a real face are, with smooth random identity, expression and albedo bases. At
``target_vertices≈35709`` it has the size of BFM09's front face (benchmarks).

Units are decimetres, x right (the subject's left), y up, z towards the camera; point 0
of the iBUG jaw is on the image's left, as in photos.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from .geometry import adjacent_triangles


def ibug68_template() -> np.ndarray:
    """(68, 2) x, y of a plausible frontal face's iBUG-68 landmarks, decimetres."""
    pts = []
    # Jaw 0-16: from the right temple (image left) round the chin to the left temple.
    for k in range(17):
        a = np.pi * k / 16
        pts.append((-0.70 * np.cos(a), 0.12 - 0.86 * np.sin(a) ** 1.2))
    # Brows 17-21 (image left), 22-26 (image right), arched.
    for k in range(5):
        x = -0.60 + 0.11 * k
        pts.append((x, 0.42 + 0.06 * np.sin(np.pi * (k + 0.5) / 5)))
    for k in range(5):
        x = 0.16 + 0.11 * k
        pts.append((x, 0.42 + 0.06 * np.sin(np.pi * (k + 0.5) / 5)))
    # Nose bridge 27-30, then nostrils 31-35.
    for k in range(4):
        pts.append((0.0, 0.30 - 0.13 * k))
    for k in range(5):
        pts.append((-0.16 + 0.08 * k, -0.17 + 0.03 * (1 - abs(k - 2) / 2)))
    # Eyes: 36-41 right (image left), 42-47 left; corner, two upper, corner, two lower.
    # Both start at the corner on the image's left and go over the upper lid.
    eye = [(-0.13, 0.0), (-0.05, 0.045), (0.05, 0.045), (0.13, 0.0), (0.05, -0.04), (-0.05, -0.04)]
    for cx in (-0.33, 0.33):
        pts += [(cx + x, 0.24 + y) for x, y in eye]
    # Outer lips 48-59: right corner, upper lip to the left corner, lower lip back.
    outer = [(-0.25, -0.44), (-0.17, -0.38), (-0.07, -0.35), (0.0, -0.36), (0.07, -0.35), (0.17, -0.38),
             (0.25, -0.44), (0.17, -0.52), (0.08, -0.55), (0.0, -0.555), (-0.08, -0.55), (-0.17, -0.52)]
    inner = [(-0.21, -0.44), (-0.08, -0.42), (0.0, -0.425), (0.08, -0.42),
             (0.21, -0.44), (0.08, -0.46), (0.0, -0.465), (-0.08, -0.46)]
    pts += outer + inner
    out = np.asarray(pts, dtype=np.float64)
    assert out.shape == (68, 2)
    return out


def _height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Face surface z(x, y) in decimetres: an ellipsoid cap plus a nose and brow ridge."""
    r2 = (x / 0.85) ** 2 + ((y + 0.1) / 1.05) ** 2
    z = 0.55 * np.sqrt(np.clip(1.0 - r2, 0.0, None))
    nose = 0.28 * np.exp(-((x / 0.09) ** 2 + ((y + 0.02) / 0.22) ** 2))
    tip = 0.10 * np.exp(-((x / 0.10) ** 2 + ((y + 0.12) / 0.08) ** 2))
    sockets = -0.05 * (np.exp(-(((x - 0.33) / 0.12) ** 2 + ((y - 0.24) / 0.08) ** 2))
                       + np.exp(-(((x + 0.33) / 0.12) ** 2 + ((y - 0.24) / 0.08) ** 2)))
    return z + nose + tip + sockets


def make_face_model_arrays(target_vertices: int = 2000, n_id: int = 80, n_exp: int = 64,
                           n_tex: int = 80, seed: int = 0) -> Dict[str, np.ndarray]:
    """A synthetic model in the converted BFM09 file layout (SPEC §1: 1-based indices,
    (1, 3N) means, (3N, K) bases). Deterministic for a given seed."""
    from scipy.spatial import Delaunay

    rng = np.random.default_rng(seed)
    lm_xy = ibug68_template()
    # Regular grid inside an ellipse slightly larger than the jaw line.
    area = np.pi * 0.80 * 0.98
    step = np.sqrt(area / max(target_vertices - 68, 16)) * 0.985
    gx, gy = np.meshgrid(np.arange(-0.82, 0.82 + 1e-9, step), np.arange(-1.0, 0.8 + 1e-9, step))
    gx, gy = gx.ravel(), gy.ravel()
    inside = (gx / 0.80) ** 2 + ((gy + 0.09) / 0.98) ** 2 <= 1.0
    gx, gy = gx[inside], gy[inside]
    # Drop grid points too close to a landmark so no sliver triangles form around it.
    d = np.min(np.hypot(gx[:, None] - lm_xy[None, :, 0], gy[:, None] - lm_xy[None, :, 1]), axis=1)
    keep = d > 0.35 * step
    xy = np.concatenate([lm_xy, np.stack([gx[keep], gy[keep]], 1)], axis=0)
    n = xy.shape[0]
    z = _height(xy[:, 0], xy[:, 1])
    verts = np.stack([xy[:, 0], xy[:, 1], z], 1)
    tri = Delaunay(xy).simplices.astype(np.int64)
    # Orient triangles counter-clockwise seen from the camera (+z).
    a, b, c = xy[tri[:, 0]], xy[tri[:, 1]], xy[tri[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    tri[cross < 0] = tri[cross < 0][:, [0, 2, 1]]
    tri = tri[np.abs(cross) > 1e-12]

    def smooth_fields(k: int, scale: float, window=None) -> np.ndarray:
        """(3N, k) smooth random displacement fields with decaying magnitude."""
        out = np.zeros((n, 3, k))
        for j in range(k):
            fx, fy = rng.uniform(0.5, 3.0, size=2)
            px, py = rng.uniform(0, 2 * np.pi, size=2)
            wave = np.cos(fx * np.pi * xy[:, 0] + px) * np.cos(fy * np.pi * xy[:, 1] + py)
            direction = rng.normal(size=3)
            direction[2] *= 0.6
            field = wave[:, None] * direction[None, :]
            if window is not None:
                field *= window[:, None]
            out[:, :, j] = field * scale / (1.0 + j / 8.0)
        return out.reshape(3 * n, k)

    mouth = np.exp(-((xy[:, 0] / 0.35) ** 2 + ((xy[:, 1] + 0.45) / 0.25) ** 2))
    eyes = np.exp(-(((np.abs(xy[:, 0]) - 0.33) / 0.18) ** 2 + ((xy[:, 1] - 0.3) / 0.15) ** 2))
    id_base = smooth_fields(n_id, 0.03)
    exp_base = smooth_fields(n_exp, 0.04, window=0.2 + mouth + 0.6 * eyes)
    # The first expression opens the mouth: lower lip and chin down.
    if n_exp:
        jaw = np.clip(-(xy[:, 1] + 0.42) / 0.5, 0, 1) * np.exp(-(xy[:, 0] / 0.6) ** 2)
        opening = np.zeros((n, 3))
        opening[:, 1] = -0.08 * jaw
        exp_base[:, 0] = opening.reshape(-1)
    skin_rgb = np.array([205.0, 150.0, 125.0])
    meantex = np.tile(skin_rgb, (n, 1))
    meantex[:, 0] += 25 * mouth          # redder lips
    meantex -= 60 * eyes[:, None]        # darker eyes
    meantex += 8 * np.sin(6 * xy[:, :1]) * np.cos(5 * xy[:, 1:2])  # some texture for photometric cues
    tex = np.zeros((n, 3, n_tex))
    for j in range(n_tex):
        fx, fy = rng.uniform(0.5, 4.0, size=2)
        wave = np.cos(fx * np.pi * xy[:, 0] + rng.uniform(0, 6)) * np.cos(fy * np.pi * xy[:, 1] + rng.uniform(0, 6))
        tex[:, :, j] = wave[:, None] * rng.normal(size=3)[None, :] * 12.0 / (1.0 + j / 8.0)
    skin = (eyes < 0.3) & (mouth < 0.3)
    return {
        "meanshape": verts.reshape(1, -1).astype(np.float32),
        "idBase": id_base.astype(np.float32),
        "exBase": exp_base.astype(np.float32),
        "meantex": meantex.reshape(1, -1).astype(np.float32),
        "texBase": tex.reshape(3 * n, n_tex).astype(np.float32),
        "tri": (tri + 1).astype(np.int32),
        "point_buf": (adjacent_triangles(tri, n) + 1).astype(np.int32),
        "keypoints": (np.arange(68) + 1).reshape(1, 68).astype(np.int32),
        "skinmask": skin.reshape(1, -1).astype(np.float32),
    }


def make_face_model(target_vertices: int = 2000, seed: int = 0, **kw):
    """A :class:`~core.models.face_model.FaceModel` built from :func:`make_face_model_arrays`."""
    from .bfm09 import model_from_arrays
    return model_from_arrays(make_face_model_arrays(target_vertices, seed=seed, **kw),
                             name="synthetic", label="synthetic")
