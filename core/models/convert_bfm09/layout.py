"""The converted model file (SPEC §1): its keys and shapes, and the check of a converted
model.

Output (``BFM09_model_info.mat``), N front-face vertices, xyz / rgb interleaved per vertex:

==============  ==========  ===========================================================
key             shape       meaning
==============  ==========  ===========================================================
meanshape       (1, 3N)     mean shape, decimetres (Basel micrometres / 1e5)
idBase          (3N, 80)    shapePC * shapeEV / 1e5, first 80 components
exBase          (3N, 64)    expPC * std_exp / 1e5, first 64 components
meantex         (1, 3N)     mean albedo, 0..255
texBase         (3N, 80)    texPC * texEV, first 80 components
tri             (F, 3)      triangles, 1-based vertex ids
point_buf       (N, 8)      adjacent triangles per vertex, 1-based; F + 1 = none
keypoints       (1, 68)     1-based vertex ids of the 68 iBUG landmarks
skinmask        (1, N)      1 for skin vertices
frontmask2_idx  (M, 1)      optional, copied through
tri_mask2       (F2, 3)     optional, copied through
==============  ==========  ===========================================================

Floats are stored as float32; index arrays are stored as they came from
``facemodel_info.mat`` (float32 holding 1-based integers, as the original did).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from core.errors import UserError
from core.resources import BFM09_FILE

# Column counts of the 257-coefficient layout (SPEC §2).
N_ID, N_EXP, N_TEX = 80, 64, 80
N_KEYPOINTS = 68

OUT_FILE = BFM09_FILE
MODEL_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "point_buf",
              "keypoints", "skinmask")
OPTIONAL_MODEL_KEYS = ("frontmask2_idx", "tri_mask2")
_FLOAT_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase")


def as_ids(arr: np.ndarray, label: str, key: str, low: int, high: int,
           shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Check that ``arr`` holds whole numbers in [low, high] (and ``shape``, None = any)."""
    a = np.asarray(arr)
    if shape is not None and (a.ndim != len(shape) or any(
            s is not None and s != n for s, n in zip(shape, a.shape))):
        want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + \
            ("," if len(shape) == 1 else "") + ")"
        raise UserError(f"{label}: {key} has shape {a.shape}; expected {want}")
    if a.size == 0:
        raise UserError(f"{label}: {key} is empty")
    if a.dtype.kind not in "fiu" or not np.isfinite(a).all() or (a != np.round(a)).any():
        raise UserError(f"{label}: {key} must hold whole numbers (vertex/triangle ids)")
    lo, hi = a.min(), a.max()
    if lo < low or hi > high:
        raise UserError(f"{label}: {key} holds ids {lo:.0f}..{hi:.0f}; expected "
                        f"{low}..{high} (1-based)")
    return a


def validate_converted(model: Mapping[str, np.ndarray], source: str = "model",
                       check_units: bool = True) -> dict[str, np.ndarray]:
    """Check a converted model (SPEC §1 keys) and return it normalised: floats float32,
    means (1, 3N), keypoints (1, 68), skinmask (1, N); index arrays keep their dtype.

    check_units: require meanshape in decimetres (largest |coordinate| under 100; the
        BFM head is about 2 dm across, 2e5 in the Basel file's micrometres).
    """
    missing = [k for k in MODEL_KEYS if k not in model]
    if missing:
        raise UserError(f"{source} has no {', '.join(missing)}; a converted model needs "
                        f"{', '.join(MODEL_KEYS)}")
    out = {}
    for k in _FLOAT_KEYS:
        a = np.asarray(model[k])
        if a.dtype.kind not in "fiu":
            raise UserError(f"{source}: {k} is {a.dtype} data, expected numbers")
        out[k] = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(out[k]).all():
            raise UserError(f"{source}: {k} contains NaN or infinite values")
    n3 = out["meanshape"].size
    if n3 % 3 or n3 == 0 or out["meanshape"].squeeze().ndim > 1:
        raise UserError(f"{source}: meanshape has shape {out['meanshape'].shape}; "
                        f"expected (1, 3N)")
    n = n3 // 3
    out["meanshape"] = out["meanshape"].reshape(1, n3)
    if out["meantex"].size != n3 or out["meantex"].squeeze().ndim > 1:
        raise UserError(f"{source}: meantex has shape {out['meantex'].shape}; expected "
                        f"(1, {n3}) like meanshape")
    out["meantex"] = out["meantex"].reshape(1, n3)
    for k, cols in (("idBase", N_ID), ("exBase", N_EXP), ("texBase", N_TEX)):
        if out[k].shape != (n3, cols):
            raise UserError(f"{source}: {k} has shape {out[k].shape}; expected "
                            f"({n3}, {cols}) for the {n} vertices of meanshape")
    tri = np.asarray(model["tri"])
    as_ids(tri, source, "tri", 1, n, (None, 3))
    f = tri.shape[0]
    out["tri"] = tri
    out["point_buf"] = as_ids(model["point_buf"], source, "point_buf", 1, f + 1, (n, None))
    kp = np.asarray(model["keypoints"])
    out["keypoints"] = as_ids(kp.reshape(1, -1), source, "keypoints", 1, n,
                               (1, N_KEYPOINTS))
    skin = np.asarray(model["skinmask"])
    if skin.size != n or skin.dtype.kind not in "fiub":
        raise UserError(f"{source}: skinmask has shape {skin.shape}; expected (1, {n})")
    out["skinmask"] = skin.reshape(1, n)
    if "frontmask2_idx" in model:
        out["frontmask2_idx"] = as_ids(model["frontmask2_idx"], source, "frontmask2_idx",
                                        1, n)
    if "tri_mask2" in model:
        out["tri_mask2"] = as_ids(model["tri_mask2"], source, "tri_mask2", 1, n, (None, 3))
    if check_units:
        extent = float(np.abs(out["meanshape"]).max())
        if extent > 100:
            raise UserError(f"{source}: meanshape reaches {extent:.3g}; a converted model is "
                            f"in decimetres (about 1), this looks like the Basel file's "
                            f"micrometres not divided by 1e5")
    return out

