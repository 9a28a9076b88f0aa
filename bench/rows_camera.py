"""Camera rows: a synthetic talking-head video with a known camera and known head poses
(:mod:`core.models.synthetic_scene`: the synthetic model textured from a real photo, so
the real detector runs on it), fitted by ``fit_video.py`` as a user runs it.

Two runs in the same bench run, as separate processes: today's default (the original's
camera of each frame's crop; the "original" column) and the frame camera with the focal
estimated (``--export nerf``; the "default" column). Measured against the truth:

* focal error: |estimated / true − 1| in % (the frame camera only; the crop camera has
  no focal of the frame);
* rotation error: the angle of R_fit·R_trueᵀ in degrees, median over the fitted frames
  (the crop camera's pose is relative to each crop's view, so its figure includes that);
* landmark error: mean distance in pixels between the fitted model's 68 landmarks in frame
  pixels and the true ones, mean over frames;
* jitter: the mean frame-to-frame change of that error, mean over frames and points of
  ‖e_t − e_{t−1}‖ with e_t the (68, 2) error of frame t against the known track, in pixels.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import numpy as np
import torch

from .common import Row

log = logging.getLogger("bench")

SECTION = "camera"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rotation(angles: np.ndarray) -> np.ndarray:
    from core.models.geometry import euler_to_rotation
    return euler_to_rotation(torch.as_tensor(np.asarray(angles, dtype=np.float64))).numpy()


def fitted_landmarks(model, pkl: dict, frame: int, tar_size: int) -> np.ndarray:
    """(68, 2) frame pixels of the model's landmarks at a fitted frame of ``pkl`` (frame
    camera when the pkl has one, else the crop camera mapped through the bbox)."""
    from core.landmarks.crop import crop_to_photo
    from core.render.camera import Camera, FrameCamera

    e = pkl["fitting_res"][frame]
    c = model.layout.zeros(1).replace(id=torch.as_tensor(pkl["id"])[None], exp=torch.as_tensor(e["exp"])[None],
                                      angles=torch.as_tensor(e["rot"])[None], trans=torch.as_tensor(e["trans"])[None])
    with torch.no_grad():
        v = model.landmarks_3d(c)[0].double()
    if "camera" in pkl:
        k = pkl["camera"]
        return FrameCamera(focal=k["focal"], width=k["width"], height=k["height"], cx=k["cx"], cy=k["cy"]).project(v.numpy())
    return crop_to_photo(Camera(image_size=tar_size).project_points(v).numpy(), e["bbox"], tar_size)


def scene_errors(model, truth, pkl: dict) -> Dict[str, float]:
    """The figures of the module docstring for one run."""
    frames = sorted(pkl["fitting_res"])
    err = np.full((len(truth.angles), 68, 2), np.nan)
    rot = []
    for i in frames:
        err[i] = fitted_landmarks(model, pkl, i, int(pkl["tar_size"])) - truth.landmarks[i]
        r = _rotation(pkl["fitting_res"][i]["rot"][None])[0] @ _rotation(truth.angles[i][None])[0].T
        rot.append(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))
    step = np.linalg.norm(np.diff(err, axis=0), axis=-1).mean(-1)
    out = {"rotation_deg": float(np.median(rot)), "landmark_px": float(np.nanmean(np.linalg.norm(err, axis=-1))),
           "jitter_px": float(np.nanmean(step)), "frames": len(frames)}
    if "camera" in pkl:
        out["focal_error_pct"] = 100.0 * abs(pkl["camera"]["focal"] / truth.focal - 1.0)
        out["focal_px"] = float(pkl["camera"]["focal"])
        out["focal_source"] = str(pkl["camera"].get("focal_source", ""))
    return out


def camera_rows(frames: int = 60, threads: int = 0, seed: int = 0) -> Tuple[List[Row], Dict[str, object]]:
    """Render the scene, fit it twice (crop camera, frame camera) and return the rows."""
    from core.io.image import read_image
    from core.landmarks.detect import make_detector
    from core.models.sfm import load_sfm
    from core.models.synthetic_scene import render_scene_video

    # The Surrey Face Model (shipped): a real face's geometry, so the photo texture and
    # the detector agree (the synthetic model's nose and jaw make dlib miss by 7-11 px).
    model = load_sfm(None)
    photo = read_image(os.path.join(REPO, "data", "astronaut.jpg"))
    faces = make_detector("dlib").detect(photo)
    details: Dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench_camera_") as tmp:
        clip = os.path.join(tmp, "scene.mp4")
        truth = render_scene_video(clip, model, photo, np.asarray(faces[0].landmarks), frames=frames, seed=seed)
        details["truth"] = {"focal": truth.focal, "width": truth.width, "height": truth.height, "frames": frames}
        runs = {}
        for name, extra in (("crop camera", []), ("frame camera", ["--export", "nerf"])):
            res = os.path.join(tmp, name.replace(" ", "_"))
            cmd = [sys.executable, os.path.join(REPO, "fit_video.py"), "--v_path", clip, "--res_folder", res,
                   "--recon_model", "sfm", "--cache_folder", "", "--lm_detector", "dlib", "--quiet", *extra]
            if threads:
                cmd += ["--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"fit_video.py failed ({name}): {proc.stderr.strip()[-300:]}")
            with open(os.path.join(res, "scene_fitting_res.pkl"), "rb") as f:
                runs[name] = scene_errors(model, truth, pickle.load(f))
        details["runs"] = runs
    crop, frame = runs["crop camera"], runs["frame camera"]
    note = (f"synthetic {frames}-frame 640x480 video (Surrey Face Model textured from data/astronaut.jpg), true "
            f"focal {truth.focal:.0f} px, yaw up to 25 deg; "
            "original column = today's default (crop camera), default column = --export nerf (frame camera, "
            "--focal auto)")
    rows = [Row(SECTION, "focal error (%)", None, frame["focal_error_pct"], "lower",
                missing="the crop camera has no focal of the frame", note=note + f"; --focal auto gave {frame['focal_px']:.1f} px ({frame['focal_source']})"),
            Row(SECTION, "head rotation error (deg, median)", crop["rotation_deg"], frame["rotation_deg"], "lower",
                note="crop camera: relative to each crop's view"),
            Row(SECTION, "landmark error vs truth (px)", crop["landmark_px"], frame["landmark_px"], "lower"),
            Row(SECTION, "jitter: frame-to-frame change of the landmark error (px)", crop["jitter_px"],
                frame["jitter_px"], "lower", note="mean over frames and the 68 points")]
    return rows, details
