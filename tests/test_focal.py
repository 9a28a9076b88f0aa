"""Per-frame crop cameras of one frame camera, and the focal length estimated with the fit:
the Gauss-Newton focal column against autograd, and recovery of a known focal."""
import math

import numpy as np
import pytest
import torch

from core.fit.config import get_preset
from core.fit.fitter import Fitter
from core.fit.gauss_newton import PhotometricProblem
from core.models.bfm09 import model_from_arrays
from core.models.coeffs import Coeffs
from core.render import MeshRenderer
from core.render.camera import Camera, FrameCamera
from tests.helpers import synthetic_arrays

GROUPS = ("id", "exp", "tex", "gamma", "angles", "trans")
SIZE = 128


@pytest.fixture(scope="module")
def model():
    return model_from_arrays(synthetic_arrays(1500), name="synthetic")


def fitter(model, camera, **over):
    return Fitter(model, MeshRenderer("builtin"), camera, get_preset("default").with_overrides(**over),
                  progress=False)


def test_crop_camera_sees_the_frame_camera_through_the_crop():
    """A point's crop pixel under FrameCamera.crop(box) is its frame pixel mapped into the
    crop (q = (p − corner) · S / side), for every box of a batch."""
    cam = FrameCamera(focal=900.0, width=640, height=480)
    assert (cam.cx, cam.cy) == (320.0, 240.0)
    boxes = np.array([[200, 100, 456, 356], [-30, 50, 370, 450]])
    crop = cam.crop(boxes, SIZE, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 7, 3, generator=g, dtype=torch.float64) * 0.3
    frame_px = cam.project(v.numpy())
    side = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    expect = (frame_px - boxes[:, None, :2]) * (SIZE / side)[:, None, None]
    assert np.allclose(crop.project_points(v).numpy(), expect, atol=1e-9)
    # Frame 1 alone, unbatched points: the same.
    assert np.allclose(crop.frame(1).project_points(v[1]).numpy(), expect[1], atol=1e-9)
    # A coarse version of the crop: every coordinate scaled.
    assert torch.allclose(crop.scaled(32).project_points(v), crop.project_points(v) * 32 / SIZE)
    # Without per-frame values and a centred principal point: SPEC's camera, to the bit.
    plain = Camera(focal=1015.0, image_size=256)
    moved = Camera(focal=torch.tensor([1015.0, 1015.0], dtype=torch.float64), image_size=256,
                   principal=torch.tensor([[128.0, 128.0]] * 2, dtype=torch.float64))
    assert torch.allclose(plain.project(v), moved.project(v), atol=1e-10)
    k = cam.intrinsics()
    assert k.tolist() == [[900.0, 0.0, 320.0], [0.0, 900.0, 240.0], [0.0, 0.0, 1.0]]


def test_batched_camera_jacobians_match_autograd():
    cam = FrameCamera(focal=700.0, width=320, height=240).crop(np.array([[10, 0, 170, 160], [100, 50, 200, 150]]),
                                                               SIZE, dtype=torch.float64)
    v = torch.randn(2, 4, 3, dtype=torch.float64) * 0.4
    jac = cam.project_jacobian(v)
    for b in range(2):
        for i in range(4):
            ref = torch.autograd.functional.jacobian(lambda p: cam.frame(b).project(p), v[b, i])
            assert torch.allclose(jac[b, i], ref, atol=1e-10)
    # d(col, row)/d(log focal)
    phi = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    pts = cam.with_focal(cam.focal * torch.exp(phi)).project_points(v)
    ref = torch.stack([torch.autograd.grad(pts[..., j].sum(), phi, retain_graph=True)[0] for j in range(2)], -1)
    got = cam.focal_derivative(cam.project_points(v)).sum(1)
    assert torch.allclose(got, ref, atol=1e-10)


def scene(model, frame_cam, boxes, seed=0):
    """Two frames of one face with different poses through their crops: (images, landmarks, truth)."""
    g = torch.Generator().manual_seed(seed)
    gt = model.layout.zeros(2).replace(
        id=(torch.randn(1, 80, generator=g) * 0.2).expand(2, -1), exp=torch.randn(2, 64, generator=g) * 0.2,
        tex=(torch.randn(1, 80, generator=g) * 0.5).expand(2, -1), gamma=torch.randn(2, 27, generator=g) * 0.1,
        angles=torch.tensor([[0.1, 0.35, 0.05], [-0.05, -0.3, 0.0]]),
        trans=torch.tensor([[0.0, 0.0, 4.0], [0.2, 0.1, 4.2]]))
    f = fitter(model, frame_cam.crop(boxes, SIZE))
    with torch.no_grad():
        rgba, _ = f.render(gt)
    return rgba[..., :3], f.project_landmarks(gt), gt


def test_focal_column_of_the_gauss_newton_model_matches_autograd(model):
    """The gradient of PhotometricProblem with the 'focal' pseudo-group (log focal factor,
    per frame, both cameras) is autograd's of the objective with the focal scaled."""
    frame_cam = FrameCamera(focal=600.0, width=480, height=360)
    boxes = np.array([[150, 90, 330, 270], [170, 100, 340, 270]])
    img, lms, gt = scene(model, frame_cam, boxes)
    cam = frame_cam.crop(boxes, SIZE)
    f = fitter(model, cam)
    # Far enough from the truth that pixels' colour errors exceed RHO_MIN (below it the IRLS
    # gradient is the smoothed one, see core.fit.gauss_newton).
    x0 = gt.replace(id=gt.id * 0.8, exp=gt.exp * 0.5, tex=gt.tex * 0.7, gamma=gt.gamma * 0.5,
                    angles=gt.angles + 0.02, trans=gt.trans + 0.01)
    phi0 = torch.tensor([0.05, -0.03])
    groups = GROUPS + ("focal",)
    prob = PhotometricProblem(f.objective, lms, img, cam, groups)
    st = prob.evaluate(x0, None, phi0)
    hess, grad = prob.linearize(st)
    leaves = {k: getattr(x0, k).clone().requires_grad_(True) for k in GROUPS}
    phi = phi0.clone().requires_grad_(True)
    scaled = cam.with_focal(cam.focal * torch.exp(phi))
    obj = f.objective.with_camera(scaled)
    ev = obj.evaluate(Coeffs(**leaves), lms, img, photo_camera=scaled)
    cost = obj.frame_costs(ev.terms)
    assert torch.allclose(st.cost, cost.detach(), rtol=1e-5)
    cost.sum().backward()
    assert phi.grad.abs().min() > 1e-4
    assert torch.allclose(grad[:, -1], phi.grad, rtol=2e-3, atol=1e-4 * phi.grad.abs().max())
    ref = torch.cat([leaves[k].grad for k in GROUPS], 1)
    assert torch.allclose(grad[:, :-1], ref, rtol=1e-3, atol=1e-4 * ref.abs().max())
    assert torch.allclose(hess, hess.transpose(1, 2), atol=1e-5 * hess.abs().max())
    assert float(torch.diagonal(hess, dim1=1, dim2=2)[:, -1].min()) > 0


def test_the_focal_moves_towards_a_known_one_with_shared_identity(model):
    """Frames rendered through crops of a 600 px camera, fitted from a 30 % too long focal
    with identity and albedo shared: the estimated focal is shared by the frames, within
    8 % of the truth, and the fit's loss is lower than with the focal held. (How close it
    gets is limited by the priors: the face's depth trades against the focal.)"""
    frame_cam = FrameCamera(focal=600.0, width=480, height=360)
    boxes = np.array([[150, 90, 330, 270], [170, 100, 340, 270]])
    img, lms, gt = scene(model, frame_cam, boxes)
    start = frame_cam.with_focal(600.0 * 1.3)
    f = fitter(model, start.crop(boxes, SIZE), first_nrf_iters=40)
    init = f.zeros(2).replace(id=torch.zeros(1, 80), tex=torch.zeros(1, 80))
    res = f.fit(lms, img, init=init, estimate_focal=True)
    est = 600.0 * 1.3 * float(res.focal_scale[0])
    assert res.focal_scale.shape == (1,)
    assert abs(est / 600.0 - 1) < 0.08, est
    assert torch.allclose(res.camera.focal, start.crop(boxes, SIZE).focal * res.focal_scale)
    fixed = f.fit(lms, img, init=init)
    assert fixed.focal_scale is None and fixed.losses["total"] > res.losses["total"]
    # Per-frame focal without shared groups (photos): one factor per frame.
    per = f.fit(lms, img, estimate_focal=True, nrf_iters=5)
    assert per.focal_scale.shape == (2,) and per.camera.focal.shape == (2,)
