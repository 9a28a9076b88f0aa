"""Differentiable perspective-correct interpolation over the triangles that cover the
pixels, in pure PyTorch, with pytorch3d's semantics (SPEC §3).

Every function takes the screen-space vertices ``verts_screen`` (B, N, 3) (col, row,
depth) and the ``pix_to_face`` (B, H, W) of a rasterization (core/render/coverage.py,
which writes down the screen space and the coverage rule, or the pytorch3d backend).

Barycentrics
    With screen-space weights w_k at the pixel centre and vertex depths z_k, the
    perspective-correct weights are (w_k / z_k) / sum_j (w_j / z_j); the depth at the
    pixel centre is 1 / sum_j (w_j / z_j). They are differentiable w.r.t. all three
    coordinates of the vertices.

Implementation (no Python loop over triangles or pixels)
    Only the covered pixels are gathered, weighted (and clamped, for the renderer's
    RGBA) and scattered back, in structure-of-arrays form (contiguous (3, M) vectors),
    with a hand-written backward.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .checks import check_inputs, check_pix_to_face
from .layout import batch_chunks, cat, columns, edge_functions, face_columns

__all__ = ["PixelJacobian", "barycentrics", "interpolate", "interpolation_jacobian"]


def _covered_pixels(pix_to_face: torch.Tensor, faces_t: torch.Tensor, num_verts: int, dtype):
    """The covered pixels of pix_to_face (B, H, W); faces_t (3, F) long.

    Returns idx (M,) flat pixel indices into B*H*W; vidx (3, M) indices into the
    flattened B*N vertices of the three corners of each pixel's face; px, py (M,) the
    pixel centres (col + 0.5, row + 0.5) in ``dtype``.
    """
    batch, height, width = pix_to_face.shape
    flat = pix_to_face.reshape(-1)
    idx = torch.nonzero(flat >= 0).squeeze(1)
    face = flat.index_select(0, idx)
    rem = idx
    if batch > 1:
        b = torch.div(idx, height * width, rounding_mode="floor")
        rem = idx - b * (height * width)
    row = torch.div(rem, width, rounding_mode="floor")
    col = rem - row * width
    vidx = idx.new_empty(3, idx.shape[0])
    for k in range(3):  # three 1-D gathers: an int64 gather along dim 1 is several times slower
        torch.index_select(faces_t[k], 0, face, out=vidx[k])
    if batch > 1:
        vidx += (b * num_verts).unsqueeze(0)
    return idx, vidx, col.to(dtype) + 0.5, row.to(dtype) + 0.5


def _edge_weights(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, px: torch.Tensor,
                  py: torch.Tensor):
    """Corner coordinates x, y, z (3, M) of each pixel's face and the pixel centres px,
    py (M,) -> (rx, ry, u, s): r = v - p (3, M); u_k = e_k / z_k (3, M) with the edge
    functions e_k = cross(r_{k+1}, r_{k+2}) (screen weights times twice the area); s =
    sum_k u_k (M,). The perspective-correct weights are u / s (the area cancels)."""
    rx = x - px
    ry = y - py
    u = edge_functions(rx, ry) / z
    return rx, ry, u, u.sum(0)


def _corner_grads(gw: torch.Tensor, rx, ry, z, u, s, w):
    """Chain rule through the perspective-correct weights: gw (3, M) = dL/dw_k and the
    quantities of :func:`_edge_weights` -> (gx, gy, gz), each (3, M): dL/d(col, row,
    depth) of corner k. No autograd."""
    ge = (gw - (gw * w).sum(0)).div_(s).div_(z)  # dL/de_k: w = u / s, u = e / z
    gz = (ge * u).neg_()
    # e_k = cross(r_{k+1}, r_{k+2}): corner j enters e_{j-1} first, e_{j+1} second.
    gx, gy = torch.empty_like(ge), torch.empty_like(ge)
    for j in range(3):
        prev, nxt = (j - 1) % 3, (j + 1) % 3
        torch.mul(ge[prev], ry[nxt], out=gx[j]).addcmul_(ge[nxt], ry[prev], value=-1)
        torch.mul(ge[nxt], rx[prev], out=gy[j]).addcmul_(ge[prev], rx[nxt], value=-1)
    return gx, gy, gz


def _offset_index(index: torch.Tensor, rows: int, stride: int) -> torch.Tensor:
    """index (L,) -> (rows * L,): index + r * stride for r = 0..rows-1, row-major."""
    offsets = torch.arange(rows, device=index.device) * stride
    return (index.view(1, -1) + offsets.view(-1, 1)).view(-1)


def _gather_corners(table: torch.Tensor, vidx: torch.Tensor) -> torch.Tensor:
    """table (B, N, D) per-vertex values, vidx (3, M) -> (D, 3, M): one gather along dim 1
    of the (D, B*N) columns (the fastest layout for the elementwise work that follows)."""
    cols = columns(table.reshape(-1, table.shape[-1]))
    return cols.index_select(1, vidx.reshape(-1)).view(table.shape[-1], 3, -1)


class _Interpolate(torch.autograd.Function):
    """image (B, H, W, C [+ 1]): at the covered pixels idx (M,), sum_k w_k attrs[vidx_k]
    with the perspective-correct weights w, clamped to ``clamp`` = (lo, hi) if given; 0
    elsewhere; with ``alpha``, one more channel, 1 at the covered pixels. Inputs: attrs
    (B, N, C), verts (B, N, 3) (col, row, depth), vidx (3, M), pixel centres px, py (M,),
    idx (M,) flat pixel indices.

    The backward is written out by hand so that everything stays in contiguous (3, M)
    vectors, 1-D gathers and 1-D scatter-adds: several times faster on a CPU than
    autograd through (M, 3, C) tensors.
    """

    @staticmethod
    def forward(ctx, attrs, verts, vidx, px, py, idx, image_shape, clamp, alpha):
        x, y, z = _gather_corners(verts, vidx)
        rx, ry, u, s = _edge_weights(x, y, z, px, py)
        w = u / s
        a = _gather_corners(attrs, vidx)  # (C, 3, M)
        wa = w.to(a.dtype)
        values = torch.addcmul(torch.addcmul(a[:, 0] * wa[0], a[:, 1], wa[1]), a[:, 2], wa[2])
        inside = None
        if clamp is not None:
            if _needs_clamp(values, *clamp):
                inside = (values >= clamp[0]) & (values <= clamp[1])  # torch.clamp's gradient mask
            values.clamp_(*clamp)
        channels = values.shape[0] + int(alpha)
        if alpha:
            values = torch.cat([values, values.new_ones(1, values.shape[1])])
        pos = _offset_index(idx * channels, channels, 1)  # channel-last image positions
        image = values.new_zeros(int(torch.Size(image_shape).numel()) * channels)
        image.scatter_(0, pos, values.view(-1))
        ctx.save_for_backward(vidx, rx, ry, z, u, s, w, a, pos[:a.shape[0] * idx.shape[0]], inside)
        ctx.shapes = (attrs.shape, verts.shape)
        return image.view(*image_shape, channels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        vidx, rx, ry, z, u, s, w, a, pos, inside = ctx.saved_tensors
        attrs_shape, verts_shape = ctx.shapes
        num = attrs_shape[0] * attrs_shape[1]
        channels = a.shape[0]
        # (C, M) at the colour channels' positions (the alpha channel has no gradient)
        grad_values = grad_image.reshape(-1).index_select(0, pos).view(channels, -1)
        if inside is not None:
            grad_values = grad_values * inside
        grad_attrs = grad_verts = None
        if ctx.needs_input_grad[0]:
            wg = w.to(grad_values.dtype)
            grad_attrs = _scatter_corners([wg * gc for gc in grad_values], vidx, num, attrs_shape)
        if ctx.needs_input_grad[1]:
            gw = a[0] * grad_values[0]  # dL/dw (3, M)
            for c in range(1, channels):
                gw.addcmul_(a[c], grad_values[c])
            gx, gy, gz = _corner_grads(gw.to(w.dtype), rx, ry, z, u, s, w)
            grad_verts = _scatter_corners([gx, gy, gz], vidx, num, verts_shape)
        return grad_attrs, grad_verts, None, None, None, None, None, None, None


def _needs_clamp(values: torch.Tensor, lo: float, hi: float) -> bool:
    """False when every value is known to lie in [lo, hi] (then clamping changes nothing
    and needs no gradient mask). Checked on a CPU only: elsewhere it would wait for the
    device, so the mask is always built there."""
    if values.device.type != "cpu":
        return True
    if values.numel() == 0:
        return False
    vmin, vmax = torch.aminmax(values)
    return not (lo <= float(vmin) and float(vmax) <= hi)  # NaN: needs the mask


def _scatter_corners(values, vidx: torch.Tensor, num: int, shape) -> torch.Tensor:
    """Sum D tensors (3, M) into per-vertex rows at vidx (3, M) -> (B, N, D) = shape (a
    channel-last view of a (D, B*N) tensor: one contiguous 1-D scatter-add per channel)."""
    flat = vidx.reshape(-1)
    out = values[0].new_zeros(len(values), num)
    for d, v in enumerate(values):
        out[d].scatter_add_(0, flat, v.reshape(-1))
    return out.t().unflatten(0, tuple(shape[:2]))


def _scatter_image(values: torch.Tensor, idx: torch.Tensor, batch: int, height: int,
                   width: int) -> torch.Tensor:
    """values (C, M) at flat pixel indices idx (M,) -> image (B, H, W, C), zero elsewhere."""
    channels = values.shape[0]
    pos = _offset_index(idx * channels, channels, 1)
    out = values.new_zeros(batch * height * width * channels)
    return out.index_copy(0, pos, values.reshape(-1)).view(batch, height, width, channels)


def _per_chunk(fn, verts_screen: torch.Tensor, faces: torch.Tensor,
               pix_to_face: torch.Tensor, attrs=None) -> torch.Tensor:
    """Check the inputs, then compute image = fn(idx, vidx, px, py, verts, attrs,
    image_shape) (see _covered_pixels) for groups of frames, concatenated over the batch."""
    check_inputs(verts_screen, faces)
    batch, num_verts, _ = verts_screen.shape
    check_pix_to_face(pix_to_face, batch)
    device = verts_screen.device
    faces_t = face_columns(faces, device)  # (3, F)
    pix_to_face = pix_to_face.to(device)
    parts = []
    for sl in batch_chunks(batch, pix_to_face[0].numel()):
        p2f = pix_to_face[sl]
        covered = _covered_pixels(p2f, faces_t, num_verts, verts_screen.dtype)
        parts.append(fn(*covered, verts_screen[sl], None if attrs is None else attrs[sl],
                        p2f.shape))
    return cat(parts)


def _barycentrics_chunk(idx, vidx, px, py, verts, _, image_shape):
    x, y, z = _gather_corners(verts, vidx)
    _, _, u, s = _edge_weights(x, y, z, px, py)
    return _scatter_image(u / s, idx, *image_shape)


def _interpolate_chunk(idx, vidx, px, py, verts, attrs, image_shape, clamp=None, alpha=False):
    return _Interpolate.apply(attrs, verts, vidx, px, py, idx, tuple(image_shape), clamp, alpha)


def barycentrics(verts_screen: torch.Tensor, faces: torch.Tensor,
                 pix_to_face: torch.Tensor) -> torch.Tensor:
    """Perspective-correct barycentric weights at the pixel centres.

    Args:
        verts_screen: (B, N, 3) float, screen-space vertices (col, row, depth).
        faces: (F, 3) long, 0-based.
        pix_to_face: (B, H, W) long, from :func:`rasterize` (-1 for background).

    Returns:
        (B, H, W, 3): weights of the three vertices of ``faces[pix_to_face]`` (they sum
        to 1), 0 on background; differentiable w.r.t. verts_screen (plain autograd).
    """
    return _per_chunk(_barycentrics_chunk, verts_screen, faces, pix_to_face)


def interpolate(attrs: torch.Tensor, verts_screen: torch.Tensor, faces: torch.Tensor,
                pix_to_face: torch.Tensor, clamp: Optional[Tuple[float, float]] = None,
                alpha: bool = False) -> torch.Tensor:
    """Interpolate per-vertex attributes at the pixel centres.

    Args:
        attrs: (B, N, C) float, per-vertex attributes.
        verts_screen: (B, N, 3) float, screen-space vertices (col, row, depth).
        faces: (F, 3) long, 0-based.
        pix_to_face: (B, H, W) long, from :func:`rasterize` (-1 for background).
        clamp: optional (lo, hi): the interpolated values are clamped to [lo, hi], with
            torch.clamp's gradient (zero where a value is outside); done at the covered
            pixels only (the same as clamping the image when 0 is in [lo, hi]).
        alpha: append one channel, 1 where a triangle covers the pixel, 0 elsewhere.

    Returns:
        (B, H, W, C) (C + 1 with ``alpha``): the perspective-correct interpolation of
        ``attrs`` over the covering triangle, 0 on background. Differentiable (once)
        w.r.t. attrs and verts_screen, through a hand-written backward that
        tests/test_render.py checks with gradcheck.
    """
    if attrs.dim() != 3 or attrs.shape[:2] != verts_screen.shape[:2]:
        raise ValueError(f"Expected attrs to have shape ({verts_screen.shape[0]}, "
                         f"{verts_screen.shape[1]}, C); got {tuple(attrs.shape)}")
    if not attrs.is_floating_point():
        raise ValueError(f"Expected attrs to be floating point; got {attrs.dtype}")
    if clamp is not None:
        clamp = (float(clamp[0]), float(clamp[1]))
        if not clamp[0] <= 0.0 <= clamp[1]:
            raise ValueError(f"Expected clamp = (lo, hi) with lo <= 0 <= hi; got {clamp}")
    chunk = functools.partial(_interpolate_chunk, clamp=clamp, alpha=bool(alpha))
    return _per_chunk(chunk, verts_screen, faces, pix_to_face, attrs)


@dataclass(frozen=True)
class PixelJacobian:
    """:func:`interpolate` at the covered pixels, with its derivatives (M covered pixels).

    Members:
        idx: (M,) flat pixel indices into B*H*W.
        vidx: (3, M) indices into the flattened B*N vertices of each pixel's corners.
        weights: (3, M) perspective-correct weights w_k of the corners.
        values: (C, M) interpolated attributes sum_k w_k attrs[vidx_k].
        d_verts: (C, 3, 3, M): d values[c] / d (col, row, depth) of corner k, [c, k, d].
    """

    idx: torch.Tensor
    vidx: torch.Tensor
    weights: torch.Tensor
    values: torch.Tensor
    d_verts: torch.Tensor


def interpolation_jacobian(attrs: torch.Tensor, verts_screen: torch.Tensor, faces: torch.Tensor,
                           pix_to_face: torch.Tensor) -> PixelJacobian:
    """What :func:`interpolate` computes at the covered pixels, and how it changes with the
    corners' screen positions (the same formulas as its backward), for Gauss-Newton
    solvers that assemble per-pixel Jacobians by the chain rule. The derivative w.r.t.
    ``attrs[vidx_k]`` is ``weights[k]``. No autograd.

    Args:
        attrs: (B, N, C), verts_screen: (B, N, 3), faces: (F, 3), pix_to_face: (B, H, W).
    """
    check_inputs(verts_screen, faces)
    batch, num_verts, _ = verts_screen.shape
    check_pix_to_face(pix_to_face, batch)
    faces_t = face_columns(faces, verts_screen.device)
    with torch.no_grad():
        idx, vidx, px, py = _covered_pixels(pix_to_face.to(verts_screen.device), faces_t, num_verts,
                                            verts_screen.dtype)
        x, y, z = _gather_corners(verts_screen, vidx)
        rx, ry, u, s = _edge_weights(x, y, z, px, py)
        w = u / s
        a = _gather_corners(attrs, vidx)  # (C, 3, M)
        values = (a * w).sum(1)
        d = torch.stack([torch.stack(_corner_grads(a[c], rx, ry, z, u, s, w)) for c in range(a.shape[0])])
        d = d.transpose(1, 2)  # (C, 3 coords, 3 corners, M) -> (C, 3 corners, 3 coords, M)
    return PixelJacobian(idx=idx, vidx=vidx, weights=w, values=values, d_verts=d.contiguous())
