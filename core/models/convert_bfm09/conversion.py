"""The conversion of SPEC §1 and the writing of its result: :func:`convert` computes the
converted model (the table in :mod:`core.models.convert_bfm09.layout`) from the inputs,
:func:`convert_folder` runs a whole conversion as ``convert_bfm09_data.py`` does, and the
output checks and the atomic write make a bad ``--out`` fail before the long part and
leave no partial file behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import scipy.io

from core.errors import UserError
from core.io.atomic import atomic_path
from .index_files import (INDEX_SOURCE, IndexFiles, download_index_files, missing_index_files,
                          read_index_files)
from .inputs import (BASEL_FILE, BASEL_SOURCE, EXP_PCA_FILE, EXP_PCA_SOURCE, FRONT_MAT_FILE,
                     basel_sizes, exp_pca_header, read_basel, read_exp_pca, read_front_mat)
from .layout import N_EXP, N_ID, N_TEX, OUT_FILE, validate_converted

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- conversion

def convert(basel_path: str | os.PathLike, exp_pca_path: str | os.PathLike,
            index: IndexFiles) -> dict[str, np.ndarray]:
    """SPEC §1: the converted model (the table in :mod:`.layout`) as arrays.

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

# --------------------------------------------------------------------------- output

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


# --------------------------------------------------------------------------- a whole conversion

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
