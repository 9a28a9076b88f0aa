"""Gauss-Newton pieces for the photometric stage: the full loss of SPEC §4, per frame,
and its Gauss-Newton model (gradient and approximate Hessian) at a point.

The photometric term Σ_pixels ‖render − image‖ / (255 M) is a sum of unsquared norms; its
Gauss-Newton model is the iteratively-reweighted least-squares one: each covered pixel's
residual r_m is weighted by 1 / max(‖r_m‖, ``RHO_MIN``), which has the same gradient as
the loss at the linearisation point. The per-pixel Jacobian is assembled by the chain rule
from the renderer's :func:`core.render.interpolation_jacobian` (how a pixel moves with its
triangle's corners and colours) and per-vertex Jacobians of the screen positions and
colours, written out analytically here, the shading's dependence on the shape through
the vertex normals included (left out with ``normals_grad=False``, as the Adam path does).
The loss itself, its terms and weights, come from :class:`core.fit.objective.Objective`;
the Levenberg-Marquardt loops of :mod:`core.fit.gn` accept a step on that exact loss.

Every result is per frame: frames whose groups are all per-frame are independent
problems (the data terms summed over frames, as ``Objective.total`` scales them). The
frames of a batch are linearised together, their covered pixels and vertices stacked
(vertex v of the b-th frame of a call is b·N + v), in calls of ``PHOTO_FRAMES_PER_CALL``
(``PHOTO_FRAMES_PER_CALL_GPU`` on a GPU).
Shapes: B frames, N vertices, P optimised parameters (the groups' sizes, in order).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from core.models.coeffs import Coeffs
from core.models.geometry import (AMBIENT_OFFSET, euler_rotation_jacobian, norm3, rotate_rows, sh_basis,
                                  sh_basis_jacobian, skew)
from core.render import interpolation_jacobian
from core.render.camera import Camera
from .gn_state import State
from .objective import Objective

# Smallest colour distance (0..255 units) a pixel's IRLS weight 1/‖r‖ is computed with.
RHO_MIN = 2.0
# Covered pixels a frame's Gauss-Newton Hessian is assembled from (evenly spaced; the
# gradient always uses every pixel): HESSIAN_PIXELS_PER_PARAM per optimised parameter, at
# least HESSIAN_MIN_PIXELS. The Hessian only shapes the step (the loop accepts it on the exact
# loss); 2048 for every problem before. On the 10 bench photos (102 parameters: 816 pixels)
# the landmark NME and photometric loss stayed the same at 14 % less CPU per photo (20 % at
# 512 pixels), and a following video frame (39 parameters: 512) took 10-30 % less; with the
# BFM09 layout's 257 parameters, 512 pixels are too few (an 8-step test fit reached 10x the
# loss), 768 enough, and a fit converges in fewer steps with 2048 (docs/performance.md).
HESSIAN_PIXELS_PER_PARAM, HESSIAN_MIN_PIXELS = 8, 512
# Frames linearised together in one call (their pixels and vertices stacked). Per frame at
# 1 thread (2 bench photos, 102 parameters), measured at fcd86ca, when the Hessian's pixel
# rows were gathered as one (K, 18, P) block (94 MB at 16 frames; built corner by corner
# since): 36 ms alone, 30 ms in calls of 4, 37 ms of 8 and 50 ms of 16. Larger calls'
# intermediates cost more in fresh memory than the calls they save; not measured again since.
PHOTO_FRAMES_PER_CALL = 4
# On a GPU each call's operations are kernel launches whatever their size: up to 32 frames
# per call there (untested on a GPU so far; about 150 MB of intermediates at 32).
PHOTO_FRAMES_PER_CALL_GPU = 32

GEOMETRY = ("id", "exp", "angles", "trans")


def hessian_pixels(params: int) -> int:
    """Covered pixels a frame's photometric Hessian is sampled at for ``params`` parameters."""
    return max(HESSIAN_MIN_PIXELS, HESSIAN_PIXELS_PER_PARAM * int(params))


@dataclass
class _Frames:
    """B' frames of the batch at the linearisation point: rotations rot (B', 3, 3) and their
    angle derivatives drot (B', 3, 3, 3) ([:, k] = ∂M/∂angle_k); world vertices, model-space
    shape and world normals (B', N, 3); albedo (B' or 1 when shared, N, 3); SH light gamma
    (B', 3, 9) with the ambient offset added; the frames' photometric camera."""

    rot: torch.Tensor
    drot: torch.Tensor
    verts: torch.Tensor
    shape: torch.Tensor
    normals: torch.Tensor
    albedo: torch.Tensor
    gamma: torch.Tensor
    camera: Camera        # per-frame when the photometric camera is (crops of one frame camera differ)

    def albedo_at(self, vids: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """(U, 3) albedo at the vertices ``vids`` (U,) of the flattened B' x N vertices
        (``local``: the same vertices' ids within their frame)."""
        if self.albedo.shape[0] == 1:
            return self.albedo[0].index_select(0, local)
        return self.albedo.reshape(-1, 3).index_select(0, vids)


class PhotometricProblem:
    """SPEC §4's loss of B independent frames and its Gauss-Newton model.

    Args:
        objective: the :class:`core.fit.objective.Objective` (model, renderer, crop
            camera, weights).
        landmarks: (B, L, 2) target points in crop pixels.
        images: (B, S, S, 3) 0..255 targets at the photometric camera's size.
        camera: the photometric camera (the crop camera or a coarse one).
        groups: optimised groups, in the order of the parameter vector.
        pose_ref: optional reference pose (temporal regulariser).
        cached: optional ``identity`` / ``albedo`` for fixed id / tex.
        columns: optional {group: (K_g,) long} the optimised coefficients of a group (by
            default all); the others keep their values (used to skip coefficients whose
            basis column is zero, as in a model padded to a larger layout).
        hessian_pixels: covered pixels per frame the Hessian is assembled from (the
            gradient always uses every pixel); None: :func:`hessian_pixels` of the
            problem's parameter count.
    """

    def __init__(self, objective: Objective, landmarks: torch.Tensor, images: torch.Tensor, camera: Camera,
                 groups: Sequence[str], pose_ref=None, cached: Optional[Dict[str, torch.Tensor]] = None,
                 columns: Optional[Dict[str, torch.Tensor]] = None, hessian_pixels: Optional[int] = None):
        self.objective = objective
        self.hessian_pixels = None if hessian_pixels is None else int(hessian_pixels)
        self.model = objective.model
        self.cfg = objective.cfg
        self.landmarks = landmarks
        self.images = images
        self.camera = camera
        self.groups = tuple(groups)
        self.pose_ref = pose_ref
        self.cached = cached or {}
        self.columns = columns or {}

    def subset(self, idx: torch.Tensor) -> "PhotometricProblem":
        """The same problem for the frames ``idx`` (B',) only (frames are independent)."""
        def rows(v):
            return v if v is None or v.shape[0] == 1 else v[idx]

        objective = self.objective
        if objective.camera.batched:
            objective = objective.with_camera(objective.camera.take(idx))
        pose_ref = None if self.pose_ref is None else type(self.pose_ref)(angles=rows(self.pose_ref.angles),
                                                                          trans=rows(self.pose_ref.trans))
        return PhotometricProblem(objective, self.landmarks[idx], self.images[idx], self.camera.take(idx),
                                  self.groups, pose_ref, {k: rows(v) for k, v in self.cached.items()},
                                  self.columns, hessian_pixels=self.hessian_pixels)

    # -- the loss ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, c: Coeffs, keypoints: Optional[torch.Tensor]) -> State:
        """Per-frame total loss at ``c`` (B frames) with the given landmark vertex ids."""
        ev = self.objective.evaluate(c, self.landmarks, self.images, pose_ref=self.pose_ref, keypoints=keypoints,
                                     photo_camera=self.camera, cached=self.cached)
        return State(cost=self.objective.frame_costs(ev.terms), terms=ev.terms, coeffs=c, out=ev.out,
                     screen=ev.screen, pix_to_face=ev.pix_to_face, keypoints=keypoints)

    @torch.no_grad()
    def rekey(self, st: State, keypoints: Optional[torch.Tensor]) -> State:
        """``st`` with other landmark vertex ids (the silhouette moved with the pose): only
        the landmark term changes, nothing is rendered again (= evaluate(st.coeffs, keypoints))."""
        obj = self.objective
        terms = {**st.terms, "lm": obj.landmark_term(obj.output_landmarks(st.out, keypoints), self.landmarks)}
        return dataclasses.replace(st, terms=terms, cost=obj.frame_costs(terms), keypoints=keypoints)

    def priors(self) -> Dict[str, Tuple[float, Optional[torch.Tensor]]]:
        """group -> (weight, reference or None) of the quadratic priors (the objective's)."""
        return self.objective.priors(self.pose_ref, photo=True)

    # -- the Gauss-Newton model ------------------------------------------------------------
    def cols(self, c: Coeffs, g: str) -> torch.Tensor:
        """(K,) the optimised coefficient ids of group ``g``."""
        if g in self.columns:
            return self.columns[g]
        return torch.arange(getattr(c, g).shape[1], device=c.angles.device)

    def _basis(self, g: str) -> torch.Tensor:
        """(3N, K) the optimised basis columns of group ``g`` (id, exp, tex): :meth:`cols`,
        the objective's cached copy when they are its active columns."""
        cols = self.columns.get(g)
        if cols is not None and cols is self.objective.active_columns(g):
            return self.objective.active_basis(g)
        base = self.objective.basis(g)
        return base if cols is None else base.index_select(1, cols)

    def sizes(self, c: Coeffs):
        return [self.cols(c, g).numel() for g in self.groups]

    @torch.no_grad()
    def linearize(self, st: State, frames: Optional[torch.Tensor] = None,
                  with_priors: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gauss-Newton Hessian (B, P, P) and gradient (B, P) of the per-frame loss at ``st``.

        ``frames``: optional (B,) bool, the frames whose photometric term is needed (the
        others get only the cheap landmark and prior terms, e.g. frames already converged).
        ``with_priors``: False leaves out the quadratic priors (the data terms only)."""
        c = st.coeffs
        sizes = self.sizes(c)
        offs = dict(zip(self.groups, _offsets(sizes)))
        batch, p = c.angles.shape[0], sum(sizes)
        hess = c.angles.new_zeros(batch, p, p)
        grad = c.angles.new_zeros(batch, p)
        todo = torch.arange(batch, device=hess.device) if frames is None else frames.nonzero().squeeze(1)
        per_call = PHOTO_FRAMES_PER_CALL if hess.device.type == "cpu" else PHOTO_FRAMES_PER_CALL_GPU
        for sel in todo.split(per_call):
            hess[sel], grad[sel] = self._photo_frames(st, sel, offs, p)
        self._landmarks(st, offs, hess, grad)
        # Quadratic terms: regularisers and the temporal pose prior, the albedo smoothness.
        for g, (w, ref) in (self.priors() if with_priors else {}).items():
            if g not in offs or w == 0:
                continue
            sl = offs[g]
            x = getattr(c, g) if ref is None else getattr(c, g) - ref
            x = x[:, self.cols(c, g)]
            idx = torch.arange(sl.start, sl.stop, device=hess.device)
            hess[:, idx, idx] += 2 * w
            grad[:, sl] += 2 * w * x
        w_refl = self.objective.data_weights()["reflectance"]
        if "tex" in offs and w_refl != 0 and self.model.has_albedo_basis:
            qtq, qtq0 = self.objective.reflectance_quadratic()
            sl, cols = offs["tex"], self.cols(c, "tex")
            hess[:, sl, sl] += 2 * w_refl * qtq[cols][:, cols]
            grad[:, sl] += 2 * w_refl * (c.tex @ qtq[:, cols] + qtq0[cols])
        return hess, grad

    def _frames(self, st: State, sel: torch.Tensor) -> "_Frames":
        """The pieces of the frames ``sel`` (B',) every Jacobian below needs."""
        c, out = st.coeffs, st.out
        rot, verts = out.rotation.index_select(0, sel), out.vertices.index_select(0, sel)
        gam = c.gamma.index_select(0, sel).reshape(-1, 3, 9).clone()
        gam[:, :, 0] += AMBIENT_OFFSET
        albedo = out.albedo if out.albedo.shape[0] == 1 else out.albedo.index_select(0, sel)
        shape = torch.bmm(verts - c.trans.index_select(0, sel)[:, None], rot)
        return _Frames(rot=rot, verts=verts, shape=shape, normals=out.normals.index_select(0, sel), albedo=albedo,
                       gamma=gam, drot=euler_rotation_jacobian(c.angles.index_select(0, sel)),
                       camera=self.camera.take(sel))

    def _photo_frames(self, st: State, sel: torch.Tensor, offs: Dict[str, slice], p: int):
        """IRLS Gauss-Newton model of the photometric term of each of the frames ``sel``
        (B',): (B', P, P), (B', P). The frames' covered pixels and vertices are stacked, so
        the batch is one set of tensor operations, not one per frame.

        The gradient is exact: the per-pixel residuals are splatted onto per-vertex
        adjoints of the colours and screen positions, then taken back to the parameters
        (:meth:`_gradient`). Each frame's Hessian JᵀQJ is assembled from at most
        ``hessian_pixels`` of its covered pixels, evenly spaced (each standing for
        ``stride`` pixels): it only shapes the step, which the LM loop accepts on the exact
        loss."""
        model = self.model
        n, nb = model.num_vertices, sel.numel()
        p2f = st.pix_to_face.index_select(0, sel)
        pj = interpolation_jacobian(st.out.colors.index_select(0, sel), st.screen.index_select(0, sel), model.tri,
                                    p2f)
        dtype, device = st.screen.dtype, st.screen.device
        m = pj.idx.shape[0]
        if m == 0:
            return torch.zeros(nb, p, p, dtype=dtype, device=device), torch.zeros(nb, p, dtype=dtype, device=device)
        fid = torch.div(pj.idx, p2f.shape[1] * p2f.shape[2], rounding_mode="floor")  # (M,) each pixel's frame
        count = torch.bincount(fid, minlength=nb)                                    # (B',) covered pixels
        target = self.images.index_select(0, sel).reshape(-1, 3).index_select(0, pj.idx).T  # (3, M)
        r = pj.values.clamp(0.0, 255.0) - target
        live = ((pj.values > 0) & (pj.values < 255)).to(r.dtype)  # clamped channels: no slope
        rho = norm3(r, 0).clamp_min(RHO_MIN)
        # (M,) IRLS weights, each frame's term a mean over its own covered pixels
        q = self.objective.data_weights()["photo"] / (255.0 * count.index_select(0, fid).to(dtype)) / rho
        # Gradient: adjoint of each pixel value, splatted to its corners' colours / screen.
        adj = r * live * q  # (3, M)
        # Rows 0-2: the adjoint of corner k's colour channel c, w_k adj_c; rows 3-5: of its
        # screen coordinate d, sum_c d_verts[c, k, d] adj_c. (6, 3 corners, M), summed into
        # the vertices one row at a time (contiguous 1-D scatter-adds; elementwise products,
        # several times faster on a CPU than einsum's batched 3 x 3 products).
        vals = adj.new_empty(6, 3, m)
        torch.mul(adj[:, None], pj.weights[None], out=vals[:3])
        torch.mul(pj.d_verts[0].transpose(0, 1), adj[0], out=vals[3:])
        for c in (1, 2):
            vals[3:].addcmul_(pj.d_verts[c].transpose(0, 1), adj[c])
        u = torch.zeros(6, nb * n, dtype=dtype, device=device)
        flat = pj.vidx.reshape(-1)
        for row in range(6):
            u[row].index_add_(0, flat, vals[row].reshape(-1))
        fr = self._frames(st, sel)
        grad = self._gradient(st, fr, offs, p, u.T.view(nb, n, 6))
        # Hessian from every stride-th pixel of each frame (stride from its own count).
        stride = (-(-count // (self.hessian_pixels or hessian_pixels(p)))).clamp_min(1)  # (B',)
        first = torch.cumsum(count, 0) - count
        pos = torch.arange(m, device=device) - first.index_select(0, fid)               # rank within its frame
        pick = ((pos % stride.index_select(0, fid)) == 0).nonzero().squeeze(1)           # (K,)
        k, fk = pick.numel(), fid.index_select(0, pick)
        vids, corners = torch.unique(pj.vidx[:, pick].T.reshape(-1), return_inverse=True)
        table = self._vertex_jacobians(st, fr, offs, p, vids)             # (U, 6, P)
        corners = corners.view(k, 3)
        # Each pixel's rows: Σ over its corners of (3, 6) coefficients times the corner's
        # (6, P) table rows (colour weight w on the colour rows, d_verts on the screen rows).
        coef = torch.zeros(3, k, 3, 6, dtype=dtype, device=device)       # corner, pixel, channel, row
        w = pj.weights[:, pick]                                          # (3, K)
        for ch in range(3):
            coef[:, :, ch, ch] = w
        coef[..., 3:] = pj.d_verts[..., pick].permute(1, 3, 0, 2)
        jac = torch.bmm(coef[0], table.index_select(0, corners[:, 0]))  # (K, 3, P)
        for corner in (1, 2):
            jac.baddbmm_(coef[corner], table.index_select(0, corners[:, corner]))
        scale = q.index_select(0, pick) * stride.index_select(0, fk).to(dtype)
        jac *= (live[:, pick].T * scale.sqrt()[:, None])[..., None]
        # Each frame's JᵀJ over its own rows (the pixels are in frame order).
        hess = jac.new_empty(nb, p, p)
        ends = torch.cumsum(torch.bincount(fk, minlength=nb), 0).tolist()
        for b, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
            rows = jac[lo:hi].view(-1, p)
            torch.mm(rows.T, rows, out=hess[b])
        return hess, grad

    def _gradient(self, st: State, fr: "_Frames", offs: Dict[str, slice], p: int, u: torch.Tensor) -> torch.Tensor:
        """(B', P) Σ_v u_vᵀ J_v for per-vertex adjoints u (B', N, 6) of the colours (0-2) and
        screen positions (3-5) of the frames ``fr``, J_v the rows of :meth:`_vertex_jacobians`:
        the same chain rule, run backwards, so no per-vertex Jacobian is formed."""
        cfg = self.cfg
        nb = u.shape[0]
        grad = fr.verts.new_zeros(nb, p)
        u_color, u_screen = u[..., :3], u[..., 3:]
        # Screen -> world vertices -> the model-space shape (V = S Mᵀ + t).
        u_verts = (fr.camera.project_jacobian(fr.verts) * u_screen[..., None]).sum(-2)  # (B', N, 3)
        u_shape = torch.bmm(u_verts, fr.rot)
        y = sh_basis(fr.normals)                                                        # (B', N, 9)
        # Adjoint of the world normals: C_c = A_c Σ_k g_ck Y_k(n).
        lit = u_color * fr.albedo
        w = torch.bmm(lit, fr.gamma)  # (B', N, 9)
        u_normals = (w[..., None] * sh_basis_jacobian(fr.normals)).sum(-2)  # (B', N, 3)
        if "trans" in offs:
            grad[:, offs["trans"]] = u_verts.sum(1)
        if "angles" in offs:
            model_normals = torch.bmm(fr.normals, fr.rot)
            grad[:, offs["angles"]] = torch.stack(
                [(u_verts * torch.bmm(fr.shape, fr.drot[:, k].transpose(1, 2))).sum((1, 2))
                 + (u_normals * torch.bmm(model_normals, fr.drot[:, k].transpose(1, 2))).sum((1, 2))
                 for k in range(3)], 1)
        if "gamma" in offs:
            grad[:, offs["gamma"]] = torch.bmm(lit.transpose(1, 2), y).reshape(nb, -1)
        if "tex" in offs:
            light = torch.bmm(y, fr.gamma.transpose(1, 2))
            grad[:, offs["tex"]] = (u_color * light).reshape(nb, -1) @ self._basis("tex")
        shape_groups = [g for g in ("id", "exp") if g in offs]
        if shape_groups:
            u_s = u_shape
            if cfg.normals_grad:
                u_s = u_s + self._normal_adjoint(fr, torch.bmm(u_normals, fr.rot))
            flat = u_s.reshape(nb, -1)
            for g in shape_groups:
                grad[:, offs[g]] = flat @ self._basis(g)
        return grad

    def _normal_adjoint(self, fr: "_Frames", u_model_normals: torch.Tensor) -> torch.Tensor:
        """(B', N, 3) adjoint of the model-space shape for the adjoint (B', N, 3) of the
        unit model-space normals (the transpose of :meth:`_normal_derivative`)."""
        model, shape = self.model, fr.shape
        nb, n, nf = shape.shape[0], model.num_vertices, model.tri.shape[0]
        p = shape[:, model.tri]                                # (B', F, 3, 3)
        e1, e2 = p[:, :, 0] - p[:, :, 1], p[:, :, 1] - p[:, :, 2]
        fn = torch.cross(e1, e2, dim=-1)
        fn = torch.cat([fn, fn.new_zeros(nb, 1, 3)], 1)        # point_buf's "no triangle"
        m = fn[:, model.point_buf].sum(2)                      # (B', N, 3) unnormalised normals
        norm = norm3(m, -1)[..., None].clamp_min(1e-12)
        unit = m / norm
        u_m = (u_model_normals - unit * (unit * u_model_normals).sum(-1, keepdim=True)) / norm
        u_fn = torch.zeros(nb, nf + 1, 3, dtype=shape.dtype, device=shape.device)
        u_fn.index_add_(1, model.point_buf.reshape(-1), u_m.repeat_interleave(model.point_buf.shape[1], 1))
        u_fn = u_fn[:, :nf]
        u_a = torch.cross(e2, u_fn, dim=-1)                    # fn = a × b: ∂/∂a = b × u, ∂/∂b = u × a
        u_b = torch.cross(u_fn, e1, dim=-1)
        out = torch.zeros(nb, n, 3, dtype=shape.dtype, device=shape.device)
        out.index_add_(1, model.tri[:, 0], u_a)
        out.index_add_(1, model.tri[:, 1], u_b - u_a)
        out.index_add_(1, model.tri[:, 2], -u_b)
        return out

    def _vertex_jacobians(self, st: State, fr: "_Frames", offs: Dict[str, slice], p: int,
                          vids: torch.Tensor) -> torch.Tensor:
        """Derivatives of the colours (rows 0-2) and screen (col, row, depth) (rows 3-5) at
        the vertices ``vids`` (U,) of the flattened B' x N vertices of the frames ``fr``
        (vertex v of frame b is b·N + v) w.r.t. each one's frame's parameters: (U, 6, P).
        With ``normals_grad`` off, the normals are held fixed in model space."""
        model = self.model
        n = model.num_vertices
        fidx = torch.div(vids, n, rounding_mode="floor")
        local = vids - fidx * n
        verts = fr.verts.reshape(-1, 3).index_select(0, vids)
        u = vids.numel()
        dverts = verts.new_zeros(u, 3, p)
        out = verts.new_zeros(u, 6, p)
        dcolor = out[:, :3]  # filled in place; rows 3-5 from dverts at the end
        normals = fr.normals.reshape(-1, 3).index_select(0, vids)
        albedo = fr.albedo_at(vids, local)
        rot, gamma = fr.rot.index_select(0, fidx), fr.gamma.index_select(0, fidx)  # (U, 3, 3), (U, 3, 9)
        y = sh_basis(normals)  # (U, 9)
        dlight = torch.bmm(gamma, sh_basis_jacobian(normals))  # (U, 3 colours, 3): ∂(Y·gammaᵀ)/∂normal
        for g, sl in offs.items():
            if g in ("id", "exp"):
                base = self._basis(g).view(n, 3, -1).index_select(0, local)
                dverts[:, :, sl] = rotate_rows(rot, base)
            elif g == "trans":
                dverts[:, :, sl] = torch.eye(3, dtype=verts.dtype, device=verts.device)
            elif g == "angles":
                drot = fr.drot.index_select(0, fidx)  # (U, 3, 3, 3)
                dverts[:, :, sl] = torch.einsum("ukij,uj->uik", drot, fr.shape.reshape(-1, 3).index_select(0, vids))
                model_normals = torch.einsum("ui,uij->uj", normals, rot)
                dn = torch.einsum("ukij,uj->uik", drot, model_normals)  # (U, 3, 3 angles)
                dcolor[:, :, sl] = albedo[:, :, None] * torch.bmm(dlight, dn)
            elif g == "tex":
                light = torch.einsum("uj,ucj->uc", y, gamma)  # (U, 3)
                tex = self._basis("tex").view(n, 3, -1).index_select(0, local)
                dcolor[:, :, sl] = tex * light[:, :, None]
            elif g == "gamma":
                for ch in range(3):
                    dcolor[:, ch, sl.start + 9 * ch: sl.start + 9 * ch + 9] = albedo[:, ch:ch + 1] * y
        shape_groups = [g for g in ("id", "exp") if g in offs]
        if self.cfg.normals_grad and shape_groups:  # the shading through the normals
            dn = self._normal_derivative(fr, vids, shape_groups)  # (U, 3, K_id + K_exp), world
            dshade = albedo[:, :, None] * torch.bmm(dlight, dn)  # (U, 3, K)
            start = 0
            for g in shape_groups:
                sl = offs[g]
                dcolor[:, :, sl] += dshade[:, :, start:start + sl.stop - sl.start]
                start += sl.stop - sl.start
        out[:, 3:] = torch.bmm(fr.camera.take(fidx).project_jacobian(verts), dverts)  # world -> screen
        return out

    def _normal_derivative(self, fr: "_Frames", vids: torch.Tensor, groups) -> torch.Tensor:
        """d(unit world normal)/d(coefficients of ``groups``, concatenated) at the vertices
        ``vids`` (U,) of the flattened B' x N vertices: (U, 3, K). The normal is the
        normalised sum m of the adjacent triangles' normals fn = (v1 − v2) × (v2 − v3)
        (core.models.geometry.vertex_normals). Each triangle's dfn is linear in its corners'
        displacements, dfn = A · d(shape) with A sparse (3T, 3N) over the T triangles next
        to ``vids`` (the bases are the same for every frame): e1 = v1 − v2, e2 = v2 − v3
        give −[e2]× at v1, [e2]× + [e1]× at v2 and −[e1]× at v3 ([a]× b = a × b); then
        dm = S · dfn with S (U, T) summing each vertex's triangles."""
        model = self.model
        n, nf = model.num_vertices, model.tri.shape[0]
        u, dtype, device = vids.numel(), fr.rot.dtype, vids.device
        fidx = torch.div(vids, n, rounding_mode="floor")
        pb = model.point_buf.index_select(0, vids - fidx * n)          # (U, Kb), nf: no triangle
        valid = pb < nf
        # The triangles next to the vertices, each frame's own: frame * nf + triangle.
        tids, slot = torch.unique((fidx[:, None] * nf + pb)[valid], return_inverse=True)  # (T,), (V,)
        t = tids.numel()
        tf = torch.div(tids, nf, rounding_mode="floor")
        corners = model.tri.index_select(0, tids - tf * nf)             # (T, 3) ids within the frame
        pts = fr.shape.reshape(-1, 3).index_select(0, (corners + (tf * n)[:, None]).reshape(-1)).view(t, 3, 3)
        e1, e2 = pts[:, 0] - pts[:, 1], pts[:, 1] - pts[:, 2]
        k1, k2 = skew(e1), skew(e2)                                   # (T, 3, 3)
        blocks = torch.stack([-k2, k2 + k1, -k1], dim=1)               # (T, 3 corners, 3 i, 3 l)
        # CSR, row 3t + i holding the 3 corners x 3 l entries of triangle t.
        cols = (3 * corners[..., None] + torch.arange(3, device=device))[:, None].expand(-1, 3, -1, -1)
        vals = blocks.permute(0, 2, 1, 3)
        crow = torch.arange(0, 3 * t + 1, device=device) * 9
        counts = valid.sum(1)
        srow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        with warnings.catch_warnings():  # "sparse CSR support is in beta": not the user's business
            warnings.simplefilter("ignore", UserWarning)
            a = torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), (3 * t, 3 * n), check_invariants=False)
            ring = torch.sparse_csr_tensor(srow, slot, torch.ones(slot.numel(), dtype=dtype, device=device), (u, t),
                                           check_invariants=False)
            dfn = (a @ self._shape_bases(groups)).view(t, -1)           # (T, 3K)
            dm = (ring @ dfn).view(u, 3, -1)                            # (U, 3, K)
            m = ring @ torch.cross(e1, e2, dim=-1)                      # (U, 3)
        norm = norm3(m, -1).clamp_min(1e-12)
        unit = m / norm[:, None]
        dunit = (dm - unit[..., None] * (unit[..., None] * dm).sum(1, keepdim=True)) / norm[:, None, None]
        return torch.bmm(fr.rot.index_select(0, fidx), dunit)

    def _shape_bases(self, groups) -> torch.Tensor:
        """(3N, K) the optimised columns of the ``groups`` bases side by side (cached)."""
        key = tuple(groups)
        cache = self.__dict__.setdefault("_bases", {})
        if key not in cache:
            cache[key] = torch.cat([self._basis(g) for g in groups], 1)
        return cache[key]

    def _landmarks(self, st: State, offs: Dict[str, slice], hess: torch.Tensor, grad: torch.Tensor) -> None:
        """Add the landmark term's Gauss-Newton model (exact Jacobian) to every frame."""
        geo = [g for g in GEOMETRY if g in offs]
        if not geo:
            return
        c, cam = st.coeffs, self.objective.camera
        jac = self.model.landmarks_3d_jacobian(c, geo, st.keypoints)
        dproj = cam.project_points_jacobian(jac["value"])  # (B, L, 2, 3)
        pts = cam.project_points(jac["value"])
        w = self.objective.landmark_residual_scale(pts, self.landmarks)
        r = ((pts - self.landmarks) * w).reshape(c.angles.shape[0], -1)
        batch, p = grad.shape
        full = r.new_zeros(batch, r.shape[1], p)
        for g in geo:
            jg = torch.einsum("blij,bljk->blik", dproj, jac[g][..., self.cols(c, g)]) * w[..., None]
            full[:, :, offs[g]] = jg.reshape(batch, r.shape[1], -1)
        hess += 2 * full.transpose(1, 2) @ full
        grad += 2 * (full.transpose(1, 2) @ r[..., None])[..., 0]


def _offsets(sizes):
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out
