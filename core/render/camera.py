"""The pinhole camera of SPEC §3 and the pixel convention, written down once.

World space: model units (decimetres), x right, y up, z towards the camera. The camera
sits at (0, 0, ``distance``) looking down −z. A world point (x, y, z) has camera depth
z_c = distance − z and projects to::

    u   = focal · x / z_c + cx        (image column, continuous)
    v   = focal · y / z_c + cy
    row = image_size − v              (image rows grow downwards)

with (cx, cy) = (image_size / 2, image_size / 2). Screen space is (col, row) = (u, row).
The renderer uses the same screen coordinates: the pixel in column i, row j covers
[i, i+1) × [j, j+1), centre (i + 0.5, j + 0.5). Landmarks from a detector (column x,
row y in crop pixels) are compared with (u, row) directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: focal length in pixels, distance of the camera to the origin in
    model units, and the side of the square image in pixels."""

    focal: float = 1015.0
    distance: float = 10.0
    image_size: int = 256

    @property
    def center(self) -> float:
        return self.image_size / 2.0

    def project(self, vertices: torch.Tensor) -> torch.Tensor:
        """World vertices (..., 3) -> screen (..., 3) = (col, row, camera depth)."""
        x, y, z = vertices.unbind(-1)
        zc = self.distance - z
        u = self.focal * x / zc + self.center
        v = self.focal * y / zc + self.center
        return torch.stack([u, self.image_size - v, zc], dim=-1)

    def project_points(self, vertices: torch.Tensor) -> torch.Tensor:
        """World vertices (..., 3) -> image points (..., 2) = (col, row) in pixels."""
        return self.project(vertices)[..., :2]

    def project_jacobian(self, vertices: torch.Tensor) -> torch.Tensor:
        """∂(col, row, depth)/∂(x, y, z) of :meth:`project`: (..., 3) -> (..., 3, 3)."""
        x, y, z = vertices.unbind(-1)
        inv = 1.0 / (self.distance - z)
        f = self.focal * inv
        zero = torch.zeros_like(x)
        du = torch.stack([f, zero, f * x * inv], dim=-1)
        drow = torch.stack([zero, -f, -f * y * inv], dim=-1)
        ddepth = torch.stack([zero, zero, -torch.ones_like(x)], dim=-1)
        return torch.stack([du, drow, ddepth], dim=-2)

    def project_points_jacobian(self, vertices: torch.Tensor) -> torch.Tensor:
        """∂(col, row)/∂(x, y, z) of :meth:`project_points`: (..., 3) -> (..., 2, 3)."""
        return self.project_jacobian(vertices)[..., :2, :]

    def fov_degrees(self) -> float:
        """Full field of view (pytorch3d's FoVPerspectiveCameras ``fov``)."""
        import math
        return math.degrees(2.0 * math.atan(self.center / self.focal))
