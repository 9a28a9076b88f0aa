"""Convert the Basel Face Model 2009 into the fitting toolkit's face model (SPEC §1).

Inputs (all in one folder, ``BFM/`` by default):

- ``01_MorphableModel.mat``: the Basel Face Model 2009 (shapeMU, shapePC, shapeEV, texMU,
  texPC, texEV; 53490 vertices, 199 components). MATLAB v5 as distributed; a MATLAB v7.3
  (HDF5) re-save is read too.
- ``Exp_Pca.bin``: the expression basis of Guo et al. ("3DFace" CoarseData), 53215
  vertices: int32 ``exp_dim``, float32 expMU (3·V), float32 expPC (exp_dim·3·V).
- four index files from Deep3DFaceReconstruction's ``BFM/`` folder (MIT licence; not
  shipped with this project, ``download_index_files`` fetches them): ``BFM_exp_idx.mat``
  (trimIndex), ``BFM_front_idx.mat`` (idx), ``facemodel_info.mat`` (topology, keypoints,
  masks), ``std_exp.txt`` (standard deviations of the expression components).

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

Every size (vertex counts, number of components) is read from the files and checked
against the others; anything wrong raises :class:`core.errors.UserError` with a one-line
message that names the file, what was expected and where to get a good copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import http.client
import logging
import os
import struct
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from core.io.atomic import atomic_path
from core.errors import UserError

log = logging.getLogger(__name__)

# Column counts of the 257-coefficient layout (SPEC §2).
N_ID, N_EXP, N_TEX = 80, 64, 80
N_KEYPOINTS = 68

BASEL_FILE = "01_MorphableModel.mat"
EXP_PCA_FILE = "Exp_Pca.bin"
FRONT_MAT_FILE = "BFM_model_front.mat"
OUT_FILE = "BFM09_model_info.mat"
INDEX_FILES = ("BFM_exp_idx.mat", "BFM_front_idx.mat", "facemodel_info.mat", "std_exp.txt")

BASEL_SOURCE = ("https://faces.dmi.unibas.ch/bfm/ (Basel Face Model 2009, free after "
                "registration; the file is in its PublicMM1 archive)")
EXP_PCA_SOURCE = "the CoarseData of https://github.com/Juyong/3DFace"
INDEX_SOURCE = ("Deep3DFaceReconstruction's BFM/ folder, "
                "https://github.com/microsoft/Deep3DFaceReconstruction/tree/master/BFM "
                "(MIT licence)")

# Content hashes of the index files as published in Deep3DFaceReconstruction's BFM/
# folder. Downloads are accepted only if they match byte for byte.
INDEX_SHA256 = {
    "BFM_exp_idx.mat": "62752a2cab3eea148569fb07e367e03535b4ee04aa71ea1a9aed36486d26c612",
    "BFM_front_idx.mat": "7d285dd018563113496127df9c364800183172adb4d3e802f726085dab66b087",
    "facemodel_info.mat": "529398f76619ae7e22f43c25dd60a2473bcc2bcc8c894fd9c613c68624ce1c04",
    "std_exp.txt": "4abc20f1cad2471272637d366b511f1a44c2befeeb1353b7fff392ef72ed1203",
}
# Tried in order; the second is the original 3DMM-Fitting-Pytorch repository, which ships
# the same files. The hash check makes the choice of mirror irrelevant to the result.
INDEX_URLS = (
    "https://raw.githubusercontent.com/microsoft/Deep3DFaceReconstruction/master/BFM/{name}",
    "https://raw.githubusercontent.com/ascust/3DMM-Fitting-Pytorch/master/BFM/{name}",
)
_MAX_DOWNLOAD_BYTES = 8 << 20  # the largest index file is 0.7 MB

MODEL_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "point_buf",
              "keypoints", "skinmask")
OPTIONAL_MODEL_KEYS = ("frontmask2_idx", "tri_mask2")
_FLOAT_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_RESAVE_HINT = "re-save it in MATLAB or Octave with save('-v7', ...)"


# --------------------------------------------------------------------------- data types

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


@dataclasses.dataclass(frozen=True)
class IndexFiles:
    """The four index files, checked for consistency with each other.

    trim_index: (Ve,) int64, 1-based Basel vertex of each expression-basis vertex.
    front_idx: (N,) int64, 1-based expression-basis vertex of each front-face vertex.
    info: the arrays of facemodel_info.mat the model keeps (tri, point_buf, keypoints,
        skinmask, and frontmask2_idx / tri_mask2 when present), unchanged.
    std_exp: (K,) float64, standard deviation of each expression component.
    """
    trim_index: np.ndarray
    front_idx: np.ndarray
    info: dict
    std_exp: np.ndarray

    @property
    def n_vertices(self) -> int:
        return int(self.front_idx.size)


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a conversion wrote."""
    out: Path
    source: str
    n_vertices: int
    n_triangles: int
    n_keypoints: int
    components: str
    out_bytes: int
    seconds: float

    def __str__(self) -> str:
        return (f"wrote {self.out} from {self.source}: {self.n_vertices} vertices, "
                f"{self.n_triangles} triangles, {self.n_keypoints} keypoints, "
                f"{self.components}, {self.out_bytes / 1e6:.1f} MB, {self.seconds:.1f} s")


# --------------------------------------------------------------------------- file sniffing

def _sniff(path: Path) -> str:
    """Classify a file by its first bytes: 'v5', 'v7.3', 'hdf5', 'html', 'lfs', 'zip',
    'gzip', 'bzip2', 'tar', 'empty' or 'other'."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        return "empty"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<!--")):
        return "html"
    if head.startswith(b"version https://git-lfs"):
        return "lfs"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"MATLAB 7.3") or head[512:520] == _HDF5_SIGNATURE:
        return "v7.3"
    if head.startswith(_HDF5_SIGNATURE):
        return "hdf5"
    if head.startswith(b"MATLAB") and len(head) >= 128:
        return "v5"
    return "other"


def _not_a_file_of_its_kind(kind: str, label: str, what: str, source: str) -> str | None:
    """The message for a download that is something else than ``what``, or None."""
    fix = f"download it again from {source}"
    if kind == "empty":
        return f"{label} is empty (0 bytes); {fix}"
    if kind == "html":
        return (f"{label} is an HTML page, not {what}: a web page (e.g. GitHub's file view "
                f"or a download-warning page) was saved instead of the file itself; "
                f"{fix} using the raw/download link")
    if kind == "lfs":
        return (f"{label} is a Git LFS pointer (a small text file), not {what}; "
                f"{fix} with the actual file content")
    if kind in ("zip", "gzip", "bzip2", "tar"):
        return (f"{label} is a {kind} archive, not {what}: extract the file from it first "
                f"(source: {source})")
    return None


# --------------------------------------------------------------------------- .mat reading

def _v5_truncation(path: Path) -> tuple[int, int]:
    """(bytes the variables of a MATLAB v5 file declare, bytes on disk)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(126)
        endian = "<" if f.read(2) == b"IM" else ">"
        pos = 128
        while pos + 8 <= size:
            f.seek(pos)
            dtype, nbytes = struct.unpack(endian + "II", f.read(8))
            if dtype >> 16:  # "small data element": tag and 4 bytes of data
                pos += 8
                continue
            pos += 8 + nbytes
            if dtype != 15:  # miCOMPRESSED elements are not padded, others to 8 bytes
                pos += (-nbytes) % 8
    return pos, size


def _is_v4(path: Path) -> bool:
    """Whether scipy takes ``path`` for a MATLAB v4 file (no text header)."""
    try:
        return scipy.io.matlab.matfile_version(str(path))[0] == 0
    except (ValueError, OSError, MatReadError):
        return False


_READ_ERRORS = (OSError, ValueError, EOFError, TypeError, KeyError, NotImplementedError,
                MemoryError, struct.error, zlib.error, MatReadError)


class _MatFile:
    """Read named numeric variables of a MATLAB file, v5 (scipy) or v7.3 (h5py), as
    arrays in MATLAB's shape; a column range can be read without loading the rest
    (for v7.3; for v5 scipy loads the variable and the slice is a view)."""

    def __init__(self, path: Path, label: str, source: str):
        self.path, self.label, self.source = Path(path), label, source
        if not self.path.is_file():
            raise UserError(f"{label} not found; get it from {source}")
        kind = _sniff(self.path)
        msg = _not_a_file_of_its_kind(kind, label, "a MATLAB .mat file", source)
        if msg:
            raise UserError(msg)
        if kind == "hdf5":
            raise UserError(f"{label} is an HDF5 file without the MATLAB v7.3 header, "
                            f"not a MATLAB .mat file; {_RESAVE_HINT} or get it again from "
                            f"{source}")
        if kind == "other" and _is_v4(self.path):
            kind = "v4"
        if kind == "other":
            raise UserError(f"{label} is not a MATLAB .mat file (it starts with "
                            f"{self._head(16)!r}; scipy would say 'Unknown mat file "
                            f"type'); get it again from {source}; if it is a MATLAB "
                            f"file of another version, {_RESAVE_HINT}")
        self.kind = kind
        self._shapes: dict[str, tuple[int, ...]] | None = None
        if kind == "v5":
            needed, size = _v5_truncation(self.path)
            if needed > size:
                raise UserError(f"{label} is truncated: it is {size} bytes but its "
                                f"variables need {needed} (incomplete download?); "
                                f"get it again from {source}")

    def _head(self, n: int) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(n)

    def _fail(self, what: str, err: BaseException) -> UserError:
        return UserError(f"could not read {what} from {self.label} ({self.kind} .mat): "
                         f"{type(err).__name__}: {err}; the file may be damaged: get it "
                         f"again from {self.source} or {_RESAVE_HINT}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """MATLAB shape of every top-level variable."""
        if self._shapes is not None:
            return self._shapes
        try:
            if self.kind in ("v4", "v5"):
                self._shapes = {name: tuple(shape)
                                for name, shape, _ in scipy.io.whosmat(self.path)}
            else:
                import h5py
                with h5py.File(self.path, "r") as f:
                    self._shapes = {name: tuple(reversed(ds.shape))
                                    for name, ds in f.items() if isinstance(ds, h5py.Dataset)}
            return self._shapes
        except ImportError as err:
            raise UserError(f"{self.label} is a MATLAB v7.3 (HDF5) file and reading it "
                            f"needs h5py (pip install h5py); or {_RESAVE_HINT}") from err
        except _READ_ERRORS as err:
            raise self._fail("the list of variables", err) from err

    def require(self, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """Shapes of ``names``; a UserError listing those that are missing."""
        shapes = self.shapes()
        missing = [n for n in names if n not in shapes]
        if missing:
            raise UserError(f"{self.label} has no variable {', '.join(missing)} (it has: "
                            f"{', '.join(sorted(shapes)) or 'none'}); is it the right file? "
                            f"Get it from {self.source}")
        return {n: shapes[n] for n in names}

    def read(self, name: str, columns: int | None = None) -> np.ndarray:
        """Variable ``name`` (2-D, MATLAB shape), only its first ``columns`` columns."""
        self.require([name])
        try:
            if self.kind in ("v4", "v5"):
                arr = scipy.io.loadmat(self.path, variable_names=[name])[name]
            else:
                import h5py
                with h5py.File(self.path, "r") as f:
                    ds = f[name]
                    # h5py sees MATLAB's column-major arrays transposed.
                    arr = (ds[()] if columns is None or ds.ndim != 2 else ds[:columns]).T
        except _READ_ERRORS as err:
            raise self._fail(name, err) from err
        arr = np.asarray(arr)
        if arr.dtype.kind not in "fiub":
            raise UserError(f"{self.label}: {name} is {arr.dtype} data, expected numbers")
        if columns is not None and arr.ndim == 2:
            arr = arr[:, :columns]
        return arr


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
    msg = _not_a_file_of_its_kind(_sniff(path), label, "the binary expression basis",
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
    return _basel_sizes(_MatFile(Path(path), label, BASEL_SOURCE))


def _basel_sizes(mat: _MatFile) -> tuple[int, int, int]:
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
    mat = _MatFile(path, label, BASEL_SOURCE)
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


# --------------------------------------------------------------------------- index files

def _index_label(name: str, path: Path) -> str:
    return f"{name} ({path})"


def _as_ids(arr: np.ndarray, label: str, key: str, low: int, high: int,
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


def _read_index_file(name: str, path: Path, label: str | None = None) -> dict[str, np.ndarray]:
    """Read one index file and check what can be checked without the others."""
    label = label or _index_label(name, path)
    big = np.iinfo(np.int32).max
    if name == "std_exp.txt":
        if not path.is_file():
            raise UserError(f"{label} not found; get it from {INDEX_SOURCE}")
        msg = _not_a_file_of_its_kind(_sniff(path), label, "a list of numbers", INDEX_SOURCE)
        if msg:
            raise UserError(msg)
        try:
            std = np.loadtxt(path, dtype=np.float64).reshape(-1)
        except ValueError as err:
            raise UserError(f"{label} is not a whitespace-separated list of numbers "
                            f"({err}); get it again from {INDEX_SOURCE}") from err
        if std.size == 0 or not np.isfinite(std).all() or (std <= 0).any():
            raise UserError(f"{label} must hold positive standard deviations "
                            f"(got {std.size} values, min {std.min() if std.size else 'n/a'})")
        return {"std_exp": std}
    mat = _MatFile(path, label, INDEX_SOURCE)
    if name == "BFM_exp_idx.mat":
        mat.require(["trimIndex"])
        return {"trimIndex": _as_ids(mat.read("trimIndex").reshape(-1), label, "trimIndex",
                                     1, big)}
    if name == "BFM_front_idx.mat":
        mat.require(["idx"])
        return {"idx": _as_ids(mat.read("idx").reshape(-1), label, "idx", 1, big)}
    if name == "facemodel_info.mat":
        shapes = mat.shapes()
        mat.require(["tri", "point_buf", "keypoints", "skinmask"])
        info = {k: mat.read(k) for k in ("tri", "point_buf", "keypoints", "skinmask",
                                         *OPTIONAL_MODEL_KEYS) if k in shapes}
        n = info["point_buf"].shape[0]
        f = info["tri"].shape[0]
        _as_ids(info["tri"], label, "tri", 1, n, (None, 3))
        _as_ids(info["point_buf"], label, "point_buf", 1, f + 1, (n, None))
        _as_ids(info["keypoints"].reshape(1, -1), label, "keypoints", 1, n, (1, N_KEYPOINTS))
        if info["skinmask"].size != n or not np.isfinite(info["skinmask"]).all():
            raise UserError(f"{label}: skinmask has shape {info['skinmask'].shape}; expected "
                            f"(1, {n}) finite values, one per vertex of point_buf")
        if "frontmask2_idx" in info:
            _as_ids(info["frontmask2_idx"].reshape(-1), label, "frontmask2_idx", 1, n)
        if "tri_mask2" in info:
            _as_ids(info["tri_mask2"], label, "tri_mask2", 1, n, (None, 3))
        return info
    raise ValueError(f"unknown index file {name!r}")


def missing_index_files(folder: str | os.PathLike) -> list[str]:
    """Names of the index files absent from ``folder``."""
    return [n for n in INDEX_FILES if not (Path(folder) / n).is_file()]


def read_index_files(folder: str | os.PathLike) -> IndexFiles:
    """Read and cross-check the four index files in ``folder``."""
    folder = Path(folder)
    missing = missing_index_files(folder)
    if missing:
        raise UserError(f"missing in {folder}/: {', '.join(missing)}; these index files "
                        f"come from {INDEX_SOURCE}: copy them there, or rerun with "
                        f"--download to fetch them")
    log.info("reading the index files in %s", folder)
    parts = {n: _read_index_file(n, folder / n) for n in INDEX_FILES}
    trim = parts["BFM_exp_idx.mat"]["trimIndex"].astype(np.int64)
    front = parts["BFM_front_idx.mat"]["idx"].astype(np.int64)
    info = parts["facemodel_info.mat"]
    if front.max() > trim.size:
        raise UserError(f"BFM_front_idx.mat: idx refers to vertex {front.max()} but "
                        f"BFM_exp_idx.mat's trimIndex lists only {trim.size} vertices: the "
                        f"two files do not belong together; get both from {INDEX_SOURCE}")
    if info["point_buf"].shape[0] != front.size:
        raise UserError(f"facemodel_info.mat: point_buf has {info['point_buf'].shape[0]} "
                        f"rows but BFM_front_idx.mat's idx selects {front.size} vertices; "
                        f"get matching files from {INDEX_SOURCE}")
    return IndexFiles(trim_index=trim, front_idx=front, info=info,
                      std_exp=parts["std_exp.txt"]["std_exp"])


def download_index_files(folder: str | os.PathLike, names: Sequence[str] | None = None,
                         timeout: float = 60.0) -> list[Path]:
    """Fetch index files (default: those missing in ``folder``) from Deep3DFaceReconstruction.

    Each download goes to a temporary name, must match the published file's sha256 and
    pass the shape/range checks of :func:`read_index_files`, and only then takes its final
    name. No network, or a mismatch on every mirror, raises UserError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder {folder} does not exist")
    names = missing_index_files(folder) if names is None else list(names)
    written = []
    for name in names:
        problems = []
        for template in INDEX_URLS:
            url = template.format(name=name)
            log.info("downloading %s", url)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    data = response.read(_MAX_DOWNLOAD_BYTES + 1)
            except (urllib.error.URLError, OSError, ValueError,
                    http.client.HTTPException) as err:
                problems.append(f"{url}: {getattr(err, 'reason', err)}")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest != INDEX_SHA256[name]:
                problems.append(f"{url}: content differs from the published file "
                                f"(sha256 {digest[:12]}..., expected "
                                f"{INDEX_SHA256[name][:12]}...)")
                continue
            target = folder / name
            with atomic_path(str(target)) as tmp:
                Path(tmp).write_bytes(data)
                _read_index_file(name, Path(tmp), label=f"downloaded {name}")
            written.append(target)
            break
        else:
            raise UserError(f"could not download {name} ({'; '.join(problems)}); without "
                            f"internet, copy the index files by hand from {INDEX_SOURCE} "
                            f"into {folder}/")
    return written


# --------------------------------------------------------------------------- conversion

def convert(basel_path: str | os.PathLike, exp_pca_path: str | os.PathLike,
            index: IndexFiles) -> dict[str, np.ndarray]:
    """SPEC §1: the converted model (the table in the module docstring) as arrays.

    index_exp = idx - 1; index_shape = (trimIndex - 1)[index_exp]; identity/albedo bases
    and means take the vertices ``index_shape`` of the Basel model, the expression basis
    the vertices ``index_exp`` of Exp_Pca.bin; then the first 80/64/80 components are
    scaled by their standard deviations (and /1e5 for geometry: micrometres to
    decimetres). Selection happens before scaling, in float32.
    """
    basel_path, exp_pca_path = Path(basel_path), Path(exp_pca_path)
    nb, ks, kt = basel_sizes(basel_path)
    for have, want, what in ((ks, N_ID, "shape"), (kt, N_TEX, "texture")):
        if have < want:
            raise UserError(f"{BASEL_FILE} ({basel_path}) has {have} {what} components; "
                            f"the model needs {want}")
    trim, front = index.trim_index, index.front_idx
    if trim.max() > nb:
        raise UserError(f"BFM_exp_idx.mat: trimIndex refers to vertex {trim.max()} but "
                        f"{BASEL_FILE} has {nb} vertices; is {basel_path} the Basel Face "
                        f"Model 2009 (53490 vertices)?")
    exp_dim, ne = exp_pca_header(exp_pca_path)
    if ne != trim.size:
        raise UserError(f"{EXP_PCA_FILE} ({exp_pca_path}) holds {ne} vertices "
                        f"(exp_dim={exp_dim}) but BFM_exp_idx.mat's trimIndex lists "
                        f"{trim.size}: the download is truncated or it is a different "
                        f"expression basis; get it from {EXP_PCA_SOURCE}")
    if index.std_exp.size != exp_dim:
        raise UserError(f"std_exp.txt has {index.std_exp.size} values but {EXP_PCA_FILE} has "
                        f"exp_dim={exp_dim} components: they must match")
    if exp_dim < N_EXP:
        raise UserError(f"{EXP_PCA_FILE} ({exp_pca_path}) has {exp_dim} expression "
                        f"components; the model needs {N_EXP}")

    index_exp = front - 1
    index_shape = (trim - 1)[index_exp]

    log.info("reading %d expression components of %s", N_EXP, exp_pca_path.name)
    ex = read_exp_pca(exp_pca_path, n_components=N_EXP, vertices=index_exp).pc
    ex *= (index.std_exp[:N_EXP] / 1e5).astype(np.float32)

    basel = read_basel(basel_path, vertices=index_shape, n_shape=N_ID, n_tex=N_TEX)
    id_base = basel.shape_pc
    id_base *= (basel.shape_ev.astype(np.float64) / 1e5).astype(np.float32)
    tex_base = basel.tex_pc
    tex_base *= basel.tex_ev
    model = {
        "meanshape": (basel.shape_mu.astype(np.float64) / 1e5).astype(np.float32)[None, :],
        "idBase": id_base,
        "exBase": ex,
        "meantex": basel.tex_mu[None, :],
        "texBase": tex_base,
    }
    model.update(index.info)  # tri, point_buf, keypoints, skinmask, optional masks
    return model


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
    _as_ids(tri, source, "tri", 1, n, (None, 3))
    f = tri.shape[0]
    out["tri"] = tri
    out["point_buf"] = _as_ids(model["point_buf"], source, "point_buf", 1, f + 1, (n, None))
    kp = np.asarray(model["keypoints"])
    out["keypoints"] = _as_ids(kp.reshape(1, -1), source, "keypoints", 1, n,
                               (1, N_KEYPOINTS))
    skin = np.asarray(model["skinmask"])
    if skin.size != n or skin.dtype.kind not in "fiub":
        raise UserError(f"{source}: skinmask has shape {skin.shape}; expected (1, {n})")
    out["skinmask"] = skin.reshape(1, n)
    if "frontmask2_idx" in model:
        out["frontmask2_idx"] = _as_ids(model["frontmask2_idx"], source, "frontmask2_idx",
                                        1, n)
    if "tri_mask2" in model:
        out["tri_mask2"] = _as_ids(model["tri_mask2"], source, "tri_mask2", 1, n, (None, 3))
    if check_units:
        extent = float(np.abs(out["meanshape"]).max())
        if extent > 100:
            raise UserError(f"{source}: meanshape reaches {extent:.3g}; a converted model is "
                            f"in decimetres (about 1), this looks like the Basel file's "
                            f"micrometres not divided by 1e5")
    return out


def read_front_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and validate Deep3DFaceRecon_pytorch's ``BFM_model_front.mat``.

    Assumption: its meanshape / idBase / exBase are already in decimetres.
    Deep3DFaceRecon_pytorch's own converter (util/load_mats.py, transferBFM09) is the
    same computation as :func:`convert` (it divides by 1e5 and keeps 80/64/80
    components), and its tri / point_buf / keypoints are 1-based (its loader subtracts 1).
    :func:`validate_converted` checks this roughly: meanshape must be of decimetre scale
    and every index 1-based and in range.
    """
    path = Path(path)
    label = f"{FRONT_MAT_FILE} ({path})"
    source = "Deep3DFaceRecon_pytorch (its BFM/ folder after running its converter)"
    mat = _MatFile(path, label, source)
    shapes = mat.shapes()
    keys = [k for k in (*MODEL_KEYS, *OPTIONAL_MODEL_KEYS) if k in shapes]
    extra = sorted(set(shapes) - set(keys))
    if extra:
        log.info("%s: ignoring variables %s", path.name, ", ".join(extra))
    return validate_converted({k: mat.read(k) for k in keys}, source=label)


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another --out",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --out",
    errno.EFBIG: "the file is larger than this system allows (see 'ulimit -f'): raise the "
                 "limit or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EACCES: "choose a folder you can write to with --out",
    errno.EPERM: "choose a folder you can write to with --out",
}


def _os_problem(err: OSError) -> str:
    """'<strerror>; <what to do>' for an OSError, on one line."""
    text = err.strerror or str(err) or type(err).__name__
    hint = _WRITE_HINTS.get(err.errno, "choose another --out")
    return f"{text}; {hint}".replace("\n", " ")


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists (``path`` absolute)."""
    p = path
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    return p


def check_output(out: str | os.PathLike) -> None:
    """Check, before any long work, that the converted model can be written to ``out``.

    ``out`` must not be a folder or another non-regular file (a device, a FIFO); its folder
    must exist or be creatable below the nearest existing folder, which must accept a new
    file (a probe file is created there and removed: this catches read-only file systems,
    missing permissions and pseudo file systems such as /proc). Raises UserError.
    """
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise UserError(f"output '{out}' is an existing folder; --out takes the file to write, "
                        f"e.g. --out {out / OUT_FILE}")
    if os.path.lexists(out) and not out.is_file():
        raise UserError(f"output '{out}' exists and is not a regular file; choose another --out")
    folder = _existing_ancestor(out.parent)
    if not folder.is_dir():
        raise UserError(f"cannot write '{out}': '{folder}' is a file, not a folder; "
                        f"choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as err:
        if err.errno == errno.ENOENT:  # an existing folder that refuses new files: /proc
            raise UserError(f"cannot write '{out}': '{folder}' does not accept new files "
                            f"({err.strerror}); choose another --out") from None
        raise UserError(f"cannot write '{out}': creating a file in '{folder}' failed: "
                        f"{_os_problem(err)}") from None
    try:
        os.write(fd, b"0")
    except OSError as err:
        raise UserError(f"cannot write '{out}': writing in '{folder}' failed: "
                        f"{_os_problem(err)}") from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(probe)


def check_output_space(out: str | os.PathLike, nbytes: int) -> None:
    """UserError when ``out`` cannot take ``nbytes`` (a lower bound of the file's size):
    less free space on its disk, or a smaller file size limit (RLIMIT_FSIZE)."""
    out = Path(os.path.abspath(out))
    need = _size(nbytes)
    try:
        import resource  # POSIX only
    except ImportError:
        resource = None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else None
    if resource and limit != resource.RLIM_INFINITY and nbytes > limit:
        raise UserError(f"cannot write '{out}': the model needs at least {need} but files are "
                        f"limited to {_size(limit)} here (ulimit -f); raise the limit")
    try:
        st = os.statvfs(_existing_ancestor(out.parent))
    except (OSError, AttributeError):  # no statvfs (Windows) or an odd file system
        return
    free = st.f_bavail * st.f_frsize
    if st.f_blocks > 0 and nbytes > free:
        raise UserError(f"cannot write '{out}': the model needs at least {need} but only "
                        f"{_size(free)} are free there; free some space or choose "
                        f"another --out")


def _size(nbytes: int) -> str:
    if nbytes >= 1e6:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / 1e3:.1f} kB" if nbytes >= 1e3 else f"{nbytes} bytes"


def model_bytes(model: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays of ``model`` (about what an uncompressed savemat writes)."""
    return int(sum(np.asarray(a).nbytes for a in model.values()))


def write_model(path: str | os.PathLike, model: Mapping[str, np.ndarray]) -> int:
    """Write ``model`` to ``path`` (scipy savemat, MATLAB v5) atomically; returns bytes.

    The folder is created if needed. Any OSError (disk full, file size limit, read-only
    file system, permission) becomes a one-line UserError; no partial or temporary file
    is left behind and an older file at ``path`` stays as it was.
    """
    path = Path(path)
    log.info("writing %s", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder '{path.parent}': "
                        f"{_os_problem(err)}") from None
    try:
        with atomic_path(str(path)) as tmp:
            with open(tmp, "wb") as f:
                scipy.io.savemat(f, dict(model), do_compression=False)
    except OSError as err:
        raise UserError(f"cannot write '{path}': {_os_problem(err)}") from None
    return path.stat().st_size


def _missing_inputs(folder: Path) -> list[str]:
    """Descriptions of the missing inputs of a Basel conversion that --download cannot fix."""
    out = []
    if not (folder / BASEL_FILE).is_file():
        out.append(f"{BASEL_FILE} (from {BASEL_SOURCE})")
    if not (folder / EXP_PCA_FILE).is_file():
        out.append(f"{EXP_PCA_FILE} (from {EXP_PCA_SOURCE})")
    return out


def convert_folder(bfm_folder: str | os.PathLike, out: str | os.PathLike | None = None,
                   download: bool = False,
                   from_front_mat: str | os.PathLike | None = None) -> Summary:
    """Convert the inputs in ``bfm_folder`` and write the model to ``out`` (default
    ``bfm_folder/BFM09_model_info.mat``).

    Source, in order: ``from_front_mat`` if given; else the Basel files when
    ``01_MorphableModel.mat`` is present; else ``BFM_model_front.mat`` in the folder.
    download: fetch missing index files (see :func:`download_index_files`).

    ``out`` is checked first (:func:`check_output`), and the free space and file size
    limit as soon as the model's size is known (:func:`check_output_space`), so a bad
    output fails before the long conversion rather than after it.
    """
    t0 = time.perf_counter()
    folder = Path(bfm_folder)
    out = Path(out) if out is not None else folder / OUT_FILE
    check_output(out)  # before the long part: a bad --out fails in a second, not a minute
    if from_front_mat is None and not (folder / BASEL_FILE).is_file() \
            and (folder / FRONT_MAT_FILE).is_file():
        log.info("%s not found in %s; using Deep3DFaceRecon_pytorch's %s", BASEL_FILE,
                 folder, FRONT_MAT_FILE)
        from_front_mat = folder / FRONT_MAT_FILE
    if from_front_mat is not None:
        model = read_front_mat(from_front_mat)
        check_output_space(out, model_bytes(model))
        source, components = str(from_front_mat), f"components {N_ID}/{N_EXP}/{N_TEX} (id/exp/tex)"
    else:
        if not folder.is_dir():
            raise UserError(f"folder {folder} does not exist; put the model files there "
                            f"(see BFM/README.md) or pass --bfm_folder")
        missing = _missing_inputs(folder)
        missing_index = missing_index_files(folder)
        if missing:
            more = (f"; also {', '.join(missing_index)} (from {INDEX_SOURCE}, or use "
                    f"--download)") if missing_index else ""
            raise UserError(f"missing in {folder}/: {'; '.join(missing)}{more}; or put "
                            f"Deep3DFaceRecon_pytorch's {FRONT_MAT_FILE} there instead "
                            f"(see BFM/README.md)")
        if missing_index and download:
            download_index_files(folder, missing_index)
        index = read_index_files(folder)
        n3 = 3 * index.n_vertices
        check_output_space(out, 4 * n3 * (2 + N_ID + N_EXP + N_TEX) + model_bytes(index.info))
        model = convert(folder / BASEL_FILE, folder / EXP_PCA_FILE, index)
        model = validate_converted(model, source="converted model")
        _, ks, kt = basel_sizes(folder / BASEL_FILE)
        exp_dim, _ = exp_pca_header(folder / EXP_PCA_FILE)
        source = f"{folder}/ (Basel + Exp_Pca.bin)"
        components = (f"components id {N_ID} of {ks}, exp {N_EXP} of {exp_dim}, "
                      f"tex {N_TEX} of {kt}")
    size = write_model(out, model)
    return Summary(out=out, source=source, n_vertices=model["meanshape"].size // 3,
                   n_triangles=int(model["tri"].shape[0]),
                   n_keypoints=int(model["keypoints"].size), components=components,
                   out_bytes=size, seconds=time.perf_counter() - t0)
