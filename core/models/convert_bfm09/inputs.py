"""The model data among the downloaded inputs of the conversion: the Basel Face Model 2009,
the expression basis, and Deep3DFaceRecon_pytorch's already converted model.

- ``01_MorphableModel.mat``: the Basel Face Model 2009 (shapeMU, shapePC, shapeEV, texMU,
  texPC, texEV; 53490 vertices, 199 components). MATLAB v5 as distributed; a MATLAB v7.3
  (HDF5) re-save is read too.
- ``Exp_Pca.bin``: the expression basis of Guo et al. ("3DFace" CoarseData), 53215
  vertices: int32 ``exp_dim``, float32 expMU (3·V), float32 expPC (exp_dim·3·V).
- ``BFM_model_front.mat``: Deep3DFaceRecon_pytorch's converted model, an alternative to
  the two above.

The index files that select the front-face vertices are read by
:mod:`core.models.convert_bfm09.index_files`. Every size is read from the files and
checked against the others; anything wrong raises :class:`core.errors.UserError` with a
one-line message that names the file, what was expected and where to get a good copy.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from core.errors import UserError
from .layout import MODEL_KEYS, OPTIONAL_MODEL_KEYS, validate_converted
from .mat import MatFile, not_a_file_of_its_kind, sniff

log = logging.getLogger(__name__)

BASEL_FILE = "01_MorphableModel.mat"
EXP_PCA_FILE = "Exp_Pca.bin"
FRONT_MAT_FILE = "BFM_model_front.mat"

BASEL_SOURCE = ("https://faces.dmi.unibas.ch/bfm/ (Basel Face Model 2009, free after "
                "registration; the file is in its PublicMM1 archive)")
EXP_PCA_SOURCE = "the CoarseData of https://github.com/Juyong/3DFace"


@dataclasses.dataclass(frozen=True)
class ExpPca:
    """The expression basis of ``Exp_Pca.bin`` (only expPC; the original ignored expMU).

    pc: (3·V', K) float32, xyz interleaved per vertex, the first K of ``exp_dim``
    components for the V' selected vertices (all ``n_vertices`` unless a selection
    was asked for).
    """
    exp_dim: int
    n_vertices: int
    pc: np.ndarray


@dataclasses.dataclass(frozen=True)
class BaselModel:
    """The parts of ``01_MorphableModel.mat`` the conversion uses, for V' selected vertices.

    shape_mu: (3·V',) micrometres. shape_pc: (3·V', Ks). shape_ev: (Ks,) standard
    deviations. tex_mu: (3·V',) 0..255. tex_pc: (3·V', Kt). tex_ev: (Kt,).
    All float32; Ks / Kt are the components read, n_shape / n_tex those in the file.
    """
    n_vertices: int
    n_shape: int
    n_tex: int
    shape_mu: np.ndarray
    shape_pc: np.ndarray
    shape_ev: np.ndarray
    tex_mu: np.ndarray
    tex_pc: np.ndarray
    tex_ev: np.ndarray


# --------------------------------------------------------------------------- Exp_Pca.bin

def exp_pca_header(path: str | os.PathLike) -> tuple[int, int]:
    """(exp_dim, n_vertices) of an ``Exp_Pca.bin``, checked against its length.

    Catches the common broken downloads: an HTML page saved instead of the file (the
    original script then fails with "bytes length not a multiple of item size"), a Git
    LFS pointer, an archive, a truncated file.
    """
    path = Path(path)
    label = f"{EXP_PCA_FILE} ({path})"
    if not path.is_file():
        raise UserError(f"{label} not found; get it from {EXP_PCA_SOURCE}")
    msg = not_a_file_of_its_kind(sniff(path), label, "the binary expression basis",
                                  EXP_PCA_SOURCE)
    if msg:
        raise UserError(msg)
    size = path.stat().st_size
    if size < 4:
        raise UserError(f"{label} is truncated ({size} bytes); get it again from "
                        f"{EXP_PCA_SOURCE}")
    with open(path, "rb") as f:
        exp_dim = int(np.frombuffer(f.read(4), dtype="<i4")[0])
    if not 1 <= exp_dim <= 100_000:
        raise UserError(f"{label} does not start with a component count (read {exp_dim}); "
                        f"it is not the expression basis of {EXP_PCA_SOURCE}")
    payload = size - 4
    if payload % 4:
        raise UserError(f"{label}: {payload} bytes after the 4-byte header is not a whole "
                        f"number of float32 values ('bytes length not a multiple of item "
                        f"size'): the file is truncated or is not Exp_Pca.bin; get it again "
                        f"from {EXP_PCA_SOURCE}")
    per_vertex = 3 * (1 + exp_dim)  # expMU and exp_dim components, xyz
    n_floats = payload // 4
    if n_floats % per_vertex or n_floats == 0:
        raise UserError(f"{label} holds {n_floats} float32 values, not a multiple of "
                        f"3 x (1 + exp_dim={exp_dim}) = {per_vertex} as its header requires: "
                        f"the download is truncated; get it again from {EXP_PCA_SOURCE}")
    return exp_dim, n_floats // per_vertex


def read_exp_pca(path: str | os.PathLike, n_components: int | None = None,
                 vertices: np.ndarray | None = None) -> ExpPca:
    """Read expPC from ``Exp_Pca.bin``, transposed to (3·V, K), xyz interleaved.

    n_components: read only the first K components (default all ``exp_dim``); the
        rest of the file is not loaded.
    vertices: 0-based vertex ids to keep (default all), (V',) ints.
    """
    exp_dim, n_vertices = exp_pca_header(path)
    k = exp_dim if n_components is None else int(n_components)
    if k > exp_dim:
        raise UserError(f"{EXP_PCA_FILE} ({path}) has {exp_dim} expression components; "
                        f"the model needs {k}")
    n3 = 3 * n_vertices
    raw = np.fromfile(path, dtype="<f4", count=k * n3, offset=4 + 4 * n3)
    pc = raw.reshape(k, n3).T  # (3V, K) view
    if vertices is not None:
        pc = np.take(pc, _xyz_rows(vertices, n_vertices, EXP_PCA_FILE), axis=0)
    return ExpPca(exp_dim=exp_dim, n_vertices=n_vertices,
                  pc=np.ascontiguousarray(pc, dtype=np.float32))


def _xyz_rows(vertices: np.ndarray, n_vertices: int, label: str) -> np.ndarray:
    """Row ids (3·V',) of the x, y, z rows of 0-based ``vertices`` in a (3·n, K) basis;
    the same as indexing the basis reshaped to (n, 3, K) by ``vertices``."""
    v = np.asarray(vertices, dtype=np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= n_vertices):
        raise UserError(f"vertex ids {v.min()}..{v.max()} (0-based) do not fit the "
                        f"{n_vertices} vertices of {label}")
    return (3 * v[:, None] + np.arange(3)).ravel()


# --------------------------------------------------------------------------- Basel model

_BASEL_VARS = ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV")


def basel_sizes(path: str | os.PathLike) -> tuple[int, int, int]:
    """(n_vertices, n_shape_components, n_tex_components) of ``01_MorphableModel.mat``,
    read from the variables' headers and checked against each other."""
    label = f"{BASEL_FILE} ({path})"
    return _basel_sizes(MatFile(Path(path), label, BASEL_SOURCE))


def _basel_sizes(mat: MatFile) -> tuple[int, int, int]:
    label = mat.label
    s = mat.require(_BASEL_VARS)
    n3 = int(np.prod(s["shapeMU"]))
    if n3 % 3 or n3 == 0 or min(s["shapeMU"]) != 1:
        raise UserError(f"{label}: shapeMU has shape {s['shapeMU']}; expected (3V, 1)")
    nv = n3 // 3
    for pc, mu, ev in (("shapePC", "shapeMU", "shapeEV"), ("texPC", "texMU", "texEV")):
        if len(s[pc]) != 2 or s[pc][0] != n3:
            raise UserError(f"{label}: {pc} has shape {s[pc]}; expected ({n3}, K) to match "
                            f"{nv} vertices of shapeMU")
        if int(np.prod(s[mu])) != n3:
            raise UserError(f"{label}: {mu} has shape {s[mu]}; expected ({n3}, 1)")
        if int(np.prod(s[ev])) != s[pc][1]:
            raise UserError(f"{label}: {ev} has {int(np.prod(s[ev]))} values but {pc} has "
                            f"{s[pc][1]} components")
    return nv, s["shapePC"][1], s["texPC"][1]


def read_basel(path: str | os.PathLike, vertices: np.ndarray | None = None,
               n_shape: int | None = None, n_tex: int | None = None) -> BaselModel:
    """Read the Basel Face Model 2009 file, keeping only ``vertices`` (0-based, default
    all) and the first ``n_shape`` / ``n_tex`` components (default all).

    Memory: the variables are read one at a time and cut down to the selected rows and
    columns before the next is read, so the peak is about one full basis (~128 MB).
    """
    path = Path(path)
    label = f"{BASEL_FILE} ({path})"
    mat = MatFile(path, label, BASEL_SOURCE)
    nv, ks, kt = _basel_sizes(mat)
    for want, have, what in ((n_shape, ks, "shape"), (n_tex, kt, "texture")):
        if want is not None and want > have:
            raise UserError(f"{label} has {have} {what} components; the model needs {want}")
    rows = None if vertices is None else _xyz_rows(vertices, nv, BASEL_FILE)

    def basis(name: str, columns: int | None) -> np.ndarray:
        log.info("reading %s from %s", name, path.name)
        arr = mat.read(name, columns)
        if not name.endswith("PC"):
            arr = arr.reshape(-1)  # MU: a (3V, 1) column; EV: (K, 1) or (1, K)
        if rows is not None and name.endswith(("MU", "PC")):
            arr = np.take(arr, rows, axis=0)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise UserError(f"{label}: {name} contains NaN or infinite values")
        return arr

    fields = dict(
        shape_mu=basis("shapeMU", None),
        shape_pc=basis("shapePC", n_shape),
        shape_ev=basis("shapeEV", None)[: n_shape or ks],
        tex_mu=basis("texMU", None),
        tex_pc=basis("texPC", n_tex),
        tex_ev=basis("texEV", None)[: n_tex or kt],
    )
    return BaselModel(n_vertices=nv, n_shape=ks, n_tex=kt, **fields)


# --------------------------------------------------------------------------- BFM_model_front.mat

def read_front_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and validate Deep3DFaceRecon_pytorch's ``BFM_model_front.mat``.

    Assumption: its meanshape / idBase / exBase are already in decimetres.
    Deep3DFaceRecon_pytorch's own converter (util/load_mats.py, transferBFM09) is the
    same computation as :func:`.conversion.convert` (it divides by 1e5 and keeps 80/64/80
    components), and its tri / point_buf / keypoints are 1-based (its loader subtracts 1).
    :func:`validate_converted` checks this roughly: meanshape must be of decimetre scale
    and every index 1-based and in range.
    """
    path = Path(path)
    label = f"{FRONT_MAT_FILE} ({path})"
    source = "Deep3DFaceRecon_pytorch (its BFM/ folder after running its converter)"
    mat = MatFile(path, label, source)
    shapes = mat.shapes()
    keys = [k for k in (*MODEL_KEYS, *OPTIONAL_MODEL_KEYS) if k in shapes]
    extra = sorted(set(shapes) - set(keys))
    if extra:
        log.info("%s: ignoring variables %s", path.name, ", ".join(extra))
    return validate_converted({k: mat.read(k) for k in keys}, source=label)

