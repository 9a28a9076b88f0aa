"""The face model: a linear 3DMM as an ``nn.Module`` whose forward is a pure function of
the coefficients (SPEC §3). All arrays are buffers, so ``.to(device)`` and ``state_dict``
just work; the fitting loop owns the optimised tensors.

Shapes: N vertices, F triangles, L landmarks (68), K_id / K_exp / K_tex basis sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .coeffs import CoeffLayout, Coeffs
from .geometry import euler_rotation_jacobian, euler_to_rotation, rigid_transform, sh_shade, vertex_normals


@dataclass(frozen=True)
class FaceOutput:
    """Result of :meth:`FaceModel.forward`.

    Attributes:
        vertices: (B, N, 3) posed vertices in world space (decimetres): S·Mᵀ + trans.
        colors: (B, N, 3) lit vertex colours, 0..255 (not clamped).
        albedo: (B, N, 3) albedo T, 0..255.
        normals: (B, N, 3) rotated unit normals.
        landmarks: (B, L, 3) posed landmark vertices in world space.
        rotation: (B, 3, 3) rotation matrices M.
    """

    vertices: torch.Tensor
    colors: torch.Tensor
    albedo: torch.Tensor
    normals: torch.Tensor
    landmarks: torch.Tensor
    rotation: torch.Tensor


class FaceModel(nn.Module):
    """A linear morphable model: shape = mean + idBase·id + exBase·exp (centred),
    albedo = meantex + texBase·tex, posed by Euler angles and a translation and lit by
    27 SH coefficients.

    Args (all arrays 0-based, float or long as noted):
        meanshape: (3N,) mean shape, xyz interleaved, decimetres.
        id_base: (3N, K_id) identity basis (already scaled by the eigenvalues).
        exp_base: (3N, K_exp) expression basis.
        meantex: (3N,) mean albedo, rgb interleaved, 0..255.
        tex_base: (3N, K_tex) albedo basis (K_tex may be 0 for shape-only models).
        tri: (F, 3) long triangles.
        point_buf: (N, K) long adjacent triangles per vertex, F = "no triangle".
        keypoints: (L,) long landmark vertex ids.
        skinmask: (N,) float, 1 on skin vertices (albedo-smoothness loss).
        name: a label for logs and outputs.
    """

    def __init__(self, meanshape, id_base, exp_base, meantex, tex_base, tri, point_buf,
                 keypoints, skinmask=None, name: str = "bfm09"):
        super().__init__()
        f32 = dict(dtype=torch.float32)
        meanshape = torch.as_tensor(meanshape, **f32).reshape(-1)
        n = meanshape.numel() // 3
        if meanshape.numel() != 3 * n:
            raise ValueError(f"Expected meanshape of size 3N; got {meanshape.numel()}")

        def base(x, what):
            t = torch.as_tensor(x, **f32)
            if t.ndim == 1 and t.numel() == 0:
                t = t.reshape(3 * n, 0)
            if t.ndim != 2 or t.shape[0] != 3 * n:
                raise ValueError(f"Expected {what} of shape ({3 * n}, K); got {tuple(t.shape)}")
            return t.contiguous()

        id_base, exp_base, tex_base = base(id_base, "idBase"), base(exp_base, "exBase"), base(tex_base, "texBase")
        meantex = torch.as_tensor(meantex, **f32).reshape(-1)
        if meantex.numel() != 3 * n:
            raise ValueError(f"Expected meantex of size {3 * n}; got {meantex.numel()}")
        tri = torch.as_tensor(tri, dtype=torch.long)
        point_buf = torch.as_tensor(point_buf, dtype=torch.long)
        keypoints = torch.as_tensor(keypoints, dtype=torch.long).reshape(-1)
        if tri.ndim != 2 or tri.shape[1] != 3 or tri.min() < 0 or tri.max() >= n:
            raise ValueError(f"Expected tri of shape (F, 3) with 0-based ids < {n}; got {tuple(tri.shape)}")
        nf = tri.shape[0]
        if point_buf.ndim != 2 or point_buf.shape[0] != n or point_buf.min() < 0 or point_buf.max() > nf:
            raise ValueError(f"Expected point_buf of shape ({n}, K) with ids in [0, {nf}]; got {tuple(point_buf.shape)}")
        if keypoints.min() < 0 or keypoints.max() >= n:
            raise ValueError(f"Expected keypoints with ids in [0, {n}); got range [{keypoints.min()}, {keypoints.max()}]")
        skin = torch.ones(n) if skinmask is None else torch.as_tensor(skinmask, **f32).reshape(-1)
        if skin.numel() != n:
            raise ValueError(f"Expected skinmask of size {n}; got {skin.numel()}")

        self.name = name
        self.layout = CoeffLayout(n_id=id_base.shape[1], n_exp=exp_base.shape[1], n_tex=tex_base.shape[1])
        center = meanshape.reshape(n, 3).mean(dim=0)
        self.register_buffer("meanshape", (meanshape.reshape(n, 3) - center).reshape(-1))
        self.register_buffer("id_base", id_base)
        self.register_buffer("exp_base", exp_base)
        self.register_buffer("meantex", meantex)
        self.register_buffer("tex_base", tex_base)
        self.register_buffer("tri", tri)
        self.register_buffer("point_buf", point_buf)
        self.register_buffer("keypoints", keypoints)
        self.register_buffer("skinmask", skin)
        # Rows of the bases at the landmark vertices: the rigid stage needs nothing else.
        rows = (3 * keypoints[:, None] + torch.arange(3)).reshape(-1)
        self.register_buffer("lm_mean", self.meanshape[rows].clone())
        self.register_buffer("lm_id_base", id_base[rows].clone())
        self.register_buffer("lm_exp_base", exp_base[rows].clone())

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_vertices(self) -> int:
        return self.meanshape.numel() // 3

    @property
    def num_landmarks(self) -> int:
        return self.keypoints.numel()

    @property
    def has_albedo_basis(self) -> bool:
        return self.tex_base.shape[1] > 0

    # -- pieces --------------------------------------------------------------------------
    def shape(self, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
        """id (B, K_id), exp (B, K_exp) -> centred shape S (B, N, 3), decimetres."""
        s = self.meanshape + id_coeff @ self.id_base.T + exp_coeff @ self.exp_base.T
        return s.reshape(s.shape[0], -1, 3)

    def albedo(self, tex_coeff: torch.Tensor) -> torch.Tensor:
        """tex (B, K_tex) -> albedo T (B, N, 3), 0..255."""
        t = self.meantex + tex_coeff @ self.tex_base.T
        return t.reshape(t.shape[0], -1, 3)

    def landmarks_3d(self, coeffs: Coeffs) -> torch.Tensor:
        """Posed landmark vertices (B, L, 3), computed from the L landmark rows only."""
        s = self.lm_mean + coeffs.id @ self.lm_id_base.T + coeffs.exp @ self.lm_exp_base.T
        s = s.reshape(s.shape[0], -1, 3)
        return rigid_transform(s, euler_to_rotation(coeffs.angles), coeffs.trans)

    def landmarks_3d_jacobian(self, coeffs: Coeffs, groups) -> "dict[str, torch.Tensor]":
        """Posed landmarks and their derivatives, for Gauss-Newton style solvers.

        Returns a dict with ``"value"``: (B, L, 3) as :meth:`landmarks_3d`, and for each
        group in ``groups`` (of "id", "exp", "angles", "trans") the Jacobian (B, L, 3, K).
        """
        s = self.lm_mean + coeffs.id @ self.lm_id_base.T + coeffs.exp @ self.lm_exp_base.T
        s = s.reshape(s.shape[0], -1, 3)
        rot = euler_to_rotation(coeffs.angles)
        out = {"value": rigid_transform(s, rot, coeffs.trans)}
        b, n = s.shape[0], s.shape[1]
        for g in groups:
            if g == "trans":
                out[g] = torch.eye(3, dtype=s.dtype, device=s.device).expand(b, n, 3, 3)
            elif g == "angles":
                d = euler_rotation_jacobian(coeffs.angles)  # (B, 3, 3, 3)
                out[g] = torch.einsum("bkij,bnj->bnik", d, s)
            elif g in ("id", "exp"):
                base = self.lm_id_base if g == "id" else self.lm_exp_base
                out[g] = torch.einsum("bij,njk->bnik", rot, base.reshape(n, 3, -1))
            else:
                raise ValueError(f"No landmark Jacobian for group '{g}'")
        return out

    def forward(self, coeffs: Coeffs, albedo: Optional[torch.Tensor] = None) -> FaceOutput:
        """Full forward model of SPEC §3.

        Args:
            coeffs: batch of B coefficients (see :class:`~core.coeffs.Coeffs`).
            albedo: optional (B or 1, N, 3) albedo overriding meantex + texBase·tex (used
                for models without an albedo basis).
        """
        shape = self.shape(coeffs.id, coeffs.exp)
        rot = euler_to_rotation(coeffs.angles)
        normals = vertex_normals(shape, self.tri, self.point_buf)
        normals = torch.bmm(normals, rot.transpose(1, 2))
        if albedo is None:
            albedo = self.albedo(coeffs.tex)
        elif albedo.shape[0] != shape.shape[0]:
            albedo = albedo.expand(shape.shape[0], -1, -1)
        colors = sh_shade(albedo, normals, coeffs.gamma)
        vertices = rigid_transform(shape, rot, coeffs.trans)
        return FaceOutput(vertices=vertices, colors=colors, albedo=albedo, normals=normals,
                          landmarks=vertices[:, self.keypoints], rotation=rot)
