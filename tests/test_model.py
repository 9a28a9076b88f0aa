import math

import numpy as np
import pytest
import torch

from core.geometry import euler_to_rotation
from core.model import FaceModel
from core.model_io import model_from_arrays
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
    from core.geometry import vertex_normals
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
