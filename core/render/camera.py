"""The pinhole camera of SPEC §3 and the pixel convention, written down once.

World space: model units (decimetres), x right, y up, z towards the camera. The camera
sits at (0, 0, ``distance``) looking down −z. A world point (x, y, z) has camera depth
z_c = distance − z and projects to::

    col = focal · x / z_c + pcol        (image column, continuous)
    row = prow − focal · y / z_c        (image rows grow downwards)

with the principal point (pcol, prow) = (image_size / 2, image_size / 2) unless given
(SPEC's form: v = focal · y / z_c + c, row = image_size − v). Screen space is (col, row).
The renderer uses the same screen coordinates: the pixel in column i, row j covers
[i, i+1) × [j, j+1), centre (i + 0.5, j + 0.5). Landmarks from a detector (column x,
row y in crop pixels) are compared with (col, row) directly.

A :class:`Camera` is the square crop's camera. Its ``focal`` and ``principal`` may be
per-frame tensors ((B,) and (B, 2)) for a batch whose frames are seen through different
crops of one full-frame camera (:class:`FrameCamera`, :meth:`FrameCamera.crop`).

A :class:`FrameCamera` is one pinhole camera for a whole photo or video frame (W × H
pixels, principal point (cx, cy), by default the frame centre (W/2, H/2)), in the same
world space: camera-space point (x, y, z_cam) = (x, y, z − distance) (OpenGL axes: x
right, y up, looking along −z) lands on frame pixel (cx + f·x / −z_cam, cy − f·y / −z_cam).
A square crop box (x0, y0, x1, y1) resized to S pixels (scale s = S / (x1 − x0), see
:mod:`core.landmarks.crop`) sees it as the crop camera with focal f·s and principal point
((cx − x0)·s, (cy − y0)·s), so a pose fitted in any crop is a pose in the frame camera.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

Scalar = Union[float, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Camera:
    """Pinhole camera of a square image.

    Attributes:
        focal: focal length in pixels: a float, or a (B,) tensor (one per frame).
        distance: the camera's distance to the world origin, model units.
        image_size: the side of the square image in pixels.
        principal: the principal point (col, row) in pixels: None for the image centre,
            a pair of floats, or a (B, 2) tensor (one per frame).
    """

    focal: Scalar = 1015.0
    distance: float = 10.0
    image_size: int = 256
    principal: Optional[Union[Tuple[float, float], torch.Tensor]] = None

    @property
    def center(self) -> float:
        """The image centre (the default principal point), pixels."""
        return self.image_size / 2.0

    @property
    def batched(self) -> bool:
        """Whether the focal or the principal point is per-frame."""
        return torch.is_tensor(self.focal) or torch.is_tensor(self.principal)

    def _focal(self, like: torch.Tensor) -> Scalar:
        """The focal broadcast against ``like`` (B, ...)."""
        f = self.focal
        if torch.is_tensor(f):
            f = f.to(like).reshape(_batch_shape(like))
        return f

    def _principal(self, like: torch.Tensor) -> Tuple[Scalar, Scalar]:
        """(pcol, prow) broadcast against ``like`` (B, ...)."""
        p = self.principal
        if p is None:
            return self.center, self.center
        if torch.is_tensor(p):
            p = p.to(like)
            return p[:, 0].reshape(_batch_shape(like)), p[:, 1].reshape(_batch_shape(like))
        return float(p[0]), float(p[1])

    def project(self, vertices: torch.Tensor) -> torch.Tensor:
        """World vertices (..., 3) -> screen (..., 3) = (col, row, camera depth); with
        per-frame focal / principal point, vertices are (B, ..., 3)."""
        x, y, z = vertices.unbind(-1)
        zc = self.distance - z
        if self.principal is None and not torch.is_tensor(self.focal):  # SPEC's form, to the bit
            u = self.focal * x / zc + self.center
            v = self.focal * y / zc + self.center
            return torch.stack([u, self.image_size - v, zc], dim=-1)
        f = self._focal(x)
        pc, pr = self._principal(x)
        return torch.stack([f * x / zc + pc, pr - f * y / zc, zc], dim=-1)

    def project_points(self, vertices: torch.Tensor) -> torch.Tensor:
        """World vertices (..., 3) -> image points (..., 2) = (col, row) in pixels."""
        return self.project(vertices)[..., :2]

    def project_jacobian(self, vertices: torch.Tensor) -> torch.Tensor:
        """∂(col, row, depth)/∂(x, y, z) of :meth:`project`: (..., 3) -> (..., 3, 3)."""
        x, y, z = vertices.unbind(-1)
        inv = 1.0 / (self.distance - z)
        f = self._focal(x) * inv
        zero = torch.zeros_like(x)
        du = torch.stack([f, zero, f * x * inv], dim=-1)
        drow = torch.stack([zero, -f, -f * y * inv], dim=-1)
        ddepth = torch.stack([zero, zero, -torch.ones_like(x)], dim=-1)
        return torch.stack([du, drow, ddepth], dim=-2)

    def project_points_jacobian(self, vertices: torch.Tensor) -> torch.Tensor:
        """∂(col, row)/∂(x, y, z) of :meth:`project_points`: (..., 3) -> (..., 2, 3)."""
        return self.project_jacobian(vertices)[..., :2, :]

    def scaled(self, size: int) -> "Camera":
        """The same view at ``size`` pixels (a resized image: every pixel coordinate times
        size / image_size)."""
        s = size / self.image_size
        p = self.principal
        if p is not None:
            p = p * s if torch.is_tensor(p) else (float(p[0]) * s, float(p[1]) * s)
        return Camera(focal=self.focal * s, distance=self.distance, image_size=size, principal=p)

    def with_focal(self, focal: Scalar) -> "Camera":
        """The camera with another focal (float or (B,) tensor)."""
        return replace(self, focal=focal)

    def take(self, idx) -> "Camera":
        """The camera of the frames ``idx`` ((B',) ids, a bool mask or a slice) of a batch
        (itself when nothing is per-frame)."""
        if not self.batched:
            return self
        f = self.focal[idx] if torch.is_tensor(self.focal) and self.focal.numel() > 1 else self.focal
        p = self.principal[idx] if torch.is_tensor(self.principal) else self.principal
        return replace(self, focal=f, principal=p)

    def frame(self, b: int) -> "Camera":
        """Frame ``b``'s camera (itself when nothing is per-frame): its points may then
        be (..., 3) without the batch dimension."""
        return self.take(slice(b, b + 1))

    def fov_degrees(self) -> float:
        """Full field of view (pytorch3d's FoVPerspectiveCameras ``fov``)."""
        return math.degrees(2.0 * math.atan(self.center / float(self.focal)))


def _batch_shape(like: torch.Tensor) -> tuple:
    """The shape a per-frame (B,) value takes to broadcast against ``like`` (B, ...); a
    single frame's value against a point without batch dimension."""
    return (-1, *([1] * (like.dim() - 1))) if like.dim() > 0 else ()


@dataclass(frozen=True)
class FrameCamera:
    """One pinhole camera for a whole W × H photo or video frame (see the module
    docstring): focal in frame pixels, principal point (cx, cy) in frame pixels (the
    landmarks' coordinates), the camera at (0, 0, ``distance``) of world space."""

    focal: float
    width: int
    height: int
    cx: Optional[float] = None
    cy: Optional[float] = None
    distance: float = 10.0

    def __post_init__(self):
        if not (math.isfinite(float(self.focal)) and float(self.focal) > 0):
            raise ValueError(f"focal must be a positive number of pixels; got {self.focal!r}")
        if self.cx is None:
            object.__setattr__(self, "cx", self.width / 2.0)
        if self.cy is None:
            object.__setattr__(self, "cy", self.height / 2.0)

    def crop(self, boxes, size: int, dtype=torch.float32, device=None) -> Camera:
        """The camera of square crops ``boxes`` ((4,) or (B, 4) x0, y0, x1, y1 frame
        pixels) resized to ``size`` pixels: per-frame focal (B,) and principal (B, 2)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = size / (b[:, 2] - b[:, 0])
        focal = torch.as_tensor(self.focal * s, dtype=dtype, device=device)
        principal = torch.as_tensor(np.stack([(self.cx - b[:, 0]) * s, (self.cy - b[:, 1]) * s], 1),
                                    dtype=dtype, device=device)
        return Camera(focal=focal, distance=self.distance, image_size=size, principal=principal)

    def with_focal(self, focal: float) -> "FrameCamera":
        return replace(self, focal=float(focal))

    def fov_degrees(self) -> float:
        """The horizontal field of view across the frame's width."""
        return math.degrees(2.0 * math.atan(self.width / 2.0 / self.focal))

    def intrinsics(self) -> np.ndarray:
        """(3, 3) K = [[f, 0, cx], [0, f, cy], [0, 0, 1]] (frame pixels; for points in the
        OpenCV camera frame, x right, y down, z forward = (x, −y, −z_cam))."""
        return np.array([[self.focal, 0.0, self.cx], [0.0, self.focal, self.cy], [0.0, 0.0, 1.0]])

    def as_camera(self) -> Camera:
        """This camera as a :class:`Camera` whose image is the whole frame (its principal
        point (cx, cy)): its projections are frame pixels."""
        return Camera(focal=float(self.focal), distance=self.distance, image_size=max(self.width, self.height),
                      principal=(float(self.cx), float(self.cy)))

    def project(self, vertices: np.ndarray) -> np.ndarray:
        """World vertices (..., 3) (numpy) -> frame pixels (..., 2) (col, row), float64."""
        v = torch.as_tensor(np.asarray(vertices, dtype=np.float64))
        return self.as_camera().project_points(v).numpy()

    def as_dict(self) -> dict:
        return {"focal": float(self.focal), "cx": float(self.cx), "cy": float(self.cy), "width": int(self.width),
                "height": int(self.height), "distance": float(self.distance),
                "intrinsics": self.intrinsics().tolist()}


def crop_cameras(cameras: Sequence[FrameCamera], boxes, size: int, dtype=torch.float32, device=None) -> Camera:
    """One batched crop camera for B frames with their own frame cameras (photos of
    different sizes): frame b seen through its box ``boxes[b]`` resized to ``size``."""
    parts = [cam.crop(box, size, dtype=torch.float64) for cam, box in zip(cameras, np.asarray(boxes).reshape(-1, 4))]
    focal = torch.cat([p.focal for p in parts]).to(dtype=dtype, device=device)
    principal = torch.cat([p.principal for p in parts]).to(dtype=dtype, device=device)
    return Camera(focal=focal, distance=cameras[0].distance, image_size=size, principal=principal)


def default_focal(width: int, height: int) -> float:
    """A starting focal for a frame of W × H pixels when none is known: the focal of a
    camera whose full field of view across the longer side is about 50° (f ≈ 1.07 ·
    max(W, H)), typical of phones and webcams."""
    return 1.07 * float(max(width, height))


def original_focal(boxes: Sequence, size: int, focal: float = 1015.0) -> float:
    """The frame focal that the original crop camera (``focal`` px at ``size`` px)
    corresponds to for crop boxes of the median side: focal · side / size."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return float(focal * np.median(b[:, 2] - b[:, 0]) / size)
