"""The tensor layout shared by coverage.py and interpolation.py (SPEC §3).

Per-face and per-pixel quantities are kept as contiguous structure-of-arrays columns
(a (D, K) tensor per quantity instead of (K, D)), frames are processed in groups that
bound memory, and the face list's (3, F) columns are cached between calls. The edge
functions, the one geometric quantity both the coverage test and the interpolation
weights are built from, are computed here on those columns.
"""
from __future__ import annotations

import weakref
from typing import List

import torch

__all__ = ["batch_chunks", "cat", "face_columns", "columns", "edge_functions"]

# Frames are processed in groups of about this many faces or pixels: it keeps every
# intermediate tensor a few MB, in cache and clear of the allocator's page-faulting
# large-block path, so the time per frame does not grow with the batch.
_CHUNK_ELEMENTS = 1 << 18


def batch_chunks(batch: int, per_frame: int) -> List[slice]:
    """Slices of the batch with about _CHUNK_ELEMENTS elements (at least one frame) each."""
    step = max(1, _CHUNK_ELEMENTS // max(per_frame, 1))
    return [slice(b, min(b + step, batch)) for b in range(0, batch, step)]


def cat(parts: List[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts) along dim 0, without a copy when there is a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_FACES_CACHE = (None, -1, None, None)  # (weakref to faces, its version, device, columns)


def face_columns(faces: torch.Tensor, device: torch.device) -> torch.Tensor:
    """faces (F, 3) int -> (3, F) int64 on ``device``. The last result is kept while the
    same faces tensor comes back unmodified (a face model renders one face list)."""
    global _FACES_CACHE
    ref, version, dev, cols = _FACES_CACHE
    if ref is not None and ref() is faces and version == faces._version and dev == device:
        return cols
    cols = columns(faces.to(device=device, dtype=torch.int64))
    _FACES_CACHE = (weakref.ref(faces), faces._version, device, cols)
    return cols


def columns(t: torch.Tensor) -> torch.Tensor:
    """(R, D) -> (D, R) contiguous: the structure-of-arrays form. For small D, stacking the
    columns is several times faster than ``t.t().contiguous()`` on a CPU."""
    return torch.stack(t.unbind(1))


def edge_functions(rx: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:
    """Corners relative to a point p, rx, ry (3, K) -> the edge functions (3, K)
    e_k = cross(r_{k+1}, r_{k+2}) (differentiable when the inputs require grad)."""
    if torch.is_grad_enabled() and (rx.requires_grad or ry.requires_grad):
        return torch.stack([rx[(k + 1) % 3] * ry[(k + 2) % 3] - rx[(k + 2) % 3] * ry[(k + 1) % 3]
                            for k in range(3)])
    e = rx.new_empty(rx.shape)
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        torch.mul(rx[i], ry[j], out=e[k])
        e[k].addcmul_(rx[j], ry[i], value=-1)
    return e
