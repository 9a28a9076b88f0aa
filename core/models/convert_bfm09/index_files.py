"""The four index files of the conversion, from Deep3DFaceReconstruction's ``BFM/`` folder
(MIT licence; not shipped with this project, :func:`download_index_files` fetches them):
``BFM_exp_idx.mat`` (trimIndex), ``BFM_front_idx.mat`` (idx), ``facemodel_info.mat``
(topology, keypoints, masks), ``std_exp.txt`` (standard deviations of the expression
components). Each is checked on its own and against the others; anything wrong raises
:class:`core.errors.UserError` with a one-line message that names the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import UserError
from core.io.atomic import atomic_path
from .layout import N_KEYPOINTS, OPTIONAL_MODEL_KEYS, as_ids
from .mat import MatFile, not_a_file_of_its_kind, sniff

log = logging.getLogger(__name__)

INDEX_FILES = ("BFM_exp_idx.mat", "BFM_front_idx.mat", "facemodel_info.mat", "std_exp.txt")
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


def _index_label(name: str, path: Path) -> str:
    return f"{name} ({path})"


def _read_index_file(name: str, path: Path, label: str | None = None) -> dict[str, np.ndarray]:
    """Read one index file and check what can be checked without the others."""
    label = label or _index_label(name, path)
    big = np.iinfo(np.int32).max
    if name == "std_exp.txt":
        if not path.is_file():
            raise UserError(f"{label} not found; get it from {INDEX_SOURCE}")
        msg = not_a_file_of_its_kind(sniff(path), label, "a list of numbers", INDEX_SOURCE)
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
    mat = MatFile(path, label, INDEX_SOURCE)
    if name == "BFM_exp_idx.mat":
        mat.require(["trimIndex"])
        return {"trimIndex": as_ids(mat.read("trimIndex").reshape(-1), label, "trimIndex",
                                     1, big)}
    if name == "BFM_front_idx.mat":
        mat.require(["idx"])
        return {"idx": as_ids(mat.read("idx").reshape(-1), label, "idx", 1, big)}
    if name == "facemodel_info.mat":
        shapes = mat.shapes()
        mat.require(["tri", "point_buf", "keypoints", "skinmask"])
        info = {k: mat.read(k) for k in ("tri", "point_buf", "keypoints", "skinmask",
                                         *OPTIONAL_MODEL_KEYS) if k in shapes}
        n = info["point_buf"].shape[0]
        f = info["tri"].shape[0]
        as_ids(info["tri"], label, "tri", 1, n, (None, 3))
        as_ids(info["point_buf"], label, "point_buf", 1, f + 1, (n, None))
        as_ids(info["keypoints"].reshape(1, -1), label, "keypoints", 1, n, (1, N_KEYPOINTS))
        if info["skinmask"].size != n or not np.isfinite(info["skinmask"]).all():
            raise UserError(f"{label}: skinmask has shape {info['skinmask'].shape}; expected "
                            f"(1, {n}) finite values, one per vertex of point_buf")
        if "frontmask2_idx" in info:
            as_ids(info["frontmask2_idx"].reshape(-1), label, "frontmask2_idx", 1, n)
        if "tri_mask2" in info:
            as_ids(info["tri_mask2"], label, "tri_mask2", 1, n, (None, 3))
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

