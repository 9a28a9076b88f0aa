"""The face model: a linear 3DMM as an ``nn.Module`` whose forward is a pure function of
the coefficients (SPEC §3). All arrays are buffers, so ``.to(device)`` and ``state_dict``
just work; the fitting loop owns the optimised tensors.

Shapes: N vertices, F triangles, L landmarks (68), K_id / K_exp / K_tex basis sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .coeffs import CoeffLayout, Coeffs
from .geometry import euler_rotation_jacobian, euler_to_rotation, rigid_transform, sh_shade, vertex_normals


def _check_finite(t: torch.Tensor, what: str) -> None:
    """ValueError unless every value of float tensor ``t`` is finite.

    A float32 sum is NaN or infinite whenever one term is (NaN and inf propagate, and
    +inf + -inf is NaN), so a finite sum proves the whole array finite at the cost of one
    reduction (a few ms for a BFM-sized basis; ``isfinite().all()`` costs many times more);
    only a non-finite sum (a bad value, or an overflow of huge but finite values) needs the
    element-wise look.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if count == 0:
        return  # the sum overflowed; every value is finite
    first = int(torch.nonzero(bad.reshape(-1))[0])
    where = f"row {first // t.shape[1]}, column {first % t.shape[1]}" if t.ndim == 2 else f"index {first}"
    raise ValueError(f"'{what}' holds {count} NaN or infinite value{'s' if count > 1 else ''} "
                     f"(first at {where}, 0-based); expected finite numbers")


def _float_matrix(x, what: str) -> torch.Tensor:
    """A 2-D array as a C-contiguous float32 tensor whose values are checked finite.

    The bases come from scipy's loadmat in Fortran order (MATLAB's); the C-order copy is
    made by numpy in blocks of rows (about 1 MB), each summed while it is still in the cache,
    so the finiteness check costs almost nothing on top of the copy (numpy's transposing
    copy is also about twice as fast as torch's ``.contiguous()`` here). Tensors and arrays
    that are already float32 C-contiguous are used as they are (no copy) and checked with
    :func:`_check_finite`.
    """
    if isinstance(x, torch.Tensor):
        t = x.to(torch.float32).contiguous()
        _check_finite(t, what)
        return t
    a = np.asarray(x)
    if a.dtype == np.float32 and a.flags.c_contiguous:
        t = torch.from_numpy(a)
        _check_finite(t, what)
        return t
    out = np.empty(a.shape, dtype=np.float32)
    step = max(1, (1 << 20) // (4 * max(1, a.shape[1])))
    finite = True
    with np.errstate(all="ignore"):  # overflow and inf - inf only make the sum non-finite
        for i in range(0, a.shape[0], step):
            block = out[i:i + step]
            block[...] = a[i:i + step]
            finite = finite and bool(np.isfinite(block.sum()))
    t = torch.from_numpy(out)
    if not finite:  # a bad value (or an overflowing sum): the exact check and message
        _check_finite(t, what)
    return t


def checked_ids(x, what: str, count: int, meaning: str, base: int = 0) -> torch.Tensor:
    """``x`` (any shape; array, tensor or list) as a long tensor of the same shape, after
    checking that it holds ``base``-based ids of ``count`` things: whole numbers in
    ``base .. base + count - 1``. The one check of a model's index arrays, 0-based here
    and 1-based in the converted BFM09 file (:mod:`core.models.bfm09`).

    meaning: what the ids count, for the message ("vertex ids of the 4 vertices").
    Raises ValueError "'<what>' holds ...; expected ..." (float values that are not whole
    numbers, bool or complex values, ids out of range), so a loader can prefix its file.
    """
    t = torch.as_tensor(x)
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or bool((t != t.round()).any()):
            raise ValueError(f"'{what}' holds values that are not whole numbers; "
                             f"expected {base}-based {meaning}")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"'{what}' holds {t.dtype} values; expected {base}-based {meaning}")
    else:
        t = t.to(torch.long)  # min / max of unsigned tensors beyond uint8 are not implemented
    if t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < base or hi > base + count - 1:
            raise ValueError(f"'{what}' holds ids {lo}..{hi}; expected {base}..{base + count - 1} "
                             f"({base}-based {meaning})")
    return t.to(torch.long)


@dataclass(frozen=True)
class FaceOutput:
    """Result of :meth:`FaceModel.forward`.

    Attributes:
        vertices: (B, N, 3) posed vertices in world space (decimetres): S·Mᵀ + trans.
        colors: (B, N, 3) lit vertex colours, 0..255 (not clamped).
        albedo: (B, N, 3) albedo T, 0..255.
        normals: (B, N, 3) rotated unit normals.
        landmarks: (B, L, 3) posed landmark vertices in world space.
        rotation: (B, 3, 3) rotation matrices M.
    """

    vertices: torch.Tensor
    colors: torch.Tensor
    albedo: torch.Tensor
    normals: torch.Tensor
    landmarks: torch.Tensor
    rotation: torch.Tensor


class FaceModel(nn.Module):
    """A linear morphable model: shape = mean + idBase·id + exBase·exp (centred),
    albedo = meantex + texBase·tex, posed by Euler angles and a translation and lit by
    27 SH coefficients.

    Args (all arrays 0-based, float or long as noted):
        meanshape: (3N,) mean shape, xyz interleaved, decimetres.
        id_base: (3N, K_id) identity basis (already scaled by the eigenvalues).
        exp_base: (3N, K_exp) expression basis.
        meantex: (3N,) mean albedo, rgb interleaved, 0..255.
        tex_base: (3N, K_tex) albedo basis (K_tex may be 0 for shape-only models).
        tri: (F, 3) long triangles.
        point_buf: (N, K) long adjacent triangles per vertex, F = "no triangle".
        keypoints: (L,) long landmark vertex ids.
        skinmask: (N,) float, 1 on skin vertices (albedo-smoothness loss).
        name: a label for logs and outputs.
        contour: optional dynamic contour definition, ``(landmark_ids (C,), candidates
            (C, K))``: landmark ``landmark_ids[c]`` (an index into the L landmarks, e.g. the
            jaw line) may sit on any of the vertices ``candidates[c]``; the fitter picks,
            per frame, the candidate whose projection is nearest the detected point, so
            the jaw landmarks follow the silhouette as the head turns.

    Raises ValueError when the arrays disagree (sizes, ids out of range, an empty mesh or
    landmark list, NaN or infinite values); the message starts with the array's quoted name
    as spelt in the converted file ('meanshape', 'idBase', 'tri', ...).
    """

    def __init__(self, meanshape, id_base, exp_base, meantex, tex_base, tri, point_buf,
                 keypoints, skinmask=None, name: str = "bfm09", contour=None):
        super().__init__()
        # Every inconsistency is a ValueError whose message starts with the quoted array name
        # in the converted file's spelling ('idBase', ...), so a loader can prefix its file.
        f32 = dict(dtype=torch.float32)
        meanshape = torch.as_tensor(meanshape, **f32).reshape(-1)
        n = meanshape.numel() // 3
        if n == 0 or meanshape.numel() != 3 * n:
            raise ValueError(f"'meanshape' has {meanshape.numel()} values; expected 3N > 0 "
                             f"(x, y, z of N vertices)")
        _check_finite(meanshape, "meanshape")

        def base(x, what):
            shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
            if shape == (0,):
                x, shape = np.zeros((3 * n, 0), np.float32), (3 * n, 0)
            if len(shape) != 2 or shape[0] != 3 * n:
                raise ValueError(f"'{what}' has shape {shape}; expected ({3 * n}, K): "
                                 f"3 rows per vertex of meanshape ({n} vertices)")
            return _float_matrix(x, what)

        id_base, exp_base, tex_base = base(id_base, "idBase"), base(exp_base, "exBase"), base(tex_base, "texBase")
        meantex = torch.as_tensor(meantex, **f32).reshape(-1)
        if meantex.numel() != 3 * n:
            raise ValueError(f"'meantex' has {meantex.numel()} values; expected {3 * n} "
                             f"(r, g, b of the {n} vertices of meanshape)")
        _check_finite(meantex, "meantex")
        tri = torch.as_tensor(tri)
        if tri.ndim != 2 or tri.shape[1] != 3 or tri.shape[0] == 0:
            raise ValueError(f"'tri' has shape {tuple(tri.shape)}; expected (F, 3) with F > 0 triangles")
        tri = checked_ids(tri, "tri", n, f"vertex ids of the {n} vertices")
        nf = tri.shape[0]
        point_buf = torch.as_tensor(point_buf)
        if point_buf.ndim != 2 or point_buf.shape[0] != n or point_buf.shape[1] == 0:
            raise ValueError(f"'point_buf' has shape {tuple(point_buf.shape)}; expected ({n}, K): "
                             f"adjacent triangles of each of the {n} vertices")
        point_buf = checked_ids(point_buf, "point_buf", nf + 1, f"triangle ids, {nf} = no triangle")
        keypoints = torch.as_tensor(keypoints).reshape(-1)
        if keypoints.numel() == 0:
            raise ValueError("'keypoints' is empty; expected the landmark vertex ids")
        keypoints = checked_ids(keypoints, "keypoints", n, f"vertex ids of the {n} vertices")
        skin = torch.ones(n) if skinmask is None else torch.as_tensor(skinmask, **f32).reshape(-1)
        if skin.numel() != n:
            raise ValueError(f"'skinmask' has {skin.numel()} values; expected {n}, one per vertex")
        _check_finite(skin, "skinmask")

        self.name = name
        self.layout = CoeffLayout(n_id=id_base.shape[1], n_exp=exp_base.shape[1], n_tex=tex_base.shape[1])
        center = meanshape.reshape(n, 3).mean(dim=0)
        self.register_buffer("meanshape", (meanshape.reshape(n, 3) - center).reshape(-1))
        self.register_buffer("id_base", id_base)
        self.register_buffer("exp_base", exp_base)
        self.register_buffer("meantex", meantex)
        self.register_buffer("tex_base", tex_base)
        self.register_buffer("tri", tri)
        self.register_buffer("point_buf", point_buf)
        self.register_buffer("keypoints", keypoints)
        self.register_buffer("skinmask", skin)
        # Rows of the bases at the landmark vertices: the rigid stage needs nothing else.
        rows = (3 * keypoints[:, None] + torch.arange(3)).reshape(-1)
        self.register_buffer("lm_mean", self.meanshape[rows].clone())
        self.register_buffer("lm_id_base", id_base[rows].clone())
        self.register_buffer("lm_exp_base", exp_base[rows].clone())
        if contour is None:
            c_lm, c_cand = torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
        else:
            c_lm = torch.as_tensor(contour[0]).reshape(-1)
            c_cand = torch.as_tensor(contour[1])
            if c_cand.ndim != 2 or c_cand.shape[0] != c_lm.numel() \
                    or (c_lm.numel() > 0 and c_cand.shape[1] == 0):
                raise ValueError(f"'contour' has landmark ids {tuple(c_lm.shape)} and candidates "
                                 f"{tuple(c_cand.shape)}; expected (C,) and (C, K), K > 0")
            c_lm = checked_ids(c_lm, "contour landmarks", keypoints.numel(),
                               f"indices into the {keypoints.numel()} landmarks")
            c_cand = checked_ids(c_cand, "contour candidates", n, f"vertex ids of the {n} vertices")
        self.register_buffer("contour_landmarks", c_lm)
        self.register_buffer("contour_candidates", c_cand)

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_vertices(self) -> int:
        return self.meanshape.numel() // 3

    @property
    def num_landmarks(self) -> int:
        return self.keypoints.numel()

    @property
    def has_albedo_basis(self) -> bool:
        return self.tex_base.shape[1] > 0

    @property
    def has_contour(self) -> bool:
        return self.contour_landmarks.numel() > 0

    # -- pieces --------------------------------------------------------------------------
    def shape(self, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
        """id (B, K_id), exp (B, K_exp) -> centred shape S (B, N, 3), decimetres."""
        s = self.meanshape + id_coeff @ self.id_base.T + exp_coeff @ self.exp_base.T
        return s.reshape(s.shape[0], -1, 3)

    def albedo(self, tex_coeff: torch.Tensor) -> torch.Tensor:
        """tex (B, K_tex) -> albedo T (B, N, 3), 0..255."""
        t = self.meantex + tex_coeff @ self.tex_base.T
        return t.reshape(t.shape[0], -1, 3)

    def _landmark_rows(self, keypoints: Optional[torch.Tensor]):
        """Mean (B|1, 3L) and bases (B|1, 3L, K) at the landmark vertices."""
        if keypoints is None:
            return self.lm_mean[None], self.lm_id_base[None], self.lm_exp_base[None]
        rows = (3 * keypoints[..., None] + torch.arange(3, device=keypoints.device)).reshape(keypoints.shape[0], -1)
        return self.meanshape[rows], self.id_base[rows], self.exp_base[rows]

    def landmarks_3d(self, coeffs: Coeffs, keypoints: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Posed landmark vertices (B, L, 3), computed from the L landmark rows only.

        keypoints: optional (B, L) per-frame vertex ids (default: the model's keypoints).
        """
        mean, idb, exb = self._landmark_rows(keypoints)
        s = mean + torch.einsum("brk,bk->br", idb.expand(coeffs.id.shape[0], -1, -1), coeffs.id) \
            + torch.einsum("brk,bk->br", exb.expand(coeffs.exp.shape[0], -1, -1), coeffs.exp)
        s = s.reshape(s.shape[0], -1, 3)
        return rigid_transform(s, euler_to_rotation(coeffs.angles), coeffs.trans)

    def landmarks_3d_jacobian(self, coeffs: Coeffs, groups, keypoints: Optional[torch.Tensor] = None) -> "dict[str, torch.Tensor]":
        """Posed landmarks and their derivatives, for Gauss-Newton style solvers.

        Returns a dict with ``"value"``: (B, L, 3) as :meth:`landmarks_3d`, and for each
        group in ``groups`` (of "id", "exp", "angles", "trans") the Jacobian (B, L, 3, K).
        """
        b = coeffs.angles.shape[0]
        mean, idb, exb = self._landmark_rows(keypoints)
        idb, exb = idb.expand(b, -1, -1), exb.expand(b, -1, -1)
        s = mean + torch.einsum("brk,bk->br", idb, coeffs.id) + torch.einsum("brk,bk->br", exb, coeffs.exp)
        s = s.reshape(b, -1, 3)
        rot = euler_to_rotation(coeffs.angles)
        out = {"value": rigid_transform(s, rot, coeffs.trans)}
        n = s.shape[1]
        for g in groups:
            if g == "trans":
                out[g] = torch.eye(3, dtype=s.dtype, device=s.device).expand(b, n, 3, 3)
            elif g == "angles":
                d = euler_rotation_jacobian(coeffs.angles)  # (B, 3, 3, 3)
                out[g] = torch.einsum("bkij,bnj->bnik", d, s)
            elif g in ("id", "exp"):
                base = idb if g == "id" else exb
                out[g] = torch.einsum("bij,bnjk->bnik", rot, base.reshape(b, n, 3, -1))
            else:
                raise ValueError(f"No landmark Jacobian for group '{g}'")
        return out

    def contour_keypoints(self, coeffs: Coeffs, project, targets: torch.Tensor) -> torch.Tensor:
        """Per-frame keypoints (B, L): the model's, with each contour landmark moved to the
        candidate vertex whose projection is nearest its target point.

        Args:
            coeffs: current coefficients (B frames).
            project: callable mapping world points (B, K, 3) to image points (B, K, 2).
            targets: (B, L, 2) detected landmarks in the same image coordinates.
        """
        b = targets.shape[0]
        kp = self.keypoints.expand(b, -1).clone()
        if not self.has_contour:
            return kp
        c, k = self.contour_candidates.shape
        cand = self.contour_candidates.reshape(1, -1).expand(b, -1)
        pts = project(self.landmarks_3d(coeffs, cand)).reshape(b, c, k, 2)
        d = (pts - targets[:, self.contour_landmarks, None, :]).pow(2).sum(-1)
        best = d.argmin(-1)  # (B, C)
        kp[:, self.contour_landmarks] = self.contour_candidates.expand(b, -1, -1).gather(2, best[..., None])[..., 0]
        return kp

    def forward(self, coeffs: Coeffs, albedo: Optional[torch.Tensor] = None,
                identity: Optional[torch.Tensor] = None, normals_grad: bool = True) -> FaceOutput:
        """Full forward model of SPEC §3.

        Args:
            coeffs: batch of B coefficients (see :class:`~core.models.coeffs.Coeffs`).
            albedo: optional (B or 1, N, 3) albedo used instead of meantex + texBase·tex
                (a cached albedo when tex is fixed, or one estimated for shape-only models).
            identity: optional (B or 1, 3N) cached meanshape + idBase·id (when id is fixed);
                coeffs.id is then ignored.
            normals_grad: False computes the normals without gradient (the shading still
                passes gradients to colours and light; cheaper).
        """
        if identity is None:
            shape = self.shape(coeffs.id, coeffs.exp)
        else:
            s = identity + coeffs.exp @ self.exp_base.T
            shape = s.reshape(s.shape[0], -1, 3)
        rot = euler_to_rotation(coeffs.angles)
        if normals_grad:
            normals = vertex_normals(shape, self.tri, self.point_buf)
        else:
            with torch.no_grad():
                normals = vertex_normals(shape, self.tri, self.point_buf)
        normals = torch.bmm(normals, rot.transpose(1, 2))
        if albedo is None:
            albedo = self.albedo(coeffs.tex)
        if albedo.shape[0] != shape.shape[0]:
            albedo = albedo.expand(shape.shape[0], -1, -1)
        colors = sh_shade(albedo, normals, coeffs.gamma)
        vertices = rigid_transform(shape, rot, coeffs.trans)
        return FaceOutput(vertices=vertices, colors=colors, albedo=albedo, normals=normals,
                          landmarks=vertices[:, self.keypoints], rotation=rot)

    def identity(self, id_coeff: torch.Tensor) -> torch.Tensor:
        """meanshape + idBase·id (B, 3N): the part of the shape a fixed identity caches."""
        return self.meanshape + id_coeff @ self.id_base.T
