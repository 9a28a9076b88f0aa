"""Ranks rows: a folder of videos and a folder of photos fitted under torchrun with 1 rank
(the "original" column) and 2 ranks (the "default" column) on this machine, as a user runs
it (``python -m torch.distributed.run --standalone --nproc_per_node R fit_video.py --v_path
FOLDER ...``: new processes, imports, model and detector loading included, no cache).

The two rank counts alternate run by run (1, 2, 1, 2, ...) so they share the machine's
load; the rows are medians. Each rank takes its share of the cores (2 cores: 1 rank with 2
threads, or 2 ranks with 1 thread each). Throughput is units (videos or photos) and video
frames per second of wall time; the manifest of the last 2-rank run says how many units
each rank did.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

from .common import Row

log = logging.getLogger("bench")

SECTION = "ranks"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = (1, 2)


def cut_clips(source: str, folder: str, n: int, frames: int) -> List[str]:
    """``n`` clips of ``frames`` frames each, cut one after the other from ``source`` (from
    its start again when it is shorter)."""
    from core.io.video import VideoReader, VideoWriter

    with VideoReader(source) as r:
        info = r.info
        pool = [f for _, f in r.frames(0, min(info.num_frames or n * frames, n * frames))]
    paths = []
    for k in range(n):
        path = os.path.join(folder, f"clip{k}.mp4")
        with VideoWriter(path, (info.width, info.height), info.fps or 25.0) as w:
            for j in range(frames):
                w.write(pool[(k * frames + j) % len(pool)])
        paths.append(path)
    return paths


def _run(script: str, flag: str, inputs: str, ranks: int, device: str, extra: Sequence[str]) -> Tuple[float, dict]:
    """One torchrun job: its wall seconds and its manifest."""
    with tempfile.TemporaryDirectory(prefix="bench_ranks_") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               os.path.join(REPO, script), flag, inputs, "--res_folder", out, "--device", device, "--quiet", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{script} under torchrun ({ranks} ranks) failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-300:]}")
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            return wall, json.load(f)


def _measure(script, flag, inputs, device, extra, repeats) -> Dict[int, dict]:
    walls: Dict[int, List[float]] = {r: [] for r in RANKS}
    manifests: Dict[int, dict] = {}
    for _ in range(repeats):
        for r in RANKS:  # alternating
            wall, manifest = _run(script, flag, inputs, r, device, extra)
            walls[r].append(wall)
            manifests[r] = manifest
            log.info("ranks: %s, %d rank(s): %.1f s", script, r, wall)
    return {r: {"wall_s": statistics.median(walls[r]), "walls": walls[r],
                "units_by_rank": [x["units"] for x in manifests[r]["ranks"]],
                "statuses": sorted({u["status"] for u in manifests[r]["units"]})} for r in RANKS}


def ranks_rows(clip: str, photos: Sequence[str], n_clips: int = 3, clip_frames: int = 25, repeats: int = 2,
               device: str = "cpu", lm_detector: str = "auto") -> Tuple[List[Row], Dict[str, object]]:
    """Run both folders with 1 and 2 ranks ``repeats`` times each; rows and details."""
    rows: List[Row] = []
    details: Dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ranks_in_") as tmp:
        videos = os.path.join(tmp, "videos")
        os.makedirs(videos)
        cut_clips(clip, videos, n_clips, clip_frames)
        vid = _measure("fit_video.py", "--v_path", videos, device,
                       ["--cache_folder", "", "--lm_detector", lm_detector], repeats)
        frames = n_clips * clip_frames
        note = (f"{n_clips} clips of {clip_frames} frames cut from {os.path.relpath(clip, REPO)}; original column = "
                f"1 rank, default column = 2 ranks (`torchrun --standalone`), medians of {repeats} alternating runs; "
                f"units per rank in the last 2-rank run: {vid[2]['units_by_rank']}")
        rows += [Row(SECTION, "videos: wall time (s)", vid[1]["wall_s"], vid[2]["wall_s"], "lower", note=note,
                     n_original=repeats, n_default=repeats),
                 Row(SECTION, "videos: frames per second", frames / vid[1]["wall_s"], frames / vid[2]["wall_s"],
                     "higher", note="every frame fitted and composed, start-up included",
                     n_original=repeats, n_default=repeats)]
        details["videos"] = vid
        if photos:
            folder = os.path.join(tmp, "photos")
            os.makedirs(folder)
            for p in photos:
                os.symlink(os.path.abspath(p), os.path.join(folder, os.path.basename(p)))
            ph = _measure("fit_single_img.py", "--img_path", folder, device,
                          ["--batch_size", "1", "--lm_detector", lm_detector], repeats)
            rows.append(Row(SECTION, "photos: photos per second", len(photos) / ph[1]["wall_s"],
                            len(photos) / ph[2]["wall_s"], "higher",
                            note=f"{len(photos)} photos, batch 1; units per rank in the last 2-rank run: "
                                 f"{ph[2]['units_by_rank']}", n_original=repeats, n_default=repeats))
            details["photos"] = ph
    return rows, details
