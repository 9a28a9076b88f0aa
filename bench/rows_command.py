"""Whole-command rows: what a user waits for when running ``fit_video.py`` on a clip.

The command runs as a user runs it (a new process, imports and model loading included,
no cache: ``--cache_folder ''``), with the default schedule and ``--nworkers 2``, as often
as the bench's repeats; the median run's wall
time is compared with the clip's own duration (the real-time factor: clip seconds / wall
seconds, 1 = real time), and split into the stages the command's ``<video>_info.json``
reports (``timings_s``): start-up and the rest (wall minus the pipeline's total), the landmark
pass, the shared identity/albedo fit, the per-frame fitting and composing the output video
(the workers compose their frames as they fit them: then the last stage only joins their
parts, and composes what came from a cache).

The photo rows time ``fit_single_img.py`` on one photo the same way (a new process each time,
the default schedule) against the floor a Python tool built on torch cannot go under: the
command's own fitting time (its info.json) plus ``python -c "import torch"``; the two
commands alternate run by run and the rows are medians.

The original schedule is not run here: at well under one frame per second on a CPU it would
take tens of minutes for the full clip (its per-frame rates are in the video rows).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import Row

log = logging.getLogger("bench")

SECTION = "whole command"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (info.json timings_s key, row label)
STAGES = (("landmarks_s", "landmark pass"), ("shape_s", "identity/albedo fit"),
          ("fit_s", "per-frame fitting"), ("render_s", "composing the output video"))
NOT_RUN = "not run"
ORIGINAL_NOTE = ("Whole-command rows: the original schedule is not run (at well under one frame per second on a "
                 "CPU a whole clip takes tens of minutes; its per-frame rates are in the video rows); the target "
                 "is the clip's own duration (real-time factor >= 1).")


def command_rows_from(wall_s: float, info: dict, duration_s: float, desc: str) -> List[Row]:
    """The rows of one measured command: ``wall_s`` its wall time, ``info`` its info.json,
    ``duration_s`` the clip's length in seconds."""
    tm = info.get("timings_s", {})
    rows = [Row(SECTION, "fit_video.py wall time (s)", None, wall_s, "lower", missing=NOT_RUN, note=desc),
            Row(SECTION, "real-time factor (clip s / wall s)", None, duration_s / wall_s if wall_s > 0 else None,
                "higher", missing=NOT_RUN, note=f"clip {duration_s:.1f} s; >= 1 is real time or faster")]
    labels = dict(STAGES)
    inline = int(tm.get("composed_while_fitting", 0))
    if inline:  # the workers composed (some of) the frames as they fitted them
        labels["fit_s"] = "per-frame fitting and composing its frames"
        labels["render_s"] = "composing the rest and joining the parts"
    other = wall_s - float(tm.get("total_s", 0.0))
    rows.append(Row(SECTION, "stage: start-up and the rest (s)", None, max(other, 0.0), "lower", missing=NOT_RUN,
                    note="wall time minus the pipeline's total: imports, model and detector loading, writing"))
    for key, _ in STAGES:
        if key in tm:
            note = "from the command's info.json timings_s"
            if key == "fit_s" and inline:
                note += f"; {inline} frames composed by the fitting workers as they went"
            rows.append(Row(SECTION, f"stage: {labels[key]} (s)", None, float(tm[key]), "lower", missing=NOT_RUN,
                            note=note))
    nme = info.get("landmark_nme_interocular")
    mean = nme.get("mean") if isinstance(nme, dict) else nme
    if mean is not None:
        rows.append(Row(SECTION, "landmark NME (%, mean over frames)", None, 100.0 * float(mean), "lower",
                        missing=NOT_RUN, note="the command's own figure (info.json)"))
    slowest = max(((float(tm[k]), labels[k]) for k, _ in STAGES if k in tm), default=None)
    if slowest is not None:
        rows[0].note += f"; slowest stage: {slowest[1]}"
    return rows


def command_rows(clip: str, nworkers: int = 2, device: str = "auto", lm_detector: str = "auto",
                 threads: Optional[int] = None, extra: Sequence[str] = (), runs: int = 1
                 ) -> Tuple[List[Row], Dict[str, object]]:
    """Run ``fit_video.py`` ``runs`` times on ``clip`` and return the rows of the median
    run (by wall time; its own stages, which add up to it) and the details of every run."""
    from core.io.video import probe_video

    meta = probe_video(clip)
    duration = meta.num_frames / meta.fps if meta.fps else 0.0
    measured = []  # (wall, info) of each run
    with tempfile.TemporaryDirectory(prefix="bench_command_") as tmp:
        cmd = [sys.executable, os.path.join(REPO, "fit_video.py"), "--v_path", clip, "--res_folder", tmp,
               "--nworkers", str(nworkers), "--cache_folder", "", "--device", device, "--lm_detector", lm_detector,
               "--quiet", *extra]
        if threads:
            cmd += ["--threads", str(threads)]
        stem = os.path.splitext(os.path.basename(clip))[0]
        for _ in range(max(1, int(runs))):
            wall = _timed(cmd)
            with open(os.path.join(tmp, f"{stem}_info.json"), encoding="utf-8") as f:
                measured.append((wall, json.load(f)))
            log.info("whole command: %.1f s for a %.1f s clip", wall, duration)
    walls = [w for w, _ in measured]
    wall, info = sorted(measured, key=lambda m: m[0])[(len(measured) - 1) // 2]
    shown = " ".join(a if a else "''" for a in cmd[1:]).replace(tmp, "OUT").replace(REPO + os.sep, "")
    how = "one run" if len(walls) == 1 else \
        f"the median of {len(walls)} runs ({', '.join(f'{w:.1f}' for w in walls)} s) and its stages"
    desc = f"`{shown}`: {meta.num_frames} frames, {meta.width}x{meta.height}, {meta.fps:g} fps; {how}, start-up included"
    details = {"command": shown, "wall_s": wall, "runs_wall_s": walls, "duration_s": duration,
               "timings_s": info.get("timings_s"), "runs_timings_s": [i.get("timings_s") for _, i in measured],
               "frames": meta.num_frames, "size": [meta.width, meta.height]}
    return command_rows_from(wall, info, duration, desc), details


def _timed(cmd: Sequence[str]) -> float:
    """Wall seconds of one run of ``cmd`` (RuntimeError if it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[1]) if len(cmd) > 1 else cmd[0]} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-300:]}")
    return wall


def photo_command_rows(photo: str, runs: int = 3, device: str = "auto", lm_detector: str = "auto",
                       threads: Optional[int] = None) -> Tuple[List[Row], Dict[str, object]]:
    """``fit_single_img.py`` on one photo, ``runs`` times, alternating with ``python -c
    "import torch"``: its wall time against its fitting time plus torch's import (medians)."""
    walls, fits, imports = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_photo_command_") as tmp:
        cmd = [sys.executable, os.path.join(REPO, "fit_single_img.py"), "--img_path", photo, "--res_folder", tmp,
               "--device", device, "--lm_detector", lm_detector, "--quiet"]
        if threads:
            cmd += ["--threads", str(threads)]
        for r in range(runs):
            for what in (("import", "command") if r % 2 == 0 else ("command", "import")):
                if what == "import":
                    imports.append(_timed([sys.executable, "-c", "import torch"]))
                    continue
                walls.append(_timed(cmd))
                info_files = glob.glob(os.path.join(tmp, "*_info.json"))
                if len(info_files) != 1:
                    raise RuntimeError(f"fit_single_img.py wrote {len(info_files)} info files")
                with open(info_files[0], encoding="utf-8") as f:
                    fits.append(float(json.load(f)["timings_s_fit_per_photo"]))
        shown = " ".join(cmd[1:]).replace(tmp, "OUT").replace(REPO + os.sep, "")
    wall, fit, imp = (float(np.median(v)) for v in (walls, fits, imports))
    floor = fit + imp
    note = f"`{shown}`, {runs} runs alternating with `python -c \"import torch\"`, medians"
    rows = [Row(SECTION, "fit_single_img.py wall time, one photo (s)", None, wall, "lower", missing=NOT_RUN,
                note=note, n_default=runs),
            Row(SECTION, "its fitting + `import torch` (s)", None, floor, "lower", missing=NOT_RUN,
                note=f"fitting {fit:.2f} s (the command's info.json) + import {imp:.2f} s", n_default=runs),
            Row(SECTION, "one-photo run / (fitting + import torch)", None, wall / floor if floor > 0 else None,
                "lower", missing=NOT_RUN, note="target <= 2", n_default=runs)]
    details = {"command": shown, "wall_s": walls, "fit_s": fits, "import_torch_s": imports}
    return rows, details
