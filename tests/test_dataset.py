"""Datasets on many ranks (core.pipelines.dataset): the work queue and its manifest with two
ranks in threads, the inputs (folders, list files, batches), and torchrun itself on the CPU:
2 ranks over a folder of photos and a folder of short clips (one of them broken), a rank
killed midway and the job resumed without refitting finished units."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import scipy.io as sio

from core.errors import UserError
from core.io.video import VideoReader, VideoWriter
from core.pipelines.dataset import workqueue
from core.pipelines.dataset.photos import photo_units
from core.pipelines.dataset.ranks import LocalStore, Ranks, launched_by_torchrun
from core.pipelines.dataset.videos import expand_videos, is_video_list, video_units
from core.pipelines.dataset.workqueue import Unit, share_units
from tests.helpers import REPO, synthetic_arrays

FAST = ["--device", "cpu", "--threads", "1", "--lm_detector", "dlib", "--preset", "default", "--tar_size", "64",
        "--first_rf_iters", "6", "--first_nrf_iters", "3"]
VIDEO_FAST = FAST + ["--nframes_shape", "3", "--rest_rf_iters", "3", "--rest_nrf_iters", "2"]


# --- the work queue, two ranks in threads ----------------------------------------------------

def _two_ranks(work, is_done, units, res_folder):
    """share_units on ranks 0 and 1 of one store, each in its own thread; returns
    ({rank: exit status}, manifest)."""
    store, status = LocalStore(), {}

    def rank(r):
        status[r] = share_units(Ranks(rank=r, world_size=2, store=store), units, lambda u: work(r, u), is_done,
                                str(res_folder), poll_s=0.01)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    with open(res_folder / workqueue.MANIFEST_NAME, encoding="utf-8") as f:
        return status, json.load(f)


def test_units_go_to_whichever_rank_is_free(tmp_path):
    """The first unit is long: the other rank takes every other unit meanwhile; the manifest
    lists them in input order with the rank that did each."""
    units = [Unit(name=f"u{i}", items=(str(i),)) for i in range(6)]
    started = threading.Event()

    def work(rank, unit):
        if unit.name == "u0":
            started.set()
            time.sleep(0.6)
        else:
            started.wait(5)
            time.sleep(0.02)

    status, m = _two_ranks(work, lambda u: False, units, tmp_path)
    assert status == {0: 0, 1: 0}
    assert [u["unit"] for u in m["units"]] == [f"u{i}" for i in range(6)]
    by = {u["unit"]: u["rank"] for u in m["units"]}
    slow = by["u0"]
    assert all(by[f"u{i}"] == 1 - slow for i in range(1, 6))
    assert m["units"][0]["seconds"] >= 0.6 and m["done"] == 6 and m["failed"] == m["skipped"] == 0
    assert m["world_size"] == 2 and m["ranks"][slow]["units"] == 1 and m["ranks"][1 - slow]["units"] == 5
    assert all(set(u) == {"unit", "rank", "status", "seconds", "error"} for u in m["units"])


def test_failed_and_finished_units_are_recorded_not_fatal(tmp_path):
    """A unit that raises, one that reports a partial failure and one already done: the
    others are still fitted, rank 0 exits 1 (some failed), the other rank 0."""
    units = [Unit(name=n, items=()) for n in ("ok", "boom", "bug", "part", "old")]
    fitted = []

    def work(rank, unit):
        fitted.append(unit.name)
        if unit.name == "boom":
            raise UserError("no face found in any frame")
        if unit.name == "bug":
            raise ZeroDivisionError("division by zero")
        return "x.jpg: no face" if unit.name == "part" else None

    status, m = _two_ranks(work, lambda u: u.name == "old", units, tmp_path)
    assert status == {0: 1, 1: 0}
    got = {u["unit"]: (u["status"], u["error"]) for u in m["units"]}
    assert got == {"ok": ("done", None), "boom": ("failed", "no face found in any frame"),
                   "bug": ("failed", "internal error: ZeroDivisionError: division by zero"),
                   "part": ("failed", "x.jpg: no face"), "old": ("skipped", None)}
    assert sorted(fitted) == ["boom", "bug", "ok", "part"]
    assert (m["done"], m["failed"], m["skipped"]) == (1, 3, 1)


def test_a_world_of_one_needs_no_torchrun(tmp_path):
    status = share_units(Ranks(store=LocalStore()), [Unit("a", ()), Unit("b", ())], lambda u: None,
                         lambda u: u.name == "b", str(tmp_path))
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert status == 0 and [(u["rank"], u["status"]) for u in m["units"]] == [(0, "done"), (0, "skipped")]


# --- clips of a long video shared with an idle rank (two ranks in threads) --------------------

def _fake_jobs(tmp_path, n):
    from core.pipelines.video import ClipJob
    return [ClipJob(worker=k, session="owner's", video_path="v.mp4", timestamps=np.zeros(4), fit_start=k, start=k,
                    stop=k + 1, landmarks=np.zeros((1, 68, 2), np.float32), crop_boxes=np.zeros((1, 4), np.int64),
                    id=np.zeros(3, np.float32), tex=np.zeros(3, np.float32), threads=2,
                    cache_path=str(tmp_path / f"clip{k}.npz"), key=f"key{k}") for k in range(n)]


def _owner_and_helper(tmp_path, monkeypatch, fake_run_workers, n_clips, owner_threads=1, helper_threads=1):
    """Rank 0 runs ``n_clips`` fake clip jobs through ClipSharing while rank 1 helps in a
    thread (both on one LocalStore, ``fake_run_workers`` in place of the workers; the
    helper's session spec is "helper's"). Returns (owner, helper, jobs)."""
    from core.pipelines.dataset import clipshare

    monkeypatch.setattr(clipshare, "run_workers", fake_run_workers)
    monkeypatch.setattr(clipshare.SessionSpec, "of", staticmethod(lambda session: "helper's"))
    store = LocalStore()
    owner = clipshare.ClipSharing(Ranks(rank=0, world_size=2, store=store), None, clip_frames=5,
                                  threads=owner_threads, poll_s=0.01)
    helper = clipshare.ClipSharing(Ranks(rank=1, world_size=2, store=store), None, clip_frames=5,
                                   threads=helper_threads, poll_s=0.01)
    finished = threading.Event()
    t = threading.Thread(target=helper.help, args=(finished.is_set,))
    t.start()
    jobs = _fake_jobs(tmp_path, n_clips)
    try:
        owner.run(jobs)
    finally:
        finished.set()
        t.join(10)
    return owner, helper, jobs


def test_an_idle_rank_helps_with_clips_and_a_failed_clip_is_fitted_again(tmp_path, monkeypatch):
    """The owner posts 6 clips; the idle rank fits some (with its own session and threads)
    and fails one, which the owner then fits itself; every result is there at the end."""
    from core.pipelines.video.cache import load_npz, save_npz

    calls = []

    def fake_run_workers(jobs, on_frame=None):
        (job,) = jobs
        who = "owner" if job.session == "owner's" else "helper"
        calls.append((who, job.worker, job.threads))
        time.sleep(0.05)
        if who == "helper" and len([c for c in calls if c[0] == "helper"]) == 1:  # its first clip fails
            raise UserError(f"worker {job.worker} failed: cannot write")
        save_npz(job.cache_path, job.key, frames=np.array([job.start]))

    owner, helper, jobs = _owner_and_helper(tmp_path, monkeypatch, fake_run_workers, 6, owner_threads=2)
    assert owner.clips_for(11) == 3 and owner.clips_for(10) == 2 and owner.clips_for(1) == 1
    helped = [k for who, k, _ in calls if who == "helper"]
    assert helped and all(th == 1 for who, _, th in calls if who == "helper")  # its own threads
    owned = [k for who, k, _ in calls if who == "owner"]
    assert helped[0] in owned and sorted(set(helped[1:]) | set(owned)) == list(range(6))  # the failed one again
    assert helper.helped == len(helped) - 1
    assert [int(load_npz(j.cache_path, j.key)["frames"][0]) for j in jobs] == list(range(6))


def test_a_helper_writing_where_the_owner_cannot_read_costs_time_not_the_video(tmp_path, monkeypatch):
    """A helper on another machine without the shared folder: its clip's result is not
    readable here, so the owner fits that clip itself."""
    from core.pipelines.video.cache import load_npz, save_npz

    def fake_run_workers(jobs, on_frame=None):
        (job,) = jobs
        time.sleep(0.05)
        if job.session == "owner's":
            save_npz(job.cache_path, job.key, frames=np.array([job.start]))  # the helper writes nothing here

    _, helper, jobs = _owner_and_helper(tmp_path, monkeypatch, fake_run_workers, 4)
    assert helper.helped >= 1
    assert all(load_npz(j.cache_path, j.key) is not None for j in jobs)


# --- inputs ----------------------------------------------------------------------------------

def test_video_folders_and_list_files(tmp_path):
    for name in ("b.mp4", "a.MOV", "notes.txt", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.mp4").write_bytes(b"x")
    assert expand_videos(str(tmp_path)) == [str(tmp_path / "a.MOV"), str(tmp_path / "b.mp4")]
    lst = tmp_path / "sub" / "list.txt"
    lst.write_text("# my videos\n\nd.mp4\n  /abs/e.mp4  \n")
    assert is_video_list(str(lst)) and is_video_list(str(tmp_path)) and not is_video_list(str(tmp_path / "b.mp4"))
    assert expand_videos(str(lst)) == [str(tmp_path / "sub" / "d.mp4"), "/abs/e.mp4"]
    assert expand_videos(str(tmp_path / "b.mp4")) == [str(tmp_path / "b.mp4")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for bad, msg in (("empty", "contains no videos"), ("empty.txt", "names no videos"), ("missing.txt", "cannot read")):
        with pytest.raises(UserError, match=msg):
            expand_videos(str(tmp_path / bad))


def test_outputs_in_the_input_folder_are_not_inputs_again(tmp_path):
    """--res_folder = the input folder: a re-run must not fit the composed videos / images
    written there (elsewhere such names are ordinary inputs)."""
    from core.pipelines.photo import expand_inputs
    for name in ("talk.mp4", "talk_recon_video.mp4", "a.jpg", "a_composed_img.jpg"):
        (tmp_path / name).write_bytes(b"x")
    assert expand_videos(str(tmp_path), res_folder=str(tmp_path / ".")) == [str(tmp_path / "talk.mp4")]
    assert len(expand_videos(str(tmp_path), res_folder=str(tmp_path / "out"))) == 2
    assert expand_inputs([str(tmp_path)], res_folder=str(tmp_path)) == [str(tmp_path / "a.jpg")]
    assert len(expand_inputs([str(tmp_path)])) == 2


def test_photo_inputs_with_the_same_outputs_are_refused_and_repeats_fitted_once(tmp_path):
    """Without torchrun too: two photos of one name in two folders would overwrite each
    other's outputs (refused before any fitting, both named); the same file twice is one input."""
    from core.pipelines.photo import expand_inputs
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "face.jpg").write_bytes(b"x")
    a, b = str(tmp_path / "a" / "face.jpg"), str(tmp_path / "b" / "face.jpg")
    with pytest.raises(UserError, match=r"same outputs 'face' \('.*a/face.jpg' and '.*b/face.jpg'\)"):
        expand_inputs([a, b])
    with pytest.raises(UserError, match="same outputs 'face'"):
        expand_inputs([str(tmp_path / "a"), str(tmp_path / "b")])
    assert expand_inputs([a, str(tmp_path / "a" / "." / "face.jpg"), str(tmp_path / "a")]) == [a]
    os.symlink(a, tmp_path / "b" / "other.jpg")  # the same file under another name: its own outputs
    assert expand_inputs([a, str(tmp_path / "b" / "other.jpg")]) == [a, str(tmp_path / "b" / "other.jpg")]


def test_units_with_the_same_outputs_are_refused():
    with pytest.raises(UserError, match="same outputs 'talk'"):
        video_units(["a/talk.mp4", "b/talk.avi"])
    with pytest.raises(UserError, match="same outputs 'x'"):
        photo_units(["a/x.jpg", "b/x.png"], 4)


def test_photo_units_are_batches_in_input_order():
    units = photo_units([f"p/{i}.jpg" for i in range(5)], 2)
    assert [u.items for u in units] == [("p/0.jpg", "p/1.jpg"), ("p/2.jpg", "p/3.jpg"), ("p/4.jpg",)]
    assert units[0].name == "0.jpg .. 1.jpg (2 photos)" and units[2].name == "4.jpg"


def test_torchrun_environment_and_the_share_of_a_rank(monkeypatch):
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    assert launched_by_torchrun(env) and not launched_by_torchrun({**env, "MASTER_PORT": ""})
    r = Ranks(rank=1, world_size=4, local_rank=3, local_world_size=4, distributed=True)
    assert r.cpu_share(16) == 4 and r.cpu_share(1) == 1 and Ranks().cpu_share(16) == 16
    assert r.device_flags("cpu", None) == ("cpu", None) and r.device_flags("cuda:3", None) == ("cuda:3", None)
    assert r.label == "rank 1/4" and Ranks().label == ""
    # On a machine with 2 GPUs, local rank 3 gets GPU 1 for auto and cuda; --gpu still wins.
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert r.device_flags("auto", None) == ("auto", 1) and r.device_flags("cuda", None) == ("cuda", 1)
    assert r.device_flags("auto", 0) == ("auto", 0) and Ranks().device_flags("auto", None) == ("auto", None)


# --- torchrun on the CPU ---------------------------------------------------------------------

def _torchrun(args, nproc=2, extra=(), timeout=300, background=False):
    """``torchrun --standalone`` with ``nproc`` ranks: the finished process, or the running
    Popen (stdout and stderr together) when ``background``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *extra,
           *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if background:
        return subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)


def _manifest(folder):
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "synthetic.mat"
    sio.savemat(path, synthetic_arrays(1500))
    return str(path)


def test_torchrun_two_ranks_over_a_folder_of_photos(tmp_path, model_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        for name in ("astronaut.jpg", "grace_hopper.jpg"):
            os.symlink(REPO / "data" / name, photos / f"{i}_{name}")
    (photos / "blank.png").write_bytes(
        __import__("cv2").imencode(".png", np.zeros((64, 64, 3), np.uint8))[1].tobytes())
    res = tmp_path / "res"
    proc = _torchrun(["fit_single_img.py", "--img_path", str(photos), "--res_folder", str(res), "--batch_size", "1",
                      "--model_path", model_path] + FAST)
    assert proc.returncode != 0, proc.stdout + proc.stderr  # the blank photo failed: not every unit was done
    m = _manifest(res)
    assert m["world_size"] == 2 and m["units_total"] == 5 and (m["done"], m["failed"]) == (4, 1)
    assert {u["rank"] for u in m["units"]} == {0, 1}, m  # both ranks worked
    blank = [u for u in m["units"] if u["unit"] == "blank.png"][0]
    assert blank["status"] == "failed" and "no face" in blank["error"]
    for u in m["units"]:
        if u["status"] == "done":
            stem = u["unit"].rsplit(".", 1)[0]
            info = json.loads((res / f"{stem}_info.json").read_text())
            assert info["landmark_nme_interocular"] < 0.15
    assert "[rank 1/2]" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    """Four 8-frame clips cut from data/clip.mp4 and a broken one."""
    folder = tmp_path_factory.mktemp("clips")
    with VideoReader(str(REPO / "data" / "clip.mp4")) as r:
        frames = [f for _, f in r.frames(0, 32)]
    h, w = frames[0].shape[:2]
    for k in range(4):
        with VideoWriter(str(folder / f"c{k}.mp4"), (w, h), 25.0) as wr:
            for f in frames[8 * k:8 * k + 8]:
                wr.write(f)
    return str(folder)


def test_torchrun_two_ranks_over_a_folder_of_clips(clips, tmp_path, model_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in sorted(os.listdir(clips))[:3]:
        os.symlink(os.path.join(clips, name), folder / name)
    (folder / "broken.mp4").write_bytes(b"not a video" * 100)
    res = tmp_path / "res"
    proc = _torchrun(["fit_video.py", "--v_path", str(folder), "--res_folder", str(res), "--cache_folder",
                      str(tmp_path / "cache"), "--model_path", model_path] + VIDEO_FAST)
    assert proc.returncode != 0
    m = _manifest(res)
    assert [u["unit"] for u in m["units"]] == ["broken.mp4", "c0.mp4", "c1.mp4", "c2.mp4"]
    assert [u["status"] for u in m["units"]] == ["failed", "done", "done", "done"]
    assert "cannot read video" in m["units"][0]["error"]
    assert {u["rank"] for u in m["units"]} == {0, 1}, m
    for k in range(3):
        info = json.loads((res / f"c{k}_info.json").read_text())
        assert info["num_frames"] == 8 and info["frames_with_fit"] == 8
        assert info["landmark_nme_interocular"]["mean"] < 0.15
        assert (res / f"c{k}_recon_video.mp4").is_file() and (res / f"c{k}_fitting_res.pkl").is_file()

    # The same folder without torchrun: one rank, every finished video skipped, the broken one failed again.
    proc = subprocess.run([sys.executable, "fit_video.py", "--v_path", str(folder), "--res_folder", str(res),
                           "--cache_folder", str(tmp_path / "cache"), "--model_path", model_path] + VIDEO_FAST,
                          cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("broken.mp4 failed: cannot read")
    m = _manifest(res)
    assert m["world_size"] == 1 and [u["status"] for u in m["units"]] == ["failed", "skipped", "skipped", "skipped"]


def _children(pid: int):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="ascii") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc to find the ranks")
@pytest.mark.parametrize("resume", ["restart", "rerun"])
def test_a_killed_rank_and_finished_units_are_not_refitted(resume, clips, tmp_path, model_path):
    """A rank is killed (SIGKILL) once the first video is written. "restart": torchrun
    --max_restarts 1 restarts the job by itself; "rerun": the job ends (non-zero) and the
    user runs the same command again. Either way the finished video is skipped (its outputs
    untouched) and the rest are fitted."""
    res = tmp_path / "res"
    cmd_args = ["fit_video.py", "--v_path", clips, "--res_folder", str(res), "--cache_folder", str(tmp_path / "cache"),
                "--model_path", model_path, "--quiet"] + VIDEO_FAST
    job = _torchrun(cmd_args, extra=["--max_restarts", "1" if resume == "restart" else "0"], background=True)
    try:
        deadline = time.monotonic() + 240
        while not glob.glob(str(res / "*_info.json")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(res / "*_info.json"))}
        ranks = _children(job.pid)
        assert first and len(ranks) == 2 and job.poll() is None
        os.kill(ranks[1], signal.SIGKILL)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    if resume == "rerun":
        assert job.returncode != 0 and len(glob.glob(str(res / "*_info.json"))) < 4
        proc = _torchrun(cmd_args)
        job, out = proc, proc.stdout + proc.stderr
    assert job.returncode == 0, out[-3000:]
    m = _manifest(res)
    status = {u["unit"]: u["status"] for u in m["units"]}
    finished = {os.path.basename(p)[:-len("_info.json")] + ".mp4" for p in first}
    assert all(status[u] == "skipped" for u in finished), (status, finished)
    # A video the other rank finished between the look and the kill is skipped too.
    others = [s for u, s in status.items() if u not in finished]
    assert set(others) <= {"done", "skipped"} and "done" in others, status
    assert {p: os.stat(p).st_mtime_ns for p in first} == first  # not written again
    assert len(glob.glob(str(res / "*_info.json"))) == 4


def test_torchrun_shares_the_clips_of_one_long_video(tmp_path, model_path):
    """One 24-frame video, 2 ranks, --clip_frames 6: the rank without a video fits some of
    its 4 clips; the result equals the same clips all fitted by one rank."""
    import pickle

    import fit_video
    from core.landmarks.detect import make_detector
    from core.pipelines import cli
    from core.pipelines.dataset.clipshare import ClipSharing
    from core.pipelines.dataset.ranks import alone
    from core.pipelines.session import Session, load_model
    from core.pipelines.video import run_video

    folder = tmp_path / "videos"
    folder.mkdir()
    with VideoReader(str(REPO / "data" / "clip.mp4")) as r:
        frames = [f for _, f in r.frames(0, 24)]
    with VideoWriter(str(folder / "long.mp4"), (frames[0].shape[1], frames[0].shape[0]), 25.0) as w:
        for f in frames:
            w.write(f)
    args = ["--v_path", str(folder), "--res_folder", str(tmp_path / "res"), "--cache_folder", str(tmp_path / "cache"),
            "--model_path", model_path, "--clip_frames", "6"] + VIDEO_FAST
    proc = _torchrun(["fit_video.py"] + args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = _manifest(tmp_path / "res")
    assert m["units"][0]["status"] == "done" and sum(r["clips_helped"] for r in m["ranks"]) >= 1, m
    info = json.loads((tmp_path / "res" / "long_info.json").read_text())
    assert info["clips_fitted"] == 4 and info["frames_with_fit"] == 24
    assert info["landmark_nme_interocular"]["mean"] < 0.15

    parsed = fit_video.build_parser().parse_args(args)
    session = Session.create(load_model(None, model_path), cli.fit_config_from_args(parsed), tar_size=64, device="cpu")
    options = dataclasses_replace(fit_video.video_options(parsed), cache_folder=str(tmp_path / "cache1"))
    run_video(session, make_detector("dlib"), str(folder / "long.mp4"), str(tmp_path / "res1"), options,
              progress=False, clip_runner=ClipSharing(alone(), session, 6, threads=1))
    with open(tmp_path / "res" / "long_fitting_res.pkl", "rb") as f:
        shared = pickle.load(f)["fitting_res"]
    with open(tmp_path / "res1" / "long_fitting_res.pkl", "rb") as f:
        single = pickle.load(f)["fitting_res"]
    assert sorted(shared) == sorted(single) == list(range(24))
    for i in range(24):
        for k in ("rot", "trans", "exp", "gamma"):
            np.testing.assert_allclose(shared[i][k], single[i][k], atol=1e-4, err_msg=f"frame {i} {k}")
