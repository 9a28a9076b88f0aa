"""Tests of core.render: the builtin rasterizer against a slow reference written plainly
here, hand-computed coverage, depth order and barycentrics, float64 gradchecks, batching,
skipped triangles, and the pytorch3d backend (parity test skipped without pytorch3d)."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from core.render import MeshRenderer, barycentrics, coverage, interpolate, layout, rasterize
from core.render.pytorch3d_backend import screen_to_ndc


# --------------------------------------------------------------------------- reference
def screen_weights(tri, px, py):
    """Screen-space barycentrics (F, 3) of the point (px, py) in triangles tri (F, 3, 3),
    NaN for zero-area triangles."""
    x, y = tri[..., 0], tri[..., 1]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    w = np.empty((len(tri), 3))
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        w[:, k] = (x[:, i] - px) * (y[:, j] - py) - (x[:, j] - px) * (y[:, i] - py)
    with np.errstate(divide="ignore", invalid="ignore"):
        return w / area[:, None]


def reference_rasterize(verts, faces, height, width, znear=0.01, zfar=50.0):
    """Plain per-pixel loop in float64 numpy: for each pixel centre, the nearest valid
    triangle whose three screen barycentrics are > 0; ties to the smaller face id."""
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces)
    batch = verts.shape[0]
    pix_to_face = np.full((batch, height, width), -1, dtype=np.int64)
    zbuf = np.full((batch, height, width), -1.0)
    for b in range(batch):
        tri = verts[b][faces]  # (F, 3, 3)
        z = tri[..., 2]
        ok = (z.min(1) > znear) & (z.min(1) <= zfar)
        for row in range(height):
            for col in range(width):
                w = screen_weights(tri, col + 0.5, row + 0.5)
                inside = ok & (w > 0).all(1)  # NaN (zero area) compares False
                if not inside.any():
                    continue
                depth = np.full(len(tri), np.inf)
                depth[inside] = 1.0 / (w[inside] / z[inside]).sum(1)
                f = int(np.argmin(depth))  # first minimum: smallest face id on a tie
                pix_to_face[b, row, col] = f
                zbuf[b, row, col] = depth[f]
    return pix_to_face, zbuf


def random_mesh(seed, batch=2, num_verts=24, num_faces=40, height=20, width=24):
    """Random overlapping triangles, some larger than the image, some off-screen."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.rand(batch, num_verts, generator=g, dtype=torch.float64) * (width + 8) - 4
    rows = torch.rand(batch, num_verts, generator=g, dtype=torch.float64) * (height + 8) - 4
    depth = torch.rand(batch, num_verts, generator=g, dtype=torch.float64) * 4 + 1
    faces = torch.stack([torch.randperm(num_verts, generator=g)[:3] for _ in range(num_faces)])
    return torch.stack([cols, rows, depth], -1), faces


# --------------------------------------------------------------------------- rasterize
@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_float64(seed):
    verts, faces = random_mesh(seed)
    frags = rasterize(verts, faces, (20, 24))
    ref_p2f, ref_z = reference_rasterize(verts.numpy(), faces.numpy(), 20, 24)
    assert (frags.pix_to_face.numpy() == ref_p2f).all()
    assert (ref_p2f >= 0).mean() > 0.3 and len(np.unique(ref_p2f)) > 10  # a real test
    np.testing.assert_allclose(frags.zbuf.numpy(), ref_z, rtol=1e-6)


def jittered_grid(seed, n, lo, hi, jitter):
    """An n x n grid over [lo, hi]^2 (pixels) with uniform jitter of +-jitter/2 px and
    depths in [3, 4], cut into 2 (n-1)^2 triangles: a dense mesh like a face model's."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(lo, hi, n, dtype=torch.float64)
    rows, cols = torch.meshgrid(t, t, indexing="ij")
    shift = (torch.rand(2, n, n, generator=g, dtype=torch.float64) - 0.5) * jitter
    depth = 3 + torch.rand(n, n, generator=g, dtype=torch.float64)
    verts = torch.stack([cols + shift[0], rows + shift[1], depth], -1).view(1, -1, 3)
    i = torch.arange(n - 1)
    a = (i[:, None] * n + i[None, :]).reshape(-1)
    faces = torch.cat([torch.stack([a, a + 1, a + n], 1), torch.stack([a + 1, a + n + 1, a + n], 1)])
    return verts, faces


def test_matches_reference_dense_mesh():
    # Small triangles, as on a face mesh: most have 0, 1 or 2 candidate pixel centres.
    verts, faces = jittered_grid(2, 14, 2.0, 19.0, 0.8)
    frags = rasterize(verts, faces, (20, 22))
    ref_p2f, ref_z = reference_rasterize(verts.numpy(), faces.numpy(), 20, 22)
    assert (frags.pix_to_face.numpy() == ref_p2f).all()
    assert len(np.unique(ref_p2f)) > 150
    np.testing.assert_allclose(frags.zbuf.numpy(), ref_z, rtol=1e-6)


@pytest.mark.parametrize("in_place", [1, 2, 4, 9])
def test_in_place_candidates_match_reference(monkeypatch, in_place):
    # A jittered grid at 1.6 px spacing: boxes of 1 to 6 candidate centres. Whatever the
    # split between candidates tested in place and enumerated, the result is the reference.
    verts, faces = jittered_grid(4, 12, 1.0, 18.6, 0.9)
    tri = verts[0][faces]
    span = [(torch.floor(tri[..., d].amax(1) - 0.5) - torch.ceil(tri[..., d].amin(1) - 0.5) + 1).clamp(min=0)
            for d in (0, 1)]
    counts = set((span[0] * span[1]).long().tolist())
    assert {1, 2, 3, 4} <= counts and max(counts) > 4  # every path is exercised
    monkeypatch.setattr(coverage, "_IN_PLACE", in_place)
    frags = rasterize(verts, faces, (20, 20))
    ref_p2f, ref_z = reference_rasterize(verts.numpy(), faces.numpy(), 20, 20)
    assert (frags.pix_to_face.numpy() == ref_p2f).all()
    assert (ref_p2f >= 0).mean() > 0.7
    np.testing.assert_allclose(frags.zbuf.numpy(), ref_z, rtol=1e-6)


def test_matches_reference_float32_up_to_edge_pixels():
    verts, faces = random_mesh(7, batch=3)
    verts = verts.float()
    frags = rasterize(verts, faces, (20, 24))
    v64 = verts.double().numpy()
    ref_p2f, ref_z = reference_rasterize(v64, faces.numpy(), 20, 24)
    ours = frags.pix_to_face.numpy()
    differ = ours != ref_p2f
    assert differ.mean() < 0.01
    # Any disagreement must be at a pixel centre within float32 rounding of an edge of
    # one of the two triangles.
    for b, row, col in zip(*np.nonzero(differ)):
        ids = [f for f in (ours[b, row, col], ref_p2f[b, row, col]) if f >= 0]
        w = screen_weights(v64[b][faces.numpy()[ids]], col + 0.5, row + 0.5)
        assert np.abs(w).min() < 1e-4
    same = ~differ & (ref_p2f >= 0)
    np.testing.assert_allclose(frags.zbuf.numpy()[same], ref_z[same], rtol=1e-5)


def slivers(seed, n=300, size=40):
    """Long thin triangles and triangles with nearly horizontal or vertical edges (an edge
    crossing a row at a steep or a grazing angle, where the row bounds are least well
    conditioned), float32 screen coordinates over a size x size image."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 2, generator=g) * size
    b = a + (torch.rand(n, 2, generator=g) - 0.5) * size
    c = b + (torch.rand(n, 2, generator=g) - 0.5) * 0.3  # a sliver: c next to b
    kind = torch.arange(n) % 3
    b[kind == 1, 1] = a[kind == 1, 1] + (torch.rand(int((kind == 1).sum()), generator=g) - 0.5) * 1e-4
    b[kind == 2, 0] = a[kind == 2, 0] + (torch.rand(int((kind == 2).sum()), generator=g) - 0.5) * 1e-4
    c[kind > 0] = a[kind > 0] + (torch.rand(int((kind > 0).sum()), 2, generator=g) - 0.5) * size
    depth = 1 + torch.rand(n, 3, generator=g)
    verts = torch.cat([torch.stack([a, b, c], 1), depth[..., None]], -1).view(1, -1, 3)
    return verts, torch.arange(3 * n).view(n, 3)


@pytest.mark.parametrize("seed", range(3))
def test_row_bounds_never_leave_out_a_covered_pixel(monkeypatch, seed):
    # The enumerated faces test only the candidates within their rows' bounds; with the
    # bounds switched off (every candidate of the box tested) the result is the same.
    verts, faces = slivers(seed)
    frags = rasterize(verts, faces, (40, 40))
    tested = []
    real_bounds = coverage._row_bounds

    def counting(a, c, last):
        lo, hi = real_bounds(a, c, last)
        tested.append((float((hi - lo + 1).clamp(min=0).sum()), float((last + 1).sum())))
        return lo, hi

    monkeypatch.setattr(coverage, "_row_bounds", counting)
    assert torch.equal(rasterize(verts, faces, (40, 40)).pix_to_face, frags.pix_to_face)
    assert sum(t for t, _ in tested) < 0.6 * sum(b for _, b in tested)  # the bounds do prune
    covered = int((frags.pix_to_face >= 0).sum())
    assert covered > 600
    monkeypatch.setattr(coverage, "_row_bounds", lambda a, c, last: (torch.zeros_like(last), last.clone()))
    full = rasterize(verts, faces, (40, 40))
    assert torch.equal(full.pix_to_face, frags.pix_to_face)
    assert torch.equal(full.zbuf, frags.zbuf)


def test_row_bounds_of_one_row():
    # e_0 = dx - 2.3 > 0, e_1 = 0.25 dx + 0.1 > 0, e_2 = 9 - 0.5 dx > 0, e_3 = 0 dx + 1:
    # dx in 3..17 of 0..30; e_2 crosses the row on a whole number (18), so the bound keeps
    # that candidate too, for the exact test to drop
    one = lambda *v: torch.tensor(v)[:, None]
    lo, hi = coverage._row_bounds(one(1.0, 0.25, -0.5), one(-2.3, 0.1, 9.0), torch.tensor([30.0]))
    assert (lo.item(), hi.item()) == (3, 18)
    lo, hi = coverage._row_bounds(one(0.0, -1.0), one(1.0, 3.5), torch.tensor([30.0]))  # dx < 3.5
    assert (lo.item(), hi.item()) == (0, 3)
    # a crossing on a whole number is widened to the candidate next to it (tested exactly)
    lo, hi = coverage._row_bounds(one(1.0), one(-4.0), torch.tensor([30.0]))
    assert (lo.item(), hi.item()) == (4, 30)


def test_known_triangle_coverage():
    # Right triangle with legs along x = 1, y = 1 and hypotenuse x + y = 7: covered
    # centres (i + .5, j + .5) need i >= 1, j >= 1 and i + j + 1 < 7 (strictly: the
    # centres on the hypotenuse, i + j = 6, are not covered). (row, col) = (j, i).
    verts = torch.tensor([[[1.0, 1.0, 2.0], [6.0, 1.0, 2.0], [1.0, 6.0, 2.0]]])
    expected = {(j, i) for i in range(1, 8) for j in range(1, 8) if i + j < 6}
    assert len(expected) == 10
    for faces in (torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 1]])):  # both windings
        p2f = rasterize(verts, faces, (8, 8)).pix_to_face[0]
        assert {tuple(rc) for rc in torch.nonzero(p2f == 0).tolist()} == expected
        assert (p2f[p2f != 0] == -1).all()


def test_vertices_on_pixel_centres_exclude_the_edges():
    verts = torch.tensor([[[1.5, 1.5, 1.0], [5.5, 1.5, 1.0], [1.5, 5.5, 1.0]]])
    p2f = rasterize(verts, torch.tensor([[0, 1, 2]]), (8, 8)).pix_to_face[0]
    assert {tuple(rc) for rc in torch.nonzero(p2f == 0).tolist()} == {(2, 2), (2, 3), (3, 2)}


def test_tiny_triangles_with_one_candidate_centre():
    # Each box holds one pixel centre, (2.5, 2.5) or (5.5, 2.5): strictly inside the first
    # triangle; on the left edge (x = 5.5) of the second.
    verts = torch.tensor([[[2.2, 2.2, 1.0], [2.9, 2.3, 1.0], [2.4, 2.9, 1.0],
                           [5.5, 2.2, 1.0], [5.9, 2.5, 1.0], [5.5, 2.9, 1.0]]])
    p2f = rasterize(verts, torch.tensor([[0, 1, 2], [3, 4, 5]]), (4, 8)).pix_to_face[0]
    assert torch.nonzero(p2f >= 0).tolist() == [[2, 2]] and p2f[2, 2] == 0


def two_squares(front_first: bool):
    """Two overlapping axis-aligned squares (two triangles each); the front one at depth 2,
    the back one at depth 3. Rows are shifted by 0.2 so that no pixel centre lies on a
    diagonal (a centre on an edge shared by two triangles is covered by neither)."""
    front = [[1.0, 1.2, 2.0], [6.0, 1.2, 2.0], [6.0, 6.2, 2.0], [1.0, 6.2, 2.0]]
    back = [[3.0, 3.2, 3.0], [8.0, 3.2, 3.0], [8.0, 8.2, 3.0], [3.0, 8.2, 3.0]]
    verts = torch.tensor([front + back])
    quads = [[0, 1, 2], [0, 2, 3]], [[4, 5, 6], [4, 6, 7]]
    faces = torch.tensor(quads[0] + quads[1] if front_first else quads[1] + quads[0])
    return verts, faces


@pytest.mark.parametrize("front_first", [True, False])
def test_nearer_triangle_wins(front_first):
    verts, faces = two_squares(front_first)
    frags = rasterize(verts, faces, (10, 10))
    front_ids = {0, 1} if front_first else {2, 3}
    overlap = frags.pix_to_face[0, 3:6, 3:6]
    assert all(int(f) in front_ids for f in overlap.flatten())
    assert torch.allclose(frags.zbuf[0, 3:6, 3:6], torch.tensor(2.0), rtol=1e-6)
    assert all(int(f) not in front_ids for f in frags.pix_to_face[0, 7:8, 3:8].flatten())
    assert torch.allclose(frags.zbuf[0, 7, 3:8], torch.tensor(3.0), rtol=1e-6)


def test_equal_depth_goes_to_smaller_face_id():
    verts = torch.tensor([[[1.0, 1.0, 2.0], [6.0, 1.0, 2.0], [1.0, 6.0, 2.0]]])
    faces = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 1, 0]])
    p2f = rasterize(verts, faces, (8, 8)).pix_to_face
    assert set(p2f.unique().tolist()) == {-1, 0}


def test_background():
    verts, faces = two_squares(True)
    frags = rasterize(verts, faces, (12, 12))
    assert (frags.pix_to_face[0, 9:, :] == -1).all() and (frags.zbuf[0, 9:, :] == -1).all()
    colors = torch.full((1, 8, 3), 100.0)
    image = MeshRenderer(backend="builtin")(verts, faces, colors, (12, 12))
    assert image.shape == (1, 12, 12, 4)
    background = frags.pix_to_face[0] < 0
    assert (image[0][background] == 0).all()
    assert (image[0][~background][:, 3] == 1).all()
    assert torch.allclose(image[0][~background][:, :3], torch.tensor(100.0))


def test_skipped_triangles():
    tri = [[1.0, 1.0], [7.0, 1.0], [1.0, 7.0]]

    def render(depths, faces=((0, 1, 2),)):
        verts = torch.tensor([[[c, r, d] for (c, r), d in zip(tri, depths)]])
        return rasterize(verts, torch.tensor(faces), (8, 8)).pix_to_face

    assert (render([2.0, 2.0, 2.0]) == 0).any()
    assert (render([2.0, -1.0, 2.0]) == -1).all()  # a vertex behind the camera
    assert (render([2.0, 0.01, 2.0]) == -1).all()  # on znear
    assert (render([60.0, 70.0, 80.0]) == -1).all()  # all beyond zfar
    assert (render([2.0, 70.0, 80.0]) == 0).any()  # partly beyond zfar: drawn
    assert (render([2.0, 2.0, 2.0], faces=((0, 1, 1),)) == -1).all()  # repeated vertex
    # Collinear vertices through pixel centres: zero area, nothing drawn.
    line = torch.tensor([[[0.5, 0.5, 1.0], [3.5, 3.5, 1.0], [6.5, 6.5, 1.0]]])
    assert (rasterize(line, torch.tensor([[0, 1, 2]]), (8, 8)).pix_to_face == -1).all()


def test_triangle_larger_than_image():
    verts = torch.tensor([[[-500.0, -500.0, 5.0], [3000.0, -400.0, 5.0], [-300.0, 4000.0, 5.0],
                           [2.0, 2.0, 1.0], [9.0, 2.0, 1.0], [2.0, 9.0, 1.0]]])
    frags = rasterize(verts, torch.tensor([[0, 1, 2], [3, 4, 5]]), (16, 12))
    ref_p2f, ref_z = reference_rasterize(verts.numpy(), [[0, 1, 2], [3, 4, 5]], 16, 12)
    assert (frags.pix_to_face.numpy() == ref_p2f).all()
    assert (ref_p2f == 0).sum() > 150 and (ref_p2f == 1).sum() > 10 and (ref_p2f >= 0).all()
    np.testing.assert_allclose(frags.zbuf.numpy(), ref_z, rtol=1e-6)


def test_batch_equals_one_at_a_time():
    verts, faces = random_mesh(11, batch=3)
    frags = rasterize(verts, faces, (20, 24))
    attrs = torch.rand(3, verts.shape[1], 2, dtype=torch.float64)
    image = interpolate(attrs, verts, faces, frags.pix_to_face)
    assert len({frags.pix_to_face[b].sum().item() for b in range(3)}) == 3  # 3 different
    for b in range(3):
        one = rasterize(verts[b:b + 1], faces, (20, 24))
        assert torch.equal(one.pix_to_face, frags.pix_to_face[b:b + 1])
        assert torch.equal(one.zbuf, frags.zbuf[b:b + 1])
        single = interpolate(attrs[b:b + 1], verts[b:b + 1], faces, one.pix_to_face)
        assert torch.allclose(single, image[b:b + 1], rtol=0, atol=1e-12)


def test_chunking_gives_the_same_result(monkeypatch):
    verts, faces = random_mesh(3, batch=3)
    attrs = torch.rand(3, verts.shape[1], 3, dtype=torch.float64)
    frags = rasterize(verts, faces, (20, 24))
    image = interpolate(attrs, verts, faces, frags.pix_to_face)
    monkeypatch.setattr(coverage, "_MAX_CANDIDATES", 7)
    monkeypatch.setattr(layout, "_CHUNK_ELEMENTS", 1)
    chunked = rasterize(verts, faces, (20, 24))
    assert torch.equal(chunked.pix_to_face, frags.pix_to_face)
    assert torch.equal(chunked.zbuf, frags.zbuf)
    assert torch.equal(interpolate(attrs, verts, faces, frags.pix_to_face), image)


def test_empty_and_invalid_inputs():
    verts = torch.rand(2, 5, 3)
    frags = rasterize(verts, torch.zeros(0, 3, dtype=torch.long), (4, 6))
    assert frags.pix_to_face.shape == (2, 4, 6) and (frags.pix_to_face == -1).all()
    assert interpolate(torch.rand(2, 5, 3), verts, torch.zeros(0, 3, dtype=torch.long),
                       frags.pix_to_face).abs().sum() == 0
    with pytest.raises(ValueError, match=r"verts_screen to have shape \(B, N, 3\)"):
        rasterize(torch.rand(5, 3), torch.zeros(1, 3, dtype=torch.long), (4, 4))
    with pytest.raises(ValueError, match=r"faces to have shape \(F, 3\)"):
        rasterize(verts, torch.zeros(3, dtype=torch.long), (4, 4))
    with pytest.raises(ValueError, match="image_size"):
        rasterize(verts, torch.zeros(1, 3, dtype=torch.long), (0, 4))
    with pytest.raises(ValueError, match="attrs"):
        interpolate(torch.rand(2, 4, 3), verts, torch.zeros(1, 3, dtype=torch.long),
                    frags.pix_to_face)


# --------------------------------------------------------------- barycentrics, interpolate
def test_perspective_correct_barycentrics_by_hand():
    # At the centre (1.5, 1.5) the screen weights are (0.8, 0.1, 0.1); with depths
    # (2, 2, 4): (0.4, 0.05, 0.025) / 0.475, and depth 1 / 0.475.
    verts = torch.tensor([[[1.0, 1.0, 2.0], [6.0, 1.0, 2.0], [1.0, 6.0, 4.0]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    frags = rasterize(verts, faces, (8, 8))
    bary = barycentrics(verts, faces, frags.pix_to_face)
    expected = torch.tensor([0.4, 0.05, 0.025], dtype=torch.float64) / 0.475
    assert torch.allclose(bary[0, 1, 1], expected, rtol=0, atol=1e-12)
    assert abs(frags.zbuf[0, 1, 1].item() - 1 / 0.475) < 1e-6
    # (3.5, 2.5): screen (0.2, 0.5, 0.3) -> (0.1, 0.25, 0.075) / 0.425
    expected = torch.tensor([0.1, 0.25, 0.075], dtype=torch.float64) / 0.425
    assert torch.allclose(bary[0, 2, 3], expected, rtol=0, atol=1e-12)
    covered = frags.pix_to_face >= 0
    assert torch.allclose(bary.sum(-1)[covered], torch.tensor(1.0, dtype=torch.float64))
    assert (bary[~covered] == 0).all()


def test_interpolated_depth_is_the_zbuf():
    # Interpolating the camera depth with perspective-correct weights gives 1 / sum(w/z).
    verts, faces = random_mesh(5)
    frags = rasterize(verts, faces, (20, 24))
    depth = interpolate(verts[..., 2:], verts, faces, frags.pix_to_face)[..., 0]
    covered = frags.pix_to_face >= 0
    assert torch.allclose(depth[covered], frags.zbuf[covered], rtol=1e-6)
    assert (depth[~covered] == 0).all()


def small_scene():
    verts = torch.tensor([[[1.2, 1.1, 2.0], [7.3, 0.6, 2.5], [0.7, 6.9, 4.0], [7.5, 7.2, 3.0]],
                          [[0.9, 0.4, 3.0], [6.8, 1.6, 2.0], [1.3, 7.4, 2.5], [8.2, 6.1, 4.0]]],
                         dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    return verts, faces, rasterize(verts, faces, (8, 9)).pix_to_face


def test_gradcheck_interpolate_attrs():
    verts, faces, p2f = small_scene()
    attrs = torch.rand(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: interpolate(a, verts, faces, p2f), (attrs,))


def test_gradcheck_interpolate_verts():
    verts, faces, p2f = small_scene()
    attrs = torch.rand(2, 4, 2, dtype=torch.float64)
    verts = verts.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: interpolate(attrs, v, faces, p2f), (verts,))
    assert torch.autograd.gradcheck(lambda v: barycentrics(v, faces, p2f), (verts,))


def test_gradcheck_interpolate_both_float32_path_matches_autograd():
    # The hand-written backward against autograd through the plain formula.
    verts, faces, p2f = small_scene()
    verts = verts.float().requires_grad_(True)
    attrs = torch.rand(2, 4, 3, requires_grad=True)
    weights = torch.rand(2, 8, 9, 3)
    (interpolate(attrs, verts, faces, p2f) * weights).sum().backward()
    grads = verts.grad.clone(), attrs.grad.clone()
    verts.grad = attrs.grad = None
    bary = barycentrics(verts, faces, p2f)  # plain autograd
    corner_attrs = attrs[torch.arange(2).view(2, 1, 1, 1), faces[p2f.clamp(min=0)]]  # (B, H, W, 3, C)
    image = (bary.unsqueeze(-1) * corner_attrs).sum(-2) * (p2f >= 0).unsqueeze(-1)
    (image * weights).sum().backward()
    assert torch.allclose(grads[0], verts.grad, atol=1e-4)
    assert torch.allclose(grads[1], attrs.grad, atol=1e-5)


def test_interpolate_clamp_and_alpha():
    verts, faces, p2f = small_scene()
    attrs = (torch.rand(2, 4, 3, dtype=torch.float64) * 2 - 0.5).requires_grad_(True)  # some outside [0, 1]
    out = interpolate(attrs, verts, faces, p2f, clamp=(0.0, 1.0), alpha=True)
    plain = interpolate(attrs, verts, faces, p2f)
    covered = p2f >= 0
    assert out.shape == (2, 8, 9, 4)
    assert torch.equal(out[..., 3], covered.to(out.dtype))
    assert torch.equal(out[..., :3], plain.clamp(0.0, 1.0))
    assert ((plain < 0) | (plain > 1)).any() and ((plain > 0) & (plain < 1)).any()  # both cases
    weights = torch.rand(2, 8, 9, 4, dtype=torch.float64)
    grad, = torch.autograd.grad((out * weights).sum(), attrs)
    expected, = torch.autograd.grad((plain.clamp(0.0, 1.0) * weights[..., :3]).sum(), attrs)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-12)
    # All inside: no mask needed, the same gradient as without clamping.
    inside = attrs.detach().clamp(0.1, 0.9).requires_grad_(True)
    g1, = torch.autograd.grad((interpolate(inside, verts, faces, p2f, clamp=(0.0, 1.0)) * weights[..., :3]).sum(), inside)
    g2, = torch.autograd.grad((interpolate(inside, verts, faces, p2f) * weights[..., :3]).sum(), inside)
    assert torch.allclose(g1, g2, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="clamp"):
        interpolate(attrs, verts, faces, p2f, clamp=(1.0, 2.0))


def test_gradcheck_interpolate_clamped_verts():
    verts, faces, p2f = small_scene()
    attrs = torch.rand(2, 4, 2, dtype=torch.float64) * 2 - 0.5
    verts = verts.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: interpolate(attrs, v, faces, p2f, clamp=(0.0, 1.0), alpha=True),
                                    (verts,))


def test_face_list_cache_sees_in_place_changes():
    verts, faces, _ = small_scene()
    first = rasterize(verts, faces, (8, 9)).pix_to_face
    faces[1] = torch.tensor([0, 1, 2])  # both faces now the same triangle
    second = rasterize(verts, faces, (8, 9)).pix_to_face
    assert (first == 1).any() and not (second == 1).any()  # face 0 wins the equal-depth tie
    ref, _ = reference_rasterize(verts.numpy(), faces.numpy(), 8, 9)
    assert (second.numpy() == ref).all()


# --------------------------------------------------------------------------- renderer
def test_renderer_rgba_clamped():
    verts, faces = two_squares(True)
    colors = torch.tensor([[[300.0, -5.0, 10.0]] * 8])
    image = MeshRenderer(backend="builtin")(verts, faces, colors, (10, 10))
    covered = image[0, ..., 3] == 1
    assert covered.sum() > 30
    assert torch.allclose(image[0][covered][:, :3], torch.tensor([255.0, 0.0, 10.0]))
    assert set(image[0, ..., 3].unique().tolist()) == {0.0, 1.0}


def test_renderer_backend_choice():
    assert MeshRenderer(backend="builtin").backend == "builtin"
    with pytest.raises(ValueError, match="backend"):
        MeshRenderer(backend="opengl")
    try:
        importlib.import_module("pytorch3d.renderer")
    except ImportError:
        assert MeshRenderer().backend == "builtin"
        with pytest.raises(ValueError, match="pytorch3d"):
            MeshRenderer(backend="pytorch3d")


def test_renderer_gradients_reach_verts_and_colors():
    verts, faces = two_squares(True)
    verts = verts.clone().requires_grad_(True)
    colors = (torch.rand(1, 8, 3) * 255).requires_grad_(True)
    image = MeshRenderer(backend="builtin")(verts, faces, colors, (10, 10))
    image[..., :3].sum().backward()
    assert verts.grad.abs().sum() > 0 and colors.grad.abs().sum() > 0
    # Every covered pixel's colour weights sum to one.
    assert abs(colors.grad.sum().item() - 3 * (image[..., 3] > 0).sum().item()) < 1e-3


# --------------------------------------------------------------------------- pytorch3d
def test_screen_to_ndc_pixel_centres():
    # pytorch3d's pixel (row, col) centre in NDC, +x left, +y up, for a non-square image
    # with S = min(H, W): x = (W - 2 col_c) / S, y = (H - 2 row_c) / S.
    verts = torch.tensor([[[0.5, 0.5, 3.0], [11.5, 7.5, 3.0], [6.0, 4.0, 3.0]]])
    ndc = screen_to_ndc(verts, (8, 12))
    expected = torch.tensor([[[11 / 8, 7 / 8, 3.0], [-11 / 8, -7 / 8, 3.0], [0.0, 0.0, 3.0]]])
    assert torch.allclose(ndc, expected)
    square = screen_to_ndc(torch.tensor([[[0.5, 0.5, 1.0]]]), (8, 8))
    assert torch.allclose(square, torch.tensor([[[1 - 1 / 8, 1 - 1 / 8, 1.0]]]))


def test_pytorch3d_parity():
    pytest.importorskip("pytorch3d")
    from core.render.pytorch3d_backend import rasterize_pytorch3d

    g = torch.Generator().manual_seed(0)
    n = 30
    t = torch.linspace(20, 100, n)
    rows, cols = torch.meshgrid(t, t, indexing="ij")
    jitter = (torch.rand(2, n, n, generator=g) - 0.5) * 1.5
    depth = 5 + torch.rand(n, n, generator=g)
    verts = torch.stack([cols + jitter[0], rows + jitter[1], depth], -1).view(1, -1, 3)
    i = torch.arange(n - 1)
    a = (i[:, None] * n + i[None, :]).reshape(-1)
    faces = torch.cat([torch.stack([a, a + 1, a + n], 1), torch.stack([a + 1, a + n + 1, a + n], 1)])
    verts = torch.cat([verts, verts.flip(1)])  # a second, different mesh in the batch
    ours = rasterize(verts, faces, (128, 128))
    theirs = rasterize_pytorch3d(verts, faces, (128, 128))
    assert (ours.pix_to_face >= 0).sum() > 5000
    assert (ours.pix_to_face != theirs.pix_to_face).float().mean() < 1e-3
    covered = ours.pix_to_face >= 0
    assert torch.allclose(ours.zbuf[covered], theirs.zbuf[covered], rtol=1e-4)
