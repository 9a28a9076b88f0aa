"""Rasterization with pytorch3d's ``rasterize_meshes``, returning the builtin Fragments.

Used only where ``import pytorch3d`` works; pytorch3d is imported lazily inside the
function, never at module import, so it is not a requirement of the project.

Conventions (pytorch3d's NDC): +x points left, +y up, and the output pixel (row, col)
has its centre at x_ndc = (W - 2 (col + 0.5)) / S, y_ndc = (H - 2 (row + 0.5)) / S with
S = min(H, W) (for a square image x_ndc = 1 - 2 col_centre / W). So a screen vertex
(col, row, depth) maps to ((W - 2 col) / S, (H - 2 row) / S, depth): z is kept as the
camera depth, as pytorch3d's MeshRasterizer keeps view-space z, and with
perspective_correct=True its z-buffer and weights are the builtin's.
"""
from __future__ import annotations

import torch

from .checks import check_image_size, check_inputs
from .coverage import Fragments


def screen_to_ndc(verts_screen: torch.Tensor, image_size) -> torch.Tensor:
    """(B, N, 3) screen (col, row, depth) -> (B, N, 3) pytorch3d NDC (x, y, depth)."""
    height, width = check_image_size(image_size)
    scale = float(min(height, width))
    col, row, depth = verts_screen.unbind(-1)
    return torch.stack([(width - 2.0 * col) / scale, (height - 2.0 * row) / scale, depth], -1)


def rasterize_pytorch3d(
    verts_screen: torch.Tensor,
    faces: torch.Tensor,
    image_size,
    znear: float = 0.01,
    zfar: float = 50.0,
    bin_size=None,
    max_faces_per_bin=None,
) -> Fragments:
    """Same contract as :func:`core.render.coverage.rasterize`, computed by pytorch3d.

    Args:
        verts_screen: (B, N, 3) float, screen-space vertices (col, row, depth).
        faces: (F, 3) long, 0-based, shared by the batch.
        image_size: (H, W), or an int for a square image.
        znear, zfar: triangles with a vertex at depth <= znear, or all vertices beyond
            zfar, are skipped (replaced by a zero-area face, which pytorch3d skips, so
            face ids are unchanged).
        bin_size, max_faces_per_bin: passed to pytorch3d (None: its heuristics).

    Returns:
        Fragments with pix_to_face (B, H, W) long, per-mesh face ids (not pytorch3d's
        packed ids) or -1, and zbuf (B, H, W), camera depth or -1.
    """
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes

    check_inputs(verts_screen, faces)
    height, width = check_image_size(image_size)
    with torch.no_grad():
        verts = verts_screen.detach().float()
        faces = faces.to(device=verts.device, dtype=torch.int64)
        batch, num_faces = verts.shape[0], faces.shape[0]
        depth = verts[..., 2].index_select(1, faces.reshape(-1)).view(batch, num_faces, 3)
        zmin = depth.amin(dim=-1)
        skip = (zmin <= znear) | (zmin > zfar)  # (B, F)
        faces_b = torch.where(skip.unsqueeze(-1), torch.zeros_like(faces), faces.expand(batch, -1, -1))
        meshes = Meshes(verts=screen_to_ndc(verts, (height, width)), faces=faces_b)
        image = (height, width) if height != width else height
        pix_to_face, zbuf, _, _ = rasterize_meshes(
            meshes, image_size=image, blur_radius=0.0, faces_per_pixel=1,
            bin_size=bin_size, max_faces_per_bin=max_faces_per_bin,
            perspective_correct=True, cull_backfaces=False)
        pix_to_face = pix_to_face[..., 0]
        zbuf = zbuf[..., 0]
        first = meshes.mesh_to_faces_packed_first_idx().view(batch, 1, 1)
        covered = pix_to_face >= 0
        pix_to_face = torch.where(covered, pix_to_face - first, torch.full_like(pix_to_face, -1))
        zbuf = torch.where(covered, zbuf, torch.full_like(zbuf, -1.0))
    return Fragments(pix_to_face=pix_to_face, zbuf=zbuf.to(verts_screen.dtype))
