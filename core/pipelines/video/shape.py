"""Stage 2 of the video pipeline: identity and albedo shared by the whole video, from
``nframes_shape`` face frames spread over it, in one batched fit with id/tex shared by all
frames (stored with batch 1, see :func:`core.fit.fitter.expand`) and exp/gamma/pose per
frame. Cached in ``shape.npz``, with those frames' own coefficients (the seeds of the
per-frame fits' chains, :attr:`ShapeResult.seeds`)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from core.errors import UserError
from core.io.video import VideoReader
from core.fit.focal import profile_focal
from core.landmarks.crop import crop_face, photo_to_crop
from core.render.camera import FrameCamera, default_focal

from ..session import Session
from .cache import digest, load_npz, save_npz
from .chains import PER_FRAME_GROUPS
from .landmarks import LandmarkTrack
from .options import VideoOptions, range_suffix

log = logging.getLogger(__name__)


@dataclass
class ShapeResult:
    """Identity and albedo shared by the whole video."""

    id: np.ndarray          # (n_id,) float32
    tex: np.ndarray         # (n_tex,) float32
    frames: np.ndarray      # (F,) frame indices used
    losses: Dict[str, float] = field(default_factory=dict)
    reused: bool = False    # loaded from the cache
    camera: Optional[FrameCamera] = None  # the video's frame camera (None: the original's crop camera)
    focal_source: str = ""                # "given", "estimated" (from the landmarks) or "assumed" (see fit_shape)
    # Each of ``frames``' own fitted per-frame groups (exp, gamma, angles, trans),
    # {group: (F, n) float32}, in the camera the frames are fitted in; empty when unknown.
    coeffs: Dict[str, np.ndarray] = field(default_factory=dict)

    def seeds(self, start: int, stop: int) -> Dict[int, Dict[str, np.ndarray]]:
        """The identity frames in source frames [start, stop) with their coefficients:
        {source frame: {group: (n,) float32}} (empty without :attr:`coeffs`)."""
        if not self.coeffs:
            return {}
        return {int(f): {g: v[k] for g, v in self.coeffs.items()}
                for k, f in enumerate(np.asarray(self.frames)) if start <= int(f) < stop}

    def camera_info(self) -> Dict[str, object]:
        """The frame camera as the pkl and info.json give it (with its focal source)."""
        return {**self.camera.as_dict(), "focal_source": self.focal_source}


def select_shape_frames(has_face: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` face frames spread evenly over the video: the middle frame of each
    of k equal parts of the face frames (all of them when there are no more than k)."""
    faces = np.flatnonzero(np.asarray(has_face, dtype=bool))
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if faces.size <= k:
        return faces
    pos = ((np.arange(k) + 0.5) * faces.size / k).astype(np.int64)
    return faces[np.unique(pos)]


def planned_shape_frames(num_frames: int, start: int, k: int) -> List[int]:
    """The source frames :func:`select_shape_frames` picks among ``num_frames`` frames from
    ``start`` when every frame has a face (the landmark pass keeps them decoded)."""
    if num_frames <= 0:
        return []
    return [int(i) + start for i in select_shape_frames(np.ones(num_frames, dtype=bool), k)]


def read_frames(video_path: str, indices: Sequence[int], timestamps: Optional[np.ndarray] = None) -> Dict[int, np.ndarray]:
    """The frames ``indices`` of a video as {index: RGB frame} (seeks where it can)."""
    out: Dict[int, np.ndarray] = {}
    with VideoReader(video_path) as reader:
        for i in sorted(set(int(v) for v in indices)):
            for _, frame in reader.frames(i, i + 1, timestamps):
                out[i] = frame
    missing = sorted(set(int(v) for v in indices) - set(out))
    if missing:
        raise UserError(f"video '{video_path}' could not be read again at frames {missing[:5]}")
    return out


def _crops(frames: Dict[int, np.ndarray], track: LandmarkTrack, boxes: np.ndarray, indices, tar_size: int):
    crops = np.stack([crop_face(frames[i], boxes[i], tar_size) for i in indices])
    lms = np.stack([photo_to_crop(track.landmarks[i], boxes[i], tar_size) for i in indices])
    return crops, lms


def fit_shape(session: Session, track: LandmarkTrack, video_path: str, options: VideoOptions,
              cache_dir: Optional[str] = None, cache_key_base: str = "") -> ShapeResult:
    """Stage 2: id and tex from ``nframes_shape`` face frames, one batched fit with id/tex
    shared (batch 1) and exp/gamma/pose per frame, with the ``first_*`` iteration counts.
    The result's ``frames`` are source frame indices."""
    fitter, model = session.fitter, session.model
    fitter = fitter.with_config(fitter.cfg.shape_stage())
    indices = select_shape_frames(track.has_face, options.nframes_shape)  # positions in the track
    key = digest({"base": cache_key_base, "frames": (indices + track.start).tolist(), "stage": "shape"})
    path = os.path.join(cache_dir, f"shape{range_suffix(options.frame_range)}.npz") if cache_dir else None
    if path:
        cached = load_npz(path, key)
        if cached is not None and all(f"coeffs_{g}" in cached for g in PER_FRAME_GROUPS):
            log.info("identity/albedo: reusing %s", path)
            camera = None
            if options.frame_camera:
                camera = start_camera(track, options).with_focal(float(cached["focal"]))
            return ShapeResult(id=cached["id"], tex=cached["tex"], frames=cached["frames"],
                               losses=json.loads(str(cached["losses"])), reused=True, camera=camera,
                               focal_source=str(cached["focal_source"]),
                               coeffs={g: cached[f"coeffs_{g}"] for g in PER_FRAME_GROUPS})
    log.info("identity/albedo from %d frames: %s", len(indices), (indices + track.start).tolist())
    boxes = track.crop_boxes(options.padding_ratio)
    wanted = [int(i) + track.start for i in indices]
    missing = [i for i in wanted if i not in track.frames]  # not kept by the landmark pass: seek
    by_source = {**{i: track.frames[i] for i in wanted if i in track.frames},
                 **(read_frames(video_path, missing, track.source_timestamps()) if missing else {})}
    frames = {int(i): by_source[int(i) + track.start] for i in indices}
    crops, lms = _crops(frames, track, boxes, indices, session.camera.image_size)
    dev, dt = session.device, fitter.dtype
    n = len(indices)
    zeros = fitter.zeros(n)
    init = zeros.replace(id=torch.zeros(1, model.layout.n_id, dtype=dt, device=dev),
                         tex=torch.zeros(1, model.layout.n_tex, dtype=dt, device=dev))
    lms_t = torch.as_tensor(lms, dtype=dt, device=dev)
    camera, source = None, ""
    if options.frame_camera:
        camera = start_camera(track, options)
        size, crop_boxes = session.camera.image_size, boxes[indices]
        source = "given"
        if options.estimate_focal:
            focal, prof = profile_focal(fitter, lambda f: camera.with_focal(f).crop(crop_boxes, size, dtype=dt,
                                                                                    device=dev), lms_t, init, camera.focal)
            best = camera.with_focal(float(focal[0]))
            if bool(prof["determined"][0]):
                source = "estimated"
                camera = best
                log.info("focal length: %.1f px (estimated from the landmarks; %.1f° horizontal field of view)",
                         camera.focal, camera.fov_degrees())
            else:
                source = "assumed"
                log.warning("the landmarks do not determine the focal length (best %.0f px, %.0f° field of view, "
                            "but hardly better than others): using %.0f px (a %.0f° field of view); give --focal "
                            "PIXELS when the camera is known", best.focal, best.fov_degrees(), camera.focal,
                            camera.fov_degrees())
        fitter = fitter.with_camera(camera.crop(crop_boxes, size, dtype=dt, device=dev))
    res = fitter.fit(lms_t, torch.as_tensor(crops, dtype=dt, device=dev), init=init)
    result = ShapeResult(id=res.coeffs.id[0].cpu().numpy().astype(np.float32),
                         tex=res.coeffs.tex[0].cpu().numpy().astype(np.float32),
                         frames=indices + track.start, losses=res.losses, camera=camera, focal_source=source,
                         coeffs={g: getattr(res.coeffs, g).detach().cpu().numpy().astype(np.float32)
                                 for g in PER_FRAME_GROUPS})
    if path:
        save_npz(path, key, id=result.id, tex=result.tex, frames=result.frames,
                 losses=np.array(json.dumps(res.losses)), focal=np.array(camera.focal if camera else np.nan),
                 focal_source=np.array(result.focal_source),
                 **{f"coeffs_{g}": v for g, v in result.coeffs.items()})
    return result


def start_camera(track: LandmarkTrack, options: VideoOptions) -> FrameCamera:
    """The video's frame camera before the fit: the given focal, or for "auto" the start
    of the estimate (:func:`core.render.camera.default_focal`); principal point as given,
    else at the frame centre."""
    if options.focal is None or options.focal == "auto":
        focal = default_focal(track.width, track.height)
    else:
        focal = float(options.focal)
    cx, cy = options.principal if options.principal is not None else (None, None)
    return FrameCamera(focal=focal, width=track.width, height=track.height, cx=cx, cy=cy)
