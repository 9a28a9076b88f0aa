"""Choosing the torch device from ``--device auto|cpu|cuda[:N]`` (and the original ``--gpu N``)."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import UserError


def resolve_device(spec: str = "auto", gpu: Optional[int] = None) -> torch.device:
    """``auto``: cuda:<gpu or 0> when CUDA is available, else cpu. ``cuda`` / ``cuda:N``
    must exist, or a UserError says so. ``gpu`` (the original flag) picks the card for
    ``auto`` and ``cuda``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return _cuda(gpu or 0)
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = gpu or 0
        if ":" in spec:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise UserError(f"bad --device '{spec}': expected auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} asked for a GPU, but torch sees no CUDA device here; use --device cpu or auto")
        return _cuda(index)
    raise UserError(f"bad --device '{spec}': expected auto, cpu, cuda or cuda:N")


def _cuda(index: int) -> torch.device:
    n = torch.cuda.device_count()
    if index < 0 or index >= n:
        raise UserError(f"GPU {index} does not exist: torch sees {n} CUDA device(s)")
    return torch.device(f"cuda:{index}")
