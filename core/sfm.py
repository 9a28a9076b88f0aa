"""The public Surrey Face Model (eos project) read into the converted BFM09 layout.

Files (from eos's ``share/`` folder; free for non-commercial use): ``sfm_shape_3448.bin``
(mean and 63 rescaled PCA components, millimetres), ``expression_blendshapes_3448.bin``
(6 blendshapes), ``ibug_to_sfm.txt`` (iBUG-68 -> vertex id, 1-based iBUG numbers) and
``sfm_model_contours.json`` (jaw-line vertices, right and left, temple to chin).

Units become decimetres (mm / 100). The model has no albedo: a flat skin albedo with a
zero basis. iBUG points without a vertex in the mapping take the jaw contour (points 1-8
and 10-17: every second contour vertex from the temple down) and, for the inner mouth
corners 61 and 65, the outer corners' vertices.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict

import numpy as np

from .errors import UserError

SFM_FILES = ("sfm_shape_3448.bin", "expression_blendshapes_3448.bin", "ibug_to_sfm.txt", "sfm_model_contours.json")
SKIN_RGB = (200.0, 150.0, 130.0)


def read_ibug_mapping(path: str) -> Dict[int, int]:
    """iBUG number (1-based) -> vertex id (0-based) from eos's ``ibug_to_sfm.txt``."""
    out = {}
    section = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("["):
                section = line
                continue
            m = re.match(r"^(\d+)\s*=\s*(\d+)$", line)
            if m and section == "[landmark_mappings]":
                out[int(m.group(1))] = int(m.group(2))
    return out


def ibug68_vertices(mapping: Dict[int, int], contours: dict) -> np.ndarray:
    """(68,) 0-based vertex ids for iBUG points 1..68."""
    right = contours["model_contour"]["right_contour"]
    left = contours["model_contour"]["left_contour"]
    ids = []
    for k in range(1, 69):
        if k in mapping:
            ids.append(mapping[k])
        elif 1 <= k <= 8:
            ids.append(right[2 * (k - 1)])
        elif 10 <= k <= 17:
            ids.append(left[2 * (17 - k)])
        elif k == 9:
            ids.append(right[-1])
        elif k == 61:
            ids.append(mapping[49])
        elif k == 65:
            ids.append(mapping[55])
        else:
            raise UserError(f"iBUG point {k} has no vertex in the SFM landmark mapping")
    return np.asarray(ids, dtype=np.int64)


def sfm_to_bfm09_arrays(folder: str, n_id: int = 80, n_exp: int = 64, n_tex: int = 80) -> Dict[str, np.ndarray]:
    """The SFM in the converted BFM09 file layout (SPEC §1; 1-based indices), its bases
    zero-padded to 80 / 64 / 80 columns."""
    from .synthetic import _point_buf

    missing = [f for f in SFM_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"Surrey Face Model files missing in '{folder}': {', '.join(missing)}")
    try:
        import eos
    except ImportError:
        raise UserError("reading the Surrey Face Model needs eos-py: pip install eos-py") from None
    model = eos.morphablemodel.load_model(os.path.join(folder, "sfm_shape_3448.bin"))
    shape = model.get_shape_model()
    mean = np.asarray(shape.get_mean(), dtype=np.float64) / 100.0
    id_basis = np.asarray(shape.get_rescaled_pca_basis(), dtype=np.float64) / 100.0
    blend = eos.morphablemodel.load_blendshapes(os.path.join(folder, "expression_blendshapes_3448.bin"))
    exp_basis = np.stack([np.asarray(b.deformation, dtype=np.float64) for b in blend], axis=1) / 100.0
    tri = np.asarray(shape.get_triangle_list(), dtype=np.int64)
    n = mean.size // 3
    with open(os.path.join(folder, "sfm_model_contours.json"), encoding="utf-8") as f:
        contours = json.load(f)
    kp = ibug68_vertices(read_ibug_mapping(os.path.join(folder, "ibug_to_sfm.txt")), contours)

    def pad(b, k):
        out = np.zeros((3 * n, k))
        out[:, :min(k, b.shape[1])] = b[:, :k]
        return out.astype(np.float32)

    return {
        "meanshape": mean.reshape(1, -1).astype(np.float32),
        "idBase": pad(id_basis, n_id),
        "exBase": pad(exp_basis, n_exp),
        "meantex": np.tile(np.asarray(SKIN_RGB), n).reshape(1, -1).astype(np.float32),
        "texBase": np.zeros((3 * n, n_tex), dtype=np.float32),
        "tri": (tri + 1).astype(np.int32),
        "point_buf": (_point_buf(tri, n) + 1).astype(np.int32),
        "keypoints": (kp + 1).reshape(1, -1).astype(np.int32),
        "skinmask": np.ones((1, n), dtype=np.float32),
    }
