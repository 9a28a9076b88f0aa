"""Writing fit results: coefficients, mesh, composed image and info, each atomically.

:func:`write_outputs` writes every file of one photo under temporary names first and
renames them only when all were written, so a failure leaves no output that looks
complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from core.errors import UserError
from .atomic import atomic_group
from .image import write_image


def check_writable_folder(folder: str, what: str = "output folder") -> str:
    """Prove, before any long work, that ``folder`` can be created (if missing) and
    written: a probe file is created and removed in it, or in its nearest existing parent
    when it does not exist yet (nothing is left behind, the folder is not created). A
    UserError naming ``what`` otherwise. Returns the absolute path."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} '{folder}' exists and is not a folder")
    probe_in = path
    while not os.path.exists(probe_in):
        parent = os.path.dirname(probe_in)
        if parent == probe_in:
            break
        probe_in = parent
    if not os.path.isdir(probe_in):
        raise UserError(f"{what} '{folder}' is not writable: '{probe_in}' is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=probe_in)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} '{folder}' is not writable: {e.strerror or e}") from None
    return path


def check_unique(names: Sequence[str], labels: Optional[Sequence[str]] = None) -> None:
    """UserError when two inputs share an output name (their outputs would overwrite each
    other in one folder); ``labels``: the inputs as the message names them (default: their
    1-based positions)."""
    seen: Dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            j = seen[n]
            which = (f"'{labels[j]}' and '{labels[i]}'" if labels is not None else f"inputs {j + 1} and {i + 1}")
            raise UserError(f"two inputs would write the same outputs '{n}' ({which}); "
                            "rename one or fit them into different --res_folder")
        seen[n] = i


def format_obj(vertices: np.ndarray, triangles: np.ndarray, colors: np.ndarray | None = None) -> str:
    """OBJ text: ``v x y z [r g b]`` per vertex (colours 0..1) and 1-based ``f a b c``.

    vertices: (N, 3); triangles: (F, 3) 0-based; colors: (N, 3) in 0..255 or None.
    """
    v = np.asarray(vertices, dtype=np.float64)
    if colors is not None:
        c = np.clip(np.asarray(colors, dtype=np.float64) / 255.0, 0.0, 1.0)
        vt = np.concatenate([v, c], axis=1)
        vlines = "\n".join("v %.6f %.6f %.6f %.4f %.4f %.4f" % tuple(r) for r in vt)
    else:
        vlines = "\n".join("v %.6f %.6f %.6f" % tuple(r) for r in v)
    flines = "\n".join("f %d %d %d" % tuple(r) for r in (np.asarray(triangles, dtype=np.int64) + 1))
    return vlines + "\n" + flines + "\n"


def _to_json(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_outputs(folder: str, files: Mapping[str, object]) -> Dict[str, str]:
    """Write several files atomically as a group.

    Args:
        folder: output folder (created if missing).
        files: file name -> content: ``np.ndarray`` for ``.npy``; (H, W, 3) uint8 image for
            ``.jpg``/``.png``; ``str`` for text (``.obj``); ``dict`` for ``.json``; a dict of
            arrays for ``.npz``.
    Returns:
        file name -> final path.
    Raises:
        UserError when a file cannot be written (full disk, read-only folder...); no file
        of the group is left behind, under its name or a temporary one.
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder '{folder}': {e.strerror or e}") from None
    paths = {name: os.path.join(folder, name) for name in files}
    try:
        with atomic_group(list(paths.values())) as tmps:
            for name, content in files.items():
                try:
                    _write_one(tmps[paths[name]], name, content)
                except OSError as e:
                    raise UserError(f"cannot write '{paths[name]}': {e.strerror or e}") from None
    except OSError as e:  # creating a temporary file, or renaming one into place
        raise UserError(f"cannot write '{e.filename2 or folder}': {e.strerror or e}") from None
    return paths


def _write_one(tmp: str, name: str, content) -> None:
    ext = os.path.splitext(name)[1].lower()
    if ext == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(content))
    elif ext == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **content)
    elif ext in (".jpg", ".jpeg", ".png"):
        write_image(tmp, content)
    elif ext == ".json":
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, default=_to_json)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
