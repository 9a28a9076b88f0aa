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

Every function is per frame: frames whose groups are all per-frame are independent
problems (the data terms summed over frames, as ``Objective.total`` scales them).
Shapes: B frames, N vertices, P optimised parameters (the groups' sizes, in order).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from core.models.coeffs import Coeffs
from core.models.geometry import AMBIENT_OFFSET, euler_rotation_jacobian, sh_basis, sh_basis_derivative
from core.render import interpolation_jacobian
from core.render.camera import Camera
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

GEOMETRY = ("id", "exp", "angles", "trans")


def hessian_pixels(params: int) -> int:
    """Covered pixels a frame's photometric Hessian is sampled at for ``params`` parameters."""
    return max(HESSIAN_MIN_PIXELS, HESSIAN_PIXELS_PER_PARAM * int(params))


@dataclass
class State:
    """The loss at one point: per-frame totals (B,) and what the linearisation reuses."""

    cost: torch.Tensor    # (B,) each frame's own total (Objective.frame_costs)
    terms: Dict[str, torch.Tensor]  # (B,) each unweighted term (Objective.evaluate)
    coeffs: Coeffs
    out: object          # FaceOutput
    screen: torch.Tensor  # (B, N, 3)
    pix_to_face: torch.Tensor  # (B, S, S)
    keypoints: Optional[torch.Tensor]


@dataclass
class _Frame:
    """One frame at the linearisation point: rotation (3, 3) and its angle derivatives
    drot (3, 3, 3), world vertices / model-space shape / world normals / albedo (N, 3),
    SH light gamma (3, 9) with the ambient offset added."""

    rot: torch.Tensor
    drot: torch.Tensor
    verts: torch.Tensor
    shape: torch.Tensor
    normals: torch.Tensor
    albedo: torch.Tensor
    gamma: torch.Tensor
    camera: Camera        # the frame's photometric camera (crops of one frame camera differ)


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
        for b in range(batch):
            if frames is not None and not bool(frames[b]):
                continue
            hb, gb = self._photo_frame(st, b, offs, p)
            hess[b] += hb
            grad[b] += gb
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

    def _frame(self, st: State, b: int) -> "_Frame":
        """The pieces of frame ``b`` every Jacobian below needs."""
        c = st.coeffs
        rot, verts = st.out.rotation[b], st.out.vertices[b]
        gam = c.gamma[b].reshape(3, 9).clone()
        gam[:, 0] += AMBIENT_OFFSET
        return _Frame(rot=rot, verts=verts, shape=(verts - c.trans[b]) @ rot, normals=st.out.normals[b],
                      albedo=st.out.albedo[min(b, st.out.albedo.shape[0] - 1)], gamma=gam,
                      drot=euler_rotation_jacobian(c.angles[b:b + 1])[0], camera=self.camera.frame(b))

    def _photo_frame(self, st: State, b: int, offs: Dict[str, slice], p: int):
        """IRLS Gauss-Newton model of frame ``b``'s photometric term: (P, P), (P,).

        The gradient is exact: the per-pixel residuals are splatted onto per-vertex
        adjoints of the colours and screen positions, then taken back to the parameters
        (:meth:`_gradient`). The Hessian JᵀQJ is assembled from at most
        ``hessian_pixels`` evenly spaced covered pixels (each standing for ``stride``
        pixels): it only shapes the step, which the LM loop accepts on the exact loss."""
        model = self.model
        n = model.num_vertices
        pj = interpolation_jacobian(st.out.colors[b:b + 1], st.screen[b:b + 1], model.tri,
                                    st.pix_to_face[b:b + 1])
        dtype, device = st.screen.dtype, st.screen.device
        hess = torch.zeros(p, p, dtype=dtype, device=device)
        m = pj.idx.shape[0]
        if m == 0:
            return hess, torch.zeros(p, dtype=dtype, device=device)
        target = self.images[b].reshape(-1, 3).index_select(0, pj.idx).T  # (3, M)
        r = pj.values.clamp(0.0, 255.0) - target
        live = ((pj.values > 0) & (pj.values < 255)).to(r.dtype)  # clamped channels: no slope
        rho = torch.linalg.vector_norm(r, dim=0).clamp_min(RHO_MIN)
        q = self.objective.data_weights()["photo"] / (255.0 * m) / rho  # (M,) IRLS weights
        # Gradient: adjoint of each pixel value, splatted to its corners' colours / screen.
        adj = r * live * q  # (3, M)
        u_color = torch.einsum("km,cm->kmc", pj.weights, adj)
        u_screen = torch.einsum("ckdm,cm->kmd", pj.d_verts, adj)
        u = torch.zeros(n, 6, dtype=dtype, device=device)
        u.index_add_(0, pj.vidx.reshape(-1), torch.cat([u_color, u_screen], dim=-1).reshape(-1, 6))
        fr = self._frame(st, b)
        grad = self._gradient(st, fr, offs, p, u)
        # Hessian from a subset of the pixels.
        stride = -(-m // (self.hessian_pixels or hessian_pixels(p)))
        sel = torch.arange(0, m, stride, device=device)
        k = sel.numel()
        vids, corners = torch.unique(pj.vidx[:, sel].T.reshape(-1), return_inverse=True)
        table = self._vertex_jacobians(st, fr, offs, p, vids)             # (U, 6, P)
        rows = table.index_select(0, corners).view(k, 18, p)             # corner-major, 6 rows each
        coef = torch.zeros(k, 3, 3, 6, dtype=dtype, device=device)       # pixel, channel, corner, row
        w = pj.weights[:, sel].T                                         # (K, 3)
        for ch in range(3):
            coef[:, ch, :, ch] = w
        coef[:, :, :, 3:] = pj.d_verts[..., sel].permute(3, 0, 1, 2)
        jac = torch.bmm(coef.view(k, 3, 18), rows)                       # (K, 3, P)
        jac *= (live[:, sel].T * (q[sel] * stride).sqrt()[:, None])[..., None]
        jac2 = jac.view(-1, p)
        hess += jac2.T @ jac2
        return hess, grad

    def _gradient(self, st: State, fr: "_Frame", offs: Dict[str, slice], p: int, u: torch.Tensor) -> torch.Tensor:
        """(P,) Σ_v u_vᵀ J_v for per-vertex adjoints u (N, 6) of the colours (0-2) and
        screen positions (3-5) of the frame ``fr``, J_v the rows of :meth:`_vertex_jacobians`:
        the same chain rule, run backwards, so no per-vertex Jacobian is formed."""
        model, c, cfg = self.model, st.coeffs, self.cfg
        n = model.num_vertices
        grad = fr.verts.new_zeros(p)
        u_color, u_screen = u[:, :3], u[:, 3:]
        # Screen -> world vertices -> the model-space shape (V = S Mᵀ + t).
        u_verts = (fr.camera.project_jacobian(fr.verts) * u_screen[..., None]).sum(1)
        u_shape = u_verts @ fr.rot
        y = sh_basis(fr.normals)
        # Adjoint of the world normals: C_c = A_c Σ_k g_ck Y_k(n).
        w = (u_color * fr.albedo) @ fr.gamma  # (N, 9)
        eye = torch.eye(3, dtype=u.dtype, device=u.device)
        u_normals = torch.stack([(sh_basis_derivative(fr.normals, eye[i].expand(n, 3)) * w).sum(1)
                                 for i in range(3)], -1)
        if "trans" in offs:
            grad[offs["trans"]] = u_verts.sum(0)
        if "angles" in offs:
            model_normals = fr.normals @ fr.rot
            grad[offs["angles"]] = torch.stack([(u_verts * (fr.shape @ fr.drot[k].T)).sum()
                                                + (u_normals * (model_normals @ fr.drot[k].T)).sum()
                                                for k in range(3)])
        if "gamma" in offs:
            grad[offs["gamma"]] = ((u_color * fr.albedo).T @ y).reshape(-1)
        if "tex" in offs:
            light = y @ fr.gamma.T
            grad[offs["tex"]] = (u_color * light).reshape(-1) @ model.tex_base[:, self.cols(c, "tex")]
        shape_groups = [g for g in ("id", "exp") if g in offs]
        if shape_groups:
            u_s = u_shape
            if cfg.normals_grad:
                u_s = u_s + self._normal_adjoint(fr, u_normals @ fr.rot)
            flat = u_s.reshape(-1)
            for g in shape_groups:
                grad[offs[g]] = flat @ (model.id_base if g == "id" else model.exp_base)[:, self.cols(c, g)]
        return grad

    def _normal_adjoint(self, fr: "_Frame", u_model_normals: torch.Tensor) -> torch.Tensor:
        """(N, 3) adjoint of the model-space shape for the adjoint (N, 3) of the unit
        model-space normals (the transpose of :meth:`_normal_derivative`)."""
        model, shape = self.model, fr.shape
        n, nf = model.num_vertices, model.tri.shape[0]
        p = shape[model.tri]                                   # (F, 3, 3)
        e1, e2 = p[:, 0] - p[:, 1], p[:, 1] - p[:, 2]
        fn = torch.cross(e1, e2, dim=-1)
        fn = torch.cat([fn, fn.new_zeros(1, 3)])               # point_buf's "no triangle"
        m = fn[model.point_buf].sum(1)                        # (N, 3) unnormalised normals
        norm = m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = m / norm
        u_m = (u_model_normals - unit * (unit * u_model_normals).sum(-1, keepdim=True)) / norm
        u_fn = torch.zeros(nf + 1, 3, dtype=shape.dtype, device=shape.device)
        u_fn.index_add_(0, model.point_buf.reshape(-1), u_m.repeat_interleave(model.point_buf.shape[1], 0))
        u_fn = u_fn[:nf]
        u_a = torch.cross(e2, u_fn, dim=-1)                    # fn = a × b: ∂/∂a = b × u, ∂/∂b = u × a
        u_b = torch.cross(u_fn, e1, dim=-1)
        out = torch.zeros(n, 3, dtype=shape.dtype, device=shape.device)
        out.index_add_(0, model.tri[:, 0], u_a)
        out.index_add_(0, model.tri[:, 1], u_b - u_a)
        out.index_add_(0, model.tri[:, 2], -u_b)
        return out

    def _vertex_jacobians(self, st: State, fr: "_Frame", offs: Dict[str, slice], p: int,
                          vids: torch.Tensor) -> torch.Tensor:
        """Derivatives of the frame ``fr``'s colours (rows 0-2) and screen (col, row, depth)
        (rows 3-5) at the vertices ``vids`` (U,) w.r.t. the parameters: (U, 6, P).
        With ``normals_grad`` off, the normals are held fixed in model space."""
        model, c = self.model, st.coeffs
        n = model.num_vertices
        verts = fr.verts.index_select(0, vids)
        u = vids.numel()
        dverts = verts.new_zeros(u, 3, p)
        dcolor = verts.new_zeros(u, 3, p)
        normals = fr.normals.index_select(0, vids)
        albedo = fr.albedo.index_select(0, vids)
        y = sh_basis(normals)  # (U, 9)
        for g, sl in offs.items():
            if g in ("id", "exp"):
                base = (model.id_base if g == "id" else model.exp_base).view(n, 3, -1).index_select(0, vids)
                base = base[..., self.cols(c, g)]
                dverts[:, :, sl] = torch.einsum("ij,njk->nik", fr.rot, base)
            elif g == "trans":
                dverts[:, :, sl] = torch.eye(3, dtype=verts.dtype, device=verts.device)
            elif g == "angles":
                dverts[:, :, sl] = torch.einsum("kij,nj->nik", fr.drot, fr.shape.index_select(0, vids))
                model_normals = normals @ fr.rot
                for k in range(3):
                    dn = model_normals @ fr.drot[k].T
                    dy = sh_basis_derivative(normals, dn)  # (U, 9)
                    dcolor[:, :, sl.start + k] = albedo * (dy @ fr.gamma.T)
            elif g == "tex":
                light = y @ fr.gamma.T  # (U, 3)
                tex = model.tex_base.view(n, 3, -1).index_select(0, vids)[..., self.cols(c, "tex")]
                dcolor[:, :, sl] = tex * light[:, :, None]
            elif g == "gamma":
                for ch in range(3):
                    dcolor[:, ch, sl.start + 9 * ch: sl.start + 9 * ch + 9] = albedo[:, ch:ch + 1] * y
        shape_groups = [g for g in ("id", "exp") if g in offs]
        if self.cfg.normals_grad and shape_groups:  # the shading through the normals
            dn = self._normal_derivative(fr, vids, shape_groups)  # (U, 3, K_id + K_exp), world
            dy = sh_basis_derivative(normals[:, None, :].expand(-1, dn.shape[2], -1), dn.transpose(1, 2))
            dshade = albedo[:, :, None] * torch.einsum("ukj,cj->uck", dy, fr.gamma)
            start = 0
            for g in shape_groups:
                sl = offs[g]
                dcolor[:, :, sl] += dshade[:, :, start:start + sl.stop - sl.start]
                start += sl.stop - sl.start
        out = torch.empty(u, 6, p, dtype=verts.dtype, device=verts.device)
        out[:, :3] = dcolor
        out[:, 3:] = torch.bmm(fr.camera.project_jacobian(verts), dverts)  # world -> screen
        return out

    def _normal_derivative(self, fr: "_Frame", vids: torch.Tensor, groups) -> torch.Tensor:
        """d(unit world normal)/d(coefficients of ``groups``, concatenated) at the vertices
        ``vids``: (U, 3, K). The normal is the normalised sum m of the adjacent triangles'
        (v1 − v2) × (v2 − v3) (core.models.geometry.vertex_normals); dm is linear in the vertex
        displacements, dm = A · d(shape), with A sparse (3U, 3N): a triangle with edges
        e1 = v1 − v2, e2 = v2 − v3 contributes −[e2]× at v1, [e2]× + [e1]× at v2 and −[e1]×
        at v3 ([a]× b = a × b)."""
        model, rot = self.model, fr.rot
        n, nf = model.num_vertices, model.tri.shape[0]
        u = vids.numel()
        pb = model.point_buf.index_select(0, vids)                     # (U, Kb)
        valid = (pb < nf).to(rot.dtype)
        corners = model.tri.index_select(0, pb.clamp(max=nf - 1).reshape(-1)).view(u, -1, 3)
        pts = fr.shape.index_select(0, corners.reshape(-1)).view(u, -1, 3, 3)
        e1, e2 = pts[:, :, 0] - pts[:, :, 1], pts[:, :, 1] - pts[:, :, 2]
        m = (torch.cross(e1, e2, dim=-1) * valid[..., None]).sum(1)    # (U, 3)
        k1, k2 = _skew(e1), _skew(e2)                                  # (U, Kb, 3, 3)
        blocks = torch.stack([-k2, k2 + k1, -k1], dim=2) * valid[..., None, None, None]  # (U, Kb, 3 corners, 3, 3)
        # CSR, row 3u + i holding the Kb * 3 * 3 entries (triangle, corner, l) of vertex u.
        kb = pb.shape[1]
        cols = (3 * corners[..., None] + torch.arange(3, device=vids.device))         # (U, Kb, 3, 3 l)
        cols = cols[:, None].expand(-1, 3, -1, -1, -1).reshape(-1)                     # (U, 3 i, Kb, 3, 3)
        vals = blocks.permute(0, 3, 1, 2, 4).reshape(-1)
        crow = torch.arange(0, 3 * u + 1, device=vids.device) * (kb * 9)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": not the user's business
            warnings.simplefilter("ignore", UserWarning)
            a = torch.sparse_csr_tensor(crow, cols, vals, (3 * u, 3 * n), check_invariants=False)
        dm = (a @ self._shape_bases(groups)).view(u, 3, -1)              # (U, 3, K)
        norm = m.norm(dim=-1).clamp_min(1e-12)
        unit = m / norm[:, None]
        dunit = (dm - unit[..., None] * (unit[..., None] * dm).sum(1, keepdim=True)) / norm[:, None, None]
        return torch.einsum("ij,ujk->uik", rot, dunit)

    def _shape_bases(self, groups) -> torch.Tensor:
        """(3N, K) the optimised columns of the ``groups`` bases side by side (cached)."""
        key = tuple(groups)
        cache = self.__dict__.setdefault("_bases", {})
        if key not in cache:
            c = self.model.layout.zeros(1, dtype=self.model.id_base.dtype, device=self.model.id_base.device)
            cache[key] = torch.cat([(self.model.id_base if g == "id" else self.model.exp_base)[:, self.cols(c, g)]
                                    for g in groups], 1)
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


def _map_frames(fn, st: State, *others: State) -> State:
    """A state whose per-frame tensors (first dim B = the batch) are ``fn`` of ``st``'s and
    the same fields of ``others``; values shared by the frames (batch 1), scalars and
    missing ones (None) are ``st``'s as they are."""
    batch = st.cost.shape[0]

    def each(v, *w):
        per_frame = torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch
        return fn(v, *w) if per_frame and all(torch.is_tensor(x) for x in w) else v

    out = None if st.out is None else dataclasses.replace(st.out, **{
        f.name: each(getattr(st.out, f.name), *(getattr(o.out, f.name) for o in others))
        for f in dataclasses.fields(st.out)})
    return State(cost=each(st.cost, *(o.cost for o in others)),
                 terms={k: each(v, *(o.terms[k] for o in others)) for k, v in st.terms.items()},
                 coeffs=Coeffs(**{k: each(v, *(getattr(o.coeffs, k) for o in others))
                                  for k, v in st.coeffs.as_dict().items()}),
                 out=out, screen=each(st.screen, *(o.screen for o in others)),
                 pix_to_face=each(st.pix_to_face, *(o.pix_to_face for o in others)),
                 keypoints=each(st.keypoints, *(o.keypoints for o in others)))


def take_state(st: State, keep: torch.Tensor) -> State:
    """The state of the frames ``keep`` ((B,) bool or (B',) ids) of a batch: every per-frame
    tensor indexed (values shared by the frames, batch 1, kept as they are)."""
    return _map_frames(lambda v: v[keep], st)


def merge_states(better: torch.Tensor, new: State, old: State) -> State:
    """Frame by frame, ``new`` where ``better`` (B,) bool, else ``old``: two states of the
    same frames (same landmark vertex ids per frame where both have them). Values shared
    by the frames (batch 1) are the same in both and kept. No rendering: the result is
    what evaluating each frame at its chosen point gives."""
    return _map_frames(lambda a, b: torch.where(better.view(-1, *([1] * (a.dim() - 1))), a, b), new, old)


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices: _skew(a) @ b = a × b."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2)


def _offsets(sizes):
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out
