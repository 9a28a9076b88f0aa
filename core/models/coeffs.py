"""The coefficient layout: the one place that knows how a coefficient vector is split.

BFM09 (SPEC §2) uses 257 numbers per frame, in this order::

    id 80 | exp 64 | tex 80 | angles 3 (x, y, z, radians) | gamma 27 (SH light) | trans 3

Other models keep the same six groups with their own sizes (``CoeffLayout(n_id=..)``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Tuple

import torch

GROUPS: Tuple[str, ...] = ("id", "exp", "tex", "angles", "gamma", "trans")


@dataclass(frozen=True)
class Coeffs:
    """Coefficients of a batch of B frames, one tensor per group.

    Attributes:
        id: (B, n_id) identity (shape) coefficients.
        exp: (B, n_exp) expression coefficients.
        tex: (B, n_tex) albedo coefficients.
        angles: (B, 3) Euler angles (x, y, z) in radians; rotation M = Rz·Ry·Rx.
        gamma: (B, 27) spherical-harmonics light, viewed as (B, 3 colours, 9 bands).
        trans: (B, 3) translation in model units (decimetres), added after rotation.
    """

    id: torch.Tensor
    exp: torch.Tensor
    tex: torch.Tensor
    angles: torch.Tensor
    gamma: torch.Tensor
    trans: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.angles.shape[0]

    def as_dict(self) -> Dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **groups: torch.Tensor) -> "Coeffs":
        d = self.as_dict()
        d.update(groups)
        return Coeffs(**d)

    def detach(self) -> "Coeffs":
        return Coeffs(**{k: v.detach() for k, v in self.as_dict().items()})


@dataclass(frozen=True)
class CoeffLayout:
    """Sizes of the six coefficient groups and their order in a packed vector."""

    n_id: int = 80
    n_exp: int = 64
    n_tex: int = 80
    n_angles: int = 3
    n_gamma: int = 27
    n_trans: int = 3

    def sizes(self) -> Dict[str, int]:
        return {g: getattr(self, "n_" + g) for g in GROUPS}

    @property
    def total(self) -> int:
        return sum(self.sizes().values())

    def slices(self) -> Dict[str, slice]:
        out, start = {}, 0
        for g, n in self.sizes().items():
            out[g] = slice(start, start + n)
            start += n
        return out

    def unpack(self, packed: torch.Tensor) -> Coeffs:
        """Split packed (B, total) coefficients into groups (views, no copy)."""
        if packed.ndim != 2 or packed.shape[1] != self.total:
            raise ValueError(f"Expected coefficients of shape (B, {self.total}); got {tuple(packed.shape)}")
        return Coeffs(**{g: packed[:, s] for g, s in self.slices().items()})

    def pack(self, coeffs: Coeffs) -> torch.Tensor:
        """Concatenate groups into (B, total), in the layout order."""
        parts = []
        for g, n in self.sizes().items():
            t = getattr(coeffs, g)
            if t.ndim != 2 or t.shape[1] != n:
                raise ValueError(f"Expected '{g}' of shape (B, {n}); got {tuple(t.shape)}")
            parts.append(t)
        return torch.cat(parts, dim=1)

    def zeros(self, batch_size: int, dtype=torch.float32, device=None) -> Coeffs:
        """All-zero coefficients (the original's starting point)."""
        return Coeffs(**{g: torch.zeros(batch_size, n, dtype=dtype, device=device)
                         for g, n in self.sizes().items()})


BFM09_LAYOUT = CoeffLayout()
