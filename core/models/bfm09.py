"""Loading converted face models strictly (STYLE 6: convert once, load strictly).

The converted BFM09 file (SPEC §1) stores ``tri``, ``point_buf`` and ``keypoints``
1-based, as the original did; the loader turns them 0-based once, here.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np
import torch

from core.errors import UserError
from .face_model import FaceModel, checked_ids

REQUIRED_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "point_buf", "keypoints")
OPTIONAL_KEYS = ("skinmask", "frontmask2_idx", "tri_mask2")
BFM09_COLUMNS = {"idBase": 80, "exBase": 64, "texBase": 80}

_HOW_TO_GET = ("download 01_MorphableModel.mat (Basel Face Model 2009) and Exp_Pca.bin into BFM/ "
               "and run 'python convert_bfm09_data.py' (see BFM/README.md)")


def read_model_arrays(path: str) -> Dict[str, np.ndarray]:
    """Read a converted model file into a dict of arrays, or raise UserError."""
    import scipy.io as sio

    if not os.path.exists(path):
        raise UserError(f"face model not found at '{path}': {_HOW_TO_GET}, or pass --model_path")
    if os.path.isdir(path):
        raise UserError(f"face model path '{path}' is a folder; pass the converted .mat file")
    try:
        data = sio.loadmat(path)
    except Exception as e:  # scipy raises several types for bad files
        raise UserError(f"cannot read face model '{path}': {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                        f"(re-create it with 'python convert_bfm09_data.py')") from None
    return {k: v for k, v in data.items() if not k.startswith("__")}


N_KEYPOINTS = 68
_FIX = "re-create it with 'python convert_bfm09_data.py'"


def _file_ids(data: Dict[str, np.ndarray], key: str, label: str, count: int, meaning: str) -> torch.Tensor:
    """``data[key]`` as a long tensor, still 1-based, after :func:`checked_ids` (whole
    numbers in 1..count); a failure is a UserError naming the file."""
    try:
        return checked_ids(data[key], key, count, meaning, base=1)
    except ValueError as e:
        raise UserError(f"face model '{label}': {e} ({_FIX})") from None


def model_from_arrays(data: Dict[str, np.ndarray], name: str = "bfm09", label: str = "model",
                      check_bfm09_columns: bool = True) -> FaceModel:
    """Build a :class:`FaceModel` from converted-layout arrays (1-based indices).

    Checks (each failure a one-line UserError naming ``label`` and the key): the keys of
    SPEC §1 are there and numeric; meanshape has 3N values; with ``check_bfm09_columns``
    the bases have 80 / 64 / 80 columns; ``tri`` is a non-empty (F, 3) list of whole-number
    vertex ids in 1..N, ``point_buf`` has N rows of triangle ids in 1..F+1 (F+1 = none),
    ``keypoints`` holds exactly 68 vertex ids in 1..N (iBUG-68). :class:`FaceModel` then
    checks the remaining sizes (3N rows, 3N meantex values, N skinmask values) and that
    every float array is finite; its ValueError becomes a UserError with the file's name.
    """
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"face model '{label}' lacks keys {missing} (has {sorted(data)}); {_FIX}")
    for k in (*REQUIRED_KEYS, "skinmask"):
        if k in data and np.asarray(data[k]).dtype.kind not in "fiub":
            raise UserError(f"face model '{label}': '{k}' holds {np.asarray(data[k]).dtype} data; "
                            f"expected a numeric array ({_FIX})")
    if check_bfm09_columns:
        for k, cols in BFM09_COLUMNS.items():
            if data[k].ndim != 2 or data[k].shape[1] != cols:
                raise UserError(f"face model '{label}': expected '{k}' with {cols} columns (BFM09 layout); "
                                f"got shape {data[k].shape}")
    n3 = np.asarray(data["meanshape"]).size
    if n3 == 0 or n3 % 3:
        raise UserError(f"face model '{label}': 'meanshape' has {n3} values; expected 3N > 0 "
                        f"(x, y, z of N vertices) ({_FIX})")
    n = n3 // 3
    tri_shape = np.shape(data["tri"])
    if len(tri_shape) != 2 or tri_shape[1] != 3 or tri_shape[0] == 0:
        raise UserError(f"face model '{label}': 'tri' has shape {tri_shape}; expected (F, 3) "
                        f"with F > 0 triangles ({_FIX})")
    tri = _file_ids(data, "tri", label, n, f"vertex ids of the {n} vertices")
    nf = tri.shape[0]
    pb_shape = np.shape(data["point_buf"])
    if len(pb_shape) != 2 or pb_shape[0] != n:
        raise UserError(f"face model '{label}': 'point_buf' has shape {pb_shape}; expected ({n}, 8): "
                        f"adjacent triangles of each of the {n} vertices ({_FIX})")
    point_buf = _file_ids(data, "point_buf", label, nf + 1, f"triangle ids, {nf + 1} = no triangle")
    kp_count = np.asarray(data["keypoints"]).size
    if kp_count != N_KEYPOINTS:
        raise UserError(f"face model '{label}': 'keypoints' has {kp_count} ids; expected "
                        f"{N_KEYPOINTS} (iBUG-68 landmarks) ({_FIX})")
    keypoints = _file_ids(data, "keypoints", label, n, f"vertex ids of the {n} vertices").reshape(-1)
    skin = data.get("skinmask")
    try:
        return FaceModel(
            meanshape=np.asarray(data["meanshape"], dtype=np.float32),
            id_base=np.asarray(data["idBase"], dtype=np.float32),
            exp_base=np.asarray(data["exBase"], dtype=np.float32),
            meantex=np.asarray(data["meantex"], dtype=np.float32),
            tex_base=np.asarray(data["texBase"], dtype=np.float32),
            tri=tri - 1, point_buf=point_buf - 1, keypoints=keypoints - 1,
            skinmask=None if skin is None else np.asarray(skin, dtype=np.float32),
            name=name,
        )
    except ValueError as e:
        raise UserError(f"face model '{label}': {e} ({_FIX})") from None


def load_bfm09(path: str) -> FaceModel:
    """Load the converted BFM09 model (SPEC §1) from ``path``."""
    return model_from_arrays(read_model_arrays(path), name="bfm09", label=path)
