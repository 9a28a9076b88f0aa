"""Which triangle covers each pixel: hard z-buffer rasterization in pure PyTorch, with
pytorch3d's semantics (SPEC §3). Interpolation over the covering triangles is in
core/render/interpolation.py.

Screen space
    Every function of the renderer (here and in interpolation.py) takes vertices already
    projected to the screen, ``verts_screen`` (B, N, 3) whose last dimension is
    (col, row, depth):

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

Implementation (no Python loop over triangles or pixels)
    Per triangle, the integer range of pixel centres in its bounding box; triangles with
    at most four candidate centres (nearly all of a dense mesh at 128 px) test them in
    place, one vectorised pass per candidate; triangles with more enumerate the rows of
    their box, and in each row only the centres between the row's crossings with the
    edges (bounds widened by their rounding error, every candidate still tested
    exactly); the z-buffer is resolved by one ``scatter_reduce(amin)`` over an
    int64 key (float32 bits of the depth, monotone for positive floats, in the high word;
    face index in the low word). Frames are processed in groups and candidates in chunks,
    which bounds memory.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .checks import check_image_size, check_inputs
from .layout import batch_chunks, cat, columns, edge_functions, face_columns

__all__ = ["Fragments", "rasterize"]

# Bound on the number of (triangle, pixel) candidate pairs tested at once (memory).
_MAX_CANDIDATES = 1 << 20
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


def _rasterize(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int,
               znear: float, zfar: float) -> Fragments:
    batch, num_verts, _ = verts.shape
    num_faces = faces.shape[0]
    device = verts.device
    dtype = verts.dtype if verts.dtype in (torch.float32, torch.float64) else torch.float32
    faces_t = face_columns(faces, device)  # (3, F)
    p2f_parts, zbuf_parts = [], []
    for sl in batch_chunks(batch, max(num_faces, height * width)):
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
    return Fragments(pix_to_face=cat(p2f_parts), zbuf=cat(zbuf_parts).to(verts.dtype))


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
    corners = columns(verts.reshape(-1, 3)).index_select(1, gidx).view(3, 3, -1)
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
    edges = edge_functions(rel[0], rel[1])  # (3, B*F) at p0
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
            w_j = edge_functions(rel_j[0], rel_j[1]).mul_(inv_area.index_select(0, sel))
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

    # Faces with more candidates: enumerate the candidates of each row of their boxes
    # that lie in (a conservative bound of) the row's inside interval, in chunks of
    # whole faces.
    if many.numel() > 0:
        inv_area = inv_area.index_select(0, many)
        rx, ry = _select_last(rel, many).unbind(0)
        # e_k(p0 + (dx, dy)) = ea_k dx + eb_k dy + ec_k, times the sign of the area so
        # that inside means all positive.
        sign = torch.sign(inv_area)
        ea = (ry.roll(-1, 0) - ry.roll(-2, 0)) * sign
        eb = (rx.roll(-2, 0) - rx.roll(-1, 0)) * sign
        ec = edges.index_select(1, many) * sign
        # 1/z at a candidate = sum_k e_k q_k with q_k = (1/z_k) / |2A|.
        q = inv_z.index_select(1, many) * inv_area.abs()
        coefs = torch.cat([ea, eb, ec, q])  # (12, K)
        sp = span.index_select(1, many).long()
        counts = sp[0] * sp[1]
        first = _pixel(many, lo, num_faces, height, width)
        face_id = _face_id(many, num_faces, batch)
        ends = torch.cumsum(counts, 0)
        start, done = 0, 0
        while start < counts.shape[0]:
            stop = int(torch.searchsorted(ends, done + _MAX_CANDIDATES, right=True))
            stop = max(stop, start + 1)
            sl = slice(start, stop)
            pix, key = _enumerate(coefs[:, sl], sp[0, sl], sp[1, sl], first[sl], face_id[sl], width)
            pix_parts.append(pix)
            key_parts.append(key)
            done = int(ends[stop - 1])
            start = stop

    if pix_parts:
        pix = torch.cat(pix_parts) if len(pix_parts) > 1 else pix_parts[0]
        key = torch.cat(key_parts) if len(key_parts) > 1 else key_parts[0]
        keys.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)


def _select_last(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (..., L) contiguous, index (K,) -> t[..., index] (..., K), as a gather along dim 1
    of a 2-D view (several times faster than index_select on the last dim of a 3-D tensor)."""
    return t.view(-1, t.shape[-1]).index_select(1, index).view(*t.shape[:-1], -1)


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


def _enumerate(coefs: torch.Tensor, ncol: torch.Tensor, nrow: torch.Tensor, first: torch.Tensor,
               face_id: torch.Tensor, width: int):
    """Test the candidate pixel centres of K faces row by row; return (pix, key) of the
    candidates, the key _EMPTY_KEY where a candidate is outside its face.

    coefs (12, K): ea_0..2, eb_0..2, ec_0..2, the edge functions (times the sign of the
    area, so positive inside) e_k = ea_k dx + eb_k dy + ec_k at the offset (dx, dy) of a
    candidate from the face's first one, and q_0..2 = (1/z_k) / |2A|. ncol, nrow (K,)
    long: the box's width and height in candidates; first (K,) flat pixel index of the
    first candidate; face_id (K,).

    In row dy, e_k = ea_k dx + c_k with c_k = eb_k dy + ec_k, which is positive on one
    side of dx = -c_k / ea_k. The candidates tested are the row's dx within that bound of
    every edge, widened by more than its rounding error (:func:`_row_bounds`); each is
    then tested exactly (e_k > 0 with the row's c_k), so the bound only saves work: it
    never decides coverage.
    """
    device = ncol.device
    dtype = coefs.dtype
    rows = int(nrow.sum())
    # (face, row) pairs: the face ``owner`` and the row offset dy of each.
    owner = torch.repeat_interleave(torch.arange(ncol.shape[0], device=device), nrow, output_size=rows)
    dy = torch.arange(rows, device=device) - (torch.cumsum(nrow, 0) - nrow).index_select(0, owner)
    per_row = coefs.index_select(1, owner)  # (12, R)
    per_row[6:9].addcmul_(per_row[3:6], dy.to(dtype))  # c_k = ec_k + eb_k dy
    per_row[3:6] = per_row[:3]
    row_coefs = per_row[3:]  # (ea_0..2, c_0..2, q_0..2) of each row: (9, R)
    lo, hi = _row_bounds(row_coefs[:3], row_coefs[3:6], ncol.index_select(0, owner).to(dtype) - 1)
    n = (hi - lo).add_(1).clamp_(min=0).long()
    total = int(n.sum())
    # The candidates: row ``row`` of each, dx from the row's lo.
    row = torch.repeat_interleave(torch.arange(rows, device=device), n, output_size=total)
    dx = torch.arange(total, device=device) - (torch.cumsum(n, 0) - n - lo.long()).index_select(0, row)
    g = row_coefs.index_select(1, row)  # (9, T)
    e = torch.addcmul(g[3:6], g[:3], dx.to(dtype))  # (3, T)
    inside = (e > 0).all(0)
    # 1/z = sum_k e_k q_k: a sum of positive terms at an inside candidate.
    inv_depth = e.mul_(g[6:]).sum(0)
    pix = (first.index_select(0, owner) + dy * width).index_select(0, row).add_(dx)
    key = _key(inv_depth, face_id.index_select(0, owner).index_select(0, row))
    return pix, key.masked_fill_(~inside, _EMPTY_KEY)


# Rounding allowance of :func:`_row_bounds` in units of the dtype's epsilon, and the
# least widening in pixels.
_BOUND_EPS, _BOUND_MIN = 16, 1e-3


def _row_bounds(a: torch.Tensor, c: torch.Tensor, last: torch.Tensor):
    """The candidates of each (face, row) pair worth testing: (lo, hi) (R,) float whole
    numbers, the first and last dx in [0, last] not excluded by any edge
    (e_k = a_k dx + c_k > 0; a, c (3, R)). Each bound t_k = -c_k / a_k is widened by
    _BOUND_MIN pixels plus the rounding error of computing e_k and t_k where it can
    matter (_BOUND_EPS epsilons of 2 last + 1: a bound further out than that leaves the
    whole row or none of it, widened or not), so a candidate whose computed e_k is
    positive is never left out; an edge with a = 0 (or a bound that is not a number)
    bounds nothing."""
    margin = (2 * last + 1).mul_(torch.finfo(a.dtype).eps * _BOUND_EPS).add_(_BOUND_MIN)  # (R,)
    t = (c / a).neg_()  # the edge crosses the row at dx = t
    lo = torch.where(a > 0, (t - margin).floor_().add_(1), 0.0).nan_to_num_(nan=0.0).amax(0).clamp_(min=0)
    hi = torch.where(a < 0, (t + margin).ceil_().sub_(1), float("inf")).nan_to_num_(nan=float("inf")).amin(0)
    return torch.minimum(lo, last + 1), torch.minimum(hi, last)
