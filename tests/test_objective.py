"""core.fit.objective: the one weighted total of SPEC §4, and what FitResult carries of it."""
import pytest
import torch

from core.fit import losses as L
from core.fit.config import get_preset
from core.fit.fitter import Fitter, PoseRef
from core.fit.objective import Objective, shared_groups
from core.models.bfm09 import model_from_arrays
from core.render import MeshRenderer
from core.render.camera import Camera
from tests.helpers import synthetic_arrays

CFG = get_preset("default").with_overrides(lm_robust_px=0.0, lm_loss_w=7.0, rgb_loss_w=1.3, tex_w=2.0, id_reg_w=0.01, exp_reg_w=0.02,
                                           tex_reg_w=0.03, rot_reg_w=5.0, trans_reg_w=6.0)


@pytest.fixture(scope="module")
def model():
    return model_from_arrays(synthetic_arrays(1500), name="synthetic")


def coeffs(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.layout.zeros(batch).replace(
        id=torch.randn(batch, 80, generator=g) * 0.3, exp=torch.randn(batch, 64, generator=g) * 0.3,
        tex=torch.randn(batch, 80, generator=g) * 0.5, gamma=torch.randn(batch, 27, generator=g) * 0.1,
        angles=torch.randn(batch, 3, generator=g) * 0.1, trans=torch.randn(batch, 3, generator=g) * 0.1)


def test_total_is_spec_formula_written_out(model):
    """Independent frames: Σ_b [w_lm lm_b + w_rgb photo_b + w_tex refl_b] + Σ_g w_g ‖x_g‖²
    (+ pose priors); shared id/tex: mean data + the shared rows' priors once."""
    obj = Objective(model, MeshRenderer("builtin"), Camera(image_size=96), CFG)
    c = coeffs(model, 3)
    target = coeffs(model, 3, seed=1)
    lms = obj.project_landmarks(target)
    with torch.no_grad():
        imgs = obj.render(target)[0][..., :3]
    ref = PoseRef(angles=torch.zeros(3, 3) + 0.05, trans=torch.zeros(3, 3) - 0.02)
    ev = obj.evaluate(c, lms, imgs, pose_ref=ref)
    rgba, out = obj.render(c)
    lm = L.landmark_loss_per_frame(obj.project_landmarks(c), lms, obj.lm_weights, 96)
    photo = L.photo_loss_per_frame(rgba[..., :3], imgs, (rgba[..., 3] > 0).float())
    refl = L.reflectance_loss_per_frame(out.albedo, model.skinmask)
    assert torch.allclose(ev.terms["lm"], lm) and torch.allclose(ev.terms["photo"], photo)
    assert torch.allclose(ev.rgba, rgba)
    data = 7.0 * lm + 1.3 * photo + 2.0 * refl
    priors = (0.01 * (c.id ** 2).sum(1) + 0.02 * (c.exp ** 2).sum(1) + 0.03 * (c.tex ** 2).sum(1)
              + 5.0 * ((c.angles - 0.05) ** 2).sum(1) + 6.0 * ((c.trans + 0.02) ** 2).sum(1))
    assert torch.allclose(obj.frame_costs(ev.terms), data + priors, rtol=1e-5)
    assert float(obj.total(ev.terms)) == pytest.approx(float((data + priors).sum()), rel=1e-5)
    # Shared identity and albedo (batch-1 rows): their priors once, the data averaged.
    shared = c.replace(id=c.id[:1], tex=c.tex[:1])
    assert shared_groups(shared, 3) == ("id", "tex")
    ev = obj.evaluate(shared, lms, imgs, pose_ref=ref)
    # A shared group's prior is on its one row (its gradient reaches the shared
    # coefficients directly, as in the original's sum over the stored rows).
    assert ev.terms["id_reg"].shape == (1,) and ev.terms["exp_reg"].shape == (3,)
    rgba, out = obj.render(shared.replace(id=c.id[:1].expand(3, -1), tex=c.tex[:1].expand(3, -1)))
    photo = L.photo_loss_per_frame(rgba[..., :3], imgs, (rgba[..., 3] > 0).float())
    refl = L.reflectance_loss_per_frame(out.albedo, model.skinmask)
    lm = L.landmark_loss_per_frame(obj.project_landmarks(shared), lms, obj.lm_weights, 96)
    want = ((7.0 * lm + 1.3 * photo + 2.0 * refl).mean() + 0.01 * (c.id[0] ** 2).sum()
            + 0.02 * (c.exp ** 2).sum() + 0.03 * (c.tex[0] ** 2).sum()
            + 5.0 * ((c.angles - 0.05) ** 2).sum() + 6.0 * ((c.trans + 0.02) ** 2).sum())
    assert float(obj.total(ev.terms, ("id", "tex"))) == pytest.approx(float(want), rel=1e-5)


def test_landmark_residual_weights_are_the_lm_term_in_least_squares_form(model):
    obj = Objective(model, MeshRenderer("builtin"), Camera(image_size=128), CFG)
    c, t = coeffs(model, 2), coeffs(model, 2, seed=3)
    p, q = obj.project_landmarks(c), obj.project_landmarks(t)
    r = (p - q) * obj.landmark_residual_weights()[None, :, None]
    ev = obj.evaluate(c, q)
    assert torch.allclose((r ** 2).sum((1, 2)), 7.0 * ev.terms["lm"], rtol=1e-5)
    assert set(ev.terms) == {"lm", "id_reg", "exp_reg"}   # no images: no photo terms, no tex prior
    s = obj.landmark_residual_scale(p, q)   # without a robust loss: the fixed weights
    assert torch.equal(s, obj.landmark_residual_weights()[None, :, None].expand(2, -1, 1))


def test_robust_residual_scale_is_the_irls_model_of_the_lm_term(model):
    """With lm_robust_px the lm term is Charbonnier's; Σ (r·s)² has its gradient in the points."""
    obj = Objective(model, MeshRenderer("builtin"), Camera(image_size=128), CFG.with_overrides(lm_robust_px=1.5))
    c, t = coeffs(model, 2), coeffs(model, 2, seed=3)
    p, q = obj.project_landmarks(c).detach().requires_grad_(True), obj.project_landmarks(t)
    (7.0 * obj.landmark_term(p, q)).sum().backward()
    s = obj.landmark_residual_scale(p.detach(), q)
    assert torch.allclose(p.grad, 2 * (p.detach() - q) * s ** 2, rtol=1e-4, atol=1e-9)
    assert float(s.max()) < 0.9 * float(obj.landmark_residual_weights().max())   # far points count less


def test_fit_result_carries_each_frames_losses_and_render(model):
    """One evaluation at the end of Fitter.fit: per-frame terms equal each frame fitted
    result evaluated alone, their totals add up to the batch total (independent frames),
    and the render is the fit's own."""
    f = Fitter(model, MeshRenderer("builtin"), Camera(image_size=96), CFG.with_overrides(first_nrf_iters=2),
               progress=False)
    target = coeffs(model, 2, seed=5)
    lms = f.project_landmarks(target)
    with torch.no_grad():
        imgs = f.render(target)[0][..., :3]
    res = f.fit(lms, imgs)
    assert res.renders.shape == (2, 96, 96, 4) and res.output.vertices.shape == (2, model.num_vertices, 3)
    with torch.no_grad():
        again, _ = f.render(res.coeffs)
    assert torch.equal(res.renders, again)
    assert float(res.frame_losses["total"].sum()) == pytest.approx(res.losses["total"], rel=1e-5)
    for b in range(2):
        one = type(res.coeffs)(**{k: v[b:b + 1] for k, v in res.coeffs.as_dict().items()})
        with torch.no_grad():
            alone = f.loss_terms(one, lms[b:b + 1], imgs[b:b + 1], keypoints=res.keypoints[b:b + 1])
        for k, v in alone.items():
            assert float(res.frame_losses[k][b]) == pytest.approx(float(v), rel=1e-5, abs=1e-9), k
    assert f.fit(lms, imgs, losses=False).renders is None


def test_following_frames_use_the_following_config_and_rest_iterations(model, monkeypatch):
    f = Fitter(model, MeshRenderer("builtin"), Camera(image_size=96), get_preset("default"), progress=False)
    rest = f.following()
    assert rest is f.following() and rest.cfg == get_preset("default").following_frames()
    orig = Fitter(model, MeshRenderer("builtin"), Camera(image_size=96), get_preset("original"), progress=False)
    assert orig.following() is orig
    seen = {}
    monkeypatch.setattr(Fitter, "rigid", lambda self, c, lms, iters, pose_ref=None: seen.setdefault("rf", (self, iters)) and c)
    monkeypatch.setattr(Fitter, "photometric", lambda self, c, lms, imgs, iters, groups=(), pose_ref=None:
                        seen.setdefault("nrf", (self, iters)) and c)
    lms = f.project_landmarks(coeffs(model, 1))
    f.fit(lms, torch.zeros(1, 96, 96, 3), following=True, losses=False)
    cfg = get_preset("default")
    assert seen["rf"] == (rest, cfg.rest_rf_iters) and seen["nrf"] == (rest, cfg.rest_nrf_iters)


def test_photo_outputs_reuse_the_fits_render(model, monkeypatch):
    """The photo pipeline renders its final fit once (inside Fitter.fit), not again for
    the outputs: photo_outputs makes no renderer call, and its image is the fit's render."""
    import numpy as np

    from core.pipelines.photo import PreparedPhoto, fit_photos, photo_outputs
    from core.pipelines.session import Session

    session = Session.create(model, CFG.with_overrides(first_nrf_iters=2), tar_size=96, device="cpu",
                             renderer="builtin", progress=False)
    target = coeffs(model, 1, seed=7)
    with torch.no_grad():
        crop = session.fitter.render(target)[0][0, ..., :3].clamp(0, 255).round().numpy().astype(np.uint8)
    lms = session.fitter.project_landmarks(target)[0].numpy().astype(np.float64)
    photo = PreparedPhoto(path="x.png", name="x", image=crop, box=(0, 0, 96, 96), crop=crop, landmarks_photo=lms,
                          landmarks_crop=lms, detect_s=0.0, num_faces=1)
    calls = []
    result = fit_photos(session, [photo])
    monkeypatch.setattr(session.renderer, "rasterize", lambda *a, **k: calls.append(1))
    files = photo_outputs(session, photo, result, 0)
    assert calls == []
    composed = files["x_composed_img.jpg"]
    rgba = result.renders[0].numpy()
    covered = rgba[..., 3] > 0.999
    assert np.abs(composed[covered].astype(float) - np.clip(rgba[..., :3], 0, 255)[covered]).max() < 1.0
    info = files["x_info.json"]
    assert info["losses"]["total"] == pytest.approx(float(result.frame_losses["total"][0]), abs=1e-6)  # rounded
