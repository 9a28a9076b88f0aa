"""The camera and differentiable mesh rendering on screen-space vertices (SPEC §3).

    camera      the pinhole camera and the pixel convention, written down once
Primitives (pure PyTorch, no cameras or lights inside):
    rasterize(verts_screen, faces, image_size) -> Fragments (pix_to_face, zbuf)
    barycentrics(verts_screen, faces, pix_to_face) -> (B, H, W, 3)
    interpolate(attrs, verts_screen, faces, pix_to_face, clamp=None, alpha=False) -> (B, H, W, C [+1])
    interpolation_jacobian(attrs, verts_screen, faces, pix_to_face) -> PixelJacobian
and a thin module, MeshRenderer, that composes them into an RGBA image; it can use
pytorch3d's rasterizer instead where pytorch3d is installed.
"""
from .rasterize import Fragments, PixelJacobian, barycentrics, interpolate, interpolation_jacobian, rasterize
from .renderer import MeshRenderer

__all__ = ["Fragments", "PixelJacobian", "rasterize", "barycentrics", "interpolate", "interpolation_jacobian", "MeshRenderer"]
