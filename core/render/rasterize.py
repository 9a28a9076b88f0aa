"""Built-in rasterizer in pure PyTorch: hard z-buffer coverage plus differentiable
perspective-correct interpolation, with pytorch3d's semantics (SPEC §3).

Screen space
    Every function takes vertices already projected to the screen, ``verts_screen``
    (B, N, 3) whose last dimension is (col, row, depth):

    * ``col``, ``row``: continuous pixel coordinates. The pixel in column i, row j covers
      [i, i+1) x [j, j+1) and has its centre at (i + 0.5, j + 0.5); rows grow downwards.
    * ``depth``: the camera depth z_c > 0 (larger is farther).

Coverage
    A pixel belongs to the nearest triangle (smallest perspective-correct camera depth at
    the pixel centre) among those whose screen-space barycentric coordinates at the pixel
    centre are all strictly positive. Both windings render (no backface culling).
    Degenerate (zero-area) triangles, triangles with a vertex at depth <= ``znear`` and
    triangles with every vertex beyond ``zfar`` are skipped. Equal depths go to the smaller
    face index. Which triangle covers a pixel has no gradient (as in pytorch3d).

Barycentrics
    With screen-space weights w_k at the pixel centre and vertex depths z_k, the
    perspective-correct weights are (w_k / z_k) / sum_j (w_j / z_j); the depth at the
    pixel centre is 1 / sum_j (w_j / z_j). They are differentiable w.r.t. all three
    coordinates of the vertices.

Implementation (no Python loop over triangles or pixels)
    rasterize: per triangle, the integer range of pixel centres in its bounding box; the
    first candidate centre of every triangle and the second of those with two (together
    nearly all of a dense mesh) are tested in place, triangles with more candidates
    enumerate them with repeat_interleave; the z-buffer is resolved by
    one ``scatter_reduce(amin)`` over an int64 key (float32 bits of the depth, monotone for
    positive floats, in the high word; face index in the low word). Frames are processed
    in groups and candidates in chunks, which bounds memory.
    interpolate: only the covered pixels are gathered, weighted and scattered back, in
    structure-of-arrays form (contiguous (3, M) vectors), with a hand-written backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["Fragments", "PixelJacobian", "rasterize", "barycentrics", "interpolate", "interpolation_jacobian"]

# Bound on the number of (triangle, pixel) candidate pairs tested at once (memory).
_MAX_CANDIDATES = 1 << 20
# Frames are processed in groups of about this many faces or pixels: it keeps every
# intermediate tensor a few MB, in cache and clear of the allocator's page-faulting
# large-block path, so the time per frame does not grow with the batch.
_CHUNK_ELEMENTS = 1 << 18
_EMPTY_KEY = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Fragments:
    """Result of :func:`rasterize`.

    Members:
        pix_to_face: LongTensor (B, H, W): index into ``faces`` (0..F-1, the same face ids
            for every batch element) of the triangle covering pixel (row, col), or -1 for
            background.
        zbuf: FloatTensor (B, H, W): camera depth of that triangle at the pixel centre
            (float32 precision), -1 for background.
    """

    pix_to_face: torch.Tensor
    zbuf: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """BoolTensor (B, H, W): True where a triangle covers the pixel."""
        return self.pix_to_face >= 0


def _check_inputs(verts_screen: torch.Tensor, faces: torch.Tensor) -> None:
    if verts_screen.dim() != 3 or verts_screen.shape[-1] != 3:
        raise ValueError(
            f"Expected verts_screen to have shape (B, N, 3); got {tuple(verts_screen.shape)}")
    if not verts_screen.is_floating_point():
        raise ValueError(f"Expected verts_screen to be floating point; got {verts_screen.dtype}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"Expected faces to have shape (F, 3); got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"Expected faces to be int64 or int32; got {faces.dtype}")


def _check_image_size(image_size) -> Tuple[int, int]:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    try:
        height, width = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"Expected image_size to be (H, W); got {image_size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"Expected a positive image_size (H, W); got {(height, width)}")
    return height, width


def _check_pix_to_face(pix_to_face: torch.Tensor, batch: int) -> None:
    if pix_to_face.dim() != 3 or pix_to_face.shape[0] != batch:
        raise ValueError(
            f"Expected pix_to_face to have shape ({batch}, H, W); got {tuple(pix_to_face.shape)}")


def rasterize(
    verts_screen: torch.Tensor,
    faces: torch.Tensor,
    image_size,
    znear: float = 0.01,
    zfar: float = 50.0,
) -> Fragments:
    """Hard rasterization of a batch of meshes that share one face list.

    Args:
        verts_screen: (B, N, 3) float, screen-space vertices (col, row, depth), see the
            module docstring. Not differentiated (the rasterizer runs under no_grad).
        faces: (F, 3) long, 0-based vertex indices of the triangles, shared by the batch.
        image_size: (H, W) in pixels, or an int for a square image.
        znear: triangles with a vertex at depth <= znear are skipped.
        zfar: triangles whose vertices are all at depth > zfar are skipped.

    Returns:
        Fragments with pix_to_face (B, H, W) long and zbuf (B, H, W) float, see
        :class:`Fragments`.
    """
    _check_inputs(verts_screen, faces)
    height, width = _check_image_size(image_size)
    with torch.no_grad():
        return _rasterize(verts_screen.detach(), faces, height, width, float(znear), float(zfar))


def _batch_chunks(batch: int, per_frame: int):
    """Slices of the batch with about _CHUNK_ELEMENTS elements (at least one frame) each."""
    step = max(1, _CHUNK_ELEMENTS // max(per_frame, 1))
    return [slice(b, min(b + step, batch)) for b in range(0, batch, step)]


def _cat(parts):
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rasterize(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int,
               znear: float, zfar: float) -> Fragments:
    batch, num_verts, _ = verts.shape
    num_faces = faces.shape[0]
    device = verts.device
    dtype = verts.dtype if verts.dtype in (torch.float32, torch.float64) else torch.float32
    faces_t = _columns(faces.to(device=device, dtype=torch.int64))  # (3, F)
    p2f_parts, zbuf_parts = [], []
    for sl in _batch_chunks(batch, max(num_faces, height * width)):
        frames = sl.stop - sl.start
        keys = torch.full((frames * height * width,), _EMPTY_KEY, dtype=torch.int64, device=device)
        if num_faces > 0 and num_verts > 0:
            _rasterize_into(keys, verts[sl].to(dtype), faces_t, height, width, znear, zfar)
        covered = keys != _EMPTY_KEY
        pix_to_face = (keys & 0xFFFFFFFF).masked_fill_(~covered, -1)
        zbuf = (keys >> 32).to(torch.int32).view(torch.float32).masked_fill_(~covered, -1.0)
        p2f_parts.append(pix_to_face.view(frames, height, width))
        zbuf_parts.append(zbuf.view(frames, height, width))
    return Fragments(pix_to_face=_cat(p2f_parts), zbuf=_cat(zbuf_parts).to(verts.dtype))


def _columns(t: torch.Tensor) -> torch.Tensor:
    """(R, D) -> (D, R) contiguous: the structure-of-arrays form. For small D, stacking the
    columns is several times faster than ``t.t().contiguous()`` on a CPU."""
    return torch.stack(t.unbind(1))


def _rasterize_into(keys: torch.Tensor, verts: torch.Tensor, faces_t: torch.Tensor,
                    height: int, width: int, znear: float, zfar: float) -> None:
    """Min-reduce the key (depth bits << 32 | face id) of every covered (face, pixel)
    pair into ``keys`` (B*H*W,) int64. verts (B, N, 3) float32/64, faces_t (3, F) long.

    Every per-face quantity is a contiguous (..., B*F) tensor in batch-major order
    (element b*F + f): elementwise work on contiguous vectors is what the CPU does
    fastest, and fewer, larger operations beat many small ones.
    """
    batch, num_verts, _ = verts.shape
    num_faces = faces_t.shape[1]
    # Corner-major vertex indices into the flattened batch: gidx[k, b*F + f].
    gidx = faces_t.reshape(-1)
    if batch > 1:
        offsets = torch.arange(batch, device=verts.device) * num_verts
        gidx = (faces_t.unsqueeze(1) + offsets.view(1, -1, 1)).view(-1)
    # (col/row/depth, corner, B*F); a gather along dim 1 of a 2-D tensor is the fastest
    # form (the same along the last dim of a 3-D tensor is many times slower).
    corners = _columns(verts.reshape(-1, 3)).index_select(1, gidx).view(3, 3, -1)
    xy, zs = corners[:2], corners[2]

    # Integer range of pixel centres (i + 0.5) inside the bounding box, (column, row);
    # clamping before any cast keeps huge coordinates finite. lo is the first candidate
    # p0, span the number of candidate columns and rows.
    lo = (xy.amin(1) - 0.5).ceil_()
    hi = (xy.amax(1) - 0.5).floor_()
    if height == width:
        lo.clamp_(0, width)
        hi.clamp_(-1, width - 1)
    else:
        for i, size in enumerate((width, height)):
            lo[i].clamp_(0, size)
            hi[i].clamp_(-1, size - 1)
    span = (hi - lo).add_(1).clamp_(min=0)
    count = span[0] * span[1]  # float: exact for the small counts it is compared with
    zmin = zs.amin(0)
    count.mul_((zmin > znear) & (zmin <= zfar))

    # Vertices relative to p0 (small numbers: accurate). The screen weight of vertex k
    # at p, unnormalised, is the edge function e_k(p) = cross(v_{k+1} - p, v_{k+2} - p);
    # twice the signed area is e_0 + e_1 + e_2 (0 exactly when two vertices coincide).
    # p is inside iff the three screen weights w_k = e_k / (2A) are > 0 (NaN, from a
    # zero or infinite area, compares False).
    rel = xy - (lo + 0.5).unsqueeze(1)  # (2, 3, B*F)
    edges = _edge_functions(rel[0], rel[1])  # (3, B*F) at p0
    inv_area = edges.sum(0).reciprocal_()
    weights = edges * inv_area
    inv_z = zs.reciprocal()

    pix_parts, key_parts = [], []

    # The first candidate p0 of every face with a candidate, tested in place (faces with
    # more candidates test it again when they are enumerated: an equal key is harmless).
    hit = torch.nonzero((weights.amin(0) > 0) & (count > 0)).squeeze(1)
    if hit.numel() > 0:
        # Inverse perspective-correct depth: 1/z = sum_k w_k / z_k.
        inv_depth = (weights.index_select(1, hit) * inv_z.index_select(1, hit)).sum(0)
        pix_parts.append(_pixel(hit, lo, num_faces, height, width))
        key_parts.append(_key(inv_depth, _face_id(hit, num_faces, batch)))

    # The second candidate of faces with two: p0 + (1, 0) in a box two columns wide, else
    # p0 + (0, 1); the edge functions there are those of the vertices moved by -step.
    two = torch.nonzero(count == 2).squeeze(1)
    if two.numel() > 0:
        right = (span[0].index_select(0, two) == 2).to(rel.dtype)  # 1: next column, 0: next row
        rel2 = _select_last(rel, two)
        rel2[0] -= right
        rel2[1] -= 1 - right
        w2 = _edge_functions(rel2[0], rel2[1]).mul_(inv_area.index_select(0, two))
        ok = torch.nonzero(w2.amin(0) > 0).squeeze(1)
        if ok.numel() > 0:
            sel = two.index_select(0, ok)
            inv_depth = (w2.index_select(1, ok) * inv_z.index_select(1, sel)).sum(0)
            offset = torch.where(right.index_select(0, ok) > 0, 1, width)
            pix_parts.append(_pixel(sel, lo, num_faces, height, width) + offset)
            key_parts.append(_key(inv_depth, _face_id(sel, num_faces, batch)))

    # Faces with more candidates: enumerate them, in chunks of whole faces.
    many = torch.nonzero(count >= 3).squeeze(1)
    if many.numel() > 0:
        many = many[torch.isfinite(inv_area.index_select(0, many))]  # zero/infinite area: none inside
    if many.numel() > 0:
        inv_area = inv_area.index_select(0, many)
        rx, ry = _select_last(rel, many).unbind(0)
        # e_k(p0 + (dx, dy)) = ea_k dx + eb_k dy + ec_k, times the sign of the area so
        # that inside means all positive.
        sign = torch.sign(inv_area)
        ea = (ry.roll(-1, 0) - ry.roll(-2, 0)) * sign
        eb = (rx.roll(-2, 0) - rx.roll(-1, 0)) * sign
        ec = edges.index_select(1, many) * sign
        coefs = [*ea, *eb, *ec, *inv_z.index_select(1, many), inv_area.abs()]
        sp = span.index_select(1, many).long()
        counts = sp[0] * sp[1]
        widths = sp[0]
        first = _pixel(many, lo, num_faces, height, width)
        face_id = _face_id(many, num_faces, batch)
        ends = torch.cumsum(counts, 0)
        start, done = 0, 0
        while start < counts.shape[0]:
            stop = int(torch.searchsorted(ends, done + _MAX_CANDIDATES, right=True))
            stop = max(stop, start + 1)
            total = int(ends[stop - 1]) - done
            sl = slice(start, stop)
            pix, key = _enumerate([c[sl] for c in coefs], counts[sl], widths[sl], first[sl],
                                  face_id[sl], total, width)
            pix_parts.append(pix)
            key_parts.append(key)
            done += total
            start = stop

    if pix_parts:
        pix = torch.cat(pix_parts) if len(pix_parts) > 1 else pix_parts[0]
        key = torch.cat(key_parts) if len(key_parts) > 1 else key_parts[0]
        keys.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)


def _select_last(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (..., L) contiguous, index (K,) -> t[..., index] (..., K), as a gather along dim 1
    of a 2-D view (several times faster than index_select on the last dim of a 3-D tensor)."""
    return t.view(-1, t.shape[-1]).index_select(1, index).view(*t.shape[:-1], -1)


def _edge_functions(rx: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:
    """Corners relative to a point p, rx, ry (3, K) -> the edge functions (3, K)
    e_k = cross(r_{k+1}, r_{k+2})."""
    e = rx.new_empty(rx.shape)
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        torch.mul(rx[i], ry[j], out=e[k])
        e[k].addcmul_(rx[j], ry[i], value=-1)
    return e


def _pixel(sel: torch.Tensor, lo: torch.Tensor, num_faces: int, height: int,
           width: int) -> torch.Tensor:
    """Flat pixel index b*H*W + row0*W + col0 of the first candidate lo (2, B*F) (column,
    row) of the faces sel (K,) (sorted indices into B*F)."""
    col, row = lo.index_select(1, sel).long()
    pix = row.mul_(width).add_(col)
    if sel.numel() and int(sel[-1]) >= num_faces:  # some face of a frame b > 0
        pix += torch.div(sel, num_faces, rounding_mode="floor") * (height * width)
    return pix


def _face_id(sel: torch.Tensor, num_faces: int, batch: int) -> torch.Tensor:
    """Indices sel (K,) into B*F -> face ids (K,) into F."""
    return sel % num_faces if batch > 1 else sel


def _key(inv_depth: torch.Tensor, face_id: torch.Tensor) -> torch.Tensor:
    """int64 z-buffer key: float32 bits of the depth (monotone for positive floats) in
    the high word, face id in the low word; the smallest key is the nearest face, then
    the smallest face id."""
    depth = inv_depth.reciprocal().to(torch.float32)
    return (depth.view(torch.int32).to(torch.int64) << 32) | face_id


def _enumerate(coefs, counts: torch.Tensor, widths: torch.Tensor, first: torch.Tensor,
               face_id: torch.Tensor, total: int, width: int):
    """Test all candidate pixel centres of K faces; return (pix, key) of the inside ones.

    coefs: 13 vectors (K,): ea_0..2, eb_0..2, ec_0..2, the edge functions (times the
    sign of the area, so positive inside) e_k = ea_k dx + eb_k dy + ec_k at the offset
    (dx, dy) of a candidate from the face's first one; 1/z_0..2; 1/|2A|. counts (K,) =
    box width x height; widths (K,); first (K,) flat pixel index of the first candidate;
    face_id (K,); total = counts.sum().
    """
    device = counts.device
    owner = torch.repeat_interleave(torch.arange(counts.shape[0], device=device), counts,
                                    output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=device) - starts.index_select(0, owner)
    w = widths.index_select(0, owner)
    dy = torch.div(local, w, rounding_mode="floor")
    dx = local - dy * w
    fdx = dx.to(coefs[0].dtype)
    fdy = dy.to(coefs[0].dtype)
    inside = None
    edges = []
    for k in range(3):
        e = torch.addcmul(coefs[6 + k].index_select(0, owner), coefs[k].index_select(0, owner), fdx)
        e.addcmul_(coefs[3 + k].index_select(0, owner), fdy)
        inside = e > 0 if inside is None else inside.logical_and_(e > 0)
        edges.append(e)
    hit = torch.nonzero(inside).squeeze(1)
    owner = owner.index_select(0, hit)
    # 1/z = sum_k (e_k / |2A|) / z_k: a sum of positive terms at an inside candidate.
    inv_depth = sum(edges[k].index_select(0, hit) * coefs[9 + k].index_select(0, owner)
                    for k in range(3))
    inv_depth *= coefs[12].index_select(0, owner)
    pix = first.index_select(0, owner) + dy.index_select(0, hit) * width + dx.index_select(0, hit)
    return pix, _key(inv_depth, face_id.index_select(0, owner))


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
    for k in range(3):
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
    e = torch.stack([rx[1] * ry[2] - rx[2] * ry[1],
                     rx[2] * ry[0] - rx[0] * ry[2],
                     rx[0] * ry[1] - rx[1] * ry[0]])
    u = e / z
    return rx, ry, u, u.sum(0)


def _corner_grads(gw: torch.Tensor, rx, ry, z, u, s, w):
    """Chain rule through the perspective-correct weights: gw (3, M) = dL/dw_k and the
    quantities of :func:`_edge_weights` -> (gx, gy, gz), each (3, M): dL/d(col, row,
    depth) of corner k."""
    gu = (gw - (gw * w).sum(0)) / s  # w = u / s
    ge = gu / z  # u = e / z
    gz = -ge * u
    # e_k = cross(r_{k+1}, r_{k+2}): corner j enters e_{j-1} first, e_{j+1} second.
    ge_prev, ge_next = ge.roll(1, 0), ge.roll(-1, 0)
    gx = ge_prev * ry.roll(-1, 0) - ge_next * ry.roll(1, 0)
    gy = ge_next * rx.roll(1, 0) - ge_prev * rx.roll(-1, 0)
    return gx, gy, gz


def _offset_index(index: torch.Tensor, rows: int, stride: int) -> torch.Tensor:
    """index (L,) -> (rows * L,): index + r * stride for r = 0..rows-1, row-major."""
    offsets = torch.arange(rows, device=index.device) * stride
    return (index.view(1, -1) + offsets.view(-1, 1)).view(-1)


def _gather_corners(table: torch.Tensor, vidx: torch.Tensor) -> torch.Tensor:
    """table (B, N, D) per-vertex values, vidx (3, M) -> (D, 3, M), one 1-D gather per
    channel (D is 3 or the few attribute channels)."""
    table = table.reshape(-1, table.shape[-1])
    flat = vidx.reshape(-1)
    if torch.is_grad_enabled() and table.requires_grad:
        return torch.stack([table[:, d].index_select(0, flat) for d in range(table.shape[1])]
                           ).view(table.shape[1], 3, -1)
    out = table.new_empty(table.shape[1], flat.shape[0])
    for d in range(table.shape[1]):
        torch.index_select(table[:, d], 0, flat, out=out[d])
    return out.view(table.shape[1], 3, -1)


class _Interpolate(torch.autograd.Function):
    """image (B, H, W, C): at the covered pixels idx (M,), sum_k w_k attrs[vidx_k] with the
    perspective-correct weights w; 0 elsewhere. Inputs: attrs (B, N, C), verts (B, N, 3)
    (col, row, depth), vidx (3, M), pixel centres px, py (M,), idx (M,) flat pixel indices.

    The backward is written out by hand so that everything stays in contiguous (3, M)
    vectors, 1-D gathers and 1-D scatter-adds: several times faster on a CPU than
    autograd through (M, 3, C) tensors.
    """

    @staticmethod
    def forward(ctx, attrs, verts, vidx, px, py, idx, image_shape):
        x, y, z = _gather_corners(verts, vidx)
        rx, ry, u, s = _edge_weights(x, y, z, px, py)
        w = u / s
        a = _gather_corners(attrs, vidx)  # (C, 3, M)
        wa = w.to(a.dtype)
        values = torch.addcmul(torch.addcmul(a[:, 0] * wa[0], a[:, 1], wa[1]), a[:, 2], wa[2])
        channels = values.shape[0]
        pos = _offset_index(idx * channels, channels, 1)  # channel-last image positions
        image = values.new_zeros(int(torch.Size(image_shape).numel()) * channels)
        image.scatter_(0, pos, values.view(-1))
        ctx.save_for_backward(vidx, rx, ry, z, u, s, w, a, pos)
        ctx.shapes = (attrs.shape, verts.shape)
        return image.view(*image_shape, channels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        vidx, rx, ry, z, u, s, w, a, pos = ctx.saved_tensors
        attrs_shape, verts_shape = ctx.shapes
        num = attrs_shape[0] * attrs_shape[1]
        grad_values = grad_image.reshape(-1).index_select(0, pos).view(a.shape[0], -1)  # (C, M)
        grad_attrs = grad_verts = None
        if ctx.needs_input_grad[0]:
            wg = w.to(grad_values.dtype)
            grad_attrs = _scatter_corners([wg * gc for gc in grad_values], vidx, num)
            grad_attrs = grad_attrs.view(attrs_shape)
        if ctx.needs_input_grad[1]:
            gw = a[0] * grad_values[0]  # dL/dw (3, M)
            for c in range(1, a.shape[0]):
                gw.addcmul_(a[c], grad_values[c])
            gx, gy, gz = _corner_grads(gw.to(w.dtype), rx, ry, z, u, s, w)
            grad_verts = _scatter_corners([gx, gy, gz], vidx, num).view(verts_shape)
        return grad_attrs, grad_verts, None, None, None, None, None


def _scatter_corners(values, vidx: torch.Tensor, num: int) -> torch.Tensor:
    """Sum values (D, 3, M) (a tensor or D tensors (3, M)) into per-vertex rows at vidx
    (3, M) -> (B*N, D)."""
    flat = vidx.reshape(-1)
    out = values[0].new_zeros(num, len(values))
    row = values[0].new_empty(num)
    for d, v in enumerate(values):
        row.zero_().scatter_add_(0, flat, v.reshape(-1))
        out[:, d].copy_(row)
    return out


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
    _check_inputs(verts_screen, faces)
    batch, num_verts, _ = verts_screen.shape
    _check_pix_to_face(pix_to_face, batch)
    device = verts_screen.device
    faces_t = _columns(faces.to(device=device, dtype=torch.int64))  # (3, F)
    pix_to_face = pix_to_face.to(device)
    parts = []
    for sl in _batch_chunks(batch, pix_to_face[0].numel()):
        p2f = pix_to_face[sl]
        covered = _covered_pixels(p2f, faces_t, num_verts, verts_screen.dtype)
        parts.append(fn(*covered, verts_screen[sl], None if attrs is None else attrs[sl],
                        p2f.shape))
    return _cat(parts)


def _barycentrics_chunk(idx, vidx, px, py, verts, _, image_shape):
    x, y, z = _gather_corners(verts, vidx)
    _, _, u, s = _edge_weights(x, y, z, px, py)
    return _scatter_image(u / s, idx, *image_shape)


def _interpolate_chunk(idx, vidx, px, py, verts, attrs, image_shape):
    return _Interpolate.apply(attrs, verts, vidx, px, py, idx, tuple(image_shape))


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
                pix_to_face: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes at the pixel centres.

    Args:
        attrs: (B, N, C) float, per-vertex attributes.
        verts_screen: (B, N, 3) float, screen-space vertices (col, row, depth).
        faces: (F, 3) long, 0-based.
        pix_to_face: (B, H, W) long, from :func:`rasterize` (-1 for background).

    Returns:
        (B, H, W, C): the perspective-correct interpolation of ``attrs`` over the covering
        triangle, 0 on background. Differentiable (once) w.r.t. attrs and verts_screen,
        through a hand-written backward that tests/test_render.py checks with gradcheck.
    """
    if attrs.dim() != 3 or attrs.shape[:2] != verts_screen.shape[:2]:
        raise ValueError(f"Expected attrs to have shape ({verts_screen.shape[0]}, "
                         f"{verts_screen.shape[1]}, C); got {tuple(attrs.shape)}")
    if not attrs.is_floating_point():
        raise ValueError(f"Expected attrs to be floating point; got {attrs.dtype}")
    return _per_chunk(_interpolate_chunk, verts_screen, faces, pix_to_face, attrs)


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
    _check_inputs(verts_screen, faces)
    batch, num_verts, _ = verts_screen.shape
    _check_pix_to_face(pix_to_face, batch)
    faces_t = _columns(faces.to(device=verts_screen.device, dtype=torch.int64))
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
