"""Pure geometry: Euler rotations, vertex normals, spherical-harmonics lighting (SPEC §3) and
the small 3-vector pieces the solvers build on (norms, cross-product matrices, per-vertex
rotations).

Conventions: vertices are row vectors, transformed as ``v @ M.T + trans``; the rotation
is M = Rz · Ry · Rx with angles (x, y, z) in radians.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def euler_to_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Angles (B, 3) = (x, y, z) in radians -> rotation matrices M (B, 3, 3), M = Rz·Ry·Rx.

    Rx = [[1,0,0],[0,cx,−sx],[0,sx,cx]], Ry = [[cy,0,sy],[0,1,0],[−sy,0,cy]],
    Rz = [[cz,−sz,0],[sz,cz,0],[0,0,1]].
    """
    if angles.ndim != 2 or angles.shape[1] != 3:
        raise ValueError(f"Expected angles of shape (B, 3); got {tuple(angles.shape)}")
    cx, cy, cz = torch.cos(angles).unbind(1)
    sx, sy, sz = torch.sin(angles).unbind(1)
    # Closed form of Rz @ Ry @ Rx.
    m = torch.stack([
        cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx,
        sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx,
        -sy, cy * sx, cy * cx,
    ], dim=1)
    return m.reshape(-1, 3, 3)


def euler_rotation_jacobian(angles: torch.Tensor) -> torch.Tensor:
    """Derivatives of M = Rz·Ry·Rx w.r.t. the angles: (B, 3, 3, 3), [:, i] = ∂M/∂angle_i."""
    cx, cy, cz = torch.cos(angles).unbind(1)
    sx, sy, sz = torch.sin(angles).unbind(1)
    o, z = torch.ones_like(cx), torch.zeros_like(cx)

    def mat(*rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = mat((o, z, z), (z, cx, -sx), (z, sx, cx))
    ry = mat((cy, z, sy), (z, o, z), (-sy, z, cy))
    rz = mat((cz, -sz, z), (sz, cz, z), (z, z, o))
    drx = mat((z, z, z), (z, -sx, -cx), (z, cx, -sx))
    dry = mat((-sy, z, cy), (z, z, z), (-cy, z, -sy))
    drz = mat((-sz, -cz, z), (cz, -sz, z), (z, z, z))
    return torch.stack([rz @ ry @ drx, rz @ dry @ rx, drz @ ry @ rx], dim=1)


def rotation_to_euler(m: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`euler_to_rotation` for |y| < 90°: M (B, 3, 3) -> angles (B, 3)."""
    y = torch.asin((-m[:, 2, 0]).clamp(-1.0, 1.0))
    x = torch.atan2(m[:, 2, 1], m[:, 2, 2])
    z = torch.atan2(m[:, 1, 0], m[:, 0, 0])
    return torch.stack([x, y, z], dim=1)


def rigid_transform(vertices: torch.Tensor, rotation: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Vertices (B, N, 3), rotation (B, 3, 3), trans (B, 3) -> v·Mᵀ + trans, (B, N, 3)."""
    return torch.bmm(vertices, rotation.transpose(1, 2)) + trans[:, None, :]


def vertex_normals(vertices: torch.Tensor, tri: torch.Tensor, point_buf: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals as in the original (SPEC §3).

    Args:
        vertices: (B, N, 3).
        tri: (F, 3) long, 0-based vertex ids.
        point_buf: (N, K) long, 0-based ids of up to K adjacent triangles; the value F
            means "no triangle" (it indexes an appended zero row).
    Returns:
        (B, N, 3) normals: the normalised sum over point_buf of the per-triangle
        (v1 − v2) × (v2 − v3), not area weighted beyond the cross product itself.
    """
    b, nf = vertices.shape[0], tri.shape[0]
    # index_select (backward: index_add) is much faster on CPU than advanced indexing.
    corners = vertices.index_select(1, tri.reshape(-1)).view(b, nf, 3, 3)
    v1, v2, v3 = corners.unbind(2)
    face_n = torch.cross(v1 - v2, v2 - v3, dim=-1)
    face_n = torch.cat([face_n, face_n.new_zeros(b, 1, 3)], dim=1)
    vn = face_n.index_select(1, point_buf.reshape(-1)).view(b, point_buf.shape[0], point_buf.shape[1], 3).sum(dim=2)
    return F.normalize(vn, dim=-1, eps=1e-12)


# SH constants (SPEC §3).
_A0, _A1, _A2 = math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0)
_C0, _C1, _C2 = 1 / math.sqrt(4 * math.pi), math.sqrt(3.0) / math.sqrt(4 * math.pi), 3 * math.sqrt(5.0) / math.sqrt(12 * math.pi)
_D0 = 0.5 / math.sqrt(3.0)
AMBIENT_OFFSET = 0.8  # added to the first SH band of every colour


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """Unit normals (..., 3) -> the 9 SH basis values (..., 9) of SPEC §3."""
    nx, ny, nz = normals.unbind(-1)
    ones = torch.ones_like(nx)
    return torch.stack([
        _A0 * _C0 * ones,
        -_A1 * _C1 * ny,
        _A1 * _C1 * nz,
        -_A1 * _C1 * nx,
        _A2 * _C2 * nx * ny,
        -_A2 * _C2 * ny * nz,
        _A2 * _C2 * _D0 * (3 * nz ** 2 - 1),
        -_A2 * _C2 * nx * nz,
        _A2 * _C2 * 0.5 * (nx ** 2 - ny ** 2),
    ], dim=-1)


def sh_basis_derivative(normals: torch.Tensor, dnormals: torch.Tensor) -> torch.Tensor:
    """Directional derivative of :func:`sh_basis` at ``normals`` along ``dnormals``
    (both (..., 3)) -> (..., 9)."""
    nx, ny, nz = normals.unbind(-1)
    dx, dy, dz = dnormals.unbind(-1)
    c1, c2 = _A1 * _C1, _A2 * _C2
    return torch.stack([
        torch.zeros_like(nx),
        -c1 * dy,
        c1 * dz,
        -c1 * dx,
        c2 * (dx * ny + nx * dy),
        -c2 * (dy * nz + ny * dz),
        c2 * _D0 * 6 * nz * dz,
        -c2 * (dx * nz + nx * dz),
        c2 * (nx * dx - ny * dy),
    ], dim=-1)


def sh_basis_jacobian(normals: torch.Tensor) -> torch.Tensor:
    """∂(sh_basis)/∂(normal) at ``normals`` (..., 3) -> (..., 9, 3): column i is
    :func:`sh_basis_derivative` along the i-th axis (the derivative is linear in the
    direction, so J · d = sh_basis_derivative(normals, d))."""
    eye = torch.eye(3, dtype=normals.dtype, device=normals.device)
    return torch.stack([sh_basis_derivative(normals, eye[i].expand_as(normals)) for i in range(3)], -1)


def sh_shade(albedo: torch.Tensor, normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Lit colours: albedo (B, N, 3) 0..255, unit normals (B, N, 3), gamma (B, 27)
    -> (B, N, 3) = albedo ⊙ (Y · gammaᵀ), gamma viewed as (B, 3, 9) with 0.8 added to
    band 0 of each colour."""
    g = gamma.reshape(-1, 3, 9)
    g = g + torch.tensor([AMBIENT_OFFSET] + [0.0] * 8, dtype=g.dtype, device=g.device)
    y = sh_basis(normals)  # (B, N, 9)
    light = torch.bmm(y, g.transpose(1, 2))  # (B, N, 3)
    return albedo * light


def adjacent_triangles(tri, n: int, k: int = 8):
    """point_buf for a mesh: (N, k) 0-based ids of up to k triangles around each vertex,
    F (the triangle count) meaning "no triangle". tri: (F, 3) 0-based ints (numpy)."""
    import numpy as np

    tri = np.asarray(tri, dtype=np.int64)
    nf = tri.shape[0]
    buf = np.full((n, k), nf, dtype=np.int64)
    flat_v = tri.reshape(-1)
    flat_f = np.repeat(np.arange(nf), 3)
    order = np.argsort(flat_v, kind="stable")
    flat_v, flat_f = flat_v[order], flat_f[order]
    starts = np.searchsorted(flat_v, np.arange(n))
    rank = np.arange(flat_v.size) - starts[flat_v]
    keep = rank < k
    buf[flat_v[keep], rank[keep]] = flat_f[keep]
    return buf


def norm3(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norm over ``dim`` of size 3 (several times faster than linalg.vector_norm on
    a short dimension of a large tensor)."""
    a, b, c = v.unbind(dim)
    return (a * a + b * b + c * c).sqrt()


def skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices: skew(a) @ b = a × b."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2)


def rotate_rows(rot: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rot (U, 3, 3) @ rows (U, 3, K) -> (U, 3, K), as nine elementwise products: a batch
    of small 3 x 3 matrix products is several times slower on a CPU."""
    out = rows.new_empty(rows.shape)
    for i in range(3):
        torch.mul(rot[:, i, 0, None], rows[:, 0], out=out[:, i])
        out[:, i].addcmul_(rot[:, i, 1, None], rows[:, 1])
        out[:, i].addcmul_(rot[:, i, 2, None], rows[:, 2])
    return out
