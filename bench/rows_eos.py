"""eos rows: landmark accuracy of this project against eos-py's ``fit_shape_and_pose`` (the
Surrey Face Model with its 6 expression blendshapes, contour and edge fitting) on the same
photos and the same landmarks.

``fit_single_img.py --recon_model sfm`` (the default preset, batch 1) fits each photo as a
user runs it; its ``<name>_info.json`` gives the detected landmarks (dlib) and the fitted
model's landmarks in photo pixels. eos fits the same detected landmarks (its defaults:
5 iterations, lambda 30) and its landmark vertices are projected with its scaled
orthographic camera. NME: mean distance over the 50 points both fits define (the chin and
iBUG 18-68 without the inner mouth corners 61 and 65, which eos's SFM mapping leaves out)
over the eye-centre distance (:func:`core.landmarks.metrics.interocular`). The "original"
column is eos, the "default" column this project.
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

SECTION = "vs eos"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# chin + iBUG 18..68 (0-based 17..67) without 61 and 65 (0-based 60, 64)
EOS_POINTS = np.array([8] + [i for i in range(17, 68) if i not in (60, 64)])
SFM_FILES = ("sfm_shape_3448.bin", "expression_blendshapes_3448.bin", "ibug_to_sfm.txt", "sfm_3448_edge_topology.json",
             "sfm_model_contours.json")


def nme50(pred: np.ndarray, ref: np.ndarray) -> float:
    """NME over :data:`EOS_POINTS`, divided by ``ref``'s eye-centre distance."""
    from core.landmarks.metrics import landmark_nme
    return landmark_nme(pred, ref, points=EOS_POINTS)


class EosFitter:
    """eos-py's fit_shape_and_pose with the SFM files in ``sfm_folder``."""

    def __init__(self, sfm_folder: str):
        import eos
        self.eos = eos
        f = {n: os.path.join(sfm_folder, n) for n in SFM_FILES}
        shape = eos.morphablemodel.load_model(f["sfm_shape_3448.bin"])
        blendshapes = eos.morphablemodel.load_blendshapes(f["expression_blendshapes_3448.bin"])
        self.model = eos.morphablemodel.MorphableModel(
            shape.get_shape_model(), blendshapes, color_model=eos.morphablemodel.PcaModel(), vertex_definitions=None,
            texture_coordinates=shape.get_texture_coordinates())
        self.mapper = eos.core.LandmarkMapper(f["ibug_to_sfm.txt"])
        self.edges = eos.morphablemodel.load_edge_topology(f["sfm_3448_edge_topology.json"])
        self.contour = eos.fitting.ContourLandmarks.load(f["ibug_to_sfm.txt"])
        self.model_contour = eos.fitting.ModelContour.load(f["sfm_model_contours.json"])

    def fit(self, landmarks: np.ndarray, width: int, height: int) -> Tuple[np.ndarray, float]:
        """The 68 fitted landmarks in photo pixels (NaN where eos has no vertex) and the
        fit's seconds."""
        eos = self.eos
        lms = [eos.core.Landmark(str(i + 1), [float(x), float(y)]) for i, (x, y) in enumerate(landmarks)]
        t0 = time.perf_counter()
        mesh, pose, _, _ = eos.fitting.fit_shape_and_pose(self.model, lms, self.mapper, width, height, self.edges,
                                                          self.contour, self.model_contour)
        seconds = time.perf_counter() - t0
        project = np.asarray(pose.get_projection()) @ np.asarray(pose.get_modelview())
        verts = np.asarray(mesh.vertices)
        out = np.full((68, 2), np.nan)
        for i in range(68):
            vid = self.mapper.convert(str(i + 1))
            if vid is not None:
                x, y = (project @ np.r_[verts[int(vid)], 1.0])[:2]
                out[i] = [width * (x + 1) / 2, height - height * (y + 1) / 2]  # OpenCV viewport (0, h, w, -h)
        return out, seconds


def eos_rows(photos: Sequence[str], sfm_folder: str, device: str = "cpu", lm_detector: str = "dlib",
             extra: Sequence[str] = ()) -> Tuple[List[Row], Dict[str, object]]:
    """Both fits on ``photos``: rows and per-photo details."""
    try:
        eos_fit = EosFitter(sfm_folder)
    except ImportError:
        return [Row(SECTION, "landmark NME, 50 points (%)", missing="eos-py not installed",
                    note="pip install eos-py")], {}
    except (OSError, RuntimeError) as e:
        return [Row(SECTION, "landmark NME, 50 points (%)", missing="no SFM files",
                    note=f"{sfm_folder}: {e}")], {}
    with tempfile.TemporaryDirectory(prefix="bench_eos_") as tmp:
        folder, out = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        os.makedirs(folder)
        for p in photos:
            os.symlink(os.path.abspath(p), os.path.join(folder, os.path.basename(p)))
        cmd = [sys.executable, os.path.join(REPO, "fit_single_img.py"), "--img_path", folder, "--res_folder", out,
               "--recon_model", "sfm", "--lm_detector", lm_detector, "--batch_size", "1", "--device", device, "--quiet",
               *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=REPO)
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"fit_single_img.py failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        details: Dict[str, dict] = {}
        for path in sorted(glob.glob(os.path.join(out, "*_info.json"))):
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
            det = np.asarray(info["landmarks_detected"], dtype=np.float64)
            ours = np.asarray(info["landmarks_model"], dtype=np.float64)
            theirs, eos_s = eos_fit.fit(det, *info["image_size"])
            details[os.path.basename(path)[:-len("_info.json")]] = {
                "nme_eos": nme50(theirs, det), "nme_ours": nme50(ours, det), "photo_loss_ours": info["losses"]["photo"],
                "seconds_eos": eos_s, "seconds_ours": info["timings_s_fit_per_photo"]}
    if not details:
        return [Row(SECTION, "landmark NME, 50 points (%)", missing="no photo fitted")], {}
    d = list(details.values())
    mean = {k: float(np.mean([x[k] for x in d])) for k in d[0]}
    med = {k: float(np.median([x[k] for x in d])) for k in ("seconds_eos", "seconds_ours")}
    wins = sum(x["nme_ours"] < x["nme_eos"] for x in d)
    note = (f"{len(d)} photos, dlib landmarks; original column = eos-py fit_shape_and_pose (SFM + 6 blendshapes, "
            f"contour and edge fitting), default column = fit_single_img.py --recon_model sfm; ours better on "
            f"{wins} of {len(d)}")
    rows = [Row(SECTION, "landmark NME, 50 points (%, mean)", 100 * mean["nme_eos"], 100 * mean["nme_ours"], "lower",
                note=note, n_original=len(d), n_default=len(d)),
            Row(SECTION, "fit time (s/photo, median)", med["seconds_eos"], med["seconds_ours"], "lower",
                note="eos: its fit only; ours: the fit (detection and writing excluded)",
                n_original=len(d), n_default=len(d))]
    return rows, {"photos": details, "mean": mean}


def default_sfm_folder(shared: str) -> Optional[str]:
    """``<shared>/sfm`` when it has every file eos needs."""
    folder = os.path.join(shared, "sfm")
    return folder if all(os.path.isfile(os.path.join(folder, n)) for n in SFM_FILES) else None
