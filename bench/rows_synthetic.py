"""Synthetic ground truth rows: fit images rendered from known coefficients.

Each case draws random coefficients: identity, expression and albedo ~ N(0, 0.5^2) per
coefficient (the bases are already scaled by their standard deviations, so this is half
the prior's spread), light gamma ~ N(0, 0.1^2) around the model's ambient term, yaw
uniform in +-30 degrees, pitch +-10, roll +-5, and a translation that makes the face fill
a 256 crop the way a detected, padded face box does. The target image is the Fitter's own
render (black background) at tar_size 256, the target landmarks the model's projected
landmarks plus Gaussian pixel noise (``noise_px``, 1 px by default, seeded). Every
schedule fits every case alone (batch 1) from zero coefficients, as for a photo.

Errors against the truth: pose = the largest absolute Euler-angle difference (degrees);
vertices = mean distance between the fitted and the true unposed shape (identity +
expression, the model frame, so the pose error does not enter), in mm (model units are
decimetres: x100); landmarks = mean distance in pixels between the fitted model's
projected landmarks and the noise-free true ones.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Tuple

import numpy as np
import torch

from core import defaults
from core.fit.config import FitConfig
from core.pipelines.session import Session

from .common import Row, median, timed, warm_up_config

log = logging.getLogger("bench")

SECTION = "synthetic ground truth"
MM_PER_MODEL_UNIT = 100.0  # decimetres -> millimetres


def random_coeffs(model, rng: np.random.Generator, device, dtype=torch.float32):
    """One case's true coefficients (batch 1), see the module docstring."""
    lay = model.layout

    def t(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64)[None], dtype=dtype, device=device)

    angles = np.radians([rng.uniform(-10, 10), rng.uniform(-30, 30), rng.uniform(-5, 5)])
    trans = [rng.uniform(-0.05, 0.05), 0.1 + rng.uniform(-0.05, 0.05), rng.uniform(2.5, 3.0)]
    return lay.zeros(1, dtype=dtype, device=device).replace(
        id=t(rng.normal(0, 0.5, lay.n_id)), exp=t(rng.normal(0, 0.5, lay.n_exp)), tex=t(rng.normal(0, 0.5, lay.n_tex)),
        gamma=t(rng.normal(0, 0.1, 27)), angles=t(angles), trans=t(trans))


def model_landmarks(fitter, coeffs, target: torch.Tensor) -> torch.Tensor:
    """(B, L, 2) projected model landmarks; models with a dynamic contour pick their
    contour vertices against ``target`` as the fitter does."""
    select = getattr(fitter, "select_keypoints", None)
    kp = select(coeffs, target) if select is not None else None
    with torch.no_grad():
        return fitter.project_landmarks(coeffs) if kp is None else fitter.project_landmarks(coeffs, kp)


def make_cases(session: Session, n: int, seed: int, noise_px: float) -> List[Dict[str, object]]:
    """``n`` cases: true coefficients, rendered image, clean and noisy landmarks."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        gt = random_coeffs(session.model, rng, session.device)
        with torch.no_grad():
            rgba, _ = session.fitter.render(gt)
            clean = session.fitter.project_landmarks(gt)
        noise = torch.as_tensor(rng.normal(0, noise_px, tuple(clean.shape)), dtype=clean.dtype, device=clean.device)
        cases.append({"gt": gt, "image": rgba[..., :3].clamp(0, 255).contiguous(), "clean": clean,
                      "landmarks": clean + noise})
    return cases


def case_errors(session: Session, gt, fit, clean: torch.Tensor, noisy: torch.Tensor) -> Dict[str, float]:
    model = session.model
    d = torch.rad2deg(fit.angles - gt.angles)
    d = (d + 180.0) % 360.0 - 180.0
    with torch.no_grad():
        verts = (model.shape(fit.id, fit.exp) - model.shape(gt.id, gt.exp)).norm(dim=-1).mean()
    lms = model_landmarks(session.fitter, fit, noisy)
    return {"pose_deg": float(d.abs().max()), "vertex_mm": float(verts) * MM_PER_MODEL_UNIT,
            "landmark_px": float((lms - clean).norm(dim=-1).mean())}


def synthetic_rows(model, presets: Mapping[str, FitConfig], device, repeats: Mapping[str, int], n_cases: int,
                   renderer: str = defaults.RENDERER, tar_size: int = defaults.TAR_SIZE, noise_px: float = 1.0, seed: int = 0,
                   model_desc: str = "") -> Tuple[List[Row], Dict[str, object]]:
    session_args = dict(model=model, tar_size=tar_size, device=str(device), renderer=renderer, progress=False)
    sessions = {name: Session.create(config=cfg, **session_args) for name, cfg in presets.items()}
    cases = make_cases(next(iter(sessions.values())), n_cases, seed, noise_px)
    for name, cfg in presets.items():  # warm-up, not timed
        Session.create(config=warm_up_config(cfg), **session_args).fitter.fit(cases[0]["landmarks"], cases[0]["image"])
    per_case: Dict[str, List[dict]] = {name: [] for name in presets}
    for k, case in enumerate(cases):
        for name, session in sessions.items():
            rec = {"fit_s": []}
            for rep in range(repeats[name]):
                log.info("synthetic case %d/%d: %s, repeat %d/%d", k + 1, len(cases), name, rep + 1, repeats[name])
                seconds, res = timed(lambda: session.fitter.fit(case["landmarks"], case["image"]), session.device)
                rec["fit_s"].append(seconds)
                if rep == 0:
                    rec.update(case_errors(session, case["gt"], res.coeffs, case["clean"], case["landmarks"]))
                    rec["photo_loss"] = res.losses.get("photo")
            per_case[name].append(rec)

    def agg(name, key):
        return median([median(r[key]) if isinstance(r[key], list) else r[key] for r in per_case[name]])

    inputs = (f"median over {len(cases)} case{'s' if len(cases) > 1 else ''} (seed {seed}), {model_desc}, "
              f"landmarks + N(0, {noise_px:g}^2) px noise")
    rows = [
        Row(SECTION, "pose error (deg, largest angle)", agg("original", "pose_deg"), agg("default", "pose_deg"),
            "lower", note=f"{inputs}; yaw within +-30 deg"),
        Row(SECTION, "vertex error (mm, unposed shape)", agg("original", "vertex_mm"), agg("default", "vertex_mm"),
            "lower", note="mean over all vertices of the identity + expression shape, model units x100"),
        Row(SECTION, "landmark error (px)", agg("original", "landmark_px"), agg("default", "landmark_px"), "lower",
            note=f"fitted vs noise-free true landmarks, {tar_size} px crop"),
        Row(SECTION, "fit wall time (s/case)", agg("original", "fit_s"), agg("default", "fit_s"), "lower",
            note=f"batch 1, median over cases of the median over repeats "
                 f"({', '.join(f'{n} x{repeats[n]}' for n in presets)})"),
    ]
    for r in rows:
        r.n_original, r.n_default = len(per_case["original"]), len(per_case["default"])
    details = {"cases": n_cases, "seed": seed, "noise_px": noise_px, "model": model_desc,
               "vertices": model.num_vertices, "per_case": per_case}
    return rows, details
