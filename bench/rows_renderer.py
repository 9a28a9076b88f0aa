"""Renderer rows: ms per frame of forward and forward+backward rendering at 256 x 256.

The mesh is a face model (BFM-sized synthetic by default: about 35709 vertices and 70789
triangles) at typical fitting poses (yaw within +-30 degrees, filling the crop like a
real face crop), rendered with :class:`core.render.MeshRenderer`. "Forward" is rasterize +
interpolate under ``no_grad``; "forward+backward" also back-propagates the image sum to
the screen-space vertices and the vertex colours (what one photometric iteration needs).
The "original" column is pytorch3d's rasterizer (the original's renderer) where it
imports, the "default" column the built-in one; the face model and the loss are not timed.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from core.render.camera import Camera
from core.render import MeshRenderer

from .common import Row, median, timed

log = logging.getLogger("bench")

SECTION = "renderer"


def pose_batch(model, batch: int, seed: int = 0, device=None) -> "object":
    """Coefficients of ``batch`` faces: zero shape, yaw in +-30 degrees, pitch/roll within
    +-10 / +-5 degrees, 0.3 m in front of the model origin (the face fills a 256 crop)."""
    g = np.random.default_rng(seed)
    c = model.layout.zeros(batch, device=device)
    ang = np.stack([g.uniform(-10, 10, batch), g.uniform(-30, 30, batch), g.uniform(-5, 5, batch)], 1)
    trans = np.stack([g.uniform(-0.05, 0.05, batch), 0.1 + g.uniform(-0.05, 0.05, batch),
                      g.uniform(2.5, 3.0, batch)], 1)
    return c.replace(angles=torch.as_tensor(np.radians(ang), dtype=torch.float32, device=device),
                     trans=torch.as_tensor(trans, dtype=torch.float32, device=device))


def make_inputs(model, batch: int, size: int, device: torch.device, seed: int = 0):
    """(verts_screen (B, N, 3), faces (F, 3), colors (B, N, 3)) of the model at fitting poses."""
    with torch.no_grad():
        out = model(pose_batch(model, batch, seed, device))
        screen = Camera(image_size=size).project(out.vertices)
        return screen.contiguous(), model.tri, out.colors.clamp(0, 255).contiguous()


def time_renderer(renderer: MeshRenderer, inputs, size: int, device: torch.device, repeats: int) -> Dict[str, object]:
    """Median seconds per call of forward and forward+backward (after one warm-up each)."""
    verts, faces, colors = inputs

    def forward():
        with torch.no_grad():
            return renderer(verts, faces, colors, (size, size))

    def forward_backward():
        v = verts.detach().clone().requires_grad_(True)
        c = colors.detach().clone().requires_grad_(True)
        renderer(v, faces, c, (size, size)).sum().backward()
        return v.grad

    _, image = timed(forward, device)
    coverage = float((image[..., 3] > 0).float().mean())
    timed(forward_backward, device)
    fwd = [timed(forward, device)[0] for _ in range(repeats)]
    fb = [timed(forward_backward, device)[0] for _ in range(repeats)]
    return {"forward_s": fwd, "forward_backward_s": fb, "coverage": coverage}


def renderer_rows(model, device: torch.device, repeats: int, size: int = 256,
                  batches: Sequence[int] = (1, 16), model_desc: str = "") -> Tuple[List[Row], Dict[str, object]]:
    """Rows (forward and forward+backward, per batch size) and the raw timings."""
    model = model.to(device)
    builtin = MeshRenderer(backend="builtin")
    p3d, p3d_missing = None, ""
    try:
        p3d = MeshRenderer(backend="pytorch3d")
    except (ValueError, ImportError):
        p3d_missing = "pytorch3d not installed"
    details: Dict[str, object] = {"vertices": model.num_vertices, "triangles": int(model.tri.shape[0]),
                                  "image_size": size, "repeats": repeats, "model": model_desc}
    rows: List[Row] = []
    for batch in batches:
        inputs = make_inputs(model, batch, size, device, seed=batch)
        log.info("renderer: builtin, batch %d", batch)
        res_b = time_renderer(builtin, inputs, size, device, repeats)
        res_p, why = None, p3d_missing
        if p3d is not None:
            if device.type == "cpu" and batch > 1:
                # pytorch3d rasterizes naively on the CPU (SPEC §3: ~12 s per 256² frame of 70k
                # triangles): measure batch 1 only, once.
                why = "pytorch3d on the CPU: batch 1 only"
            else:
                log.info("renderer: pytorch3d, batch %d", batch)
                try:
                    res_p = time_renderer(p3d, inputs, size, device, 1 if device.type == "cpu" else repeats)
                except Exception as e:  # a broken pytorch3d build must not sink the whole run
                    why = f"pytorch3d failed: {type(e).__name__}"
                    log.warning("pytorch3d renderer failed: %s", e)
        details[f"batch_{batch}"] = {"builtin": res_b, "pytorch3d": res_p}
        for key, label in (("forward_s", "forward"), ("forward_backward_s", "forward+backward")):
            ms = lambda r: None if r is None else 1e3 * median(r[key]) / batch  # noqa: E731
            n_p = 0 if res_p is None else len(res_p[key])
            rows.append(Row(
                section=SECTION, metric=f"{label}, batch {batch} (ms/frame)", original=ms(res_p), default=ms(res_b),
                better="lower", missing=why, n_original=n_p, n_default=len(res_b[key]),
                note=(f"{size}x{size}, {details['vertices']} vertices / {details['triangles']} triangles, "
                      f"{math.floor(100 * res_b['coverage'])}% of pixels covered; median of {len(res_b[key])}; "
                      f"original column: pytorch3d rasterizer")))
    return rows, details
