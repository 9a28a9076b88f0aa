"""Basel Face Model 2017 / 2019 (``.h5``): ``--recon_model bfm2017`` (or ``bfm2019``).

The h5 file (from https://faces.dmi.unibas.ch/bfm/bfm2017.html, registration required)
holds ``shape``, ``expression`` and ``color`` PCA models, each ``model/mean`` (3N,),
``model/pcaBasis`` (3N, K, orthonormal) and ``model/pcaVariance`` (K,), and the mesh in
``shape/representer/cells`` (3, F). Bases are scaled by the standard deviations, so
coefficients are in units of σ as for BFM09; the expression mean is added to the mean shape;
colours (0..1) become 0..255; millimetres become decimetres and the shape is centred
(SPEC §3), so the one camera serves every model.

Landmarks: eos's iBUG-68 mapping ``ibug_to_bfm2017-1_bfm_nomouth.txt`` and contour
definition ``bfm2017-1_bfm_nomouth_model_contours.json`` (the ``bfm_nomouth`` topology, also
used by BFM 2019's ``model2019_bfm.h5``). They are looked up beside the h5 file, then in the
copy bundled with the project (``BFM/landmarks``, see :mod:`core.resources`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

from core.errors import UserError
from .landmark_maps import contour_definition, ibug68_vertices, read_ibug_mapping
from core.resources import BUNDLED_LANDMARKS

log = logging.getLogger(__name__)

MAPPING_FILE = "ibug_to_bfm2017-1_bfm_nomouth.txt"
CONTOUR_FILE = "bfm2017-1_bfm_nomouth_model_contours.json"


def _unit_scale(mean: np.ndarray) -> float:
    """Factor to decimetres from the face's width: millimetres (~150) or micrometres."""
    width = float(np.ptp(mean.reshape(-1, 3)[:, 0]))
    if 30.0 < width < 1000.0:
        return 0.01
    if 3e4 < width < 1e6:
        return 1e-5
    if 0.3 < width < 10.0:
        return 1.0
    raise UserError(f"BFM h5: cannot tell the units of a mean shape {width:.3g} wide")


def _pca(f, group: str):
    try:
        mean = np.asarray(f[f"{group}/model/mean"], dtype=np.float64).reshape(-1)
        basis = np.asarray(f[f"{group}/model/pcaBasis"], dtype=np.float64)
        var = np.asarray(f[f"{group}/model/pcaVariance"], dtype=np.float64).reshape(-1)
    except KeyError as e:
        raise UserError(f"BFM h5 file lacks '{group}/model/...' ({e}); is it a Basel Face Model 2017/2019 file?") from None
    if basis.shape[0] != mean.size and basis.shape[1] == mean.size:
        basis = basis.T
    if basis.shape != (mean.size, var.size):
        raise UserError(f"BFM h5 '{group}': basis {basis.shape} does not match mean {mean.shape} and variance {var.shape}")
    return mean, basis * np.sqrt(np.clip(var, 0, None))[None, :]


def _landmark_files(h5_path: str, bundled: Optional[str] = None):
    """Paths of the mapping and contour files: beside the model, else the bundled copy."""
    bundled = bundled or BUNDLED_LANDMARKS
    for folder in (os.path.dirname(os.path.abspath(h5_path)), bundled):
        if all(os.path.isfile(os.path.join(folder, f)) for f in (MAPPING_FILE, CONTOUR_FILE)):
            return os.path.join(folder, MAPPING_FILE), os.path.join(folder, CONTOUR_FILE)
    raise UserError(f"{MAPPING_FILE} and {CONTOUR_FILE} are neither beside '{h5_path}' nor in '{bundled}'; "
                    f"copy them from eos's share/ folder (https://github.com/patrikhuber/eos/tree/master/share)")


def load_bfm2017(path: str):
    """The BFM 2017/2019 model in ``path`` as a :class:`~core.models.face_model.FaceModel` (own
    layout: id K_shape | exp K_exp | tex K_color | angles | gamma | trans)."""
    from .geometry import adjacent_triangles
    from .face_model import FaceModel

    if not os.path.isfile(path):
        raise UserError(f"BFM 2017/2019 model not found at '{path}': download model2017-1_bfm_nomouth.h5 "
                        f"(or model2019_bfm.h5) from https://faces.dmi.unibas.ch/bfm/bfm2017.html and pass --model_path")
    try:
        import h5py
    except ImportError:
        raise UserError("reading BFM 2017/2019 needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"cannot read '{path}' as an HDF5 file ({e})") from None
    with f:
        shape_mean, shape_basis = _pca(f, "shape")
        exp_mean, exp_basis = _pca(f, "expression")
        color_mean, color_basis = _pca(f, "color")
        try:
            cells = np.asarray(f["shape/representer/cells"], dtype=np.int64)
        except KeyError:
            raise UserError(f"BFM h5 file '{path}' lacks 'shape/representer/cells'") from None
    tri = cells.T if cells.shape[0] == 3 and cells.shape[1] != 3 else cells
    n = shape_mean.size // 3
    if exp_mean.size != shape_mean.size or color_mean.size != shape_mean.size or tri.max() >= n:
        raise UserError(f"BFM h5 file '{path}': shape, expression, colour and mesh sizes disagree")
    mapping_path, contour_path = _landmark_files(path)
    with open(contour_path, encoding="utf-8") as fh:
        contours = json.load(fh)
    kp = ibug68_vertices(read_ibug_mapping(mapping_path), contours)
    c_lm, c_cand = contour_definition(contours)
    if kp.max() >= n or c_cand.max() >= n:
        raise UserError(f"the landmark mapping {MAPPING_FILE} does not fit '{path}' ({n} vertices): "
                        f"it is for the bfm_nomouth topology")
    scale = _unit_scale(shape_mean + exp_mean)
    colour_scale = 255.0 if color_mean.max() <= 1.5 else 1.0
    log.info("BFM 2017/2019 from %s: %d vertices, %d shape, %d expression, %d colour components",
             path, n, shape_basis.shape[1], exp_basis.shape[1], color_basis.shape[1])
    try:
        return FaceModel(
            meanshape=(shape_mean + exp_mean) * scale, id_base=shape_basis * scale, exp_base=exp_basis * scale,
            meantex=color_mean * colour_scale, tex_base=color_basis * colour_scale, tri=tri,
            point_buf=adjacent_triangles(tri, n), keypoints=kp, name="bfm2017", contour=(c_lm, c_cand))
    except ValueError as e:
        raise UserError(f"BFM 2017/2019 model '{path}' is not usable: {e}") from None
