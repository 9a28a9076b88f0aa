"""Input checks shared by the rasterizers and the interpolation (SPEC §3).

Each raises ``ValueError`` stating the expected and the actual value; none computes
anything else.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["check_inputs", "check_image_size", "check_pix_to_face"]


def check_inputs(verts_screen: torch.Tensor, faces: torch.Tensor) -> None:
    """verts_screen must be (B, N, 3) floating point; faces (F, 3) int64 or int32."""
    if verts_screen.dim() != 3 or verts_screen.shape[-1] != 3:
        raise ValueError(
            f"Expected verts_screen to have shape (B, N, 3); got {tuple(verts_screen.shape)}")
    if not verts_screen.is_floating_point():
        raise ValueError(f"Expected verts_screen to be floating point; got {verts_screen.dtype}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"Expected faces to have shape (F, 3); got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"Expected faces to be int64 or int32; got {faces.dtype}")


def check_image_size(image_size) -> Tuple[int, int]:
    """image_size (H, W), or an int for a square image -> (H, W) positive ints."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    try:
        height, width = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"Expected image_size to be (H, W); got {image_size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"Expected a positive image_size (H, W); got {(height, width)}")
    return height, width


def check_pix_to_face(pix_to_face: torch.Tensor, batch: int) -> None:
    """pix_to_face must be (B, H, W) with B = ``batch``."""
    if pix_to_face.dim() != 3 or pix_to_face.shape[0] != batch:
        raise ValueError(
            f"Expected pix_to_face to have shape ({batch}, H, W); got {tuple(pix_to_face.shape)}")
