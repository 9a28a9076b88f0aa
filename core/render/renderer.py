"""MeshRenderer: rasterize, then interpolate vertex colours into an RGBA image."""
from __future__ import annotations

import importlib
import logging

import torch
from torch import nn

from .coverage import Fragments, rasterize
from .interpolation import interpolate

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "builtin", "pytorch3d")


def _pytorch3d_available() -> bool:
    try:
        importlib.import_module("pytorch3d.renderer")
    except Exception:  # ImportError, or a broken build raising something else
        return False
    return True


class MeshRenderer(nn.Module):
    """Render vertex-coloured meshes given in screen space (see core.render.coverage).

    Args:
        backend: "builtin" (the pure-PyTorch rasterizer), "pytorch3d" (pytorch3d's
            rasterize_meshes; it must import), or "auto" (pytorch3d if it imports, else
            builtin). Only the rasterization differs; interpolation is the same code, so
            the gradients are the same.
        znear, zfar: depth limits, see :func:`core.render.coverage.rasterize`.
    """

    def __init__(self, backend: str = "auto", znear: float = 0.01, zfar: float = 50.0):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Expected backend to be one of {BACKENDS}; got {backend!r}")
        if backend == "auto":
            backend = "pytorch3d" if _pytorch3d_available() else "builtin"
        elif backend == "pytorch3d" and not _pytorch3d_available():
            raise ValueError("backend='pytorch3d' but pytorch3d does not import; "
                             "install pytorch3d or use backend='builtin'")
        logger.debug("MeshRenderer rasterizes with the %s backend", backend)
        self.backend = backend
        self.znear = float(znear)
        self.zfar = float(zfar)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, znear={self.znear}, zfar={self.zfar}"

    def rasterize(self, verts_screen: torch.Tensor, faces: torch.Tensor, image_size) -> Fragments:
        """verts_screen (B, N, 3) (col, row, depth), faces (F, 3) long, image_size (H, W)
        -> Fragments with pix_to_face (B, H, W) and zbuf (B, H, W); no gradient."""
        if self.backend == "pytorch3d":
            from .pytorch3d_backend import rasterize_pytorch3d
            return rasterize_pytorch3d(verts_screen, faces, image_size,
                                       znear=self.znear, zfar=self.zfar)
        return rasterize(verts_screen, faces, image_size, znear=self.znear, zfar=self.zfar)

    def forward(self, verts_screen: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor,
                image_size) -> torch.Tensor:
        """Render an RGBA image.

        Args:
            verts_screen: (B, N, 3) float, screen-space vertices (col, row, depth).
            faces: (F, 3) long, 0-based.
            colors: (B, N, 3) float, vertex colours in 0..255.
            image_size: (H, W) in pixels, or an int for a square image.

        Returns:
            (B, H, W, 4): RGB, the perspective-correct interpolation of ``colors`` clamped
            to [0, 255] (black on background), and alpha, 1 where a triangle covers the
            pixel and 0 elsewhere. Differentiable w.r.t. verts_screen and colors.
        """
        pix_to_face = self.rasterize(verts_screen, faces, image_size).pix_to_face
        return self.shade(verts_screen, faces, colors, pix_to_face)

    @staticmethod
    def shade(verts_screen: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor,
              pix_to_face: torch.Tensor) -> torch.Tensor:
        """The RGBA image of :meth:`forward` from a rasterization already done:
        pix_to_face (B, H, W) -> (B, H, W, 4)."""
        return interpolate(colors, verts_screen, faces, pix_to_face, clamp=(0.0, 255.0), alpha=True)
