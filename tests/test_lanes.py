"""A batch fitted in lanes (core.fit.lanes): each part's result is the part fitted alone,
joined in frame order, at one torch thread per lane, the caller's thread count restored."""
import threading

import pytest
import torch

from core import threads as T
from core.fit import lanes as L
from core.fit.config import get_preset
from core.fit.fitter import Fitter, PoseRef
from core.models.bfm09 import model_from_arrays
from core.render import MeshRenderer
from core.render.camera import Camera
from tests.helpers import synthetic_arrays


@pytest.fixture(scope="module")
def model():
    return model_from_arrays(synthetic_arrays(1500), name="synthetic")


def make_fitter(model, camera=None):
    cfg = get_preset("default").with_overrides(first_nrf_iters=4, fine_iters=2, first_rf_iters=4, lm_init_iters=3)
    return Fitter(model, MeshRenderer("builtin"), camera or Camera(image_size=96), cfg, progress=False)


@pytest.fixture(scope="module")
def scene(model):
    """5 frames of known coefficients rendered with per-frame crop cameras: images
    (5, 96, 96, 3), landmarks (5, 68, 2), the batched camera."""
    g = torch.Generator().manual_seed(3)
    b = 5
    gt = model.layout.zeros(b).replace(
        id=torch.randn(b, 80, generator=g) * 0.2, exp=torch.randn(b, 64, generator=g) * 0.2,
        tex=torch.randn(b, 80, generator=g) * 0.5, gamma=torch.randn(b, 27, generator=g) * 0.1,
        angles=(torch.rand(b, 3, generator=g) - 0.5) * torch.tensor([0.3, 0.8, 0.2]),
        trans=(torch.rand(b, 3, generator=g) - 0.5) * torch.tensor([0.2, 0.2, 0.6]))
    cam = Camera(focal=torch.tensor([1015.0, 900.0, 1200.0, 1100.0, 950.0]), image_size=96,
                 principal=torch.tensor([[48.0, 48.0], [45.0, 50.0], [50.0, 44.0], [48.0, 52.0], [47.0, 47.0]]))
    f = make_fitter(model, cam)
    with torch.no_grad():
        img = f.render(gt)[0][..., :3]
    return img, f.project_landmarks(gt) + 0.3, cam


def _alone_at_one_thread(f, img, lms, parts, **kw):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [f.with_camera(f.camera.take(idx)).fit(lms[idx], img[idx], **{k: v[idx] if torch.is_tensor(v) else
                                                                               v for k, v in kw.items()})
                for idx in parts]
    finally:
        torch.set_num_threads(before)


def test_each_lane_is_its_part_fitted_alone(model, scene, monkeypatch):
    img, lms, cam = scene
    f = make_fitter(model, cam)
    seen = []
    real = Fitter.rigid

    def rigid(self, *a, **k):  # where and at how many torch threads each part runs
        seen.append((threading.current_thread().name, torch.get_num_threads(), a[1].shape[0]))
        return real(self, *a, **k)

    monkeypatch.setattr(Fitter, "rigid", rigid)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = f.fit(lms, img, lanes=2)
        assert torch.get_num_threads() == 2  # the caller's count again
    finally:
        torch.set_num_threads(before)
    assert res.lanes == 2
    assert sorted(seen) == [("fit-lane-0", 1, 3), ("fit-lane-1", 1, 2)]  # parts of 3 and 2 frames
    parts = [torch.arange(0, 3), torch.arange(3, 5)]
    alone = _alone_at_one_thread(f, img, lms, parts)
    for k, v in res.coeffs.as_dict().items():
        assert v.shape[0] == 5 and torch.equal(v, torch.cat([getattr(a.coeffs, k) for a in alone])), k
    assert torch.equal(res.renders, torch.cat([a.renders for a in alone]))
    assert torch.equal(res.keypoints, torch.cat([a.keypoints for a in alone]))
    assert torch.equal(res.output.vertices, torch.cat([a.output.vertices for a in alone]))
    for k in res.frame_losses:
        assert torch.equal(res.frame_losses[k], torch.cat([a.frame_losses[k] for a in alone])), k
    # The batch's figures: as a batch of 5 reports them (means of the frames' data terms)
    whole = f.objective.batch_terms({k: v for k, v in res.frame_losses.items() if k != "total"})
    assert res.losses["photo"] == pytest.approx(float(res.frame_losses["photo"].mean()), rel=1e-6)
    assert res.losses["total"] == pytest.approx(float(whole["total"]), rel=1e-6)
    assert res.camera is f.camera
    # the fit did move the frames, and each part's own losses are what the batch reports
    assert float(res.frame_losses["lm"].max()) < 1.0
    assert set(res.timings) == set(alone[0].timings) and all(v > 0 for v in res.timings.values())


def test_pose_ref_and_init_follow_their_frames(model, scene):
    """A following video frame's warm start (init) and pose prior (pose_ref) are split
    with the frames."""
    img, lms, cam = scene
    f = make_fitter(model, cam)
    first = f.fit(lms, img, lanes=1)
    ref = PoseRef(angles=first.coeffs.angles + 0.01, trans=first.coeffs.trans)
    res = f.fit(lms, img, init=first.coeffs, pose_ref=ref, following=True, lanes=3)
    assert res.lanes == 3
    parts = [torch.arange(0, 2), torch.arange(2, 4), torch.arange(4, 5)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [f.with_camera(cam.take(i)).fit(lms[i], img[i], init=first.coeffs.replace(
            **{k: v[i] for k, v in first.coeffs.as_dict().items()}), pose_ref=PoseRef(ref.angles[i], ref.trans[i]),
            following=True) for i in parts]
    finally:
        torch.set_num_threads(before)
    for k, v in res.coeffs.as_dict().items():
        assert torch.equal(v, torch.cat([getattr(a.coeffs, k) for a in alone])), k


def test_shared_groups_and_single_frames_are_not_split(model, scene):
    img, lms, cam = scene
    f = make_fitter(model)  # one crop camera
    init = f.zeros(5).replace(id=torch.zeros(1, 80))  # an identity shared by the frames
    assert not L.splittable(5, init, None) and L.splittable(5, f.zeros(5), None)
    res = f.fit(lms[:3], img[:3], lanes=2, init=init.replace(**{k: v[:3] for k, v in init.as_dict().items()
                                                                if k != "id"}), nrf_iters=0)
    assert res.lanes == 1
    assert f.fit(lms[:1], img[:1], lanes=4).lanes == 1
    assert f.fit(lms[:2], img[:2], lanes=4).lanes == 2  # no more lanes than frames


def test_an_error_in_a_lane_reaches_the_caller(model, scene, monkeypatch):
    img, lms, cam = scene
    f = make_fitter(model, cam)

    def broken(self, coeffs, *a, **k):
        if coeffs.angles.shape[0] == 2:
            raise MemoryError("lane out of memory")
        return coeffs

    monkeypatch.setattr(Fitter, "photometric", broken)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(MemoryError, match="lane out of memory"):
            f.fit(lms, img, lanes=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_lanes():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert L.cpu_lanes("cpu", 8) == 2 and L.cpu_lanes("cpu", 1) == 1 and L.cpu_lanes(torch.device("cpu"), 3) == 2
        assert L.cpu_lanes("cuda:0", 8) == 1 and L.cpu_lanes("cuda", 8) == 1
        torch.set_num_threads(1)  # the governor's count when other programs hold a core
        assert L.cpu_lanes("cpu", 8) == 1
    finally:
        torch.set_num_threads(before)


def test_one_thread_keeps_the_governor_out(monkeypatch):
    calls = []

    class Gov:
        def update(self):
            calls.append(threading.current_thread().name)

    monkeypatch.setattr(T, "_active", Gov())
    before = torch.get_num_threads()
    try:
        T.tick()

        def lane():
            with T.one_thread():
                assert torch.get_num_threads() == 1
                T.tick()
            T.tick()  # out of the block again

        t = threading.Thread(target=lane, name="lane")
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert calls == ["MainThread", "lane"]


def test_photos_take_one_lane_per_free_core(model, monkeypatch, tmp_path):
    """fit_photos asks the thread governor first (a sample when due), so the lanes follow
    the cores other programs leave free; run_photos records them in each info.json."""
    import json

    import numpy as np

    from core.pipelines.photo import PreparedPhoto, fit_photos, run_photos
    from core.pipelines.session import Session

    session = Session.create(model, get_preset("default").with_overrides(first_nrf_iters=2, fine_iters=1),
                             tar_size=96, device="cpu", renderer="builtin", progress=False)
    g = torch.Generator().manual_seed(5)
    photos = []
    for k in range(3):
        target = model.layout.zeros(1).replace(id=torch.randn(1, 80, generator=g) * 0.2,
                                               angles=torch.tensor([[0.0, 0.2 * k - 0.2, 0.0]]),
                                               trans=torch.tensor([[0.0, 0.0, 0.05 * k]]))
        with torch.no_grad():
            crop = session.fitter.render(target)[0][0, ..., :3].clamp(0, 255).round().numpy().astype(np.uint8)
        lms = session.fitter.project_landmarks(target)[0].numpy().astype(np.float64)
        photos.append(PreparedPhoto(path=f"p{k}.png", name=f"p{k}", image=crop, box=(0, 0, 96, 96), crop=crop,
                                    landmarks_photo=lms, landmarks_crop=lms, detect_s=0.0, num_faces=1))
    free = {"cores": 1}

    class Gov:  # the governor's sample: torch's count at the free cores
        def update(self):
            torch.set_num_threads(free["cores"])

    monkeypatch.setattr(T, "_active", Gov())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert fit_photos(session, photos).lanes == 1  # a core held by another program: one lane
        free["cores"] = 2
        assert fit_photos(session, photos).lanes == 2
        monkeypatch.setattr("core.pipelines.photo.prepare_photo",
                            lambda path, *a, **k: next(p for p in photos if p.path == path))
        run_photos(session, None, [p.path for p in photos], str(tmp_path))
    finally:
        torch.set_num_threads(before)
    infos = [json.loads((tmp_path / f"p{k}_info.json").read_text()) for k in range(3)]
    assert [i["fit_lanes"] for i in infos] == [2, 2, 2] and [i["batch_size"] for i in infos] == [3, 3, 3]
