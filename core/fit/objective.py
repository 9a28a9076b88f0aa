"""The objective of SPEC §4, defined once: every loss term, its weight and the weighted total.

Every solver (Adam, Levenberg-Marquardt on the landmarks, Gauss-Newton on the full loss)
minimises this objective and asks it for the terms, weights and totals; none of them holds
a weight or writes the sum itself.

Terms (unweighted, per frame, shape (B,); the prior of a group shared by the frames (1,)):

    lm            Σ_k w_k ‖(p_k − q_k) / S‖²          landmarks (weights: losses.landmark_weights)
    photo         masked mean colour distance / 255   (with images)
    reflectance   albedo smoothness over the skin     (with images)
    id_reg, exp_reg, tex_reg    ‖x_g‖² of the frame's row of the group (tex_reg with images)
    rot_reg, trans_reg          ‖x_g − ref_g‖² against a reference pose (video frames)

The weighted total (:meth:`Objective.weigh`): ``scale · Σ_k w_k data_k + Σ_g w_g prior_g``.
For a batch (:meth:`Objective.total`), the data terms are means over the B frames and
every prior is summed over the rows of its group. When every group is per-frame the frames
are independent problems: ``scale = B``, so the total is the sum of the frames' own totals
and a frame's fit does not depend on what it is batched with. When some groups are shared
by the frames (batch 1: the video identity/albedo fit) ``scale = 1`` and a shared group's
prior counts once: the original's mean-data + summed-prior balance.
A frame's own total (:meth:`Objective.frame_costs`) is the same formula for one frame.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Collection, Dict, Optional, Tuple

import torch

from core.models.coeffs import Coeffs
from core.models.face_model import FaceModel
from core.render.camera import Camera
from . import losses as L
from .config import FitConfig

DATA_TERMS = ("lm", "reflectance", "photo")
# The prior term of each regularised group.
PRIOR_TERMS = {"id": "id_reg", "exp": "exp_reg", "tex": "tex_reg", "angles": "rot_reg", "trans": "trans_reg"}


@dataclass(frozen=True)
class PoseRef:
    """Reference pose for the temporal regulariser: angles (B, 3), trans (B, 3)."""

    angles: torch.Tensor
    trans: torch.Tensor


def expand(coeffs: Coeffs, batch: int) -> Coeffs:
    """Broadcast groups stored with batch 1 (shared by all frames) to ``batch``."""
    return Coeffs(**{k: (v.expand(batch, -1) if v.shape[0] == 1 and batch > 1 else v)
                     for k, v in coeffs.as_dict().items()})


def shared_groups(coeffs: Coeffs, batch: int) -> Tuple[str, ...]:
    """The groups stored with batch 1 while the fit has ``batch`` > 1 frames."""
    if batch <= 1:
        return ()
    return tuple(g for g, v in coeffs.as_dict().items() if v.shape[0] == 1)


@dataclass
class Evaluation:
    """The objective at one point: unweighted per-frame ``terms`` ((B,) each; a shared
    group's prior (1,)) and, when
    images were given, what was rendered: the model output (FaceOutput), the screen
    vertices (B, N, 3), the rasterization (B, S, S) and the RGBA image (B, S, S, 4)."""

    terms: Dict[str, torch.Tensor]
    out: Optional[object] = None
    screen: Optional[torch.Tensor] = None
    pix_to_face: Optional[torch.Tensor] = None
    rgba: Optional[torch.Tensor] = None


class Objective:
    """SPEC §4's loss for a face model seen by one camera.

    Args:
        model: the face model.
        renderer: a :class:`core.render.MeshRenderer` (or anything with its call,
            ``rasterize`` and ``shade``).
        camera: the crop camera; landmarks are always compared in its pixels.
        cfg: the weights (and the flags the terms read: ``normals_grad``).
    """

    def __init__(self, model: FaceModel, renderer, camera: Camera, cfg: FitConfig):
        self.model = model
        self.renderer = renderer
        self.camera = camera
        self.cfg = cfg
        p = next(iter(model.buffers()))
        self.device, self.dtype = p.device, p.dtype
        self.lm_weights = L.landmark_weights(model.num_landmarks, dtype=self.dtype, device=self.device,
                                             jaw=cfg.lm_jaw_w, inner=cfg.lm_inner_w, heavy=cfg.lm_heavy_w)
        self._cache: Dict[object, object] = {}

    def with_camera(self, camera: Camera) -> "Objective":
        """The same objective seen through another crop camera (per-frame cameras of a
        batch, another focal); the model-only cache is shared."""
        other = copy.copy(self)
        other.camera = camera
        return other

    # -- the weights, once ---------------------------------------------------------------
    def data_weights(self) -> Dict[str, float]:
        """Weight of each data term."""
        cfg = self.cfg
        return {"lm": cfg.lm_loss_w, "reflectance": cfg.tex_w, "photo": cfg.rgb_loss_w}

    def prior_weights(self) -> Dict[str, float]:
        """Weight of each regularised group's prior."""
        cfg = self.cfg
        return {"id": cfg.id_reg_w, "exp": cfg.exp_reg_w, "tex": cfg.tex_reg_w,
                "angles": cfg.rot_reg_w, "trans": cfg.trans_reg_w}

    def priors(self, pose_ref: Optional[PoseRef] = None, photo: bool = True
               ) -> Dict[str, Tuple[float, Optional[torch.Tensor]]]:
        """group -> (weight, reference or None) of the quadratic priors in force: id and
        exp always, tex with the photometric terms, angles and trans with a reference pose."""
        w = self.prior_weights()
        out = {"id": (w["id"], None), "exp": (w["exp"], None)}
        if photo:
            out["tex"] = (w["tex"], None)
        if pose_ref is not None:
            out["angles"] = (w["angles"], pose_ref.angles)
            out["trans"] = (w["trans"], pose_ref.trans)
        return out

    def landmark_residual_weights(self) -> torch.Tensor:
        """(L,) r_k = (p_k − q_k) · this gives Σ r_k² = lm_loss_w · the lm term (least-squares
        form for the Levenberg-Marquardt and Gauss-Newton solvers; without a robust loss)."""
        return torch.sqrt(self.cfg.lm_loss_w * self.lm_weights) / self.camera.image_size

    def landmark_residual_scale(self, points: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """(B, L, 1) s_k with r_k = (p_k − q_k) · s_k the landmark residuals of the solvers
        at the model's points ``points`` (B, L, 2): Σ r_k² is lm_loss_w · the lm term, or
        with ``cfg.lm_robust_px`` its Gauss-Newton (IRLS) model there (equal gradient)."""
        w = self.landmark_residual_weights()[None, :, None]
        if not self.cfg.lm_robust_px:
            return w.expand(points.shape[0], -1, 1)
        size = self.camera.image_size
        d2 = (((points - landmarks) / size) ** 2).sum(-1, keepdim=True)
        return w * L.robust_irls_scale(d2, (self.cfg.lm_robust_px / size) ** 2)

    def landmark_term(self, points: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """(B,) the unweighted lm term of the model's points (B, L, 2) against the targets."""
        return L.landmark_loss_per_frame(points, landmarks, self.lm_weights, self.camera.image_size,
                                         self.cfg.lm_robust_px)

    def weigh(self, terms: Dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        """THE weighted total: ``scale · Σ_k w_k data_k + Σ_g w_g prior_g`` over the terms
        present (tensors of any one shape: per frame, or already reduced)."""
        w = self.data_weights()
        data = None
        for k in DATA_TERMS:
            if k in terms:
                data = w[k] * terms[k] if data is None else data + w[k] * terms[k]
        total = scale * data
        for g, wg in self.prior_weights().items():
            if PRIOR_TERMS[g] in terms:
                total = total + wg * terms[PRIOR_TERMS[g]]
        return total

    @staticmethod
    def reduce(terms: Dict[str, torch.Tensor], shared: Collection[str] = ()) -> Dict[str, torch.Tensor]:
        """A batch's terms from per-frame ``terms`` (B,): data terms averaged over the
        frames, priors summed over their group's rows (a ``shared`` group's row once)."""
        return {k: v.mean() if k in DATA_TERMS else v[0] if _GROUP_OF[k] in shared else v.sum()
                for k, v in terms.items()}

    def batch_terms(self, terms: Dict[str, torch.Tensor], shared: Collection[str] = ()) -> Dict[str, torch.Tensor]:
        """:meth:`reduce` with the weighted ``total`` added: the batch's figures."""
        return {**self.reduce(terms, shared), "total": self.total(terms, shared)}

    def total(self, terms: Dict[str, torch.Tensor], shared: Collection[str] = ()) -> torch.Tensor:
        """The scalar total a batch minimises, from per-frame ``terms`` (B,): ``weigh`` of
        :meth:`reduce`, with ``scale = B`` for independent frames and 1 with ``shared``."""
        return self.weigh(self.reduce(terms, shared), scale=1.0 if shared else float(terms["lm"].shape[0]))

    def frame_costs(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) each frame's own total (every group per-frame)."""
        return self.weigh(terms)

    # -- the terms ---------------------------------------------------------------------
    def evaluate(self, coeffs: Coeffs, landmarks: torch.Tensor, images: Optional[torch.Tensor] = None,
                 pose_ref: Optional[PoseRef] = None, keypoints: Optional[torch.Tensor] = None,
                 photo_camera: Optional[Camera] = None, cached: Optional[Dict[str, torch.Tensor]] = None,
                 normals_grad: Optional[bool] = None) -> Evaluation:
        """Every term at ``coeffs`` (per-frame or shared groups), per frame.

        Args:
            landmarks: (B, L, 2) target points in crop pixels.
            images: (B, T, T, 3) 0..255 targets at ``photo_camera``'s size, or None
                (landmark and prior terms only, nothing rendered).
            keypoints: optional (B, L) per-frame landmark vertex ids.
            photo_camera: the camera of the photometric term (default the crop camera).
            cached: optional ``identity`` / ``albedo`` precomputed for fixed id / tex.
            normals_grad: shading gradient through the normals (default the config's).
        """
        batch = landmarks.shape[0]
        c = expand(coeffs, batch)
        ev = Evaluation(terms={})
        if images is not None:
            cached = cached or {}
            ng = self.cfg.normals_grad if normals_grad is None else normals_grad
            ev.out, ev.screen, ev.pix_to_face, ev.rgba = self._draw(
                c, photo_camera, albedo=cached.get("albedo"), identity=cached.get("identity"), normals_grad=ng)
            mask = (ev.rgba[..., 3] > 0).to(ev.rgba.dtype)
            ev.terms["photo"] = L.photo_loss_per_frame(ev.rgba[..., :3], images, mask)
            ev.terms["reflectance"] = L.reflectance_loss_per_frame(ev.out.albedo, self.model.skinmask)
            lms = self.output_landmarks(ev.out, keypoints)
        else:
            lms = self.project_landmarks(c, keypoints)
        ev.terms["lm"] = self.landmark_term(lms, landmarks)
        # Priors on the rows as given: a shared group's one row (its gradient then reaches
        # the shared coefficients directly, not through the broadcast to the frames).
        for g, (_, ref) in self.priors(pose_ref, photo=images is not None).items():
            x = getattr(coeffs, g)
            ev.terms[PRIOR_TERMS[g]] = ((x if ref is None else x - ref) ** 2).sum(1)
        return ev

    # -- the model seen by the camera ---------------------------------------------------
    def render(self, coeffs: Coeffs, albedo: Optional[torch.Tensor] = None, camera: Optional[Camera] = None,
               identity: Optional[torch.Tensor] = None, normals_grad: bool = True):
        """(B, S, S, 4) RGBA of the model at ``coeffs`` (S = the camera's image size,
        default the crop camera) and the model output."""
        out, _, _, rgba = self._draw(coeffs, camera, albedo=albedo, identity=identity, normals_grad=normals_grad)
        return rgba, out

    def _draw(self, coeffs: Coeffs, camera: Optional[Camera], albedo: Optional[torch.Tensor] = None,
              identity: Optional[torch.Tensor] = None, normals_grad: bool = True):
        """The model output, its screen vertices (B, N, 3), the rasterization (B, S, S) and
        the RGBA image (B, S, S, 4) seen by ``camera`` (default the crop camera): the
        renderer's own call (rasterize, then shade), its pieces kept for the solvers."""
        camera = camera or self.camera
        out = self.model(coeffs, albedo=albedo, identity=identity, normals_grad=normals_grad)
        size = camera.image_size
        screen = camera.project(out.vertices)
        pix_to_face = self.renderer.rasterize(screen, self.model.tri, (size, size)).pix_to_face
        return out, screen, pix_to_face, self.renderer.shade(screen, self.model.tri, out.colors, pix_to_face)

    @staticmethod
    def landmark_vertices(out, keypoints: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, L, 3) the landmark vertices of a model output (``keypoints`` (B, L) ids)."""
        if keypoints is None:
            return out.landmarks
        return out.vertices.gather(1, keypoints[..., None].expand(-1, -1, 3))

    def output_landmarks(self, out, keypoints: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, L, 2) crop pixels of a model output's landmarks (``keypoints`` (B, L) ids)."""
        return self.camera.project_points(self.landmark_vertices(out, keypoints))

    def project_landmarks(self, coeffs: Coeffs, keypoints: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, 2) crop pixels of the model's landmarks (no rendering)."""
        return self.camera.project_points(self.model.landmarks_3d(coeffs, keypoints))

    @torch.no_grad()
    def keypoints(self, coeffs: Coeffs, landmarks: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-frame landmark vertex ids (B, L) with the contour landmarks moved to the
        silhouette (models with a contour definition), or None (fixed keypoints)."""
        if not self.model.has_contour:
            return None
        c = expand(coeffs, landmarks.shape[0])
        return self.model.contour_keypoints(c, self.camera.project_points, landmarks)

    # -- pieces the solvers reuse (cached: they depend only on the model) ---------------
    def fixed_pieces(self, fixed: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The parts of the forward model that fixed id / tex make constant."""
        cached = {}
        with torch.no_grad():
            if "id" in fixed:
                cached["identity"] = self.model.identity(fixed["id"])
            if "tex" in fixed:
                cached["albedo"] = self.model.albedo(fixed["tex"])
        return cached

    def basis(self, group: str) -> torch.Tensor:
        """(3N, K) the model's whole basis of ``group`` (id, exp or tex)."""
        return {"id": self.model.id_base, "exp": self.model.exp_base, "tex": self.model.tex_base}[group]

    def active_columns(self, group: str) -> torch.Tensor:
        """(K,) ids of the coefficients of ``group`` (id, exp or tex) whose basis column is
        not all zero: the others change the loss only through their prior (whose
        minimiser is zero)."""
        key = ("active", group)
        if key not in self._cache:
            self._cache[key] = torch.nonzero(self.basis(group).abs().amax(0) > 0).reshape(-1)
        return self._cache[key]

    def active_basis(self, group: str) -> torch.Tensor:
        """(3N, K) the columns :meth:`active_columns` of the basis of ``group`` (id, exp or
        tex), contiguous (cached: the solvers multiply by it every step)."""
        key = ("active_basis", group)
        if key not in self._cache:
            self._cache[key] = self.basis(group).index_select(1, self.active_columns(group)).contiguous()
        return self._cache[key]

    def reflectance_quadratic(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The albedo smoothness as a quadratic in tex: (QᵀQ (K, K), Qᵀq0 (K,)) with the
        per-frame residual Q·tex + q0 (see losses.reflectance_loss_per_frame)."""
        key = "reflectance_quadratic"
        if key not in self._cache:
            model = self.model
            n = model.num_vertices
            skin = model.skinmask[:, None, None]
            denom = model.skinmask.sum().clamp_min(1.0)
            scale = skin / 255.0 / denom.sqrt()

            def centred(x):  # (N, 3, K) -> the smoothness residual's linear map
                return (x - (x * skin).sum(0, keepdim=True) / denom) * scale

            q = centred(model.tex_base.view(n, 3, -1)).reshape(3 * n, -1)
            q0 = centred(model.meantex.view(n, 3, 1)).reshape(-1)
            self._cache[key] = (q.T @ q, q.T @ q0)
        return self._cache[key]


_GROUP_OF = {v: k for k, v in PRIOR_TERMS.items()}
