"""Exports of a video fitted with one frame camera, for the pipelines that consume face
tracks (talking-head NeRF / Gaussian splatting: AD-NeRF, RAD-NeRF, ER-NeRF, GeneFace, ...).

``--export nerf`` writes the folder ``<video>_nerf/``:

* ``transforms_train.json`` and ``transforms_val.json`` (the AD-NeRF family's layout):
  top-level ``focal_len``, ``cx``, ``cy``, ``w``, ``h`` (frame pixels) and ``frames``,
  each ``{"img_id": i, "aud_id": i, "transform_matrix": 4x4}`` with ``i`` the 0-based
  source frame index and the matrix the camera-to-world transform. Camera axes are
  OpenGL's (x right, y up, looking along −z); world space is the face model's space
  (SPEC §2, decimetres, centred: the head is still and the camera moves). A camera-space
  point (x, y, z) is the frame pixel (cx + f·x / −z, cy − f·y / −z). Every fitted frame is
  in exactly one file: the first ``TRAIN_FRACTION`` (10/11, as AD-NeRF splits) of the
  fitted frames in order train, the rest val.
* ``track_params.pt``: torch tensors as the BFM09 trackers of those pipelines write them:
  ``id`` (1, n_id), ``exp`` (N, n_exp), ``euler`` (N, 3) radians (SPEC §3: M = Rz·Ry·Rx),
  ``trans`` (N, 3) camera space, ``focal`` (1,), plus ``frames`` (N,) the source frame
  indices of the N fitted frames: a model-space vertex v is v·Mᵀ + trans in camera space.
* ``landmarks.npy``: (N, 68, 2) float32, the landmarks the fit used (detected or tracked)
  in frame pixels (col, row), and ``lms/<i>.lms``: the same per frame as text (68 lines
  "x y"), the layout of the trackers' ``ori_imgs/<i>.lms``.

``--save_meshes`` writes ``<video>_meshes.npy``: (frames, V, 3) float16, every frame of
the track (the frame range) in order, the posed vertices v·Mᵀ + t of SPEC §3 (the frame
camera at (0, 0, 10) looking down −z, so camera space = these minus (0, 0, 10)); NaN rows
for frames without a face.
"""
from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np
import torch

from core.models.geometry import euler_to_rotation
from core.render.camera import FrameCamera

TRAIN_FRACTION = 10.0 / 11.0


def camera_to_world(angles: np.ndarray, trans: np.ndarray, camera: FrameCamera) -> np.ndarray:
    """(N, 4, 4) camera-to-world matrices of poses ``angles``, ``trans`` (N, 3) fitted in
    ``camera``: world (model space) -> camera is X ↦ M·X + (trans − (0, 0, distance))."""
    m = euler_to_rotation(torch.as_tensor(np.asarray(angles, dtype=np.float64))).numpy()  # (N, 3, 3)
    t = np.asarray(trans, dtype=np.float64) - np.array([0.0, 0.0, camera.distance])
    out = np.zeros((m.shape[0], 4, 4))
    rt = np.transpose(m, (0, 2, 1))
    out[:, :3, :3] = rt
    out[:, :3, 3] = -np.einsum("nij,nj->ni", rt, t)
    out[:, 3, 3] = 1.0
    return out


def split_train_val(n: int) -> int:
    """How many of ``n`` fitted frames (in order) go to the training file."""
    return n if n < 2 else max(1, min(n - 1, int(n * TRAIN_FRACTION)))


def write_nerf(folder: str, camera: FrameCamera, frames: np.ndarray, id_: np.ndarray, exp: np.ndarray,
               angles: np.ndarray, trans: np.ndarray, landmarks: np.ndarray) -> Dict[str, str]:
    """Write the ``--export nerf`` files into ``folder`` (created) for the N fitted frames:
    ``frames`` (N,) source indices, ``exp`` (N, n_exp), ``angles`` / ``trans`` (N, 3) in
    ``camera``, ``id_`` (n_id,), ``landmarks`` (N, 68, 2) frame pixels."""
    os.makedirs(os.path.join(folder, "lms"), exist_ok=True)
    c2w = camera_to_world(angles, trans, camera)
    head = {"focal_len": float(camera.focal), "cx": float(camera.cx), "cy": float(camera.cy),
            "w": int(camera.width), "h": int(camera.height)}
    n_train = split_train_val(len(frames))
    files = {}
    for name, sl in (("transforms_train.json", slice(0, n_train)), ("transforms_val.json", slice(n_train, None))):
        items = [{"img_id": int(i), "aud_id": int(i), "transform_matrix": m.tolist()}
                 for i, m in zip(frames[sl], c2w[sl])]
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**head, "frames": items}, f, indent=1)
        files[name] = path
    cam_trans = np.asarray(trans, dtype=np.float32) - np.array([0, 0, camera.distance], dtype=np.float32)
    params = {"id": torch.as_tensor(np.asarray(id_, dtype=np.float32))[None],
              "exp": torch.as_tensor(np.asarray(exp, dtype=np.float32)),
              "euler": torch.as_tensor(np.asarray(angles, dtype=np.float32)),
              "trans": torch.as_tensor(cam_trans),
              "focal": torch.tensor([float(camera.focal)], dtype=torch.float32),
              "frames": torch.as_tensor(np.asarray(frames, dtype=np.int64))}
    files["track_params.pt"] = os.path.join(folder, "track_params.pt")
    torch.save(params, files["track_params.pt"])
    lms = np.asarray(landmarks, dtype=np.float32)
    files["landmarks.npy"] = os.path.join(folder, "landmarks.npy")
    np.save(files["landmarks.npy"], lms)
    for i, pts in zip(frames, lms):
        np.savetxt(os.path.join(folder, "lms", f"{int(i)}.lms"), pts, fmt="%.3f")
    return files
