"""Losses of SPEC §4 as pure functions: tensors in, scalar out.

The landmark weights live here, once. SPEC §4 (the original's): 1 for all 68 iBUG points,
10 for the nose bridge (ids 28-30, 0-based) and the mouth (48-67), normalised to sum 1; a
fit configuration may weigh the three groups (jaw contour 0-16, those heavy points, the
other inner points) otherwise.
"""
from __future__ import annotations

import torch

JAW = tuple(range(0, 17))
NOSE_BRIDGE = (28, 29, 30)
MOUTH = tuple(range(48, 68))
HEAVY_WEIGHT = 10.0


def landmark_weights(num_landmarks: int = 68, dtype=torch.float32, device=None, *, jaw: float = 1.0,
                     inner: float = 1.0, heavy: float = HEAVY_WEIGHT) -> torch.Tensor:
    """(L,) landmark weights summing to 1.

    For the 68 iBUG points: ``jaw`` for the jaw contour (0-16), ``heavy`` for the nose
    bridge (28-30) and the mouth (48-67), ``inner`` for the other inner points (brows,
    nose, eyes); the defaults are SPEC §4's (1, 1, 10). Other counts: uniform.
    """
    if num_landmarks != 68:
        w = torch.ones(num_landmarks, dtype=dtype, device=device)
        return w / w.sum()
    if min(jaw, inner, heavy) < 0 or jaw + inner + heavy <= 0:
        raise ValueError(f"landmark weights must be >= 0 and not all 0, got jaw {jaw}, inner {inner}, heavy {heavy}")
    w = torch.full((num_landmarks,), float(inner), dtype=dtype, device=device)
    w[list(JAW)] = jaw
    w[list(NOSE_BRIDGE + MOUTH)] = heavy
    return w / w.sum()


def landmark_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, image_size: int,
                  robust_px: float = 0.0) -> torch.Tensor:
    """Mean over the batch of Σ_k w_k ‖(p_k − q_k) / image_size‖² (SPEC §4), or of
    Σ_k w_k ρ(‖p_k − q_k‖ / image_size) with ``robust_px`` > 0 (:func:`robust_square`).

    Args:
        pred, target: (B, L, 2) image points in pixels.
        weights: (L,) landmark weights.
        image_size: side of the square image in pixels.
        robust_px: scale of the robust loss in pixels (0: the squared distance).
    """
    return landmark_loss_per_frame(pred, target, weights, image_size, robust_px).mean()


def landmark_loss_per_frame(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                            image_size: int, robust_px: float = 0.0) -> torch.Tensor:
    """(B,) the landmark term of each frame (see :func:`landmark_loss`)."""
    d = (pred - target) / image_size
    d2 = (d ** 2).sum(-1)
    if robust_px > 0:
        d2 = robust_square(d2, (robust_px / image_size) ** 2)
    return (d2 * weights).sum(-1)


def robust_square(d2: torch.Tensor, s2: float) -> torch.Tensor:
    """Charbonnier's ρ of a squared distance: 2 s² (√(1 + d²/s²) − 1); d² for d ≪ s, 2 s·d
    for d ≫ s (the distance itself, as the NME counts it, not its square)."""
    return 2.0 * s2 * (torch.sqrt(1.0 + d2 / s2) - 1.0)


def robust_irls_scale(d2: torch.Tensor, s2: float) -> torch.Tensor:
    """√ρ'(d²): the factor on a residual whose square, summed, is ρ's Gauss-Newton (IRLS)
    model at d² (same gradient): (1 + d²/s²)^(-1/4)."""
    return (1.0 + d2 / s2) ** -0.25


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
