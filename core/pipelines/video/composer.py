"""Composing a video's frames as they come (:class:`Composer`): each fitted frame's
render pasted back into its source frame, written to a video in order, with the landmark
NME and model landmarks of each fitted frame. Used by the fitting workers (each composes
its clip while fitting it, :func:`~core.pipelines.video.clips.fit_clip`) and by the last
stage (:func:`~core.pipelines.video.compose.render_video`, for clips from the cache)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from core import threads as thread_control
from core.io.video import VideoWriter
from core.landmarks.crop import crop_to_photo, paste_back
from core.landmarks.metrics import landmark_nme
from core.models.coeffs import Coeffs

from ..session import Session


class Composer:
    """Composes a video's frames into a :class:`VideoWriter` as they come, in order: each
    fitted frame's render (at the crop size, in its crop: the crop camera, or the
    video's frame camera's window on it) pasted back into the source frame through the
    face mask (:func:`paste_back`), every other frame as it is. Fitted frames are rendered
    in batches of ``batch``. For each fitted frame it keeps (by source index) the landmark
    NME of the model's landmarks against the target ones
    (:func:`core.landmarks.metrics.landmark_nme` with its default points, as for photos),
    those model landmarks in frame pixels, and with ``meshes`` its posed vertices.

    session: the fitting session; id, tex: (n,) the video's identity and albedo;
    camera: the video's frame camera (None: the crop camera of the session)."""

    def __init__(self, session: Session, id: np.ndarray, tex: np.ndarray, camera, writer: VideoWriter,
                 batch: int = 8, meshes: bool = False):
        self.fitter, self.camera, self.writer = session.fitter, camera, writer
        self.dev, self.dt = session.device, session.fitter.dtype
        self.tar = session.camera.image_size
        self.num_vertices = session.model.num_vertices
        self.batch, self.meshes = int(batch), bool(meshes)
        self.id = torch.as_tensor(np.asarray(id), dtype=self.dt, device=self.dev)[None]
        self.tex = torch.as_tensor(np.asarray(tex), dtype=self.dt, device=self.dev)[None]
        # The video's shape before expression and its albedo, the same for every frame:
        # computed once, as the fits do (with a BFM-sized model two large products a frame).
        self.fixed = self.fitter.objective.fixed_pieces({"id": self.id, "tex": self.tex})
        self.nme: Dict[int, float] = {}
        self.landmarks: Dict[int, np.ndarray] = {}
        self.vertices: Dict[int, np.ndarray] = {}
        self._pending: List[tuple] = []  # (key, frame, coeffs or None, box, target landmarks)

    def add(self, key: int, frame: np.ndarray, coeffs: Optional[Dict[str, np.ndarray]], box=None,
            target: Optional[np.ndarray] = None) -> None:
        """The next frame (source index ``key``, (H, W, 3) uint8 RGB; the composer pastes
        into it, so it must not be used elsewhere): ``coeffs`` its
        fitted per-frame groups ({group: (n,) array}: exp, gamma, angles, trans), ``box``
        its crop box and ``target`` its (68, 2) landmarks in frame pixels; None: written
        as it is."""
        self._pending.append((int(key), frame, coeffs, box, target))
        fitted = sum(p[2] is not None for p in self._pending)
        if fitted >= self.batch or len(self._pending) >= 4 * self.batch:
            self.flush()

    def flush(self) -> None:
        """Render and write every frame added so far."""
        thread_control.tick()
        todo = [p for p in self._pending if p[2] is not None]
        composed = {}
        if todo:
            b = len(todo)
            d = {g: torch.as_tensor(np.stack([p[2][g] for p in todo]), dtype=self.dt, device=self.dev)
                 for g in todo[0][2]}
            c = Coeffs(id=self.id.expand(b, -1), tex=self.tex.expand(b, -1), **d)
            boxes = np.stack([np.asarray(p[3]) for p in todo])
            f = self.fitter
            if self.camera is not None:  # the frames' crops of the video's camera
                f = f.with_camera(self.camera.crop(boxes, self.tar, dtype=self.dt, device=self.dev))
            with torch.no_grad():
                rgba, out = f.render(c, **self.fixed)
                model_lms = f.camera.project_points(out.landmarks).cpu().numpy()
            vertices = out.vertices.cpu().numpy() if self.meshes else None
            # (clipped and truncated to uint8 for the whole batch at once)
            rgb = rgba[..., :3].clamp(0, 255).to(torch.uint8).cpu().numpy()
            alpha = rgba[..., 3].cpu().numpy()
            for k, (key, frame, _, box, target) in enumerate(todo):
                composed[key] = paste_back(frame, rgb[k], alpha[k], box, inplace=True)  # the frame is ours
                p = crop_to_photo(model_lms[k], box, self.tar)
                self.nme[key] = landmark_nme(p, target)
                if p.shape == (68, 2):
                    self.landmarks[key] = p.astype(np.float32)
                if vertices is not None:
                    self.vertices[key] = vertices[k]
        for key, frame, *_ in self._pending:
            self.writer.write(composed.get(key, frame))
        self._pending.clear()


    def arrays(self) -> Dict[str, np.ndarray]:
        """What it kept, over the fitted frames composed so far (K, by source index):
        ``frames`` (K,) int64, ``nme`` (K,) float64, model ``landmarks`` (K, 68, 2) float32
        in frame pixels (NaN where the model has no 68 landmarks) and, with ``meshes``,
        ``vertices`` (K, V, 3) float16."""
        keys = sorted(self.nme)
        out = {"frames": np.asarray(keys, dtype=np.int64), "nme": np.asarray([self.nme[k] for k in keys]),
               "landmarks": np.full((len(keys), 68, 2), np.nan, dtype=np.float32)}
        for j, k in enumerate(keys):
            if k in self.landmarks:
                out["landmarks"][j] = self.landmarks[k]
        if self.meshes:
            out["vertices"] = np.zeros((len(keys), self.num_vertices, 3), dtype=np.float16)
            for j, k in enumerate(keys):
                out["vertices"][j] = self.vertices[k]
        return out


def gather_parts(parts, first: int, num_frames: int, meshes: Optional[np.ndarray] = None) -> Dict[str, object]:
    """The per-frame results of a video's composed parts (:meth:`Composer.arrays` of each)
    over its ``num_frames`` frames from source frame ``first``: :func:`nme_summary` of the
    NMEs and ``landmarks`` (num_frames, 68, 2) float32, NaN without a fit; ``meshes``
    (num_frames, V, 3) is filled with the parts' vertices."""
    per_frame: Dict[int, float] = {}
    landmarks = np.full((num_frames, 68, 2), np.nan, dtype=np.float32)
    for part in parts:
        pos = part["frames"] - first
        per_frame.update(zip(part["frames"].tolist(), part["nme"].tolist()))
        landmarks[pos] = part["landmarks"]
        if meshes is not None:
            meshes[pos] = part["vertices"]
    return {**nme_summary(per_frame), "landmarks": landmarks}


def nme_summary(per_frame: Dict[int, float]) -> Dict[str, object]:
    """Mean, median, p95 and max of the per-frame NMEs ({source index: value}), and the
    values themselves under ``per_frame``."""
    e = np.asarray(list(per_frame.values())) if per_frame else np.zeros(1)
    return {"mean": float(e.mean()), "median": float(np.median(e)), "p95": float(np.percentile(e, 95)),
            "max": float(e.max()), "per_frame": per_frame}
