"""The Fitter: the stages of SPEC §4 for a batch of photos or video frames.

Stages, each a method of :class:`Fitter`, each minimising the one objective
(:mod:`core.fit.objective`) with a solver that takes that objective:

* ``rigid``: pose (angles, trans) from the landmarks only (no rendering): Adam as in the
  original (:mod:`core.fit.adam`), or Levenberg-Marquardt (``rigid_solver="lm"``,
  :mod:`core.fit.lm`).
* ``landmark_init``: optional LM on pose + identity + expression against the landmarks
  with the priors, a cheap starting point for the photometric stage.
* ``photometric``: the full loss, rendering each iteration: Adam, or Gauss-Newton /
  Levenberg-Marquardt steps (``nonrigid_solver="gn"``, :mod:`core.fit.gn`).

Identity and albedo can be shared by all B frames (video shape estimation) or held
fixed (per-frame video fitting); the pose can be pulled towards a reference pose.
:meth:`Fitter.fit` runs the whole schedule and evaluates the objective once at the result:
:class:`FitResult` carries each frame's losses and its render, so nothing is rendered again.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from core.models.coeffs import Coeffs
from core.models.face_model import FaceModel
from core.render.camera import Camera
from .adam import adam
from .appearance import init_appearance
from .config import FitConfig
from .gn import gn_frames, gn_shared
from .lanes import fit_in_lanes, splittable
from .lm import landmark_lm
from .objective import Objective, PoseRef, expand, shared_groups

__all__ = ["Fitter", "FitResult", "PoseRef", "expand", "POSE", "NONRIGID"]

POSE = ("angles", "trans")
NONRIGID = ("id", "exp", "tex", "gamma", "angles", "trans")


@dataclass
class FitResult:
    """Fitted coefficients (per-frame, shared groups expanded to B) and diagnostics.

    Attributes:
        coeffs: the fit, every group (B, n).
        losses: the batch's terms and weighted total (Objective.total), floats.
        timings: seconds per stage.
        keypoints: (B, L) landmark vertex ids used at the end.
        frame_losses: each frame's own terms and ``total`` (as if fitted alone), (B,) each.
        renders: (B, S, S, 4) RGBA of the fit at the crop camera (with images and losses).
        output: the model output at the fit (vertices, colors, ... (B, N, 3)), or None.
        camera: the crop camera the fit saw the frames through.
        lanes: how many parts of the batch were fitted side by side (:mod:`core.fit.lanes`).
    """

    coeffs: Coeffs
    losses: Dict[str, float]
    timings: Dict[str, float] = field(default_factory=dict)
    keypoints: Optional[torch.Tensor] = None
    frame_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    renders: Optional[torch.Tensor] = None
    output: Optional[object] = None
    camera: Optional[Camera] = None
    lanes: int = 1


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
        self.objective = Objective(model, renderer, camera, config)
        self.model = model
        self.renderer = renderer
        self.camera = camera
        self.cfg = config
        self.progress = progress
        self.device, self.dtype = self.objective.device, self.objective.dtype
        self._following: Optional["Fitter"] = None

    def with_camera(self, camera: Camera) -> "Fitter":
        """The same fitter seeing the frames through another crop camera (per-frame
        focal and principal point of crops of one frame camera, see
        :meth:`core.render.camera.FrameCamera.crop`); its image size must be the same."""
        if camera.image_size != self.camera.image_size:
            raise ValueError(f"expected a camera of {self.camera.image_size} px; got {camera.image_size}")
        follow = self.following()
        other = copy.copy(self)
        other.camera = camera
        other.objective = self.objective.with_camera(camera)
        other._following = other if follow is self else follow.with_camera(camera)
        return other

    def with_config(self, config: FitConfig) -> "Fitter":
        """The same model, renderer and camera with other settings (itself when equal)."""
        if config == self.cfg:
            return self
        return Fitter(self.model, self.renderer, self.camera, config, progress=self.progress)

    # -- helpers -------------------------------------------------------------------------
    def zeros(self, batch: int) -> Coeffs:
        return self.model.layout.zeros(batch, dtype=self.dtype, device=self.device)

    def project_landmarks(self, coeffs: Coeffs, keypoints: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, 2) image points of the model's landmarks (fast path); ``keypoints``
        (B, L) optionally overrides the landmark vertex ids per frame."""
        return self.objective.project_landmarks(coeffs, keypoints)

    def select_keypoints(self, coeffs: Coeffs, landmarks: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-frame landmark vertex ids (B, L) with the contour landmarks moved to the
        silhouette (models with a contour definition), or None (fixed keypoints)."""
        return self.objective.keypoints(coeffs, landmarks)

    def render(self, coeffs: Coeffs, albedo: Optional[torch.Tensor] = None, camera: Optional[Camera] = None,
               identity: Optional[torch.Tensor] = None, normals_grad: bool = True):
        """Render (B, S, S, 4) RGBA of the model at ``coeffs`` (S = the camera's image
        size, default the fitted crop size) and return it with the model output.
        ``albedo`` / ``identity``: cached pieces for fixed tex / id (see FaceModel)."""
        return self.objective.render(coeffs, albedo=albedo, camera=camera, identity=identity,
                                     normals_grad=normals_grad)

    def loss_terms(self, coeffs: Coeffs, landmarks: torch.Tensor, images: Optional[torch.Tensor],
                   pose_ref: Optional[PoseRef] = None, keypoints: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The batch's terms of SPEC §4 (data terms averaged over the frames, priors summed)
        and the weighted ``total`` (:meth:`Objective.total`)."""
        batch = landmarks.shape[0]
        ev = self.objective.evaluate(coeffs, landmarks, images, pose_ref=pose_ref, keypoints=keypoints)
        return self.objective.batch_terms(ev.terms, shared_groups(coeffs, batch))

    def init_appearance(self, coeffs: Coeffs, images: torch.Tensor, albedo: bool = True, rounds: int = 2,
                        ridge: float = 400.0) -> Coeffs:
        """Closed-form light (and albedo) start: see :func:`core.fit.appearance.init_appearance`."""
        return init_appearance(self.objective, coeffs, images, albedo=albedo, rounds=rounds, ridge=ridge)

    def following(self) -> "Fitter":
        """The fitter of following video frames, warm-started from the previous frame
        (config ``FitConfig.following_frames()``; itself when that changes nothing)."""
        if self._following is None:
            self._following = self.with_config(self.cfg.following_frames())
        return self._following

    # -- stages ------------------------------------------------------------------------
    def rigid(self, coeffs: Coeffs, landmarks: torch.Tensor, iters: int,
              pose_ref: Optional[PoseRef] = None) -> Coeffs:
        """Fit angles and trans to the landmarks (the other groups held)."""
        if iters <= 0:
            return coeffs
        if self.cfg.rigid_solver == "lm":
            return landmark_lm(self.objective, coeffs, landmarks, POSE, iters, pose_ref=pose_ref,
                               progress=self.progress, desc="rigid (LM)")
        return adam(self.objective, coeffs, landmarks, iters, POSE, self.cfg.rf_lr, pose_ref, photo=False,
                    progress=self.progress, desc="rigid")

    def landmark_init(self, coeffs: Coeffs, landmarks: torch.Tensor, iters: int,
                      groups: Sequence[str] = ("angles", "trans", "id", "exp"),
                      pose_ref: Optional[PoseRef] = None) -> Coeffs:
        """LM on pose, identity and expression against the landmarks plus regularisers."""
        if iters <= 0:
            return coeffs
        return landmark_lm(self.objective, coeffs, landmarks, tuple(groups), iters, pose_ref=pose_ref,
                           progress=self.progress, desc="landmark init (LM)")

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
            solve = gn_shared if shared else gn_frames
            return solve(self.objective, coeffs, landmarks, schedule, tuple(groups), pose_ref, progress=self.progress,
                         desc="non-rigid, shared groups (GN)" if shared else "non-rigid (GN)")
        return adam(self.objective, coeffs, landmarks, schedule, tuple(groups), self.cfg.nrf_lr, pose_ref,
                    photo=True, progress=self.progress, desc="non-rigid")

    def coarse(self, images: torch.Tensor, size: int):
        """A camera and the crops (B, T, T, 3) at ``size`` pixels: same view, each coarse
        pixel the average of the crop pixels it covers."""
        t = self.camera.image_size
        cam = self.camera.scaled(size)
        if t % size == 0:
            return cam, box_average(images, t // size)
        x = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(size, size), mode="area")
        return cam, x.permute(0, 2, 3, 1).contiguous()

    def fit(self, landmarks: torch.Tensor, images: Optional[torch.Tensor], init: Optional[Coeffs] = None,
            rf_iters: Optional[int] = None, nrf_iters: Optional[int] = None,
            nonrigid_groups: Sequence[str] = NONRIGID, pose_ref: Optional[PoseRef] = None,
            losses: bool = True, following: bool = False, lanes: int = 1) -> FitResult:
        """The whole schedule: rigid, (landmark init), photometric.

        Args:
            landmarks: (B, L, 2) target points in crop pixels.
            images: (B, T, T, 3) crops, 0..255 (None: landmark-only fit).
            init: starting coefficients (default all zero, as in the original).
            rf_iters, nrf_iters: iteration counts (default: the config's, for a photo or a
                clip's first frame, or for a following frame with ``following``).
            following: a following video frame, warm-started from the previous one
                (``init``): the :meth:`following` fitter with ``rest_*`` iterations.
            losses: evaluate the objective once at the result (one render) into
                ``FitResult.losses``, ``frame_losses`` and ``renders`` (else empty).
            lanes: fit the batch in that many parts side by side (one CPU thread each,
                :mod:`core.fit.lanes`; :func:`core.fit.lanes.cpu_lanes` gives one per free
                core) when its frames are independent; each part's result is the part's
                fitted alone.
        """
        cfg = self.cfg
        batch = landmarks.shape[0]
        if min(lanes, batch) > 1 and splittable(batch, init, pose_ref):
            return fit_in_lanes(self, min(lanes, batch), landmarks, images, init=init, pose_ref=pose_ref,
                                rf_iters=rf_iters, nrf_iters=nrf_iters, nonrigid_groups=nonrigid_groups,
                                losses=losses, following=following)
        if following:
            rf = cfg.rest_rf_iters if rf_iters is None else rf_iters
            nrf = cfg.rest_nrf_iters if nrf_iters is None else nrf_iters
            return self.following().fit(landmarks, images, init=init, rf_iters=rf, nrf_iters=nrf,
                                        nonrigid_groups=nonrigid_groups, pose_ref=pose_ref, losses=losses)
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
        result = FitResult(coeffs=expand(coeffs, batch).detach(), losses={}, timings=t,
                           keypoints=self.model.keypoints.expand(batch, -1) if kp is None else kp,
                           camera=self.camera)
        if losses:
            with torch.no_grad():
                ev = self.objective.evaluate(coeffs, landmarks, images, pose_ref=pose_ref, keypoints=kp)
            batch_terms = self.objective.batch_terms(ev.terms, shared_groups(coeffs, batch))
            result.losses = {k: float(v) for k, v in batch_terms.items()}
            result.frame_losses = {**{k: v.expand(batch) for k, v in ev.terms.items()},
                                   "total": self.objective.frame_costs(ev.terms).expand(batch)}
            result.renders, result.output = ev.rgba, ev.out
        return result


def box_average(images: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, T, C) -> (B, T/k, T/k, C): each pixel the mean of the k x k block it covers
    (avg_pool2d's values, summed rows first, in the channel-last layout: several times
    faster than avg_pool2d on it). T must be a multiple of k."""
    b, t, w, ch = images.shape
    if k == 1:
        return images.contiguous()
    s = t // k
    rows = images.reshape(b, s, k, w * ch)
    acc = rows[:, :, 0] + rows[:, :, 1]
    for i in range(2, k):
        acc += rows[:, :, i]
    cols = acc.view(b, s, w // k, k, ch)
    out = cols[:, :, :, 0] + cols[:, :, :, 1]
    for i in range(2, k):
        out += cols[:, :, :, i]
    return out.mul_(1.0 / (k * k))
