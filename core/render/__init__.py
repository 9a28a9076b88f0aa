"""The camera and differentiable mesh rendering on screen-space vertices (SPEC §3).

    camera             the pinhole camera and the pixel convention, written down once
    checks             the input checks (shapes, dtypes, image size) with precise messages
    layout             the structure-of-arrays layout, frame groups and edge functions
                       shared by coverage and interpolation
    coverage           which triangle covers each pixel: rasterize -> Fragments (z-buffer)
    interpolation      barycentrics, interpolate, interpolation_jacobian -> PixelJacobian
    renderer           MeshRenderer, the thin module that composes them
    pytorch3d_backend  pytorch3d's rasterizer behind the same Fragments, where it imports
Primitives (pure PyTorch, no cameras or lights inside):
    rasterize(verts_screen, faces, image_size) -> Fragments (pix_to_face, zbuf)
    barycentrics(verts_screen, faces, pix_to_face) -> (B, H, W, 3)
    interpolate(attrs, verts_screen, faces, pix_to_face, clamp=None, alpha=False) -> (B, H, W, C [+1])
    interpolation_jacobian(attrs, verts_screen, faces, pix_to_face) -> PixelJacobian
and a thin module, MeshRenderer, that composes them into an RGBA image; it can use
pytorch3d's rasterizer instead where pytorch3d is installed.
"""
from .coverage import Fragments, rasterize
from .interpolation import PixelJacobian, barycentrics, interpolate, interpolation_jacobian
from .renderer import MeshRenderer

__all__ = ["Fragments", "PixelJacobian", "rasterize", "barycentrics", "interpolate", "interpolation_jacobian", "MeshRenderer"]
