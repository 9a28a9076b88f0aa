"""The fitting engine: rigid then non-rigid stages (SPEC §4), batched over frames.

Stages, each a method of :class:`Fitter`:

* ``rigid``: pose (angles, trans) from the landmarks only, on the L landmark vertices
  (no rendering). Adam as in the original, or Levenberg-Marquardt (``rigid_solver="lm"``).
* ``landmark_init``: optional LM on pose + identity + expression against the landmarks
  with the regularisers, a cheap starting point for the photometric stage.
* ``photometric``: Adam on every optimised group with the full loss of SPEC §4,
  rendering each iteration.

Identity and albedo can be shared by all B frames (video shape estimation) or held
fixed (per-frame video fitting); the pose can be pulled towards a reference pose.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from . import losses as L
from core import threads
from core.render.camera import Camera
from core.models.coeffs import Coeffs
from .config import FitConfig
from .gauss_newton import PhotometricProblem
from core.models.geometry import sh_basis
from core.models.face_model import FaceModel

log = logging.getLogger(__name__)

POSE = ("angles", "trans")
NONRIGID = ("id", "exp", "tex", "gamma", "angles", "trans")
# Levenberg-Marquardt damping of the photometric Gauss-Newton solver: start, and the
# factors applied after a step that lowered / did not lower a frame's loss.
GN_LAMBDA0, GN_LAMBDA_DOWN, GN_LAMBDA_UP = 1e-2, 0.3, 10.0
# A frame's GN stage ends early once a step gains less than GN_RTOL of its loss, or once
# its damping exceeds GN_LAMBDA_MAX (steps too short to matter).
GN_RTOL, GN_LAMBDA_MAX = 1e-4, 1e3


@dataclass
class FitResult:
    """Fitted coefficients (per-frame, shared groups expanded to B) and diagnostics."""

    coeffs: Coeffs
    losses: Dict[str, float]
    timings: Dict[str, float] = field(default_factory=dict)
    keypoints: Optional[torch.Tensor] = None  # (B, L) landmark vertex ids used at the end


@dataclass(frozen=True)
class PoseRef:
    """Reference pose for the temporal regulariser: angles (B, 3), trans (B, 3)."""

    angles: torch.Tensor
    trans: torch.Tensor


def expand(coeffs: Coeffs, batch: int) -> Coeffs:
    """Broadcast groups stored with batch 1 (shared by all frames) to ``batch``."""
    return Coeffs(**{k: (v.expand(batch, -1) if v.shape[0] == 1 and batch > 1 else v)
                     for k, v in coeffs.as_dict().items()})


class Fitter:
    """Fits a :class:`FaceModel` to landmarks and images.

    Args:
        model: the face model (on the target device).
        renderer: a :class:`core.render.MeshRenderer` (or anything with the same call).
        camera: the pinhole camera; ``camera.image_size`` is the fitted crop size.
        config: weights, learning rates and iteration counts.
        progress: show tqdm progress bars.
    """

    def __init__(self, model: FaceModel, renderer, camera: Camera, config: FitConfig, progress: bool = True):
        self.model = model
        self.renderer = renderer
        self.camera = camera
        self.cfg = config
        self.progress = progress
        p = next(iter(model.buffers()))
        self.device, self.dtype = p.device, p.dtype
        self.lm_weights = L.landmark_weights(model.num_landmarks, dtype=self.dtype, device=self.device)

    # -- helpers -------------------------------------------------------------------------
    def zeros(self, batch: int) -> Coeffs:
        return self.model.layout.zeros(batch, dtype=self.dtype, device=self.device)

    def project_landmarks(self, coeffs: Coeffs, keypoints: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, 2) image points of the model's landmarks (fast path); ``keypoints``
        (B, L) optionally overrides the landmark vertex ids per frame."""
        return self.camera.project_points(self.model.landmarks_3d(coeffs, keypoints))

    @torch.no_grad()
    def select_keypoints(self, coeffs: Coeffs, landmarks: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-frame landmark vertex ids (B, L) with the contour landmarks moved to the
        silhouette (models with a contour definition), or None (fixed keypoints)."""
        if not self.model.has_contour:
            return None
        c = expand(coeffs, landmarks.shape[0])
        return self.model.contour_keypoints(c, self.camera.project_points, landmarks)

    def render(self, coeffs: Coeffs, albedo: Optional[torch.Tensor] = None, camera: Optional[Camera] = None,
               identity: Optional[torch.Tensor] = None, normals_grad: bool = True):
        """Render (B, S, S, 4) RGBA of the model at ``coeffs`` (S = the camera's image
        size, default the fitted crop size) and return it with the model output.
        ``albedo`` / ``identity``: cached pieces for fixed tex / id (see FaceModel)."""
        camera = camera or self.camera
        out = self.model(coeffs, albedo=albedo, identity=identity, normals_grad=normals_grad)
        screen = camera.project(out.vertices)
        size = camera.image_size
        rgba = self.renderer(screen, self.model.tri, out.colors, (size, size))
        return rgba, out

    def loss_terms(self, coeffs: Coeffs, landmarks: torch.Tensor, images: Optional[torch.Tensor],
                   pose_ref: Optional[PoseRef] = None, with_photo: bool = True,
                   keypoints: Optional[torch.Tensor] = None, photo_camera: Optional[Camera] = None,
                   cached: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Every loss term of SPEC §4 (unweighted) and the weighted ``total``.

        Args:
            coeffs: per-frame or shared (batch 1) groups.
            landmarks: (B, L, 2) target image points.
            images: (B, T, T, 3) 0..255 target crops, or None (landmark terms only).
            keypoints: optional (B, L) per-frame landmark vertex ids.
            photo_camera: the camera of the photometric term when ``images`` are at
                another resolution than the crop (coarse-to-fine); landmarks always use
                the crop's camera.
            cached: optional ``identity`` / ``albedo`` precomputed for fixed id / tex.
        """
        cfg = self.cfg
        batch = landmarks.shape[0]
        c = expand(coeffs, batch)
        terms: Dict[str, torch.Tensor] = {}
        if with_photo and images is not None:
            cached = cached or {}
            rgba, out = self.render(c, albedo=cached.get("albedo"), identity=cached.get("identity"),
                                    camera=photo_camera, normals_grad=cfg.normals_grad)
            mask = (rgba[..., 3] > 0).to(rgba.dtype)
            terms["photo"] = L.photo_loss(rgba[..., :3], images, mask)
            terms["reflectance"] = L.reflectance_loss(out.albedo, self.model.skinmask)
            verts = out.landmarks if keypoints is None else \
                out.vertices.gather(1, keypoints[..., None].expand(-1, -1, 3))
            lms = self.camera.project_points(verts)
        else:
            lms = self.project_landmarks(c, keypoints)
        terms["lm"] = L.landmark_loss(lms, landmarks, self.lm_weights, self.camera.image_size)
        terms["id_reg"] = L.l2(coeffs.id)
        terms["exp_reg"] = L.l2(coeffs.exp)
        terms["tex_reg"] = L.l2(coeffs.tex)
        # Data terms are means over the batch and regularisers sums (SPEC §4). When every
        # group is per-frame the frames are independent problems: scale the data terms by
        # B so the total is the sum of the per-frame totals and a frame's fit does not
        # depend on what it is batched with. With shared groups (video shape fit) keep
        # the original's mean-data + summed-prior balance.
        shared = any(v.shape[0] == 1 for v in coeffs.as_dict().values()) and batch > 1
        scale = 1.0 if shared else float(batch)
        data = cfg.lm_loss_w * terms["lm"]
        if "photo" in terms:
            data = data + cfg.tex_w * terms["reflectance"] + cfg.rgb_loss_w * terms["photo"]
        total = scale * data + cfg.id_reg_w * terms["id_reg"] + cfg.exp_reg_w * terms["exp_reg"]
        if "photo" in terms:
            total = total + cfg.tex_reg_w * terms["tex_reg"]
        if pose_ref is not None:
            terms["rot_reg"] = L.l2(c.angles - pose_ref.angles)
            terms["trans_reg"] = L.l2(c.trans - pose_ref.trans)
            total = total + cfg.rot_reg_w * terms["rot_reg"] + cfg.trans_reg_w * terms["trans_reg"]
        terms["total"] = total
        return terms

    # -- stages ------------------------------------------------------------------------
    def rigid(self, coeffs: Coeffs, landmarks: torch.Tensor, iters: int,
              pose_ref: Optional[PoseRef] = None) -> Coeffs:
        """Fit angles and trans to the landmarks (the other groups held)."""
        if iters <= 0:
            return coeffs
        if self.cfg.rigid_solver == "lm":
            return self._lm(coeffs, landmarks, POSE, iters, pose_ref=pose_ref, desc="rigid (LM)")
        return self._adam(coeffs, landmarks, iters, POSE, self.cfg.rf_lr, pose_ref, photo=False, desc="rigid")

    def landmark_init(self, coeffs: Coeffs, landmarks: torch.Tensor, iters: int,
                      groups: Sequence[str] = ("angles", "trans", "id", "exp"),
                      pose_ref: Optional[PoseRef] = None) -> Coeffs:
        """LM on pose, identity and expression against the landmarks plus regularisers."""
        if iters <= 0:
            return coeffs
        return self._lm(coeffs, landmarks, tuple(groups), iters, pose_ref=pose_ref, desc="landmark init (LM)")

    def photometric(self, coeffs: Coeffs, landmarks: torch.Tensor, images: torch.Tensor, iters: int,
                    groups: Sequence[str] = NONRIGID, pose_ref: Optional[PoseRef] = None) -> Coeffs:
        """Minimise the full loss over ``groups``, rendering every iteration: Adam, or with
        ``nonrigid_solver="gn"`` Gauss-Newton / LM steps (``iters`` the most steps).

        With ``coarse_size`` set, the first ``iters - fine_iters`` iterations compare the
        render and the crops at that lower resolution (one Adam state throughout)."""
        if iters <= 0:
            return coeffs
        cfg = self.cfg
        if cfg.init_light:
            coeffs = self.init_appearance(coeffs, images, albedo=cfg.init_albedo and "tex" in groups
                                          and self.model.has_albedo_basis)
        shared = any(getattr(coeffs, g).shape[0] == 1 for g in groups) and landmarks.shape[0] > 1
        size = self.camera.image_size
        schedule = [(None, images, iters)]
        if 0 < cfg.coarse_size < size and iters > cfg.fine_iters:
            cam, small = self.coarse(images, cfg.coarse_size)
            schedule = [(cam, small, iters - cfg.fine_iters), (None, images, cfg.fine_iters)]
        if cfg.nonrigid_solver == "gn":
            if shared:
                return self._gn_shared(coeffs, landmarks, schedule, tuple(groups), pose_ref,
                                       desc="non-rigid, shared groups (GN)")
            return self._gn(coeffs, landmarks, schedule, tuple(groups), pose_ref, desc="non-rigid (GN)")
        return self._adam(coeffs, landmarks, schedule, tuple(groups), self.cfg.nrf_lr, pose_ref,
                          photo=True, desc="non-rigid")

    def coarse(self, images: torch.Tensor, size: int):
        """A camera and the crops (B, T, T, 3) at ``size`` pixels: same view, each coarse
        pixel the average of the crop pixels it covers."""
        t = self.camera.image_size
        s = size / t
        cam = Camera(focal=self.camera.focal * s, distance=self.camera.distance, image_size=size)
        x = images.permute(0, 3, 1, 2)
        if t % size == 0:
            x = torch.nn.functional.avg_pool2d(x, t // size)
        else:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
        return cam, x.permute(0, 2, 3, 1).contiguous()

    def fit(self, landmarks: torch.Tensor, images: Optional[torch.Tensor], init: Optional[Coeffs] = None,
            rf_iters: Optional[int] = None, nrf_iters: Optional[int] = None,
            nonrigid_groups: Sequence[str] = NONRIGID, pose_ref: Optional[PoseRef] = None,
            losses: bool = True) -> FitResult:
        """The whole single-image schedule: rigid, (landmark init), photometric.

        Args:
            landmarks: (B, L, 2) target points in crop pixels.
            images: (B, T, T, 3) crops, 0..255 (None: landmark-only fit).
            init: starting coefficients (default all zero, as in the original).
            losses: evaluate every loss term at the result (one more render) into
                ``FitResult.losses`` (else it is empty).
        """
        cfg = self.cfg
        batch = landmarks.shape[0]
        rf = cfg.first_rf_iters if rf_iters is None else rf_iters
        nrf = cfg.first_nrf_iters if nrf_iters is None else nrf_iters
        coeffs = self.zeros(batch) if init is None else init
        t = {}
        t0 = time.perf_counter()
        coeffs = self.rigid(coeffs, landmarks, rf, pose_ref=pose_ref)
        t["rigid_s"] = time.perf_counter() - t0
        if cfg.lm_init_iters > 0:
            t0 = time.perf_counter()
            lm_groups = [g for g in ("angles", "trans", "id", "exp") if g in nonrigid_groups]
            coeffs = self.landmark_init(coeffs, landmarks, cfg.lm_init_iters, groups=lm_groups, pose_ref=pose_ref)
            t["landmark_init_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if images is not None:
            coeffs = self.photometric(coeffs, landmarks, images, nrf, groups=nonrigid_groups, pose_ref=pose_ref)
        t["nonrigid_s"] = time.perf_counter() - t0
        kp = self.select_keypoints(coeffs, landmarks)
        terms = {}
        if losses:
            with torch.no_grad():
                terms = self.loss_terms(coeffs, landmarks, images, pose_ref=pose_ref, keypoints=kp)
        if kp is None:
            kp = self.model.keypoints.expand(batch, -1)
        return FitResult(coeffs=expand(coeffs, batch).detach(),
                         losses={k: float(v) for k, v in terms.items()}, timings=t, keypoints=kp)

    # -- light and albedo ----------------------------------------------------------------
    @torch.no_grad()
    def init_appearance(self, coeffs: Coeffs, images: torch.Tensor, albedo: bool = True, rounds: int = 2,
                        ridge: float = 400.0) -> Coeffs:
        """Least-squares SH light (and albedo coefficients) from the image colours at the
        visible vertices, for the current shape and pose.

        The colour model I_c(v) = T_c(v) · Σ_k Y_k(v) g_ck is linear in the light g for a
        fixed albedo and linear in tex for a fixed light, so both are small ridge
        regressions, alternated ``rounds`` times. ``ridge`` is the colour noise variance
        (0..255 units) against the albedo prior N(0, 1). Shared (batch 1) groups are solved
        over all frames at once.
        """
        batch = images.shape[0]
        c = expand(coeffs, batch)
        out = self.model(c)
        screen = self.camera.project(out.vertices)
        size = self.camera.image_size
        frags = self.renderer.rasterize(screen, self.model.tri, (size, size))
        vis = torch.zeros(batch, self.model.num_vertices, dtype=torch.bool, device=self.device)
        for b in range(batch):
            faces = frags.pix_to_face[b][frags.pix_to_face[b] >= 0].unique()
            vis[b, self.model.tri[faces].reshape(-1)] = True
        vis &= (self.model.skinmask > 0)[None]
        # Keep vertices well inside the face: at the silhouette the image colour at a
        # vertex mixes in the background (or hair), outliers a least-squares fit follows.
        covered = (frags.pix_to_face >= 0).to(self.dtype)[:, None]
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
        eye9 = torch.eye(9, dtype=self.dtype, device=self.device)
        for r in range(rounds):
            alb = self.model.albedo(tex) if self.model.has_albedo_basis else out.albedo
            g = torch.empty(batch, 3, 9, dtype=self.dtype, device=self.device)
            for b in range(batch):
                for ch in range(3):
                    a = y[b, vis[b]] * alb[b, vis[b], ch:ch + 1]
                    g[b, ch] = torch.linalg.solve(a.T @ a + 1e-6 * a.shape[0] * eye9, a.T @ target[b, vis[b], ch])
            gamma = (g - torch.tensor([0.8] + [0.0] * 8, dtype=self.dtype, device=self.device)).reshape(batch, 27)
            if coeffs.gamma.shape[0] == 1 and batch > 1:
                gamma = gamma.mean(0, keepdim=True).expand(batch, -1)
            if not albedo or r == rounds - 1:
                break
            light = torch.bmm(y, g.transpose(1, 2))                             # (B, N, 3)
            k = self.model.layout.n_tex
            base = self.model.tex_base.reshape(-1, 3, k)                        # (N, 3, K)
            mean = self.model.meantex.reshape(-1, 3)
            shared = coeffs.tex.shape[0] == 1 and batch > 1
            lhs = ridge * torch.eye(k, dtype=self.dtype, device=self.device)
            rhs = torch.zeros(k, dtype=self.dtype, device=self.device)
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
        if albedo and self.model.has_albedo_basis:
            new["tex"] = tex[:1] if coeffs.tex.shape[0] == 1 and batch > 1 else tex
        return coeffs.replace(**new)

    # -- optimisers ----------------------------------------------------------------------
    def _adam(self, coeffs: Coeffs, landmarks, schedule, groups: Tuple[str, ...], lr: float,
              pose_ref: Optional[PoseRef], photo: bool, desc: str) -> Coeffs:
        """Adam on ``groups``. ``schedule``: an iteration count (landmark terms only) or a
        list of (photo camera or None, images, iterations) run one after the other."""
        if isinstance(schedule, int):
            schedule = [(None, None, schedule)]
        leaves = {g: getattr(coeffs, g).detach().clone().requires_grad_(True) for g in groups}
        params = []
        for g, t in leaves.items():
            scale = self.cfg.gamma_lr_scale if g == "gamma" else 1.0
            params.append({"params": [t], "lr": lr * scale})
        opt = torch.optim.Adam(params, lr=lr)
        fixed = {k: v.detach() for k, v in coeffs.as_dict().items() if k not in leaves}
        cached = self._fixed_pieces(fixed) if photo else {}
        total_iters = sum(n for _, _, n in schedule)
        bar = tqdm(total=total_iters, desc=desc, disable=not self.progress, leave=False)
        for cam, images, iters in schedule:
            for _ in range(iters):
                threads.tick()
                c = Coeffs(**fixed, **leaves)
                kp = self.select_keypoints(c, landmarks)
                terms = self.loss_terms(c, landmarks, images, pose_ref=pose_ref, with_photo=photo, keypoints=kp,
                                        photo_camera=cam, cached=cached)
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                opt.step()
                bar.update(1)
        bar.close()
        return Coeffs(**fixed, **{k: v.detach() for k, v in leaves.items()})

    def _fixed_pieces(self, fixed: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The parts of the forward model that fixed id / tex make constant."""
        cached = {}
        with torch.no_grad():
            if "id" in fixed:
                cached["identity"] = self.model.identity(fixed["id"])
            if "tex" in fixed:
                cached["albedo"] = self.model.albedo(fixed["tex"])
        return cached

    def _active_columns(self, group: str) -> torch.Tensor:
        """(K,) ids of the coefficients of ``group`` (id, exp or tex) whose basis column is
        not all zero: the others change the loss only through their prior (whose
        minimiser is zero)."""
        cache = self.__dict__.setdefault("_active", {})
        if group not in cache:
            base = {"id": self.model.id_base, "exp": self.model.exp_base, "tex": self.model.tex_base}[group]
            cache[group] = torch.nonzero(base.abs().amax(0) > 0).reshape(-1)
        return cache[group]

    def _gn_setup(self, coeffs: Coeffs, groups: Sequence[str], batch: int):
        """What both Gauss-Newton solvers start from: the coefficients expanded to the
        batch, the fixed groups and the model pieces they make constant, the optimised
        columns of id / exp / tex (``columns``) and of every group (``cols``), and the
        full group values the optimised columns are written into (``start``)."""
        c = expand(coeffs, batch)
        fixed = {k: v for k, v in c.as_dict().items() if k not in groups}
        cached = self._fixed_pieces({k: getattr(coeffs, k) for k in fixed})
        columns = {g: self._active_columns(g) for g in groups if g in ("id", "exp", "tex")}
        cols = {g: columns.get(g, torch.arange(getattr(c, g).shape[1], device=self.device)) for g in groups}
        # Coefficients outside cols only enter their prior: its minimiser, zero.
        start = {g: torch.zeros_like(getattr(c, g)) if g in columns else getattr(c, g).detach() for g in groups}
        return c, fixed, cached, columns, cols, start

    def _gn_bar(self, schedule, desc: str):
        """The progress bar of a Gauss-Newton fit: one tick per step of ``schedule``."""
        return tqdm(total=sum(n for _, _, n in schedule), desc=desc, disable=not self.progress, leave=False)

    def _gn_stages(self, schedule, landmarks: torch.Tensor, groups: Sequence[str],
                   pose_ref: Optional[PoseRef], cached, columns):
        """(PhotometricProblem, steps) of each stage of ``schedule`` that has steps, both
        Gauss-Newton solvers' stage loop: the stage's camera (the photo camera when None)
        and images, the optimised groups in their order and the fixed model pieces."""
        for cam, images, steps in schedule:
            if steps > 0:
                yield PhotometricProblem(self, landmarks, images, cam or self.camera, groups, pose_ref, cached,
                                         columns), steps

    def _gn(self, coeffs: Coeffs, landmarks: torch.Tensor, schedule, groups: Tuple[str, ...],
            pose_ref: Optional[PoseRef], desc: str) -> Coeffs:
        """Levenberg-Marquardt on the full per-frame loss with the Gauss-Newton model of
        :mod:`core.fit.gauss_newton` (IRLS photometric term, exact landmark and prior terms).

        ``schedule``: (photo camera or None, images, steps) stages as for :meth:`_adam`;
        a step solves the damped normal equations and keeps the result for the frames
        whose exact loss went down (each frame has its own damping); ``steps`` is the most:
        a stage stops when every frame has converged (GN_RTOL, GN_LAMBDA_MAX). Every
        group must be per-frame (frames are independent problems)."""
        batch = landmarks.shape[0]
        c, fixed, cached, columns, cols, start = self._gn_setup(coeffs, groups, batch)
        sizes = [cols[g].numel() for g in groups]
        x = torch.cat([getattr(c, g)[:, cols[g]] for g in groups], dim=1).detach()

        def unpack(v):
            parts = dict(zip(groups, torch.split(v, sizes, dim=1)))
            return Coeffs(**fixed, **{g: start[g].index_copy(1, cols[g], parts[g]) for g in groups})

        bar = self._gn_bar(schedule, desc)
        for prob, steps in self._gn_stages(schedule, landmarks, groups, pose_ref, cached, columns):
            kp = self.select_keypoints(unpack(x), landmarks)
            st = prob.evaluate(unpack(x), kp)
            hess, grad = prob.linearize(st)
            lam = torch.full((batch,), GN_LAMBDA0, dtype=torch.float64, device=self.device)
            done = torch.zeros(batch, dtype=torch.bool, device=self.device)
            for step in range(steps):
                threads.tick()
                h = hess.double()
                damp = lam[:, None] * torch.diagonal(h, dim1=1, dim2=2) + 1e-12
                delta = _solve_each(h + torch.diag_embed(damp), -grad.double()).to(x.dtype)
                delta = torch.where(done[:, None], torch.zeros_like(delta), delta)
                trial = prob.evaluate(unpack(x + delta), kp)
                better = (trial.cost < st.cost) & ~done
                # A frame is done when a step gains less than GN_RTOL of its loss, or when
                # the damping has grown so large that steps no longer move it.
                small = better & (st.cost - trial.cost < GN_RTOL * st.cost)
                lam = torch.where(better, lam * GN_LAMBDA_DOWN, lam * GN_LAMBDA_UP).clamp(1e-8, 1e8)
                done |= small | (lam > GN_LAMBDA_MAX)
                bar.update(1)
                if bool(better.any()):
                    x = torch.where(better[:, None], x + delta, x)
                if bool(done.all()) or step == steps - 1:
                    break
                if not bool(better.any()):
                    continue
                if bool(better.all()) and not self.model.has_contour:
                    st = trial
                else:  # some frames kept their old point, or the contour moves: re-evaluate
                    kp = self.select_keypoints(unpack(x), landmarks)
                    st = prob.evaluate(unpack(x), kp)
                # Frames that did not move (or are done) keep their Gauss-Newton model.
                moved = better & ~done
                h_new, g_new = prob.linearize(st, frames=moved)
                hess = torch.where(moved[:, None, None], h_new, hess)
                grad = torch.where(moved[:, None], g_new, grad)
        bar.close()
        return Coeffs(**{k: v.detach() for k, v in unpack(x).as_dict().items()})

    def _gn_shared(self, coeffs: Coeffs, landmarks: torch.Tensor, schedule, groups: Tuple[str, ...],
                   pose_ref: Optional[PoseRef], desc: str) -> Coeffs:
        """Levenberg-Marquardt with the Gauss-Newton model when some groups are shared by
        the B frames (batch 1 in ``coeffs``; the video identity/albedo fit).

        The loss is Fitter.loss_terms' for shared groups: the mean over the frames of the
        data terms plus every prior once (a shared group's once, a per-frame group's for
        every frame). One system over [shared | frame 1 | ... | frame B] parameters: the
        frames' Gauss-Newton models (data terms) averaged into the shared block and its
        couplings, the priors added on the diagonal; one damping for the whole fit."""
        batch = landmarks.shape[0]
        shared = [g for g in groups if getattr(coeffs, g).shape[0] == 1]
        order = tuple(shared + [g for g in groups if g not in shared])
        c, fixed, cached, columns, cols, start = self._gn_setup(coeffs, order, batch)
        ks = sum(cols[g].numel() for g in shared)
        kf = sum(cols[g].numel() for g in order if g not in shared)
        xs = torch.cat([getattr(c, g)[:1, cols[g]] for g in shared], dim=1).detach()          # (1, ks)
        xf = torch.cat([getattr(c, g)[:, cols[g]] for g in order if g not in shared], dim=1).detach()  # (B, kf)

        def unpack(vs, vf):
            full = torch.cat([vs.expand(batch, -1), vf], dim=1)
            parts = dict(zip(order, torch.split(full, [cols[g].numel() for g in order], dim=1)))
            return Coeffs(**fixed, **{g: start[g].index_copy(1, cols[g], parts[g]) for g in order})

        def total(st):  # the shared-mode loss (see the docstring)
            return st.data.mean() + sum(v[0] if g in shared else v.sum() for g, v in st.priors.items())

        def system(st, prob):
            hb, gb = prob.linearize(st, with_priors=False)  # (B, P, P), (B, P), data terms of each frame
            n = ks + batch * kf
            h = torch.zeros(n, n, dtype=torch.float64, device=self.device)
            g = torch.zeros(n, dtype=torch.float64, device=self.device)
            hb, gb = hb.double() / batch, gb.double() / batch
            h[:ks, :ks] = hb[:, :ks, :ks].sum(0)
            g[:ks] = gb[:, :ks].sum(0)
            for b in range(batch):
                blk = slice(ks + b * kf, ks + (b + 1) * kf)
                h[:ks, blk] = hb[b, :ks, ks:]
                h[blk, :ks] = hb[b, ks:, :ks]
                h[blk, blk] = hb[b, ks:, ks:]
                g[blk] = gb[b, ks:]
            # The priors, each once per coefficient of the system.
            x = torch.cat([xs[0], xf.reshape(-1)]).double()
            diag, ref = torch.zeros(n, dtype=torch.float64, device=self.device), torch.zeros_like(x)
            weights = prob._priors()
            pos = 0
            for grp in shared:
                k = cols[grp].numel()
                diag[pos:pos + k] = weights.get(grp, (0.0, None))[0]
                pos += k
            off = 0
            for grp in (g2 for g2 in order if g2 not in shared):
                k = cols[grp].numel()
                w, r = weights.get(grp, (0.0, None))
                for b in range(batch):
                    i = ks + b * kf + off
                    diag[i:i + k] = w
                    if r is not None:
                        ref[i:i + k] = r[b, cols[grp]].double()
                off += k
            idx = torch.arange(n, device=self.device)
            h[idx, idx] += 2 * diag
            g += 2 * diag * (x - ref)
            return h, g

        bar = self._gn_bar(schedule, desc)
        for prob, steps in self._gn_stages(schedule, landmarks, order, pose_ref, cached, columns):
            kp = self.select_keypoints(unpack(xs, xf), landmarks)
            st = prob.evaluate(unpack(xs, xf), kp)
            cost = total(st)
            h, g = system(st, prob)
            lam = GN_LAMBDA0
            for step in range(steps):
                threads.tick()
                delta = torch.linalg.solve(h + torch.diag(lam * torch.diagonal(h) + 1e-12), -g).to(xs.dtype)
                ts, tf = xs + delta[:ks][None], xf + delta[ks:].view(batch, kf)
                trial = prob.evaluate(unpack(ts, tf), kp)
                new = total(trial)
                bar.update(1)
                if not bool(new < cost):
                    lam *= GN_LAMBDA_UP
                    if lam > GN_LAMBDA_MAX:
                        break
                    continue
                gain = float(cost - new)
                xs, xf, cost, st = ts, tf, new, trial
                lam *= GN_LAMBDA_DOWN
                if gain < GN_RTOL * float(cost) or step == steps - 1:
                    break
                if self.model.has_contour:
                    kp = self.select_keypoints(unpack(xs, xf), landmarks)
                    st = prob.evaluate(unpack(xs, xf), kp)
                    cost = total(st)
                h, g = system(st, prob)
        bar.close()
        out = unpack(xs, xf).as_dict()
        return Coeffs(**{k: (v[:1] if k in shared else v).detach() for k, v in out.items()})

    def _lm(self, coeffs: Coeffs, landmarks: torch.Tensor, groups: Tuple[str, ...], iters: int,
            pose_ref: Optional[PoseRef], desc: str) -> Coeffs:
        """Levenberg-Marquardt on the per-frame landmark residuals (+ regularisers), with
        the analytic Jacobian of the landmark projection.

        Every frame is solved independently (its own damping); groups shared across frames
        (batch 1) are solved per frame and re-shared as the mean afterwards.
        """
        batch = landmarks.shape[0]
        cfg = self.cfg
        c = expand(coeffs, batch)
        sizes = [getattr(c, g).shape[1] for g in groups]
        # Residual weights: landmark rows, then a diagonal prior per regularised group.
        w = (torch.sqrt(cfg.lm_loss_w * self.lm_weights) / self.camera.image_size)[None, :, None]
        prior_w, prior_mu = [], []
        for g, n in zip(groups, sizes):
            wg, mu = 0.0, torch.zeros(batch, n, dtype=self.dtype, device=self.device)
            if g == "id":
                wg = cfg.id_reg_w
            elif g == "exp":
                wg = cfg.exp_reg_w
            elif pose_ref is not None and g in POSE:
                wg = cfg.rot_reg_w if g == "angles" else cfg.trans_reg_w
                mu = pose_ref.angles if g == "angles" else pose_ref.trans
            prior_w.append(torch.full((n,), wg, dtype=self.dtype, device=self.device))
            prior_mu.append(mu.expand(batch, n))
        prior_w, prior_mu = torch.cat(prior_w), torch.cat(prior_mu, dim=1)

        def unpack(x):
            return c.replace(**dict(zip(groups, torch.split(x, sizes, dim=1))))

        def residual_cost(x, kp):
            pts = self.project_landmarks(unpack(x), kp)
            r = ((pts - landmarks) * w).reshape(batch, -1)
            return (r ** 2).sum(1) + ((x - prior_mu) ** 2 * prior_w).sum(1), r

        x = torch.cat([getattr(c, g) for g in groups], dim=1).detach()
        lam = torch.full((batch,), 1e-3, dtype=self.dtype, device=self.device)
        eye = torch.eye(x.shape[1], dtype=self.dtype, device=self.device)
        with torch.no_grad():
            kp = self.select_keypoints(unpack(x), landmarks)
            cost, r = residual_cost(x, kp)
            for _ in tqdm(range(iters), desc=desc, disable=not self.progress, leave=False):
                threads.tick()
                if self.model.has_contour:  # the silhouette correspondence moves with the pose
                    kp = self.select_keypoints(unpack(x), landmarks)
                    cost, r = residual_cost(x, kp)
                jac = self.model.landmarks_3d_jacobian(unpack(x), groups, kp)
                dproj = self.camera.project_points_jacobian(jac["value"])  # (B, L, 2, 3)
                J = torch.cat([torch.einsum("blij,bljk->blik", dproj, jac[g]) for g in groups], dim=-1)
                J = (J * w[..., None]).reshape(batch, -1, x.shape[1])  # (B, 2L, P)
                jtj = J.transpose(1, 2) @ J + torch.diag_embed(prior_w.expand(batch, -1))
                grad = (J.transpose(1, 2) @ r[..., None])[..., 0] + prior_w * (x - prior_mu)
                damp = lam[:, None, None] * (torch.diagonal(jtj, dim1=1, dim2=2)[:, :, None] * eye + 1e-9 * eye)
                x_new = x + _solve_each(jtj + damp, -grad)
                cost_new, r_new = residual_cost(x_new, kp)
                better = cost_new < cost
                x = torch.where(better[:, None], x_new, x)
                r = torch.where(better[:, None], r_new, r)
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


def _solve_each(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a[i] x[i] = b[i] for (B, P, P) a and (B, P) b, one system at a time.

    A batched torch.linalg.solve on the CPU runs MKL's threaded LU inside torch's own
    parallel loop over the batch, which can deadlock (seen here with B = 2); P is small,
    so a loop costs nothing."""
    return torch.stack([torch.linalg.solve(a[i], b[i]) for i in range(a.shape[0])])
