"""Single-photo rows: fit wall time, landmark NME and photometric loss on real photos.

Each photo is read, its face detected and cropped once (``core.pipelines.photo.prepare_photo``);
then, for every repeat, each schedule fits it alone (batch 1, as ``fit_single_img.py``
does with one photo) and ``core.pipelines.photo.photo_outputs`` computes what the tool writes.
The wall time covers the fit only (rigid, landmark init, photometric stages): reading,
detection and writing are the same for both schedules and are reported apart. Then each
schedule fits a batch of ``BATCH`` photos (repeated when there are fewer) as often as its
repeats, the schedules alternating, for the batching rows (the median per photo). The
landmark NME compares the model's landmarks with the detector's, both in photo pixels
(see :func:`bench.common.nme_interocular`), the photometric loss is SPEC §4's, as written
into ``<name>_info.json``. The schedules alternate photo by photo so both see the same
machine load.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from core import defaults
from core.fit.config import FitConfig
from core.errors import UserError
from core.pipelines.photo import fit_photos, photo_outputs, prepare_photo
from core.pipelines.session import Session

from .common import Row, median, nme_interocular, timed, warm_up_config

log = logging.getLogger("bench")

SECTION = "single photo"
BATCH = 8  # the batch size of the batching rows


def warm_up(session_args: dict, cfg: FitConfig, photo) -> None:
    """One very short fit (and its outputs), not timed."""
    session = Session.create(config=warm_up_config(cfg), **session_args)
    photo_outputs(session, photo, fit_photos(session, [photo]), 0)


def _info(files: Mapping[str, object]) -> dict:
    for name, content in files.items():
        if name.endswith("_info.json"):
            return content
    raise KeyError("photo_outputs wrote no _info.json")


def photo_rows(model, photos: Sequence[str], detector, presets: Mapping[str, FitConfig], device,
               repeats: Mapping[str, int], renderer: str = defaults.RENDERER, tar_size: int = defaults.TAR_SIZE, padding_ratio: float = defaults.PADDING_RATIO,
               ) -> Tuple[List[Row], Dict[str, object]]:
    """Rows for the photos (every preset fits every photo ``repeats[preset]`` times)."""
    prepared, failed = [], {}
    for path in photos:
        try:
            prepared.append(prepare_photo(path, detector, tar_size, padding_ratio))
        except UserError as e:
            failed[path] = str(e)
            log.warning("photo skipped: %s", e)
    if not prepared:
        raise UserError(f"no usable photo among {list(photos)}")
    session_args = dict(model=model, tar_size=tar_size, device=str(device), renderer=renderer, progress=False)
    sessions = {name: Session.create(config=cfg, **session_args) for name, cfg in presets.items()}
    for name, cfg in presets.items():
        warm_up(session_args, cfg, prepared[0])
    per_photo: Dict[str, Dict[str, dict]] = {name: {} for name in presets}
    for k, photo in enumerate(prepared):
        for rep in range(max(repeats.values())):
            for name, session in sessions.items():
                if rep >= repeats[name]:
                    continue
                log.info("photo %d/%d %s: %s, repeat %d/%d", k + 1, len(prepared), photo.name, name, rep + 1,
                         repeats[name])
                seconds, result = timed(lambda: fit_photos(session, [photo]), session.device)
                rec = per_photo[name].setdefault(photo.name, {"fit_s": []})
                rec["fit_s"].append(seconds)
                if rep == 0:
                    info = _info(photo_outputs(session, photo, result, 0))
                    rec["nme"] = nme_interocular(np.asarray(info["landmarks_model"]),
                                                 np.asarray(info["landmarks_detected"]))
                    rec["photo_loss"] = float(info["losses"]["photo"])
                    rec["lm_loss"] = float(info["losses"]["lm"])
                    rec["stage_s"] = result.timings
    detect_s = median([p.detect_s for p in prepared])
    # Batching: BATCH photos (the photos repeated when fewer) fitted together, as often as each
    # schedule's repeats, the schedules alternating; the median per photo.
    batch = [prepared[k % len(prepared)] for k in range(BATCH)]
    batch_runs: Dict[str, List[float]] = {name: [] for name in presets}
    for rep in range(max(repeats.values())):
        for name, session in sessions.items():
            if rep >= repeats[name]:
                continue
            log.info("a batch of %d photos: %s, repeat %d/%d", BATCH, name, rep + 1, repeats[name])
            seconds, _ = timed(lambda: fit_photos(session, batch), session.device)
            batch_runs[name].append(seconds / BATCH)
    batch_s = {name: median(runs) for name, runs in batch_runs.items()}

    def agg(name, key):
        vals = [median(r[key]) if isinstance(r[key], list) else r[key] for r in per_photo[name].values()]
        return median(vals)

    names = [p.name for p in prepared]
    inputs = f"{len(prepared)} photo{'s' if len(prepared) > 1 else ''} ({', '.join(names)})"
    reps = ", ".join(f"{n} x{repeats[n]}" for n in presets)
    rows = [
        Row(SECTION, "fit wall time (s/photo)", agg("original", "fit_s"), agg("default", "fit_s"), "lower",
            note=f"median over {inputs} of the median over repeats ({reps}); batch 1; fit only "
                 f"(detection {detect_s:.2f} s/photo and writing excluded)",
            n_original=len(per_photo["original"]), n_default=len(per_photo["default"])),
        Row(SECTION, "landmark NME (% of inter-ocular)", _pct(agg("original", "nme")), _pct(agg("default", "nme")),
            "lower", note="median over the photos; model vs detector landmarks, chin + 51 inner points, "
                          "eye-centre distance (as in <name>_info.json)"),
        Row(SECTION, "photometric loss", agg("original", "photo_loss"), agg("default", "photo_loss"), "lower",
            note="median over the photos; SPEC §4 photo_loss: mean RGB distance between render and crop under the "
                 "face mask, / 255"),
    ]
    # The same photos at batch 1: the mean over the batch's photos of each one's median time
    # alone (a batch's time per photo is a mean over its photos; the median over every photo
    # would compare other photos, and a median with a mean).
    one = {name: float(np.mean([median(per_photo[name][p.name]["fit_s"]) for p in batch])) for name in presets}
    rows.append(Row(SECTION, f"fit time per photo at batch {BATCH} / at batch 1", _ratio(batch_s["original"], one["original"]),
                    _ratio(batch_s["default"], one["default"]), "lower",
                    note=f"a batch of {BATCH} ({'the photos repeated' if len(prepared) < BATCH else 'the first photos'}; "
                         f"median over repeats: {reps}) against the same photos fitted one at a time (the mean of "
                         "their batch-1 medians); below 1: batching pays (target <= 0.6)"))
    best = {name: min(one[name], batch_s[name]) for name in presets}
    rows.append(Row(SECTION, "fit time per photo at each schedule's best batch size (s)", best["original"],
                    best["default"], "lower", note=f"the batch's photos: the lower of their mean time alone and "
                                                   f"per photo at batch {BATCH}; ratio = how much less fitting "
                                                   "work the default does (target >= 10)"))
    details = {"photos": [os.path.relpath(p.path) for p in prepared], "failed": failed, "detect_s": detect_s,
               "per_photo": per_photo, "repeats": dict(repeats), "batch_s_per_photo": batch_s,
               "batch_runs_s_per_photo": batch_runs, "batch": BATCH, "batch_photos_alone_s_per_photo": one}
    return rows, details


def _pct(v):
    return None if v is None else 100.0 * v


def _ratio(a, b):
    return None if a is None or not b else a / b
