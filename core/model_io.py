"""Loading converted face models strictly (STYLE 6: convert once, load strictly).

The converted BFM09 file (SPEC §1) stores ``tri``, ``point_buf`` and ``keypoints``
1-based, as the original did; the loader turns them 0-based once, here.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from .errors import UserError
from .model import FaceModel

REQUIRED_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "point_buf", "keypoints")
OPTIONAL_KEYS = ("skinmask", "frontmask2_idx", "tri_mask2")
DEFAULT_MODEL_PATH = os.path.join("BFM", "BFM09_model_info.mat")
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


def model_from_arrays(data: Dict[str, np.ndarray], name: str = "bfm09", label: str = "model",
                      check_bfm09_columns: bool = True) -> FaceModel:
    """Build a :class:`FaceModel` from converted-layout arrays (1-based indices)."""
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"face model '{label}' lacks keys {missing} (has {sorted(data)}); "
                        f"re-create it with 'python convert_bfm09_data.py'")
    if check_bfm09_columns:
        for k, cols in BFM09_COLUMNS.items():
            if data[k].ndim != 2 or data[k].shape[1] != cols:
                raise UserError(f"face model '{label}': expected '{k}' with {cols} columns (BFM09 layout); "
                                f"got shape {data[k].shape}")
    tri = np.asarray(data["tri"]).astype(np.int64)
    point_buf = np.asarray(data["point_buf"]).astype(np.int64)
    keypoints = np.asarray(data["keypoints"]).astype(np.int64).reshape(-1)
    for k, arr in (("tri", tri), ("point_buf", point_buf), ("keypoints", keypoints)):
        if arr.size and arr.min() < 1:
            raise UserError(f"face model '{label}': '{k}' must hold 1-based ids (found {arr.min()})")
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
        raise UserError(f"face model '{label}' is inconsistent: {e}") from None


def load_bfm09(path: str = DEFAULT_MODEL_PATH) -> FaceModel:
    """Load the converted BFM09 model (SPEC §1) from ``path``."""
    return model_from_arrays(read_model_arrays(path), name="bfm09", label=path)
