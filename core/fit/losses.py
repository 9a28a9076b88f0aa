"""Losses of SPEC §4 as pure functions: tensors in, scalar out.

The landmark weights live here, once: 1 for all 68 iBUG points, 10 for the nose bridge
(ids 28-30, 0-based) and the mouth (48-67), normalised to sum 1.
"""
from __future__ import annotations

import torch

NOSE_BRIDGE = (28, 29, 30)
MOUTH = tuple(range(48, 68))
HEAVY_WEIGHT = 10.0


def landmark_weights(num_landmarks: int = 68, dtype=torch.float32, device=None) -> torch.Tensor:
    """(L,) landmark weights summing to 1 (iBUG-68 emphasis; uniform for other counts)."""
    w = torch.ones(num_landmarks, dtype=dtype, device=device)
    if num_landmarks == 68:
        w[list(NOSE_BRIDGE + MOUTH)] = HEAVY_WEIGHT
    return w / w.sum()


def landmark_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, image_size: int) -> torch.Tensor:
    """Mean over the batch of Σ_k w_k ‖(p_k − q_k) / image_size‖².

    Args:
        pred, target: (B, L, 2) image points in pixels.
        weights: (L,) landmark weights.
        image_size: side of the square image in pixels.
    """
    return landmark_loss_per_frame(pred, target, weights, image_size).mean()


def landmark_loss_per_frame(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                            image_size: int) -> torch.Tensor:
    """(B,) Σ_k w_k ‖(p_k − q_k) / image_size‖² of each frame (see :func:`landmark_loss`)."""
    d = (pred - target) / image_size
    return ((d ** 2).sum(-1) * weights).sum(-1)


def photo_loss(rendered: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean colour distance: mean over the batch of
    Σ_pixels ‖rendered − image‖₂ · mask / 255, divided by Σ mask.

    Args:
        rendered, image: (B, H, W, 3), 0..255.
        mask: (B, H, W) 0/1 (the rendered face's coverage).
    """
    return photo_loss_per_frame(rendered, image, mask).mean()


def photo_loss_per_frame(rendered: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) the masked mean colour distance / 255 of each image (see :func:`photo_loss`)."""
    dist = torch.linalg.vector_norm(rendered - image, dim=-1)  # subgradient 0 where equal
    return (dist * mask).sum(dim=(1, 2)) / 255.0 / mask.sum(dim=(1, 2)).clamp_min(1.0)


def reflectance_loss(albedo: torch.Tensor, skinmask: torch.Tensor) -> torch.Tensor:
    """Albedo smoothness over the skin: Σ((T − mean_skin(T)) · skin / 255)² / (B · Σ skin).

    Args:
        albedo: (B, N, 3) 0..255.
        skinmask: (N,) 1 on skin vertices.
    """
    return reflectance_loss_per_frame(albedo, skinmask).mean()


def reflectance_loss_per_frame(albedo: torch.Tensor, skinmask: torch.Tensor) -> torch.Tensor:
    """(B,) Σ((T − mean_skin(T)) · skin / 255)² / Σ skin of each frame."""
    skin = skinmask[None, :, None]
    denom = skinmask.sum().clamp_min(1.0)
    mean = (albedo * skin).sum(dim=1, keepdim=True) / denom
    return (((albedo - mean) * skin / 255.0) ** 2).sum(dim=(1, 2)) / denom


def l2(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over every element."""
    return (x ** 2).sum()
