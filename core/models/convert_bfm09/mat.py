"""Recognising a downloaded file by its first bytes, and reading MATLAB ``.mat`` files.

:func:`sniff` and :func:`not_a_file_of_its_kind` catch the common broken downloads (an
HTML page saved instead of the file, a Git LFS pointer, an archive, an empty file) for
every input; :class:`MatFile` reads named variables of a MATLAB v4/v5 (scipy) or v7.3
(h5py) file, with one-line :class:`core.errors.UserError` messages for truncated,
damaged or unreadable files.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from core.errors import UserError

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_RESAVE_HINT = "re-save it in MATLAB or Octave with save('-v7', ...)"


def sniff(path: Path) -> str:
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


def not_a_file_of_its_kind(kind: str, label: str, what: str, source: str) -> str | None:
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


class MatFile:
    """Read named numeric variables of a MATLAB file, v5 (scipy) or v7.3 (h5py), as
    arrays in MATLAB's shape; a column range can be read without loading the rest
    (for v7.3; for v5 scipy loads the variable and the slice is a view)."""

    def __init__(self, path: Path, label: str, source: str):
        self.path, self.label, self.source = Path(path), label, source
        if not self.path.is_file():
            raise UserError(f"{label} not found; get it from {source}")
        kind = sniff(self.path)
        msg = not_a_file_of_its_kind(kind, label, "a MATLAB .mat file", source)
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

