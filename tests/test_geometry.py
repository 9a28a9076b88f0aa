import math

import torch

from core.models import geometry as G


def _explicit_rotation(a):
    cx, cy, cz = [math.cos(t) for t in a]
    sx, sy, sz = [math.sin(t) for t in a]
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


def test_rotation_is_rz_ry_rx():
    a = torch.tensor([[0.3, -0.5, 0.2], [1.0, 0.1, -2.0]], dtype=torch.float64)
    m = G.euler_to_rotation(a)
    for i in range(2):
        assert torch.allclose(m[i], _explicit_rotation(a[i].tolist()), atol=1e-12)
    assert torch.allclose(G.rotation_to_euler(m), a, atol=1e-12)


def test_yaw_turns_the_nose_to_image_right():
    # Positive y angle rotates +z (the nose) towards +x, i.e. to the image's right.
    m = G.euler_to_rotation(torch.tensor([[0.0, 0.3, 0.0]]))
    nose = G.rigid_transform(torch.tensor([[[0.0, 0.0, 1.0]]]), m, torch.zeros(1, 3))
    assert nose[0, 0, 0] > 0.29


def test_rotation_jacobian_matches_autograd():
    a = torch.randn(3, 3, dtype=torch.float64)
    d = G.euler_rotation_jacobian(a)
    for b in range(3):
        ref = torch.autograd.functional.jacobian(lambda x: G.euler_to_rotation(x[None])[0], a[b])  # (3,3,3)
        assert torch.allclose(d[b], ref.permute(2, 0, 1), atol=1e-12)


def test_rigid_transform_row_vectors():
    v = torch.tensor([[[1.0, 0.0, 0.0]]])
    m = G.euler_to_rotation(torch.tensor([[0.0, 0.0, math.pi / 2]]))
    out = G.rigid_transform(v, m, torch.tensor([[0.0, 0.0, 1.0]]))
    assert torch.allclose(out, torch.tensor([[[0.0, 1.0, 1.0]]]), atol=1e-6)


def test_normals_by_hand():
    # Two triangles in the z=0 plane and one tilted; point_buf with the "no triangle" id F.
    v = torch.tensor([[[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 1.0]]], dtype=torch.float64)
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]])
    pb = torch.tensor([[0, 2], [0, 1], [0, 1], [1, 2]])
    n = G.vertex_normals(v, tri, pb)
    # (v1 - v2) x (v2 - v3) for the first triangle: (-1,0,0) x (1,-1,0) = (0,0,1).
    assert torch.allclose(n[0, 0], torch.tensor([0, 0, 1.0], dtype=torch.float64))
    f2 = torch.cross(v[0, 1] - v[0, 3], v[0, 3] - v[0, 2], dim=0)
    assert torch.allclose(n[0, 3], f2 / f2.norm())
    s = torch.tensor([0, 0, 1.0], dtype=torch.float64) + f2
    assert torch.allclose(n[0, 1], s / s.norm())


def test_sh_basis_values():
    y = G.sh_basis(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    a0c0 = math.pi / math.sqrt(4 * math.pi)
    a1c1 = 2 * math.pi / math.sqrt(3) * math.sqrt(3) / math.sqrt(4 * math.pi)
    a2c2 = 2 * math.pi / math.sqrt(8) * 3 * math.sqrt(5) / math.sqrt(12 * math.pi)
    d0 = 0.5 / math.sqrt(3)
    assert torch.allclose(y[0], torch.tensor([a0c0, 0, a1c1, 0, 0, 0, a2c2 * d0 * 2, 0, 0], dtype=torch.float64))
    assert torch.allclose(y[1], torch.tensor([a0c0, 0, 0, -a1c1, 0, 0, -a2c2 * d0, 0, a2c2 * 0.5], dtype=torch.float64))


def test_sh_shade_ambient_offset_and_channels():
    albedo = torch.tensor([[[100.0, 50.0, 200.0]]])
    normals = torch.tensor([[[0.0, 0.0, 1.0]]])
    gamma = torch.zeros(1, 27)
    out = G.sh_shade(albedo, normals, gamma)
    a0c0 = math.pi / math.sqrt(4 * math.pi)
    assert torch.allclose(out, albedo * 0.8 * a0c0)
    gamma[0, 9] = 0.2  # green channel, band 0
    out = G.sh_shade(albedo, normals, gamma)
    assert torch.allclose(out[0, 0], torch.tensor([100 * 0.8, 50 * 1.0, 200 * 0.8]) * a0c0)


def test_sh_basis_derivative_matches_forward_mode_autodiff():
    from core.models.geometry import sh_basis, sh_basis_derivative
    g = torch.Generator().manual_seed(3)
    n = torch.nn.functional.normalize(torch.randn(50, 3, generator=g, dtype=torch.float64), dim=-1)
    dn = torch.randn(50, 3, generator=g, dtype=torch.float64)
    _, ref = torch.func.jvp(sh_basis, (n,), (dn,))
    assert torch.allclose(sh_basis_derivative(n, dn), ref, atol=1e-12)
    assert ref.abs().max() > 0.1


def test_sh_basis_jacobian_is_the_derivative_along_every_direction():
    from core.models.geometry import sh_basis, sh_basis_jacobian
    g = torch.Generator().manual_seed(4)
    n = torch.nn.functional.normalize(torch.randn(2, 40, 3, generator=g, dtype=torch.float64), dim=-1)
    jac = sh_basis_jacobian(n)
    assert jac.shape == (2, 40, 9, 3)
    ref = torch.func.vmap(torch.func.vmap(torch.func.jacfwd(sh_basis)))(n)  # (2, 40, 9, 3)
    assert torch.allclose(jac, ref, atol=1e-12) and ref.abs().max() > 0.1


def test_small_vector_pieces():
    from core.models.geometry import norm3, rotate_rows, skew
    g = torch.Generator().manual_seed(3)
    v = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(norm3(v, -1), v.norm(dim=-1)) and torch.allclose(norm3(v.T, 0), v.norm(dim=-1))
    assert torch.allclose((skew(v) @ w[..., None])[..., 0], torch.cross(v, w, dim=-1))
    rot = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    rows = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(rotate_rows(rot, rows), torch.bmm(rot, rows))
