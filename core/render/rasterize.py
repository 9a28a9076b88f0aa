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
    rasterize: per triangle, the integer range of pixel centres in its bounding box;
    triangles with at most four candidate centres (nearly all of a dense mesh) test them
    in place, one vectorised pass per candidate, triangles with more enumerate them with
    repeat_interleave; the z-buffer is resolved by
    one ``scatter_reduce(amin)`` over an int64 key (float32 bits of the depth, monotone for
    positive floats, in the high word; face index in the low word). Frames are processed
    in groups and candidates in chunks, which bounds memory.
    interpolate: only the covered pixels are gathered, weighted (and clamped, for the
    renderer's RGBA) and scattered back, in structure-of-arrays form (contiguous (3, M)
    vectors), with a hand-written backward.
"""
from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .checks import check_image_size, check_inputs, check_pix_to_face

__all__ = ["Fragments", "PixelJacobian", "rasterize", "barycentrics", "interpolate", "interpolation_jacobian"]

# Bound on the number of (triangle, pixel) candidate pairs tested at once (memory).
_MAX_CANDIDATES = 1 << 20
# Frames are processed in groups of about this many faces or pixels: it keeps every
# intermediate tensor a few MB, in cache and clear of the allocator's page-faulting
# large-block path, so the time per frame does not grow with the batch.
_CHUNK_ELEMENTS = 1 << 18
_EMPTY_KEY = torch.iinfo(torch.int64).max
_LOW_WORD = 0 if sys.byteorder == "little" else 1  # int32 word of an int64 holding its low 32 bits
# Faces with at most this many candidate pixel centres (nearly all of a dense mesh) test
# them in place, one vectorised pass per candidate; faces with more enumerate them.
_IN_PLACE = 4


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
    check_inputs(verts_screen, faces)
    height, width = check_image_size(image_size)
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
    faces_t = _face_columns(faces, device)  # (3, F)
    p2f_parts, zbuf_parts = [], []
    for sl in _batch_chunks(batch, max(num_faces, height * width)):
        frames = sl.stop - sl.start
        keys = torch.full((frames * height * width,), _EMPTY_KEY, dtype=torch.int64, device=device)
        if num_faces > 0 and num_verts > 0:
            _rasterize_into(keys, verts[sl].to(dtype), faces_t, height, width, znear, zfar)
        # The key's words as int32: the face id (the empty key's low word 0xFFFFFFFF reads
        # -1) and the depth's float32 bits (the empty key's high word 0x7FFFFFFF is a NaN).
        words = keys.view(torch.int32).view(-1, 2)
        pix_to_face = words[:, _LOW_WORD].long()
        zbuf = words[:, 1 - _LOW_WORD].view(torch.float32).nan_to_num(nan=-1.0, posinf=float("inf"))
        p2f_parts.append(pix_to_face.view(frames, height, width))
        zbuf_parts.append(zbuf.view(frames, height, width))
    return Fragments(pix_to_face=_cat(p2f_parts), zbuf=_cat(zbuf_parts).to(verts.dtype))


_FACES_CACHE = (None, -1, None, None)  # (weakref to faces, its version, device, columns)


def _face_columns(faces: torch.Tensor, device: torch.device) -> torch.Tensor:
    """faces (F, 3) int -> (3, F) int64 on ``device``. The last result is kept while the
    same faces tensor comes back unmodified (a face model renders one face list)."""
    global _FACES_CACHE
    ref, version, dev, cols = _FACES_CACHE
    if ref is not None and ref() is faces and version == faces._version and dev == device:
        return cols
    cols = _columns(faces.to(device=device, dtype=torch.int64))
    _FACES_CACHE = (weakref.ref(faces), faces._version, device, cols)
    return cols


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

    # Vertices relative to p0 (small numbers: accurate). The screen weight of vertex k
    # at p, unnormalised, is the edge function e_k(p) = cross(v_{k+1} - p, v_{k+2} - p);
    # twice the signed area is e_0 + e_1 + e_2 (0 exactly when two vertices coincide).
    # p is inside iff the three screen weights w_k = e_k / (2A) are > 0.
    rel = xy - (lo + 0.5).unsqueeze(1)  # (2, 3, B*F)
    edges = _edge_functions(rel[0], rel[1])  # (3, B*F) at p0
    inv_area = edges.sum(0).reciprocal_()
    weights = edges * inv_area
    inv_z = zs.reciprocal()
    # Candidates per face; 0 for the skipped ones: a vertex at depth <= znear, all beyond
    # zfar, or a zero (or non-finite) area.
    count = span[0] * span[1]  # float: exact for the small counts it is compared with
    zmin = zs.amin(0)
    count.mul_((zmin > znear) & (zmin <= zfar) & torch.isfinite(inv_area))

    pix_parts, key_parts = [], []

    # The first candidate p0 of every face with a candidate, tested in place (faces with
    # more candidates test it again when they are enumerated: an equal key is harmless).
    hit = torch.nonzero((weights.amin(0) > 0) & (count > 0)).squeeze(1)
    if hit.numel() > 0:
        # Inverse perspective-correct depth: 1/z = sum_k w_k / z_k.
        inv_depth = (weights.index_select(1, hit) * inv_z.index_select(1, hit)).sum(0)
        pix_parts.append(_pixel(hit, lo, num_faces, height, width))
        key_parts.append(_key(inv_depth, _face_id(hit, num_faces, batch)))

    # Candidates 1..3 of faces with 2 to 4 (boxes up to 2 x 2, 1 x 4 or 4 x 1), also in
    # place: candidate j is p0 + (dx, dy) = (j mod ncol, j div ncol); the edge functions
    # there are those of the vertices moved by -(dx, dy).
    multi = torch.nonzero(count >= 2).squeeze(1)
    if multi.numel() > 0:
        counts = count.index_select(0, multi)
        ncol = span[0].index_select(0, multi)
        local = torch.nonzero(counts <= _IN_PLACE).squeeze(1)  # into multi
        for j in range(1, _IN_PLACE):
            if j > 1:  # the faces with more than j candidates
                local = local[counts.index_select(0, local) > j]
            if local.numel() == 0:
                break
            sel = multi.index_select(0, local)
            dy = ncol.index_select(0, local).reciprocal_().mul_(j).floor_()  # exact: small integers
            dx = dy.mul(ncol.index_select(0, local)).neg_().add_(j)
            rel_j = _select_last(rel, sel)
            rel_j[0] -= dx
            rel_j[1] -= dy
            w_j = _edge_functions(rel_j[0], rel_j[1]).mul_(inv_area.index_select(0, sel))
            ok = torch.nonzero(w_j.amin(0) > 0).squeeze(1)
            if ok.numel() > 0:
                hit = sel.index_select(0, ok)
                inv_depth = (w_j.index_select(1, ok) * inv_z.index_select(1, hit)).sum(0)
                offset = dy.index_select(0, ok).mul_(width).add_(dx.index_select(0, ok)).long()
                pix_parts.append(_pixel(hit, lo, num_faces, height, width) + offset)
                key_parts.append(_key(inv_depth, _face_id(hit, num_faces, batch)))
        many = multi[counts > _IN_PLACE]
    else:
        many = multi

    # Faces with more candidates: enumerate them, in chunks of whole faces.
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
    e_k = cross(r_{k+1}, r_{k+2}) (differentiable when the inputs require grad)."""
    if torch.is_grad_enabled() and (rx.requires_grad or ry.requires_grad):
        return torch.stack([rx[(k + 1) % 3] * ry[(k + 2) % 3] - rx[(k + 2) % 3] * ry[(k + 1) % 3]
                            for k in range(3)])
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
    u = _edge_functions(rx, ry) / z
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
    columns = _columns(table.reshape(-1, table.shape[-1]))
    return columns.index_select(1, vidx.reshape(-1)).view(table.shape[-1], 3, -1)


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
    faces_t = _face_columns(faces, device)  # (3, F)
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
    faces_t = _face_columns(faces, verts_screen.device)
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
