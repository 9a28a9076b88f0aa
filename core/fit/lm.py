"""Levenberg-Marquardt on the landmark residuals and the priors (rigid stage, landmark init).

The residuals are the objective's landmark term in least-squares form
(``Objective.landmark_residual_weights``) and its quadratic priors; the Jacobian of the
landmark projection is analytic (``FaceModel.landmarks_3d_jacobian``, ``Camera``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from tqdm import tqdm

from core import threads
from core.models.coeffs import Coeffs
from .objective import Objective, PoseRef, expand


def landmark_lm(objective: Objective, coeffs: Coeffs, landmarks: torch.Tensor, groups: Tuple[str, ...],
                iters: int, pose_ref: Optional[PoseRef] = None, progress: bool = False,
                desc: str = "landmarks (LM)") -> Coeffs:
    """``iters`` LM steps on ``groups`` against the landmarks (B, L, 2), crop pixels.

    Every frame is solved independently (its own damping); groups shared across frames
    (batch 1) are solved per frame and re-shared as the mean afterwards."""
    model, cam = objective.model, objective.camera
    dtype, device = objective.dtype, objective.device
    batch = landmarks.shape[0]
    c = expand(coeffs, batch)
    sizes = [getattr(c, g).shape[1] for g in groups]
    table = objective.priors(pose_ref, photo=False)
    prior_w, prior_mu = [], []
    for g, n in zip(groups, sizes):
        wg, ref = table.get(g, (0.0, None))
        mu = torch.zeros(batch, n, dtype=dtype, device=device) if ref is None else ref
        prior_w.append(torch.full((n,), wg, dtype=dtype, device=device))
        prior_mu.append(mu.expand(batch, n))
    prior_w, prior_mu = torch.cat(prior_w), torch.cat(prior_mu, dim=1)

    def unpack(x):
        return c.replace(**dict(zip(groups, torch.split(x, sizes, dim=1))))

    def residual_cost(x, kp):
        """(B,) cost, (B, 2L) residuals and (B, L, 1) their scale (IRLS with a robust loss)."""
        pts = objective.project_landmarks(unpack(x), kp)
        w = objective.landmark_residual_scale(pts, landmarks)
        r = ((pts - landmarks) * w).reshape(batch, -1)
        cost = objective.weigh({"lm": objective.landmark_term(pts, landmarks)}) + ((x - prior_mu) ** 2 * prior_w).sum(1)
        return cost, r, w

    x = torch.cat([getattr(c, g) for g in groups], dim=1).detach()
    lam = torch.full((batch,), 1e-3, dtype=dtype, device=device)
    eye = torch.eye(x.shape[1], dtype=dtype, device=device)
    with torch.no_grad():
        kp = objective.keypoints(unpack(x), landmarks)
        cost, r, w = residual_cost(x, kp)
        moved = False  # x changed since kp was picked
        for _ in tqdm(range(iters), desc=desc, disable=not progress, leave=False):
            threads.tick()
            if model.has_contour and moved:  # the silhouette correspondence moves with the pose
                kp = objective.keypoints(unpack(x), landmarks)
                cost, r, w = residual_cost(x, kp)
            jac = model.landmarks_3d_jacobian(unpack(x), groups, kp)
            dproj = cam.project_points_jacobian(jac["value"])  # (B, L, 2, 3)
            J = torch.cat([torch.einsum("blij,bljk->blik", dproj, jac[g]) for g in groups], dim=-1)
            J = (J * w[..., None]).reshape(batch, -1, x.shape[1])  # (B, 2L, P)
            jtj = J.transpose(1, 2) @ J + torch.diag_embed(prior_w.expand(batch, -1))
            grad = (J.transpose(1, 2) @ r[..., None])[..., 0] + prior_w * (x - prior_mu)
            damp = lam[:, None, None] * (torch.diagonal(jtj, dim1=1, dim2=2)[:, :, None] * eye + 1e-9 * eye)
            x_new = x + solve_each(jtj + damp, -grad)
            cost_new, r_new, w_new = residual_cost(x_new, kp)
            better = cost_new < cost
            moved = bool(better.any())
            x = torch.where(better[:, None], x_new, x)
            r = torch.where(better[:, None], r_new, r)
            w = torch.where(better[:, None, None], w_new, w)
            cost = torch.where(better, cost_new, cost)
            lam = torch.where(better, lam * 0.3, lam * 10.0).clamp(1e-9, 1e9)
    parts = dict(zip(groups, torch.split(x, sizes, dim=1)))
    out = {}
    for g, v in coeffs.as_dict().items():
        if g in parts:
            out[g] = parts[g].mean(0, keepdim=True) if v.shape[0] == 1 and batch > 1 else parts[g]
        else:
            out[g] = v
    return Coeffs(**out)


def solve_each(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a[i] x[i] = b[i] for (B, P, P) a and (B, P) b, one system at a time.

    A batched torch.linalg.solve on the CPU runs MKL's threaded LU inside torch's own
    parallel loop over the batch, which can deadlock (seen here with B = 2); P is small,
    so a loop costs nothing."""
    return torch.stack([torch.linalg.solve(a[i], b[i]) for i in range(a.shape[0])])
