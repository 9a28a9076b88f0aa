import pytest
import torch

from core.fit import losses as L


def test_landmark_weights():
    w = L.landmark_weights()
    assert abs(w.sum().item() - 1) < 1e-6
    heavy = [28, 29, 30] + list(range(48, 68))
    total = 68 - len(heavy) + 10 * len(heavy)
    assert torch.allclose(w[heavy], torch.full((23,), 10.0 / total))
    assert torch.allclose(w[0], torch.tensor(1.0 / total))
    assert w[27] == w[0] and w[31] == w[0] and w[47] == w[0]


def test_landmark_weight_groups():
    w = L.landmark_weights(jaw=0.5, inner=2.0, heavy=3.0)
    total = 17 * 0.5 + 23 * 3.0 + 28 * 2.0
    assert abs(w.sum().item() - 1) < 1e-6
    assert torch.allclose(w[[0, 8, 16]], torch.full((3,), 0.5 / total))
    assert torch.allclose(w[[28, 30, 48, 67]], torch.full((4,), 3.0 / total))
    assert torch.allclose(w[[17, 27, 31, 36, 47]], torch.full((5,), 2.0 / total))
    assert torch.allclose(L.landmark_weights(5, jaw=9.0), torch.full((5,), 0.2))   # other counts: uniform
    with pytest.raises(ValueError):
        L.landmark_weights(jaw=-1.0)


def test_robust_landmark_loss_by_hand():
    """Charbonnier: 2 s² (√(1 + d²/s²) − 1) of the distance in image units; d² for small d,
    about 2 s d for large d; its IRLS scale squared is ρ's derivative in d²."""
    w = torch.tensor([0.5, 0.5])
    p = torch.tensor([[[30.0, 40.0], [0.3, 0.4]]])  # distances 50 px and 0.5 px
    q = torch.zeros(1, 2, 2)
    s = 2.0 / 100
    d = torch.tensor([0.5, 0.005])
    expect = (0.5 * 2 * s * s * (torch.sqrt(1 + d ** 2 / s ** 2) - 1)).sum()
    got = L.landmark_loss(p, q, w, 100, robust_px=2.0)
    assert abs(got.item() - expect.item()) < 1e-6 * expect.item()
    assert abs(L.robust_square(torch.tensor(0.005 ** 2), s * s).item() / 0.005 ** 2 - 1) < 0.04
    assert abs(L.robust_square(torch.tensor(0.5 ** 2), s * s).item() / (2 * s * 0.5) - 1) < 0.05
    d2 = torch.tensor(0.3, requires_grad=True)
    L.robust_square(d2, 0.1).backward()
    assert abs(d2.grad.item() - L.robust_irls_scale(torch.tensor(0.3), 0.1).item() ** 2) < 1e-6
    assert L.landmark_loss(p, q, w, 100, robust_px=2.0) < L.landmark_loss(p, q, w, 100)


def test_landmark_loss_by_hand():
    w = torch.tensor([0.25, 0.75])
    p = torch.tensor([[[10.0, 0], [0, 0]], [[0, 0], [0, 20]]])
    q = torch.zeros(2, 2, 2)
    # frame 0: 0.25 * (10/100)^2; frame 1: 0.75 * (20/100)^2; mean of the two.
    expect = (0.25 * 0.01 + 0.75 * 0.04) / 2
    assert abs(L.landmark_loss(p, q, w, 100).item() - expect) < 1e-6 * expect


def test_photo_loss_by_hand_and_gradient_at_zero():
    r = torch.zeros(1, 2, 2, 3, requires_grad=True)
    img = torch.zeros(1, 2, 2, 3)
    img[0, 0, 0] = torch.tensor([3.0, 4.0, 0.0])   # distance 5
    img[0, 1, 1] = torch.tensor([255.0, 0, 0])      # outside the mask
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    loss = L.photo_loss(r, img, mask)
    assert abs(loss.item() - (5.0 / 255) / 2) < 1e-7
    loss.backward()
    assert torch.isfinite(r.grad).all() and r.grad[0, 0, 1].abs().sum() == 0


def test_reflectance_loss_by_hand():
    albedo = torch.tensor([[[10.0, 0, 0], [30.0, 0, 0], [1000.0, 0, 0]]])
    skin = torch.tensor([1.0, 1.0, 0.0])
    # mean over skin = 20; deviations ±10 on two skin vertices.
    expect = 2 * (10.0 / 255) ** 2 / (1 * 2)
    assert abs(L.reflectance_loss(albedo, skin).item() - expect) < 1e-9


def test_l2():
    assert L.l2(torch.tensor([[1.0, 2.0], [3.0, 0.0]])).item() == 14.0
