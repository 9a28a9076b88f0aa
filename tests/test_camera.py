import torch

from core.render.camera import Camera


def test_projection_by_hand():
    cam = Camera(focal=1015.0, distance=10.0, image_size=256)
    v = torch.tensor([[0.5, -0.2, 1.0]], dtype=torch.float64)
    zc = 10.0 - 1.0
    u = 1015 * 0.5 / zc + 128
    row = 256 - (1015 * -0.2 / zc + 128)
    assert torch.allclose(cam.project(v), torch.tensor([[u, row, zc]], dtype=torch.float64))
    # The origin lands on the image centre; +x goes right, +y goes up (smaller row).
    c = cam.project_points(torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0, 0.1, 0]]))
    assert torch.allclose(c[0], torch.tensor([128.0, 128.0]))
    assert c[1, 0] > 128 and c[2, 1] < 128


def test_projection_jacobian_matches_autograd():
    cam = Camera(image_size=224)
    v = torch.randn(5, 3, dtype=torch.float64) * 0.5
    jac = cam.project_points_jacobian(v)
    for i in range(5):
        ref = torch.autograd.functional.jacobian(lambda p: cam.project_points(p), v[i])
        assert torch.allclose(jac[i], ref, atol=1e-10)
    full = cam.project_jacobian(v)
    for i in range(5):
        ref = torch.autograd.functional.jacobian(lambda p: cam.project(p), v[i])
        assert torch.allclose(full[i], ref, atol=1e-10)


def test_fov_matches_pytorch3d_setting():
    import math
    cam = Camera(image_size=256)
    assert abs(cam.fov_degrees() - math.degrees(2 * math.atan(128 / 1015))) < 1e-12
