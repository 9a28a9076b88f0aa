"""Busy-CPU rows: the same fits on an idle machine and with one core kept busy by another
program, with a fixed thread count (torch's default: every core) and with the adaptive
count of :mod:`core.threads` (what the scripts use without ``--threads``).

The busy program is ``python -c "while True: pass"`` (one core, like ``yes > /dev/null``).
Conditions alternate round by round (idle fixed, idle adaptive, busy fixed, busy adaptive,
the order rotating), so all four see the same machine; values are medians over rounds.

* photo: the fitting work of one photo (``core.pipelines.photo.fit_photos``, batch 1, default
  preset), the shipped photos in turn; the adaptive governor is installed 0.6 s before the
  fit, as the scripts install it at start-up (imports, model and detector loading come
  before the first fit);
* photo command: ``fit_single_img.py`` on one shipped photo, the whole command a user waits
  for (``--threads <cores>`` for the fixed column);
* video frames: seconds per frame of the per-frame fitting stage of ``core.pipelines.video.run_video``
  (one worker, in this process) on the shipped sample clip; landmarks and identity/albedo
  come from its cache, so each measured run repeats only the per-frame fits.

Columns: original = fixed threads, default = adaptive; the slowdown rows divide each
column's busy time by the adaptive idle time (the target: at most 1.5x).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from core import defaults, threads

from .common import REPO, Row, median

log = logging.getLogger("bench")

SECTION = "busy CPU"
MODES = ("fixed", "adaptive")
SETTLE_S = 0.6


@contextlib.contextmanager
def busy_core(on: bool):
    """Keep one core busy with another process while the block runs (when ``on``)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        yield
    finally:
        proc.kill()
        proc.wait()


def _set_mode(mode: str, cores: int) -> None:
    if mode == "fixed":
        threads.install(threads=cores)
    else:
        threads.install()
    time.sleep(SETTLE_S)


def conditions(rounds: int) -> List[Tuple[bool, str]]:
    """(busy, mode) for every round, the order rotating so no condition is always first."""
    base = [(False, "fixed"), (False, "adaptive"), (True, "fixed"), (True, "adaptive")]
    out = []
    for r in range(rounds):
        k = r % len(base)
        out += base[k:] + base[:k]
    return out


def measure(run: Callable[[], float], rounds: int, cores: int, label: str) -> Dict[Tuple[bool, str], List[float]]:
    """seconds[(busy, mode)] over ``rounds`` rounds of every condition."""
    out: Dict[Tuple[bool, str], List[float]] = {}
    for busy, mode in conditions(rounds):
        with busy_core(busy):
            _set_mode(mode, cores)
            s = run()
        log.info("%s: %s, %s: %.3f s", label, "busy" if busy else "idle", mode, s)
        out.setdefault((busy, mode), []).append(s)
    threads.uninstall()
    return out


def rows_of(times: Dict[Tuple[bool, str], List[float]], what: str, unit: str, note: str) -> List[Row]:
    med = {k: median(v) for k, v in times.items()}
    n = len(next(iter(times.values())))
    idle = med[(False, "adaptive")]
    rows = [Row(SECTION, f"{what}, idle ({unit})", med[(False, "fixed")], idle, note=note, n_original=n, n_default=n),
            Row(SECTION, f"{what}, one core busy ({unit})", med[(True, "fixed")], med[(True, "adaptive")], note=note,
                n_original=n, n_default=n)]
    if idle:
        rows.append(Row(SECTION, f"{what}, busy / adaptive idle (x)", med[(True, "fixed")] / idle,
                        med[(True, "adaptive")] / idle, note="target: default <= 1.5", n_original=n, n_default=n))
    return rows


def photo_fit_rows(model, photos: Sequence[str], detector, cfg, device, rounds: int, renderer: str = defaults.RENDERER,
                   tar_size: int = defaults.TAR_SIZE) -> Tuple[List[Row], dict]:
    from core.pipelines.photo import fit_photos, prepare_photo
    from core.pipelines.session import Session

    prepared = [prepare_photo(p, detector, tar_size, defaults.PADDING_RATIO) for p in photos]
    session = Session.create(model, cfg, tar_size=tar_size, device=str(device), renderer=renderer, progress=False)
    fit_photos(session, prepared[:1])  # warm-up
    cores = threads.cpu_cores()
    counter = {"k": 0}

    def run() -> float:
        photo = prepared[counter["k"] % len(prepared)]
        counter["k"] += 1
        t = time.perf_counter()
        fit_photos(session, [photo])
        return time.perf_counter() - t

    times = measure(run, rounds * len(prepared), cores, "photo fit")
    note = (f"fit only, batch 1, default preset, {', '.join(os.path.basename(p) for p in photos)} in turn; "
            f"original column: {cores} fixed threads, default: adaptive; busy = another process spinning on one core")
    return rows_of(times, "photo fit", "s/photo", note), {"photo_fit_s": _keyed(times)}


def photo_command_rows(photo: str, rounds: int, extra: Sequence[str] = ()) -> Tuple[List[Row], dict]:
    cores = threads.cpu_cores()
    out: Dict[Tuple[bool, str], List[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        for busy, mode in conditions(rounds):
            cmd = [sys.executable, os.path.join(REPO, "fit_single_img.py"), "--img_path", photo, "--res_folder",
                   os.path.join(tmp, "res"), "--lm_detector", "dlib", "--quiet", *extra]
            if mode == "fixed":
                cmd += ["--threads", str(cores)]
            with busy_core(busy):
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                s = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"fit_single_img.py failed: {proc.stderr.strip()[-300:]}")
            log.info("photo command: %s, %s: %.2f s", "busy" if busy else "idle", mode, s)
            out.setdefault((busy, mode), []).append(s)
    note = (f"`fit_single_img.py --img_path {os.path.relpath(photo, REPO)} --lm_detector dlib` wall time (start-up "
            f"included); original column: --threads {cores}, default: no --threads (adaptive)")
    return rows_of(out, "photo command", "s", note), {"photo_command_s": _keyed(out)}


def video_frame_rows(model, detector, cfg, device, clip: str, rounds: int, renderer: str = defaults.RENDERER,
                     tar_size: int = defaults.TAR_SIZE) -> Tuple[List[Row], dict]:
    from core.pipelines.session import Session
    from core.pipelines.video import VideoOptions, run_video

    cores = threads.cpu_cores()
    session = Session.create(model, cfg, tar_size=tar_size, device=str(device), renderer=renderer, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench_load_video_") as tmp:
        options = VideoOptions(nframes_shape=4, nworkers=1, clip_overlap=0, cache_folder=os.path.join(tmp, "cache"),
                               keep_audio=False)
        run_video(session, detector, clip, os.path.join(tmp, "res"), options, progress=False)  # caches

        def run() -> float:
            for f in glob.glob(os.path.join(tmp, "cache", "*", "clip_*.npz")):
                os.remove(f)
            report = run_video(session, detector, clip, os.path.join(tmp, "res"), options, progress=False)
            return report.timings["fit_s"] / max(1, report.timings["fit_frames"])

        times = measure(run, rounds, cores, "video frames")
    note = (f"per-frame fitting stage of run_video on {os.path.basename(clip)} (1 worker, in process), seconds per "
            f"frame; landmarks and identity/albedo from the cache; original column: {cores} fixed threads")
    return rows_of(times, "video frame fit", "s/frame", note), {"video_frame_s": _keyed(times)}


def _keyed(times: Dict[Tuple[bool, str], List[float]]) -> Dict[str, List[float]]:
    return {f"{'busy' if b else 'idle'}_{m}": [round(x, 4) for x in v] for (b, m), v in times.items()}


def load_rows(model, photos: Sequence[str], detector, cfg, device, rounds: int, clip: str = None,
              renderer: str = defaults.RENDERER, tar_size: int = defaults.TAR_SIZE, command: bool = True) -> Tuple[List[Row], dict]:
    """Every busy-CPU row (CPU only: a GPU fit does not share the cores the same way)."""
    if device.type != "cpu" or threads.cpu_cores() < 2:
        why = "a GPU run" if device.type != "cpu" else "a single-core machine"
        return [Row(SECTION, "(not measured)", missing=why, note=f"busy-core rows need 2+ CPU cores; this is {why}")], {}
    rows, details = photo_fit_rows(model, photos, detector, cfg, device, rounds, renderer, tar_size)
    if command and photos:
        r, d = photo_command_rows(photos[0], max(1, rounds // 2))
        rows += r
        details.update(d)
    if clip:
        r, d = video_frame_rows(model, detector, cfg, device, clip, rounds, renderer, tar_size)
        rows += r
        details.update(d)
    torch.set_num_threads(threads.cpu_cores())
    return rows, details
