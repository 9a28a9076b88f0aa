"""Gauss-Newton photometric solver: exact loss, exact gradient, per-vertex Jacobians,
pixel Jacobians, and fits that recover known coefficients."""
import dataclasses

import pytest
import torch

from core.render.camera import Camera
from core.models.coeffs import Coeffs
from core.fit.config import get_preset
from core.fit.fitter import Fitter
from core.fit.gauss_newton import PhotometricProblem
from core.models.bfm09 import model_from_arrays
from core.render import MeshRenderer, interpolate, interpolation_jacobian
from tests.helpers import synthetic_arrays

GROUPS = ("id", "exp", "tex", "gamma", "angles", "trans")


@pytest.fixture(scope="module")
def model():
    return model_from_arrays(synthetic_arrays(1500), name="synthetic")


def fitter(model, size=128, **over):
    return Fitter(model, MeshRenderer("builtin"), Camera(image_size=size), get_preset("default").with_overrides(**over),
                  progress=False)


def truth(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.layout.zeros(1).replace(
        id=torch.randn(1, 80, generator=g) * 0.2, exp=torch.randn(1, 64, generator=g) * 0.2,
        tex=torch.randn(1, 80, generator=g) * 0.5, gamma=torch.randn(1, 27, generator=g) * 0.1,
        angles=torch.tensor([[0.1, 0.3, 0.05]]), trans=torch.tensor([[0.02, -0.03, 0.1]]))


def perturbed(gt):
    return gt.replace(id=gt.id * 0.8, exp=gt.exp * 0.5, tex=gt.tex * 0.7, gamma=gt.gamma * 0.5,
                      angles=gt.angles + 0.02, trans=gt.trans + 0.01)


def scene(f, gt):
    with torch.no_grad():
        rgba, _ = f.render(gt)
    return rgba[..., :3], f.project_landmarks(gt) + 0.5


@pytest.mark.parametrize("normals_grad, robust", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_loss_and_gradient_match_autograd(model, normals_grad, robust):
    """evaluate() is the objective's total (Fitter.loss_terms); linearize()'s gradient is autograd's of it
    (the shading through the normals included or not, as in the Adam path; the robust landmark
    loss's IRLS model included)."""
    f = fitter(model, normals_grad=normals_grad, lm_robust_px=robust, lm_loss_w=3000.0 if robust else 100.0)
    gt = truth(model)
    img, lms = scene(f, gt)
    x0 = perturbed(gt)
    prob = PhotometricProblem(f.objective, lms, img, f.camera, GROUPS)
    st = prob.evaluate(x0, None)
    hess, grad = prob.linearize(st)
    leaves = {k: getattr(x0, k).clone().requires_grad_(True) for k in GROUPS}
    total = f.loss_terms(Coeffs(**leaves), lms, img)["total"]
    total.backward()
    assert float(st.cost[0]) == pytest.approx(float(total.detach()), rel=1e-5)
    ref = torch.cat([leaves[k].grad for k in GROUPS], 1)[0]
    assert ref.norm() > 1e-2
    for k, sl in zip(GROUPS, torch.split(torch.arange(ref.numel()), [getattr(x0, k).shape[1] for k in GROUPS])):
        assert torch.allclose(grad[0, sl], ref[sl], rtol=1e-3, atol=1e-4 * ref[sl].norm() + 1e-9), k
    # The Gauss-Newton Hessian is symmetric positive semi-definite.
    assert torch.allclose(hess, hess.transpose(1, 2), atol=1e-5 * hess.abs().max())
    assert torch.linalg.eigvalsh(hess[0].double()).min() > -1e-6 * hess.abs().max()


def test_vertex_jacobians_match_forward_mode_autodiff(model):
    """The analytic d(colour, screen)/d(parameters) at a few vertices, normals included."""
    f = fitter(model)
    x0 = perturbed(truth(model))
    prob = PhotometricProblem(f.objective, torch.zeros(1, 68, 2), torch.zeros(1, 128, 128, 3), f.camera, GROUPS)
    st = prob.evaluate(x0, None)
    vids = torch.tensor([3, 100, 700, 1200])
    sizes = [getattr(x0, g).shape[1] for g in GROUPS]
    offs = {}
    start = 0
    for g, n in zip(GROUPS, sizes):
        offs[g] = slice(start, start + n)
        start += n
    table = prob._vertex_jacobians(st, prob._frames(st, torch.tensor([0])), offs, start, vids)  # (U, 6, P)

    def fn(x):
        c = Coeffs(**dict(zip(GROUPS, torch.split(x[None], sizes, dim=1))))
        out = model(c)
        return torch.cat([out.colors[0, vids], f.camera.project(out.vertices)[0, vids]], dim=1)  # (U, 6)

    x = torch.cat([getattr(x0, g) for g in GROUPS], 1)[0]
    ref = torch.func.jacfwd(fn)(x)  # (U, 6, P)
    assert torch.allclose(table, ref, rtol=1e-3, atol=1e-3 * ref.abs().max())


def test_interpolation_jacobian_matches_autograd():
    g = torch.Generator().manual_seed(0)
    verts = torch.tensor([[[2.0, 3.0, 5.0], [14.0, 4.0, 6.0], [6.0, 13.0, 4.0]]], dtype=torch.float64)
    verts = verts + 0.1 * torch.randn(verts.shape, generator=g, dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    attrs = torch.rand(1, 3, 3, generator=g, dtype=torch.float64) * 255
    from core.render import rasterize
    p2f = rasterize(verts, faces, (16, 16)).pix_to_face
    pj = interpolation_jacobian(attrs, verts, faces, p2f)
    assert pj.idx.numel() > 20
    image = interpolate(attrs, verts, faces, p2f).reshape(-1, 3)
    assert torch.allclose(pj.values, image[pj.idx].T)
    for ch in range(3):
        v = verts.clone().requires_grad_(True)
        a = attrs.clone().requires_grad_(True)
        m = pj.idx[len(pj.idx) // 2]
        interpolate(a, v, faces, p2f).reshape(-1, 3)[m, ch].backward()
        k = (pj.idx == m).nonzero()[0, 0]
        corners = pj.vidx[:, k]
        assert torch.allclose(v.grad[0, corners], pj.d_verts[ch, :, :, k])
        assert torch.allclose(a.grad[0, corners, ch], pj.weights[:, k])


def test_gn_fit_recovers_a_render_and_beats_adam_on_the_loss(model):
    f = fitter(model, first_nrf_iters=8, fine_iters=0)
    gt = truth(model, seed=2)
    img, lms = scene(f, gt)
    res = f.fit(lms, img)
    adam = fitter(model, nonrigid_solver="adam", first_nrf_iters=100, fine_iters=0).fit(lms, img)
    assert res.losses["total"] < adam.losses["total"]
    assert res.losses["photo"] < 0.01  # mean colour error under 2.6 / 255
    assert (res.coeffs.angles - gt.angles).abs().max() < 0.01  # radians
    assert (f.project_landmarks(res.coeffs) - lms).norm(dim=-1).mean() < 1.0


def test_gn_batch_frames_are_independent(model):
    f = fitter(model, first_nrf_iters=4, fine_iters=0)
    a, b = truth(model, seed=3), truth(model, seed=4)
    img_a, lms_a = scene(f, a)
    img_b, lms_b = scene(f, b)
    both = f.fit(torch.cat([lms_a, lms_b]), torch.cat([img_a, img_b]))
    alone = f.fit(lms_b, img_b)
    # float32 sums over a batch round differently from one frame's (by CPU: up to 3e-4 in exp
    # on an AMD EPYC); frames coupled through the batch would differ by far more
    assert torch.allclose(both.coeffs.exp[1], alone.coeffs.exp[0], atol=1e-3)
    assert torch.allclose(both.coeffs.angles[1], alone.coeffs.angles[0], atol=1e-4)
    assert not torch.allclose(both.coeffs.exp[0], alone.coeffs.exp[0], atol=1e-2)  # a different frame


def test_gn_leaves_zero_basis_columns_at_zero():
    arrays = dict(synthetic_arrays(1500))  # the cached dict is shared by other tests
    arrays["exBase"] = arrays["exBase"].copy()
    arrays["exBase"][:, 10:] = 0  # a model padded to a larger layout
    m = model_from_arrays(arrays, name="padded")
    f = fitter(m, first_nrf_iters=4, fine_iters=0)
    gt = truth(m, seed=5)
    gt = gt.replace(exp=torch.cat([gt.exp[:, :10], torch.zeros(1, 54)], 1))
    img, lms = scene(f, gt)
    init = f.zeros(1).replace(exp=torch.full((1, 64), 0.3))
    res = f.fit(lms, img, init=init)
    assert torch.all(res.coeffs.exp[0, 10:] == 0)
    assert res.coeffs.exp[0, :10].abs().max() > 0.01


def test_following_frames_settings():
    cfg = get_preset("default")
    rest = cfg.following_frames()
    assert rest.lm_init_iters == cfg.rest_lm_init_iters
    assert rest.fine_iters == cfg.rest_fine_iters and rest.normals_grad == cfg.rest_normals_grad
    original = get_preset("original")
    assert original.following_frames() == original  # the original fits every frame alike


def test_gn_with_shared_identity_and_albedo(model):
    """The video identity/albedo fit: id and tex shared by the frames stay shared and the
    loss ends below what 100 Adam iterations reach from the same start."""
    g = torch.Generator().manual_seed(7)
    b = 2
    gt = model.layout.zeros(b).replace(
        id=(torch.randn(1, 80, generator=g) * 0.3).expand(b, -1), exp=torch.randn(b, 64, generator=g) * 0.3,
        tex=(torch.randn(1, 80, generator=g) * 0.5).expand(b, -1), gamma=torch.randn(b, 27, generator=g) * 0.1,
        angles=torch.tensor([[0.1, 0.3, 0.0], [-0.05, -0.2, 0.05]]), trans=torch.tensor([[0.02, 0.0, 0.1], [0.0, 0.03, -0.1]]))
    f = fitter(model, first_nrf_iters=8, fine_iters=0)
    img, lms = scene(f, gt)
    init = f.zeros(b).replace(id=torch.zeros(1, 80), tex=torch.zeros(1, 80))
    res = f.fit(lms, img, init=init)
    adam = fitter(model, nonrigid_solver="adam", first_nrf_iters=100, fine_iters=0).fit(lms, img, init=init)
    assert torch.equal(res.coeffs.id[0], res.coeffs.id[1]) and torch.equal(res.coeffs.tex[0], res.coeffs.tex[1])
    assert res.losses["total"] < adam.losses["total"]
    assert (res.coeffs.angles - gt.angles).abs().max() < 0.02
    assert not torch.equal(res.coeffs.exp[0], res.coeffs.exp[1])


@pytest.mark.parametrize("normals_grad", [True, False])
def test_adjoint_gradient_is_the_transpose_of_the_vertex_jacobians(model, normals_grad):
    """_gradient(u) == Σ_v u_vᵀ J_v for arbitrary per-vertex adjoints u: the backward chain
    rule equals the forward one (checked against jacfwd above)."""
    f = fitter(model, normals_grad=normals_grad)
    x0 = perturbed(truth(model))
    prob = PhotometricProblem(f.objective, torch.zeros(1, 68, 2), torch.zeros(1, 128, 128, 3), f.camera, GROUPS)
    st = prob.evaluate(x0, None)
    sizes = [getattr(x0, g).shape[1] for g in GROUPS]
    offs, start = {}, 0
    for g, n in zip(GROUPS, sizes):
        offs[g] = slice(start, start + n)
        start += n
    u = torch.randn(model.num_vertices, 6, generator=torch.Generator().manual_seed(1))
    fr = prob._frames(st, torch.tensor([0]))
    table = prob._vertex_jacobians(st, fr, offs, start, torch.arange(model.num_vertices))
    ref = torch.einsum("nr,nrp->p", u, table)
    got = prob._gradient(st, fr, offs, start, u[None])[0]
    for g, sl in offs.items():
        assert torch.allclose(got[sl], ref[sl], rtol=1e-4, atol=1e-4 * ref[sl].abs().max() + 1e-6), g


def test_hessian_pixels_change_only_the_hessian(model):
    """Fewer Hessian pixels (the shared fit spreads SHARED_HESSIAN_PIXELS over its frames): the
    gradient stays exact (every pixel), the Hessian is a coarser estimate of the same one."""
    f = fitter(model)
    gt = truth(model)
    img, lms = scene(f, gt)
    x0 = perturbed(gt)
    full = PhotometricProblem(f.objective, lms, img, f.camera, GROUPS)
    few = PhotometricProblem(f.objective, lms, img, f.camera, GROUPS, hessian_pixels=256)
    h_full, g_full = full.linearize(full.evaluate(x0, None))
    h_few, g_few = few.linearize(few.evaluate(x0, None))
    assert torch.equal(g_full, g_few) and not torch.equal(h_full, h_few)
    d_full, d_few = torch.diagonal(h_full[0]), torch.diagonal(h_few[0])
    assert float((d_few - d_full).norm() / d_full.norm()) < 0.2


@pytest.fixture(scope="module")
def model64():
    """The synthetic model in float64: batch and single-frame fits then agree to rounding
    (in float32, one frame's accept / reject decisions can flip on batched sums' rounding)."""
    return model_from_arrays(synthetic_arrays(1500), name="synthetic").double()


def truth64(model, seed):
    return Coeffs(**{k: v.double() for k, v in truth(model, seed).as_dict().items()})


def test_converged_frames_leave_the_batch(model64, monkeypatch):
    """Independent frames fitted together: a frame that has converged is no longer rendered
    (later steps evaluate fewer frames), and each frame's fit is the one it gets alone."""
    from core.fit import gauss_newton as G
    f = fitter(model64, first_nrf_iters=12)
    gts = [truth64(model64, seed=s) for s in range(3)]
    imgs, lms = zip(*(scene(f, gt) for gt in gts))
    img, lm = torch.cat(imgs), torch.cat(lms)
    # frame 0 starts at its truth (converges at once), the others far from it
    x0 = Coeffs(**{k: torch.cat([getattr(gts[0], k)] + [getattr(perturbed(g), k) for g in gts[1:]])
                   for k in GROUPS})
    sizes = []
    real = G.PhotometricProblem.evaluate

    def counting(self, c, kp):
        sizes.append(self.landmarks.shape[0])
        return real(self, c, kp)

    monkeypatch.setattr(G.PhotometricProblem, "evaluate", counting)
    together = f.photometric(x0, lm, img, 12)
    assert sizes[0] == 3 and min(sizes) < 3, sizes
    for b in range(3):
        alone = f.photometric(Coeffs(**{k: getattr(x0, k)[b:b + 1] for k in GROUPS}), lm[b:b + 1], img[b:b + 1], 12)
        for k in GROUPS:
            assert torch.allclose(getattr(together, k)[b], getattr(alone, k)[0], atol=1e-9), (b, k)


@pytest.mark.parametrize("shared_albedo", [False, True])
def test_batched_linearisation_is_each_frames_own(model64, shared_albedo, monkeypatch):
    """linearize() stacks the frames' pixels and vertices: each frame's Hessian and gradient
    are the ones it gets alone, with per-frame cameras (crops of photos with their own focal
    lengths) and with an albedo shared by the frames (the video's fixed texture); ``frames``
    leaves the others' photometric term out."""
    from core.render.camera import Camera
    f = fitter(model64)
    gts = [truth64(model64, seed=s) for s in range(3)]
    cam = Camera(focal=torch.tensor([1015.0, 900.0, 1200.0], dtype=torch.float64), image_size=128,
                 principal=torch.tensor([[64.0, 64.0], [60.0, 70.0], [66.0, 58.0]], dtype=torch.float64))
    fb = f.with_camera(cam)
    with torch.no_grad():
        img = fb.render(Coeffs(**{k: torch.cat([getattr(g, k) for g in gts]) for k in GROUPS}))[0][..., :3]
    lm = torch.zeros(3, 68, 2, dtype=torch.float64)
    x0 = Coeffs(**{k: torch.cat([getattr(perturbed(g), k) for g in gts]) for k in GROUPS})
    groups, cached = GROUPS, None
    if shared_albedo:
        groups = ("exp", "gamma", "angles", "trans")
        cached = fb.objective.fixed_pieces({"id": x0.id, "tex": x0.tex[:1]})
        x0 = x0.replace(tex=x0.tex[:1])
    prob = PhotometricProblem(fb.objective, lm, img, cam, groups, cached=cached)
    st = prob.evaluate(x0, None)
    if shared_albedo:  # one albedo for every frame (as a model may return it for a fixed texture)
        assert torch.equal(st.out.albedo[0], st.out.albedo[2])
        st = dataclasses.replace(st, out=dataclasses.replace(st.out, albedo=st.out.albedo[:1]))
    hess, grad = prob.linearize(st)
    some, _ = prob.linearize(st, frames=torch.tensor([False, True, False]))
    for b in range(3):
        sub = prob.subset(torch.tensor([b]))
        one = Coeffs(**{k: v[min(b, v.shape[0] - 1)][None] for k, v in x0.as_dict().items()})
        h1, g1 = sub.linearize(sub.evaluate(one, None))
        assert torch.allclose(hess[b], h1[0], rtol=1e-9, atol=1e-12 * float(h1.abs().max()))
        assert torch.allclose(grad[b], g1[0], rtol=1e-9, atol=1e-12 * float(g1.abs().max()))
    assert torch.allclose(some[1], hess[1], rtol=1e-9) and not torch.allclose(some[0], hess[0])
    assert not torch.allclose(hess[0], hess[1], rtol=1e-2)  # the frames' systems do differ
    # The frames per call (4 on a CPU, 32 on a GPU) change nothing but the rounding.
    from core.fit import gauss_newton as G
    for per_call in (1, 2, 3):
        monkeypatch.setattr(G, "PHOTO_FRAMES_PER_CALL", per_call)
        h, g = prob.linearize(st)
        assert torch.allclose(h, hess, rtol=1e-9, atol=1e-12 * float(hess.abs().max())), per_call
        assert torch.allclose(g, grad, rtol=1e-9, atol=1e-12 * float(grad.abs().max())), per_call


def test_rekey_is_evaluate_with_the_new_contour_keypoints():
    """After a step the jaw landmarks move along the silhouette; rekey() recomputes only the
    landmark term (no render) and equals a full evaluation with the new vertex ids."""
    from core.models.sfm import load_sfm

    m = load_sfm(None)  # the bundled Surrey model: a contour definition
    f = Fitter(m, MeshRenderer("builtin"), Camera(image_size=96), get_preset("default"), progress=False)
    g = torch.Generator().manual_seed(0)
    c = m.layout.zeros(2).replace(id=torch.randn(2, m.layout.n_id, generator=g) * 0.5,
                                  angles=torch.tensor([[0.1, 0.4, 0.0], [0.0, -0.3, 0.1]]),
                                  gamma=torch.randn(2, 27, generator=g) * 0.1)
    with torch.no_grad():
        img = f.render(c.replace(angles=c.angles + 0.05))[0][..., :3]
    lms = f.project_landmarks(c) + torch.randn(2, 68, 2, generator=g)
    prob = PhotometricProblem(f.objective, lms, img, f.camera, ("id", "exp", "gamma", "angles", "trans"))
    old, new = f.objective.keypoints(c.replace(angles=c.angles - 0.3), lms), f.objective.keypoints(c, lms)
    assert int((old != new).sum()) > 5
    a, b = prob.rekey(prob.evaluate(c, old), new), prob.evaluate(c, new)
    assert torch.allclose(a.cost, b.cost, rtol=1e-6) and torch.equal(a.keypoints, b.keypoints)
    assert not torch.allclose(prob.evaluate(c, old).cost, b.cost, rtol=1e-4)


def test_merge_states_is_evaluate_at_each_frames_point(model):
    """After a step some frames of a batch move and some keep their point: the merged state
    (no render) equals a full evaluation at each frame's chosen point, term by term, and its
    linearisation is the same."""
    from core.fit.gn_state import merge_states

    m = model
    f = Fitter(m, MeshRenderer("builtin"), Camera(image_size=64), get_preset("default"), progress=False)
    g = torch.Generator().manual_seed(1)
    c = m.layout.zeros(3).replace(id=torch.randn(3, m.layout.n_id, generator=g) * 0.5,
                                  angles=torch.tensor([[0.1, 0.3, 0.0], [0.0, -0.2, 0.1], [0.05, 0.0, 0.0]]),
                                  gamma=torch.randn(3, 27, generator=g) * 0.1)
    moved = c.replace(angles=c.angles + 0.04, exp=torch.randn(3, m.layout.n_exp, generator=g) * 0.3)
    with torch.no_grad():
        img = f.render(c.replace(angles=c.angles + 0.02))[0][..., :3]
    lms = f.project_landmarks(c) + torch.randn(3, 68, 2, generator=g)
    groups = ("exp", "gamma", "angles", "trans")
    prob = PhotometricProblem(f.objective, lms, img, f.camera, groups)
    better = torch.tensor([True, False, True])
    chosen = Coeffs(**{k: torch.where(better[:, None], v, getattr(c, k)) for k, v in moved.as_dict().items()})
    merged = merge_states(better, prob.evaluate(moved, None), prob.evaluate(c, None))
    full = prob.evaluate(chosen, None)
    assert torch.allclose(merged.cost, full.cost, rtol=1e-6)
    for k in full.terms:
        assert torch.allclose(merged.terms[k], full.terms[k], rtol=1e-6), k
    assert torch.equal(merged.pix_to_face, full.pix_to_face)
    h1, g1 = prob.linearize(merged)
    h2, g2 = prob.linearize(full)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-7) and torch.allclose(h1, h2, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(prob.evaluate(moved, None).cost, full.cost, rtol=1e-4)


def test_shared_fit_in_lanes_is_the_same_fit(model, monkeypatch):
    """gn_shared evaluates and linearises its frames in lanes (parts side by side, one CPU
    thread each): the parts' states put together are the batch's state (up to rounding:
    a batch's tensor operations may sum in another order), and the fit ends where the
    one-lane fit ends."""
    from core.fit import gn as gn_mod
    from core.fit import lanes as lanes_mod
    from core.fit.gn_state import cat_states
    g = torch.Generator().manual_seed(3)
    b = 4
    gt = model.layout.zeros(b).replace(
        id=(torch.randn(1, 80, generator=g) * 0.3).expand(b, -1), exp=torch.randn(b, 64, generator=g) * 0.3,
        tex=(torch.randn(1, 80, generator=g) * 0.5).expand(b, -1), gamma=torch.randn(b, 27, generator=g) * 0.1,
        angles=torch.randn(b, 3, generator=g) * 0.1, trans=torch.randn(b, 3, generator=g) * 0.03)
    f = fitter(model, first_nrf_iters=6, fine_iters=0)
    img, lms = scene(f, gt)
    prob = PhotometricProblem(f.objective, lms, img, f.camera, GROUPS)
    x = perturbed(gt)
    whole = prob.evaluate(x, None)
    parts = [prob.subset(idx).evaluate(Coeffs(**{k: v[idx] for k, v in x.as_dict().items()}), None)
             for idx in (torch.arange(0, 2), torch.arange(2, 4))]
    joined = cat_states(parts)
    assert torch.allclose(joined.cost, whole.cost, rtol=1e-5) and torch.allclose(joined.screen, whole.screen, atol=1e-4)
    assert (joined.pix_to_face != whole.pix_to_face).float().mean() < 1e-4
    assert all(torch.allclose(joined.terms[k], whole.terms[k], rtol=1e-5, atol=1e-8) for k in whole.terms)
    assert joined.out.vertices.shape == whole.out.vertices.shape and joined.coeffs.id.shape == (b, 80)
    with pytest.raises(ValueError):
        cat_states([parts[0], take_one(parts[1])])

    init = f.zeros(b).replace(id=torch.zeros(1, 80), tex=torch.zeros(1, 80))
    seen = []
    real, lanes_of = lanes_mod.run_lanes, gn_mod.shared_lanes

    def spy(tasks, name="lane"):
        seen.append((name, len(tasks)))
        return real(tasks, name)

    monkeypatch.setattr(gn_mod, "run_lanes", spy)
    monkeypatch.setattr(gn_mod, "shared_lanes", lambda device, batch: 2)
    two = f.fit(lms, img, init=init)
    assert seen and set(seen) == {("gn-lane", 2)}
    monkeypatch.setattr(gn_mod, "shared_lanes", lambda device, batch: 1)
    seen.clear()
    one = f.fit(lms, img, init=init)
    assert not seen
    for k in GROUPS:
        assert torch.allclose(getattr(two.coeffs, k), getattr(one.coeffs, k), rtol=1e-3, atol=2e-3), k
    assert abs(two.losses["total"] - one.losses["total"]) <= 1e-3 * one.losses["total"]
    assert lanes_of("cpu", 8) == min(torch.get_num_threads(), 4)  # parts of at least 2 frames
    assert lanes_of("cpu", 3) == 1 and lanes_of("meta", 8) == 1


def take_one(st):
    from core.fit.gn_state import take_state
    return take_state(st, torch.tensor([0]))


def _stage_traces(f, x0, lms, img, steps, monkeypatch):
    """Fit one frame and return, per stage, the costs of its evaluations in order: the
    stage's start, then one per step (the trial; accepted when lower than the best so far)."""
    from core.fit import gauss_newton as G
    traces = []
    real = G.PhotometricProblem.evaluate

    def logged(self, c, kp):
        st = real(self, c, kp)
        size = self.images.shape[1]
        if not traces or traces[-1][0] != size:
            traces.append((size, []))
        traces[-1][1].append(float(st.cost[0]))
        return st

    monkeypatch.setattr(G.PhotometricProblem, "evaluate", logged)
    f.photometric(x0, lms, img, steps)
    return traces


def _why_it_ended(costs, rtol, steps):
    """How a stage with these evaluation costs ended under the stopping rule, checking
    that it went on exactly as long as the rule says, and the relative gain of its last
    accepted step (None: none): 'small' (an accepted step gained less than rtol of the
    loss), 'misses' (GN_MAX_MISSES steps in a row rejected), 'damping' (past
    GN_LAMBDA_MAX) or 'steps' (the step limit)."""
    from core.fit import gn
    best, misses, lam, gain = costs[0], 0, gn.GN_LAMBDA0, None
    trials = costs[1:]
    for k, c in enumerate(trials):
        last = k == len(trials) - 1
        why = None
        if c < best:
            gain = (best - c) / best
            best, misses, lam = c, 0, lam * gn.GN_LAMBDA_DOWN
            if gain < rtol:
                why = "small"
        else:
            misses, lam = misses + 1, lam * gn.GN_LAMBDA_UP
            why = "misses" if misses >= gn.GN_MAX_MISSES else "damping" if lam > gn.GN_LAMBDA_MAX else None
        if why is not None:
            assert last, f"the stage went on after it should have ended ({why}): {costs}"
            return why, gain
        if last:
            assert k + 1 == steps, f"the stage ended early for no reason: {costs}"
            return "steps", gain
    raise AssertionError(f"a stage without steps: {costs}")


def test_gn_stages_end_where_the_stopping_rule_says(model, monkeypatch):
    """A coarse stage that the crop-size stage follows ends at the first step gaining less
    than GN_RTOL_COARSE of the loss; the last stage at GN_RTOL; any stage after
    GN_MAX_MISSES rejected steps in a row. On these cases the coarse stages end on gains the
    old tolerance (GN_RTOL everywhere) would have gone on from."""
    from core.fit import gn
    steps = 30
    coarse_ends = []
    for seed in (0, 2):
        f = fitter(model, coarse_size=64, fine_iters=10, first_nrf_iters=steps)
        gt = truth(model, seed)
        img, lms = scene(f, gt)
        traces = _stage_traces(f, perturbed(gt), lms, img, steps, monkeypatch)
        monkeypatch.undo()
        assert [size for size, _ in traces] == [64, 128]
        (_, coarse), (_, fine) = traces
        why, gain = _why_it_ended(coarse, gn.GN_RTOL_COARSE, steps - 10)
        _why_it_ended(fine, gn.GN_RTOL, 10)
        if why == "small":
            coarse_ends.append(gain)
    assert any(gn.GN_RTOL <= g < gn.GN_RTOL_COARSE for g in coarse_ends), coarse_ends


def test_gn_gives_up_after_max_misses(model, monkeypatch):
    """When no step lowers the loss, a per-frame stage stops after GN_MAX_MISSES tries, not
    after the damping has grown past GN_LAMBDA_MAX (6 tries from GN_LAMBDA0); the shared
    (video identity) fit keeps trying until then."""
    from core.fit import gauss_newton as G
    from core.fit import gn
    calls = []
    real = G.PhotometricProblem.evaluate

    def worse_after_the_start(self, c, kp):
        st = real(self, c, kp)
        calls.append(1)
        if len(calls) > 1:  # every trial: the loss went up
            st = dataclasses.replace(st, cost=st.cost + 1.0, terms={k: v + 1.0 for k, v in st.terms.items()})
        return st

    f = fitter(model, first_nrf_iters=20, fine_iters=0)
    gt = truth(model, seed=1)
    img, lms = scene(f, gt)
    monkeypatch.setattr(G.PhotometricProblem, "evaluate", worse_after_the_start)
    x0 = perturbed(gt)
    out = f.photometric(x0, lms, img, 20)
    assert len(calls) == 1 + gn.GN_MAX_MISSES < 7
    assert torch.equal(out.exp, x0.exp)  # no step kept
    calls.clear()
    b = 2
    init = f.zeros(b).replace(id=torch.zeros(1, 80), tex=torch.zeros(1, 80))
    f.photometric(init, lms.expand(b, -1, -1), img.expand(b, -1, -1, -1), 20)
    tries = 0
    lam = gn.GN_LAMBDA0
    while lam <= gn.GN_LAMBDA_MAX:
        lam *= gn.GN_LAMBDA_UP
        tries += 1
    assert len(calls) == 1 + tries == 7
