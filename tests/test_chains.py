"""Chains of warm-started frames (core.pipelines.video.chains): which identity frames start
chains, how a clip is cut into them, and that fitting them in lockstep is the same fit as
one chain at a time, seeded from the identity frames, and resumable."""
from dataclasses import replace

import numpy as np
import pytest

from core.pipelines import video as V
from core.pipelines.video import chains as C
from tests.test_video import BLANKS, N_FRAMES, _interrupt_then_resume, _job, clip, model_path, track  # noqa: F401 (fixtures)

GROUPS = ("exp", "gamma", "angles", "trans")


def _seed(res, frame, shift=0.0):
    """The coefficients of ``frame`` in a fit_clip result (angles shifted by ``shift`` rad)."""
    s = {g: res[g][frame].copy() for g in GROUPS}
    s["angles"] = s["angles"] + np.float32(shift)
    return s


def test_chain_seeds_keep_every_chain_long_enough():
    # warm-up 4: a seed at least 12 frames after the start and the seed before, and 5 before the end
    assert C.chain_seeds([5, 14, 20, 30, 45, 58], first=0, stop=60, warmup=4) == [14, 30, 45]
    assert C.chain_seeds([14, 30], first=10, stop=60, warmup=4) == [30]
    assert C.chain_seeds([40], first=0, stop=44, warmup=4) == []  # no room for its warm-up
    assert C.chain_seeds([3, 6], first=0, stop=20, warmup=0) == [3, 6]  # no warm-up: 3 frames apart


def test_chain_bounds_tile_the_clip_and_warm_up_each_seed(track, clip, tmp_path):
    job = replace(_job(track, clip, tmp_path, stop=16), seeds={6: {}, 11: {}}, seed_warmup=2)
    # chain 0 from the clip's first frame keeps [0, 8); the seed at 6 fits [6, 13), keeps [8, 13); ...
    assert C.chain_bounds(job) == [(0, 0, 8), (6, 8, 13), (11, 13, 16)]
    assert C.chain_bounds(replace(job, seeds={14: {}})) == [(0, 0, 16)]  # 14 + 2 warm-up reaches the end
    later = replace(_job(track, clip, tmp_path, start=4, stop=16), fit_start=2, seeds={9: {}}, seed_warmup=1)
    later.landmarks, later.crop_boxes = track.landmarks[2:16], track.crop_boxes(0.3)[2:16]
    assert C.chain_bounds(later) == [(0, 0, 8), (7, 8, 14)]  # positions from fit_start = 2


@pytest.fixture(scope="module")
def whole(track, clip, tmp_path_factory):
    """The clip fitted as one chain, frame after frame."""
    return V.fit_clip(_job(track, clip, tmp_path_factory.mktemp("whole"), stop=N_FRAMES))


def test_chains_in_lockstep_fit_as_one_chain_at_a_time(track, clip, tmp_path, whole, monkeypatch):
    seeds = {8: _seed(whole, 8), 12: _seed(whole, 12)}
    job = replace(_job(track, clip, tmp_path, stop=N_FRAMES), seeds=seeds, seed_warmup=2)
    together = V.fit_clip(job)
    monkeypatch.setattr(C, "CHAIN_CROP_BYTES", 1)  # every chain a group of its own, fitted as it is read
    alone = V.fit_clip(replace(job, cache_path=str(tmp_path / "alone.npz")))
    assert together["fitted"].tolist() == alone["fitted"].tolist() == [i not in BLANKS for i in range(N_FRAMES)]
    for g in GROUPS:  # a batch of frames solves each frame's own system
        np.testing.assert_allclose(together[g], alone[g], atol=2e-4, rtol=1e-3)
        # chain 0 (frames 0-9) alone is exactly the frame-after-frame fit
        np.testing.assert_array_equal(alone[g][:10], whole[g][:10])


def test_a_seed_starts_its_chain_from_its_coefficients(track, clip, tmp_path, whole):
    base = _job(track, clip, tmp_path, stop=N_FRAMES)
    seeded = V.fit_clip(replace(base, seeds={9: _seed(whole, 9)}, seed_warmup=0, cache_path=str(tmp_path / "a.npz")))
    wrong = V.fit_clip(replace(base, seeds={9: _seed(whole, 9, shift=0.3)}, seed_warmup=0,
                               cache_path=str(tmp_path / "b.npz")))
    near = np.abs(seeded["angles"][9] - whole["angles"][9]).max()
    assert near < 0.02, near  # one following-frame step from the frame-after-frame fit's own result
    assert np.abs(wrong["angles"][9] - whole["angles"][9]).max() > 5 * near  # the seed is where it starts
    for g in GROUPS:  # before the seed: chain 0, the frame-after-frame fit
        np.testing.assert_allclose(seeded[g][:9], whole[g][:9], atol=2e-4, rtol=1e-3)


def test_interrupted_chains_resume(track, clip, tmp_path, whole):
    job = replace(_job(track, clip, tmp_path, stop=N_FRAMES), seeds={8: _seed(whole, 8), 12: _seed(whole, 12)},
                  seed_warmup=2)
    full = V.fit_clip(job)
    import os
    os.remove(job.cache_path)
    resumed, seen = _interrupt_then_resume(job, after=7)
    restored = sorted(e.frame for e in seen if e.restored)
    assert 0 < len(restored) < N_FRAMES and sorted(e.frame for e in seen) == list(range(N_FRAMES))
    assert not os.path.exists(job.partial_path)
    for g in GROUPS:
        np.testing.assert_allclose(resumed[g], full[g], atol=2e-4, rtol=1e-3)


def test_fit_video_starts_chains_at_the_identity_frames(clip, model_path, tmp_path):
    """The whole command with --shape_seeds on / off (one cache: the same landmarks and
    identity fit): with seeds the frames follow other paths (the first chain runs back from
    the first seed's chain: first_back), as close to the landmarks, and info.json's NME is
    what the pkl gives."""
    import fit_video
    from core.pipelines.cli import run_main
    from tests.test_video import FAST, _check_landmark_nme, _load, spec_landmarks

    out = {}
    for mode in ("off", "on"):
        res = str(tmp_path / mode)
        args = ["--v_path", clip, "--res_folder", res, "--cache_folder", str(tmp_path / "cache"),
                "--model_path", model_path, "--clip_overlap", "1", "--shape_seeds", mode]
        assert run_main(fit_video.main, args + FAST) == 0
        out[mode] = _load(res, "talk")
    (p_off, i_off), (p_on, i_on) = out["off"], out["on"]
    shape = i_on["shape_frames"]
    assert shape == i_off["shape_frames"] and len(shape) == 3
    seeds = C.chain_seeds(shape, 0, N_FRAMES, 1)
    assert seeds and set(seeds) <= set(shape)
    took_over = seeds[0] + 1  # the first seed's chain keeps frames from its warm-up on
    moved = {i: np.linalg.norm(spec_landmarks(model_path, p_on, i) - spec_landmarks(model_path, p_off, i), axis=1).max()
             for i in sorted(p_on["fitting_res"])}
    # other fits before the first seed's chain takes over (the chain back from it) and after
    assert max(d for i, d in moved.items() if i < took_over) > 0.05
    assert max(d for i, d in moved.items() if i >= took_over) > 0.05
    tracked = np.load(str(tmp_path / "cache" / "talk" / "landmarks.npz"))["landmarks"]
    on = _check_landmark_nme(p_on, i_on, model_path, tracked)
    off = _check_landmark_nme(p_off, i_off, model_path, tracked)
    assert on.mean() < 1.2 * off.mean() + 0.005, (on.mean(), off.mean())


def test_chains_too_long_to_keep_side_by_side_are_not_used(monkeypatch):
    assert C.lockstep_pays(0, 600, {200: {}, 400: {}}, 8, 256)  # 600 crops: well within 256 MB
    monkeypatch.setattr(C, "CHAIN_CROP_BYTES", 150 * 256 * 256 * 3)  # room for 150 crops of 256 px
    assert not C.lockstep_pays(0, 600, {200: {}, 400: {}}, 8, 256)  # chains of 208, 208 and 200 frames
    assert C.lockstep_pays(0, 600, {50: {}, 100: {}}, 8, 256)  # the first two (58 and 58) fit together
    assert not C.lockstep_pays(0, 600, {}, 8, 256)  # one chain


def test_the_landmark_pass_cuts_the_crops_the_workers_would(clip, track):
    """landmark_pass(crops=...) keeps each frame's crop exactly as a worker cuts it from the
    decoded frame (crop_face in crop_boxes), zeros where no face; none beyond its budget."""
    from core.io.video import VideoReader
    from core.landmarks.crop import crop_face
    from core.landmarks.detect import DlibDetector

    cut = V.landmark_pass(clip, DlibDetector(), progress=False, crops=(0.3, 48), crop_bytes=N_FRAMES * 48 * 48 * 3)
    np.testing.assert_array_equal(cut.landmarks, track.landmarks)
    assert cut.crops.shape == (N_FRAMES, 48, 48, 3) and cut.crops.dtype == np.uint8
    boxes = track.crop_boxes(0.3)
    with VideoReader(clip) as r:
        for i, frame in r.frames(0, N_FRAMES):
            want = crop_face(frame, boxes[i], 48) if track.has_face[i] else np.zeros((48, 48, 3), np.uint8)
            np.testing.assert_array_equal(cut.crops[i], want)
    assert not cut.crops[list(BLANKS)].any() and cut.crops[0].std() > 5
    small = V.landmark_pass(clip, DlibDetector(), progress=False, crops=(0.3, 48), crop_bytes=N_FRAMES * 48 * 48 * 3 - 1)
    assert small.crops is None


def test_chains_from_the_passs_crops_need_no_video(track, clip, tmp_path, whole):
    """A clip given the landmark pass's crops fits exactly as one that decodes the video
    for them, without opening it (the video path given is gone)."""
    from core.landmarks.detect import DlibDetector

    cut = V.landmark_pass(clip, DlibDetector(), progress=False, crops=(0.3, 48), crop_bytes=1 << 30)
    seeds = {8: _seed(whole, 8), 12: _seed(whole, 12)}
    job = replace(_job(track, clip, tmp_path, start=2, stop=N_FRAMES), seeds=seeds, seed_warmup=2)
    read = V.fit_clip(job)
    given = V.fit_clip(replace(job, crops=cut.crops[2:N_FRAMES], video_path=str(tmp_path / "gone.mp4"),
                               cache_path=str(tmp_path / "given.npz")))
    assert given["fitted"].tolist() == read["fitted"].tolist()
    for g in GROUPS:
        np.testing.assert_array_equal(given[g], read[g])


def test_first_chain_back_needs_a_seed_chain_kept_beside_it(monkeypatch):
    assert C.first_chain_back(0, 600, {200: {}, 400: {}}, 8, 256)
    assert not C.first_chain_back(0, 600, {}, 8, 256)  # no seed: one chain, from a cold start
    assert not C.first_chain_back(0, 600, {595: {}}, 8, 256)  # its warm-up reaches the end: no chain of its own
    monkeypatch.setattr(C, "CHAIN_CROP_BYTES", 150 * 256 * 256 * 3)  # room for 150 crops of 256 px
    assert not C.first_chain_back(0, 600, {200: {}, 400: {}}, 8, 256)  # 208 frames, then 208: not kept together
    assert C.first_chain_back(0, 600, {50: {}, 100: {}}, 8, 256)


def _record_steps(monkeypatch):
    """Each _fit_step's [(chain runs back, position, has a crop, warm-started)], in order."""
    steps = []
    fit_step = C._fit_step

    def spy(job, session, step, out, fitted):
        seen = []
        for st, j, crop in step:
            warm = crop is not None and ((st.seed is not None and j == st.start)
                                         or (st.last is not None and abs(st.last[0] - j) == 1))
            seen.append((st.back, j, crop is not None, warm))
        steps.append(seen)
        return fit_step(job, session, step, out, fitted)

    monkeypatch.setattr(C, "_fit_step", spy)
    return steps


def _landmark_error(job, res) -> np.ndarray:
    """(N,) mean distance in crop pixels between each fitted frame's model landmarks and its
    target landmarks (NaN where not fitted)."""
    import torch

    from core.landmarks.crop import photo_to_crop
    from core.models.coeffs import Coeffs

    session = job.session.build()
    n = len(res["fitted"])
    c = Coeffs(id=torch.as_tensor(job.id)[None].expand(n, -1), tex=torch.as_tensor(job.tex)[None].expand(n, -1),
               **{g: torch.as_tensor(res[g]) for g in GROUPS})
    with torch.no_grad():
        lms = session.camera.project_points(session.model.landmarks_3d(c)).numpy()
    tar = session.camera.image_size
    err = np.full(n, np.nan)
    for i in np.flatnonzero(res["fitted"]):
        j = i + job.start - job.fit_start
        err[i] = np.linalg.norm(lms[i] - photo_to_crop(job.landmarks[j], job.crop_boxes[j], tar), axis=1).mean()
    return err


def test_first_chain_runs_back_from_the_first_seeds_chain(track, clip, tmp_path, whole, monkeypatch):
    """With first_back, the frames before the first seed's chain keeps its own (10 = seed 8
    + warm-up 2) are fitted from 9 down to 0, starting once frame 10 is fitted, each from
    the one after it: the only cold start is the frame after the blank frames 3-4 (2),
    where the forward chain starts cold twice (0 and 5). The fits are as close to the
    landmarks as the forward ones, and an interrupted run resumes to the same result."""
    seeds = {8: _seed(whole, 8), 12: _seed(whole, 12)}
    job = replace(_job(track, clip, tmp_path, stop=N_FRAMES), seeds=seeds, seed_warmup=2, first_back=True)
    steps = _record_steps(monkeypatch)
    back = V.fit_clip(job)
    order = [j for s in steps for b, j, _, _ in s if b]
    assert order == list(range(9, -1, -1))
    first = next(t for t, s in enumerate(steps) if any(b for b, *_ in s))
    assert any(j == 10 for s in steps[:first] for b, j, *_ in s if not b)  # frame 10 came first
    cold = [j for s in steps for b, j, face, warm in s if face and not warm]
    assert cold == [2]
    assert back["fitted"].tolist() == [i not in BLANKS for i in range(N_FRAMES)]
    steps.clear()
    forward = V.fit_clip(replace(job, first_back=False, cache_path=str(tmp_path / "fwd.npz")))
    assert sorted(j for s in steps for b, j, face, warm in s if face and not warm) == [0, 5]
    for g in GROUPS:  # frames 10 on: the same chains
        np.testing.assert_allclose(back[g][10:], forward[g][10:], atol=2e-4, rtol=1e-3)
    err_b, err_f = _landmark_error(job, back), _landmark_error(job, forward)
    assert np.nanmean(err_b[:10]) < 1.05 * np.nanmean(err_f[:10]) + 0.02, (err_b[:10], err_f[:10])
    import os
    os.remove(job.cache_path)
    resumed, seen = _interrupt_then_resume(job, after=9)
    assert any(e.restored for e in seen) and sorted(e.frame for e in seen) == list(range(N_FRAMES))
    for g in GROUPS:
        np.testing.assert_allclose(resumed[g], back[g], atol=2e-4, rtol=1e-3)


def test_first_chain_back_waits_for_a_frame_of_a_later_group_cold(track, clip, tmp_path, whole, monkeypatch):
    """When the first seed's chain is not kept beside the first chain (each a group of its
    own), the first chain runs forward from a cold start, as without first_back."""
    seeds = {8: _seed(whole, 8), 12: _seed(whole, 12)}
    job = replace(_job(track, clip, tmp_path, stop=N_FRAMES), seeds=seeds, seed_warmup=2, first_back=True)
    monkeypatch.setattr(C, "CHAIN_CROP_BYTES", 1)
    steps = _record_steps(monkeypatch)
    res = V.fit_clip(job)
    assert not any(b for s in steps for b, *_ in s)
    assert sorted(j for s in steps for b, j, face, warm in s if face and not warm) == [0, 5]
    assert res["fitted"].tolist() == [i not in BLANKS for i in range(N_FRAMES)]
