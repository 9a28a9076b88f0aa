"""Per-frame crop cameras of one frame camera, and the focal length estimated from the
landmarks (core.fit.focal): recovery of a known focal."""
import math

import numpy as np
import pytest
import torch

from core.fit.config import get_preset
from core.fit.fitter import Fitter
from core.models.bfm09 import model_from_arrays
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


def scene(model, frame_cam, boxes, seed=0):
    """Frames of one face with different poses seen through their crops of ``frame_cam``:
    (landmarks in crop pixels (B, 68, 2), the truth)."""
    g = torch.Generator().manual_seed(seed)
    b = len(boxes)
    yaw = torch.linspace(-0.45, 0.45, b)
    gt = model.layout.zeros(b).replace(
        id=(torch.randn(1, 80, generator=g) * 0.5).expand(b, -1), exp=torch.randn(b, 64, generator=g) * 0.3,
        angles=torch.stack([0.1 * torch.sin(3 * yaw), yaw, 0.05 * torch.cos(2 * yaw)], 1),
        trans=torch.stack([0.05 * yaw, 0.02 * yaw, torch.full((b,), 3.5)], 1))
    f = fitter(model, frame_cam.crop(boxes, SIZE))
    return f.project_landmarks(gt), gt


@pytest.mark.parametrize("start", [500.0, 1100.0])
def test_focal_profile_finds_a_known_focal_from_landmarks(model, start):
    """Exact landmarks of five views (yaw ±26°) of a face with a strong identity (0.5 σ per
    coefficient) through crops of a 700 px and a 1200 px camera: the profile ends at the same
    focal from a start 30 % short or 60 % long, near the truth. The priors shrink the
    identity, and the focal makes up for part of it: the estimate is short by 15 % at 700 px
    (6 % at 1200 px) with this identity, within 3 % for one close to the mean (bench)."""
    from core.fit.focal import profile_focal
    for true, tol in ((700.0, 0.2), (1200.0, 0.1)):
        frame_cam = FrameCamera(focal=true, width=480, height=360)
        boxes = np.array([[130, 60, 350, 280]] * 5)
        lms, gt = scene(model, frame_cam, boxes)
        f = fitter(model, frame_cam.crop(boxes, SIZE))
        init = f.zeros(5).replace(id=torch.zeros(1, 80), tex=torch.zeros(1, 80))
        found, prof = profile_focal(f, lambda v: frame_cam.with_focal(v).crop(boxes, SIZE), lms, init, start)
        assert found.shape == (1,) and abs(found[0] / true - 1) < tol, (true, found)
        again, _ = profile_focal(f, lambda v: frame_cam.with_focal(v).crop(boxes, SIZE), lms, init, 2100.0 - start)
        assert abs(again[0] / found[0] - 1) < 0.01
        assert prof["lm"].shape == (len(prof["focal"]), 5) and np.all(np.diff(prof["focal"]) > 0)
        assert prof["determined"].tolist() == [True]
    per, _ = profile_focal(f, lambda v: frame_cam.with_focal(v).crop(boxes, SIZE), lms, f.zeros(5), start,
                           shared=False)
    assert per.shape == (5,) and np.all(per > 0)


def test_landmarks_without_perspective_leave_the_focal_undetermined(model):
    """Landmarks of a face seen from very far (no perspective left): no focal is better
    than another, so the profile says it is not determined."""
    from core.fit.focal import profile_focal
    far = FrameCamera(focal=40000.0, width=480, height=360, distance=10.0)
    boxes = np.array([[130, 60, 350, 280]] * 5)
    g = torch.Generator().manual_seed(1)
    gt = model.layout.zeros(5).replace(
        id=(torch.randn(1, 80, generator=g) * 0.3).expand(5, -1), angles=torch.stack(
            [torch.zeros(5), torch.linspace(-0.4, 0.4, 5), torch.zeros(5)], 1),
        trans=torch.tensor([[0.0, 0.0, -390.0]]).expand(5, -1))
    lms = fitter(model, far.crop(boxes, SIZE)).project_landmarks(gt)
    cam = FrameCamera(focal=700.0, width=480, height=360)
    f = fitter(model, cam.crop(boxes, SIZE))
    init = f.zeros(5).replace(id=torch.zeros(1, 80), tex=torch.zeros(1, 80))
    _, prof = profile_focal(f, lambda v: cam.with_focal(v).crop(boxes, SIZE), lms, init, 700.0)
    assert prof["determined"].tolist() == [False], prof["contrast"]
