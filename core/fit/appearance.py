"""A closed-form start for the light and the albedo (``init_light`` / ``init_albedo``)."""
from __future__ import annotations

import torch

from core.models.coeffs import Coeffs
from core.models.geometry import sh_basis
from .objective import Objective, expand


@torch.no_grad()
def init_appearance(objective: Objective, coeffs: Coeffs, images: torch.Tensor, albedo: bool = True,
                    rounds: int = 2, ridge: float = 400.0) -> Coeffs:
    """Least-squares SH light (and albedo coefficients) from the image colours at the
    visible vertices, for the current shape and pose.

    The colour model I_c(v) = T_c(v) · Σ_k Y_k(v) g_ck is linear in the light g for a
    fixed albedo and linear in tex for a fixed light, so both are small ridge
    regressions, alternated ``rounds`` times. ``ridge`` is the colour noise variance
    (0..255 units) against the albedo prior N(0, 1). Shared (batch 1) groups are solved
    over all frames at once.
    """
    model, camera, device, dtype = objective.model, objective.camera, objective.device, objective.dtype
    batch = images.shape[0]
    c = expand(coeffs, batch)
    out = model(c)
    screen = camera.project(out.vertices)
    size = camera.image_size
    frags = objective.renderer.rasterize(screen, model.tri, (size, size))
    vis = torch.zeros(batch, model.num_vertices, dtype=torch.bool, device=device)
    for b in range(batch):
        faces = frags.pix_to_face[b][frags.pix_to_face[b] >= 0].unique()
        vis[b, model.tri[faces].reshape(-1)] = True
    vis &= (model.skinmask > 0)[None]
    # Keep vertices well inside the face: at the silhouette the image colour at a
    # vertex mixes in the background (or hair), outliers a least-squares fit follows.
    covered = (frags.pix_to_face >= 0).to(dtype)[:, None]
    inner = -torch.nn.functional.max_pool2d(-covered, 5, stride=1, padding=2)  # 2 px erosion
    cols = screen[..., 0].floor().long().clamp(0, size - 1)
    rows = screen[..., 1].floor().long().clamp(0, size - 1)
    vis &= inner[:, 0].flatten(1).gather(1, rows * size + cols) > 0
    if vis.sum(1).min() < 30:
        return coeffs
    # Image colour at every vertex (bilinear; pixel i spans [i, i + 1)).
    grid = (screen[..., :2] / size * 2 - 1)[:, None]                       # (B, 1, N, 2)
    target = torch.nn.functional.grid_sample(images.permute(0, 3, 1, 2), grid, align_corners=False)
    target = target[:, :, 0].transpose(1, 2)                                # (B, N, 3)
    y = sh_basis(out.normals)                                               # (B, N, 9)
    tex = c.tex
    gamma = c.gamma
    eye9 = torch.eye(9, dtype=dtype, device=device)
    for r in range(rounds):
        alb = model.albedo(tex) if model.has_albedo_basis else out.albedo
        g = torch.empty(batch, 3, 9, dtype=dtype, device=device)
        for b in range(batch):
            for ch in range(3):
                a = y[b, vis[b]] * alb[b, vis[b], ch:ch + 1]
                g[b, ch] = torch.linalg.solve(a.T @ a + 1e-6 * a.shape[0] * eye9, a.T @ target[b, vis[b], ch])
        gamma = (g - torch.tensor([0.8] + [0.0] * 8, dtype=dtype, device=device)).reshape(batch, 27)
        if coeffs.gamma.shape[0] == 1 and batch > 1:
            gamma = gamma.mean(0, keepdim=True).expand(batch, -1)
        if not albedo or r == rounds - 1:
            break
        light = torch.bmm(y, g.transpose(1, 2))                             # (B, N, 3)
        k = model.layout.n_tex
        base = model.tex_base.reshape(-1, 3, k)                        # (N, 3, K)
        mean = model.meantex.reshape(-1, 3)
        shared = coeffs.tex.shape[0] == 1 and batch > 1
        lhs = ridge * torch.eye(k, dtype=dtype, device=device)
        rhs = torch.zeros(k, dtype=dtype, device=device)
        solved = []
        for b in range(batch):
            v = vis[b]
            a = (base[v] * light[b, v, :, None]).reshape(-1, k)
            rb = (target[b, v] - mean[v] * light[b, v]).reshape(-1)
            if shared:
                lhs, rhs = lhs + a.T @ a, rhs + a.T @ rb
            else:
                solved.append(torch.linalg.solve(lhs + a.T @ a, a.T @ rb))
        tex = torch.linalg.solve(lhs, rhs)[None].expand(batch, -1) if shared else torch.stack(solved)
    new = {"gamma": gamma[:1] if coeffs.gamma.shape[0] == 1 and batch > 1 else gamma}
    if albedo and model.has_albedo_basis:
        new["tex"] = tex[:1] if coeffs.tex.shape[0] == 1 and batch > 1 else tex
    return coeffs.replace(**new)
