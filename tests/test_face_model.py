import math

import numpy as np
import pytest
import torch

from core.models.geometry import euler_to_rotation
from core.models.face_model import FaceModel
from core.models.bfm09 import model_from_arrays
from tests.helpers import synthetic_arrays


def tiny_model(dtype=torch.float64):
    """4 vertices, 2 triangles, 2 components per basis; numbers chosen by hand."""
    mean = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float64).reshape(-1)
    id_base = np.zeros((12, 2)); id_base[2, 0] = 1.0; id_base[5, 1] = 0.5   # z of v0, z of v1
    exp_base = np.zeros((12, 1)); exp_base[0, 0] = 2.0                      # x of v0
    meantex = np.full(12, 100.0)
    tex_base = np.zeros((12, 1)); tex_base[0, 0] = 10.0                     # red of v0
    tri = np.array([[0, 1, 2], [1, 3, 2]])
    pb = np.array([[0, 2], [0, 1], [0, 1], [1, 2]])
    m = FaceModel(mean, id_base, exp_base, meantex, tex_base, tri, pb, keypoints=[3, 0], name="tiny")
    return m.to(dtype)


def test_forward_by_hand():
    m = tiny_model()
    lay = m.layout
    assert (lay.n_id, lay.n_exp, lay.n_tex, lay.total) == (2, 1, 1, 2 + 1 + 1 + 3 + 27 + 3)
    c = lay.zeros(1, dtype=torch.float64).replace(
        id=torch.tensor([[0.1, 0.2]], dtype=torch.float64), exp=torch.tensor([[0.25]], dtype=torch.float64),
        tex=torch.tensor([[1.0]], dtype=torch.float64), angles=torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=torch.float64),
        trans=torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    out = m(c)
    # Shape: mean + id + exp, minus the mean shape's centroid (0.5, 0.5, 0).
    s = torch.tensor([[0.5, 0, 0.1], [1, 0, 0.1], [0, 1, 0], [1, 1, 0]], dtype=torch.float64) - torch.tensor([0.5, 0.5, 0])
    assert torch.allclose(m.shape(c.id, c.exp)[0], s)
    # Rz(90°): (x, y) -> (-y, x); then + trans.
    expect = torch.stack([-s[:, 1], s[:, 0], s[:, 2]], 1) + torch.tensor([1.0, 2, 3])
    assert torch.allclose(out.vertices[0], expect, atol=1e-12)
    assert torch.allclose(out.landmarks[0], expect[[3, 0]], atol=1e-12)
    assert torch.allclose(out.albedo[0, 0], torch.tensor([110.0, 100, 100], dtype=torch.float64))
    # Zero gamma: ambient 0.8 · a0c0 on every colour.
    a0c0 = math.pi / math.sqrt(4 * math.pi)
    assert torch.allclose(out.colors, out.albedo * 0.8 * a0c0)
    # Normals are computed on the shape, then rotated: unit length, and rotation about z
    # keeps their z component.
    from core.models.geometry import vertex_normals
    n0 = vertex_normals(m.shape(c.id, c.exp), m.tri, m.point_buf)
    assert torch.allclose(out.normals.norm(dim=-1), torch.ones(1, 4, dtype=torch.float64))
    assert torch.allclose(out.normals[..., 2], n0[..., 2]) and torch.allclose(out.normals[..., 0], -n0[..., 1])


def test_landmark_fast_path_and_jacobian():
    m = model_from_arrays(synthetic_arrays(), name="s").to(torch.float64)
    torch.manual_seed(0)
    c = m.layout.zeros(2, dtype=torch.float64).replace(
        id=torch.randn(2, 80, dtype=torch.float64), exp=torch.randn(2, 64, dtype=torch.float64),
        angles=torch.randn(2, 3, dtype=torch.float64) * 0.3, trans=torch.randn(2, 3, dtype=torch.float64) * 0.1)
    assert torch.allclose(m.landmarks_3d(c), m(c).landmarks, atol=1e-10)
    jac = m.landmarks_3d_jacobian(c, ("angles", "trans", "id", "exp"))
    for g in ("angles", "trans", "id", "exp"):
        def f(x, g=g):
            return m.landmarks_3d(c.replace(**{g: x}))
        ref = torch.autograd.functional.jacobian(f, getattr(c, g))  # (B, L, 3, B, K)
        ref = torch.stack([ref[b, :, :, b] for b in range(2)])
        assert torch.allclose(jac[g], ref, atol=1e-9), g


def test_buffers_follow_to_and_state_dict():
    m = tiny_model(torch.float32)
    names = set(dict(m.named_buffers()))
    assert {"meanshape", "id_base", "exp_base", "meantex", "tex_base", "tri", "point_buf", "keypoints", "skinmask"} <= names
    assert not list(m.parameters())
    m64 = m.to(torch.float64)
    assert m64.id_base.dtype == torch.float64 and m64.tri.dtype == torch.long


def test_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="idBase"):
        FaceModel(np.zeros(12), np.zeros((9, 2)), np.zeros((12, 1)), np.zeros(12), np.zeros((12, 1)),
                  [[0, 1, 2]], np.zeros((4, 1)), [0])
    with pytest.raises(ValueError, match="tri"):
        FaceModel(np.zeros(12), np.zeros((12, 2)), np.zeros((12, 1)), np.zeros(12), np.zeros((12, 1)),
                  [[0, 1, 4]], np.zeros((4, 1)), [0])


def test_rotation_applied_as_row_vectors():
    m = tiny_model()
    c = m.layout.zeros(1, dtype=torch.float64).replace(angles=torch.tensor([[0.2, -0.4, 0.7]], dtype=torch.float64))
    s = m.shape(c.id, c.exp)
    r = euler_to_rotation(c.angles)
    assert torch.allclose(m(c).vertices, s @ r[0].T)


def _tiny_args(**changes):
    """The arrays of tiny_model() as FaceModel keyword arguments, with ``changes``."""
    args = dict(meanshape=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float64).reshape(-1),
                id_base=np.zeros((12, 2)), exp_base=np.zeros((12, 1)), meantex=np.full(12, 100.0),
                tex_base=np.zeros((12, 1)), tri=np.array([[0, 1, 2], [1, 3, 2]]),
                point_buf=np.array([[0, 2], [0, 1], [0, 1], [1, 2]]), keypoints=[3, 0])
    args.update(changes)
    return args


@pytest.mark.parametrize("change, needle", [
    (dict(tri=np.zeros((0, 3), np.int64)), "'tri' has shape (0, 3); expected (F, 3) with F > 0"),
    (dict(keypoints=[]), "'keypoints' is empty"),
    (dict(tri=np.array([[0, 1, 2], [1, 4, 2]])), "'tri' holds ids 0..4; expected 0..3"),
    (dict(tri=np.array([[0, 1, 2], [1, 2.5, 2]])), "'tri' holds values that are not whole numbers"),
    (dict(point_buf=np.array([[0, 3], [0, 1], [0, 1], [1, 2]])), "'point_buf' holds ids 0..3; expected 0..2"),
    (dict(point_buf=np.zeros((4, 0), np.int64)), "'point_buf' has shape (4, 0)"),
    (dict(keypoints=[3, -1]), "'keypoints' holds ids -1..3; expected 0..3"),
    (dict(meanshape=np.zeros(0)), "'meanshape' has 0 values; expected 3N > 0"),
    (dict(meantex=np.full(9, 100.0)), "'meantex' has 9 values; expected 12"),
    (dict(skinmask=np.ones(3)), "'skinmask' has 3 values; expected 4"),
    (dict(exp_base=np.full((12, 1), np.nan)), "'exBase' holds 12 NaN or infinite values (first at row 0, column 0"),
    (dict(meanshape=np.r_[np.zeros(11), np.inf]), "'meanshape' holds 1 NaN or infinite value (first at index 11"),
    (dict(skinmask=np.array([1, 1, np.nan, 1])), "'skinmask' holds 1 NaN"),
    (dict(contour=([0], [[0, 4]])), "'contour candidates' holds ids 0..4; expected 0..3"),
    (dict(contour=([2], [[0, 1]])), "'contour landmarks' holds ids 2..2; expected 0..1"),
])
def test_constructor_rejects_bad_arrays_with_their_name(change, needle):
    with pytest.raises(ValueError) as info:
        FaceModel(**_tiny_args(**change))
    assert needle in str(info.value)


def test_constructor_accepts_huge_finite_values_and_contours():
    # float32 sums of 1e38 overflow to inf: the fast finiteness test must fall back, not refuse.
    m = FaceModel(**_tiny_args(id_base=np.full((12, 2), 1e38)))
    assert torch.isfinite(m.id_base).all() and float(m.id_base.max()) == pytest.approx(1e38, rel=1e-6)
    m = FaceModel(**_tiny_args(contour=([1], [[0, 3, 2]])))
    assert m.has_contour and m.contour_candidates.tolist() == [[0, 3, 2]]
    m = FaceModel(**_tiny_args(contour=(np.zeros(0, np.int64), np.zeros((0, 3), np.int64))))
    assert not m.has_contour


def _big_args(id_base):
    n = id_base.shape[0] // 3
    return dict(meanshape=np.zeros(3 * n), id_base=id_base, exp_base=np.zeros((3 * n, 1)), meantex=np.zeros(3 * n),
                tex_base=np.zeros((3 * n, 0)), tri=[[0, 1, 2]], point_buf=np.zeros((n, 1), np.int64), keypoints=[0])


@pytest.mark.parametrize("layout", ["F64", "F32", "C32", "tensor"])
def test_bases_are_copied_exactly_and_checked_in_every_block(layout):
    """The bases are converted in blocks of rows (Fortran-ordered input from loadmat): the
    values survive exactly, and a bad value in a late block is found and located."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3 * 2000, 80))  # 6000 rows: several ~1 MB blocks
    conv = {"F64": lambda x: np.asfortranarray(x), "F32": lambda x: np.asfortranarray(x, np.float32),
            "C32": lambda x: np.ascontiguousarray(x, np.float32),
            "tensor": lambda x: torch.as_tensor(x, dtype=torch.float32).T.contiguous().T}[layout]
    m = FaceModel(**_big_args(conv(a)))
    assert m.id_base.is_contiguous() and m.id_base.dtype == torch.float32
    np.testing.assert_array_equal(m.id_base.numpy(), a.astype(np.float32))
    bad = a.copy()
    bad[5000, 7] = np.inf
    bad[5999, 79] = np.nan
    with pytest.raises(ValueError) as info:
        FaceModel(**_big_args(conv(bad)))
    assert "'idBase' holds 2 NaN or infinite values (first at row 5000, column 7, 0-based)" in str(info.value)
