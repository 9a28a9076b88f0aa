"""The public Surrey Face Model (eos project): ``--recon_model sfm``.

Files (from eos's ``share/`` folder; free for non-commercial use; bundled in ``BFM/sfm/``,
see :mod:`core.resources`): ``sfm_shape_3448.bin``
(mean and 63 rescaled PCA components, millimetres), ``expression_blendshapes_3448.bin``
(6 blendshapes), ``ibug_to_sfm.txt`` (iBUG-68 -> vertex id, 1-based iBUG numbers) and
``sfm_model_contours.json`` (jaw-line vertices, right and left, temple to chin).

Units become decimetres (mm / 100), centred like every model (SPEC §3), so the one camera
serves it. The model has no albedo: a flat skin albedo with an empty basis, whose colour
the fitted SH light absorbs per channel. Its own coefficient layout: id 63 | exp 6 |
tex 0 | angles 3 | gamma 27 | trans 3. The jaw landmarks are dynamic: each may sit on any
vertex of its side's contour (``sfm_model_contours.json``), the one nearest the detected
point, so they follow the silhouette as the head turns.

:func:`sfm_to_bfm09_arrays` also writes it in the converted BFM09 file layout (bases padded
to 80 / 64 / 80, fixed keypoints), for tools that expect that file. iBUG points the
mapping lacks are filled by :func:`core.models.landmark_maps.ibug68_vertices`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict

import numpy as np

from core.errors import UserError
from .landmark_maps import contour_definition, ibug68_vertices, read_ibug_mapping
from core.resources import BUNDLED_SFM

log = logging.getLogger(__name__)

SFM_FILES = ("sfm_shape_3448.bin", "expression_blendshapes_3448.bin", "ibug_to_sfm.txt", "sfm_model_contours.json")
SKIN_RGB = (200.0, 150.0, 130.0)


LICENCE = ("The Surrey Face Model (sfm_shape_3448) is free for non-commercial use only; see "
           "https://github.com/patrikhuber/eos and cvssp.org/facemodel")


def _read_sfm(folder: str):
    """(mean (3N,), id basis (3N, 63), exp basis (3N, 6), tri (F, 3), keypoints (68,),
    contours dict) from the eos files, in millimetres."""
    missing = [f for f in SFM_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"Surrey Face Model files missing in '{folder}': {', '.join(missing)} "
                        f"(they are in eos's share/ folder: https://github.com/patrikhuber/eos/tree/master/share; "
                        f"the project ships them in {BUNDLED_SFM})")
    try:
        import eos
    except ImportError:
        raise UserError("reading the Surrey Face Model needs eos-py: pip install eos-py") from None
    try:
        model = eos.morphablemodel.load_model(os.path.join(folder, "sfm_shape_3448.bin"))
        blend = eos.morphablemodel.load_blendshapes(os.path.join(folder, "expression_blendshapes_3448.bin"))
    except Exception as e:
        raise UserError(f"cannot read the Surrey Face Model in '{folder}': {e}") from None
    shape = model.get_shape_model()
    mean = np.asarray(shape.get_mean(), dtype=np.float64)
    id_basis = np.asarray(shape.get_rescaled_pca_basis(), dtype=np.float64)
    exp_basis = np.stack([np.asarray(b.deformation, dtype=np.float64) for b in blend], axis=1)
    tri = np.asarray(shape.get_triangle_list(), dtype=np.int64)
    with open(os.path.join(folder, "sfm_model_contours.json"), encoding="utf-8") as f:
        contours = json.load(f)
    kp = ibug68_vertices(read_ibug_mapping(os.path.join(folder, "ibug_to_sfm.txt")), contours)
    if exp_basis.shape[0] != mean.size or id_basis.shape[0] != mean.size:
        raise UserError(f"Surrey Face Model in '{folder}': blendshapes or basis do not match the mean shape")
    return mean, id_basis, exp_basis, tri, kp, contours


def load_sfm(folder=None):
    """The Surrey Face Model as a :class:`~core.models.face_model.FaceModel` with its own layout and
    dynamic jaw contour. ``folder`` None: the copy bundled with the project (``BFM/sfm``)."""
    from .geometry import adjacent_triangles
    from .face_model import FaceModel

    if folder is None:
        folder = BUNDLED_SFM
    elif not os.path.isdir(folder):
        raise UserError(f"--model_path '{folder}' must be the folder holding {', '.join(SFM_FILES)}")
    mean, id_basis, exp_basis, tri, kp, contours = _read_sfm(folder)
    n = mean.size // 3
    log.info("Surrey Face Model from %s. %s", folder, LICENCE)
    try:
        return FaceModel(
            meanshape=mean / 100.0, id_base=id_basis / 100.0, exp_base=exp_basis / 100.0,
            meantex=np.tile(np.asarray(SKIN_RGB), n), tex_base=np.zeros((3 * n, 0)),
            tri=tri, point_buf=adjacent_triangles(tri, n), keypoints=kp, skinmask=None, name="sfm",
            contour=contour_definition(contours))
    except ValueError as e:
        raise UserError(f"Surrey Face Model in '{folder}' is not usable: {e}") from None


def sfm_to_bfm09_arrays(folder: str, n_id: int = 80, n_exp: int = 64, n_tex: int = 80) -> Dict[str, np.ndarray]:
    """The SFM in the converted BFM09 file layout (SPEC §1; 1-based indices), its bases
    zero-padded to 80 / 64 / 80 columns and its keypoints fixed."""
    from .geometry import adjacent_triangles

    mean, id_basis, exp_basis, tri, kp, _ = _read_sfm(folder)
    n = mean.size // 3

    def pad(b, k):
        out = np.zeros((3 * n, k))
        out[:, :min(k, b.shape[1])] = b[:, :k] / 100.0
        return out.astype(np.float32)

    return {
        "meanshape": (mean / 100.0).reshape(1, -1).astype(np.float32),
        "idBase": pad(id_basis, n_id),
        "exBase": pad(exp_basis, n_exp),
        "meantex": np.tile(np.asarray(SKIN_RGB), n).reshape(1, -1).astype(np.float32),
        "texBase": np.zeros((3 * n, n_tex), dtype=np.float32),
        "tri": (tri + 1).astype(np.int32),
        "point_buf": (adjacent_triangles(tri, n) + 1).astype(np.int32),
        "keypoints": (kp + 1).reshape(1, -1).astype(np.int32),
        "skinmask": np.ones((1, n), dtype=np.float32),
    }
