"""Stage 4 of the video pipeline: the clips' results merged into the pkl, every fitted
frame rendered and pasted back into its source frame, the composed video encoded, and the
three outputs (pkl, video, info) renamed into place together at the end, the video only
once it reads back complete."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from core import threads as thread_control
from core.errors import UserError
from core.io.atomic import atomic_path
from core.io.video import VideoReader, VideoWriter
from core.landmarks.crop import crop_to_photo, paste_back
from core.landmarks.metrics import landmark_nme
from core.models.coeffs import Coeffs

from ..session import Session
from .clips import PER_FRAME_GROUPS
from .landmarks import LandmarkTrack
from .options import VideoOptions
from .shape import ShapeResult


RECON_SUFFIX = "_recon_video.mp4"  # <video>_recon_video.mp4: the composed video


def output_names(video_path: str) -> Dict[str, str]:
    """Output file names of a video: pkl, composed video and info (and, when asked for,
    the meshes and the nerf export folder)."""
    stem = os.path.splitext(os.path.basename(video_path))[0]
    return {"pkl": f"{stem}_fitting_res.pkl", "video": f"{stem}{RECON_SUFFIX}", "info": f"{stem}_info.json",
            "meshes": f"{stem}_meshes.npy", "nerf": f"{stem}_nerf"}


def merge_clips(results: Dict[int, Dict[str, np.ndarray]], n_clips: int, first: int, n: int) -> Dict[str, np.ndarray]:
    """The clips' results over the source frames [first, first + n), concatenated."""
    parts = [results[k] for k in range(n_clips)]
    frames = np.concatenate([p["frames"] for p in parts])
    if not np.array_equal(frames, np.arange(first, first + n)):
        raise UserError("internal error: the clips do not cover the video exactly")
    return {k: np.concatenate([p[k] for p in parts]) for k in ("fitted",) + PER_FRAME_GROUPS}


def pkl_contents(track: LandmarkTrack, boxes: np.ndarray, shape: ShapeResult, merged: Dict[str, np.ndarray],
                 tar_size: int, frame_range: bool) -> dict:
    """``<video>_fitting_res.pkl``: the original layout ({'id', 'tex', 'fitting_res':
    {source frame: {'rot', 'trans', 'gamma', 'exp'}}}) plus each frame's ``bbox`` and
    ``tar_size``, ``fps``, ``frames_without_face``, ``num_frames`` (and ``frame_range``
    [start, stop] when ``frame_range``)."""
    first, fitted = track.start, merged["fitted"]
    fitting_res = {}
    for i in np.flatnonzero(fitted):
        fitting_res[first + int(i)] = {"rot": merged["angles"][i].copy(), "trans": merged["trans"][i].copy(),
                                       "gamma": merged["gamma"][i].copy(), "exp": merged["exp"][i].copy(),
                                       "bbox": boxes[i].astype(np.int64)}
    pkl = {"id": shape.id.astype(np.float32), "tex": shape.tex.astype(np.float32), "fitting_res": fitting_res,
           "tar_size": int(tar_size), "fps": float(track.fps), "frames_without_face": track.frames_without_face,
           "num_frames": int(track.num_frames)}
    if shape.camera is not None:  # rot / trans are poses in this camera, not in each frame's crop
        pkl["camera"] = shape.camera_info()
    if frame_range:
        pkl["frame_range"] = [int(first), int(track.stop)]
    return pkl


@contextlib.contextmanager
def video_writer(path: str, video_path: str, track: LandmarkTrack, options: VideoOptions) -> Iterator[VideoWriter]:
    """The composed video's writer (source size and rate; the source's audio, of the frame
    range only, unless ``options.keep_audio`` is off), aborted when the block raises."""
    audio = {}
    if options.frame_range is not None and options.keep_audio:
        audio = {"audio_start": max(0.0, float(track.timestamps[0]) / 1000.0) if track.start else 0.0,
                 "audio_duration": track.num_frames / float(track.fps)}
    writer = VideoWriter(path, (track.width, track.height), track.fps,
                         audio_from=video_path if options.keep_audio else None, **audio)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise


def commit_outputs(writer: VideoWriter, files: Dict[str, str], pkl: dict, info: dict, res_folder: str,
                   meshes: Optional[np.ndarray] = None,
                   export: Optional[Callable[[str], object]] = None) -> None:
    """Write the pkl and the info (and the ``meshes`` array to ``files["meshes"]``, and
    the folder ``files["nerf"]`` filled by ``export(folder)``) and rename them into place
    with the finished video, together (UserError for a full disk or a file-size limit).
    The info goes last: a folder with an info.json has every output complete."""
    try:
        with contextlib.ExitStack() as stack:
            tmp_info = stack.enter_context(atomic_path(files["info"]))
            tmp_pkl = stack.enter_context(atomic_path(files["pkl"]))
            tmp_mesh = stack.enter_context(atomic_path(files["meshes"], suffix=".npy")) if meshes is not None else None
            tmp_dir = stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f".{os.path.basename(files['nerf'])}.", dir=res_folder)) if export is not None else None
            with open(tmp_pkl, "wb") as f:
                pickle.dump(pkl, f)
            if tmp_mesh is not None:
                np.save(tmp_mesh, meshes)
            if tmp_dir is not None:
                export(tmp_dir)
            with open(tmp_info, "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2)
            if tmp_dir is not None:
                _replace_dir(tmp_dir, files["nerf"])
            writer.commit()
    except OSError as e:  # disk full, file-size limit
        raise UserError(f"cannot write the outputs in '{res_folder}': {e.strerror or e}") from None


def _replace_dir(tmp: str, final: str) -> None:
    """Rename the finished folder ``tmp`` to ``final``, replacing an older one (moved
    aside first, removed after)."""
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old.", dir=os.path.dirname(final) or ".")
        os.rename(final, os.path.join(old, "x"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    os.rename(tmp, final)
    os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory removes it on the way out
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def render_video(session: Session, video_path: str, track: LandmarkTrack, boxes: np.ndarray, shape: ShapeResult,
                 merged: Dict[str, np.ndarray], writer: VideoWriter, progress: bool,
                 batch: int = 8, meshes: Optional[np.ndarray] = None) -> Dict[str, object]:
    """Paste each fitted frame's render into it and write every frame of the track in
    order, then finish the video. Returns the landmark NME of each fitted frame ({source
    index: value}, :func:`core.landmarks.metrics.landmark_nme` with its default points,
    model vs tracked, as for photos) and its mean, median, p95 and max, and ``landmarks``
    (n, 68, 2) float32 the model's landmarks in frame pixels (NaN without a fit).
    ``meshes``: optional (n, V, 3) array filled with each fitted frame's posed vertices."""
    fitter, cam = session.fitter, session.camera
    dev, dt = session.device, fitter.dtype
    tar = cam.image_size
    first = track.start
    pending: List[Tuple[int, np.ndarray]] = []  # (position in the track, frame)
    per_frame: Dict[int, float] = {}
    model_landmarks = np.full((track.num_frames, 68, 2), np.nan, dtype=np.float32)
    id_t = torch.as_tensor(shape.id, dtype=dt, device=dev)[None]
    tex_t = torch.as_tensor(shape.tex, dtype=dt, device=dev)[None]

    def flush():
        thread_control.tick()
        todo = [i for i, _ in pending if merged["fitted"][i]]
        composed = {}
        if todo:
            d = {g: torch.as_tensor(merged[g][todo], dtype=dt, device=dev) for g in PER_FRAME_GROUPS}
            b = len(todo)
            c = Coeffs(id=id_t.expand(b, -1), tex=tex_t.expand(b, -1), **d)
            f = fitter
            if shape.camera is not None:  # the frames' crops of the video's camera
                f = fitter.with_camera(shape.camera.crop(boxes[todo], tar, dtype=dt, device=dev))
            with torch.no_grad():
                rgba, out = f.render(c)
                model_lms = f.camera.project_points(out.landmarks).cpu().numpy()
            if meshes is not None:
                meshes[todo] = out.vertices.cpu().numpy()
            rgba = rgba.cpu().numpy()
            frames = dict(pending)
            for k, i in enumerate(todo):
                composed[i] = paste_back(frames[i], np.clip(rgba[k, ..., :3], 0, 255).astype(np.uint8),
                                         rgba[k, ..., 3], boxes[i])
                p = crop_to_photo(model_lms[k], boxes[i], tar)
                per_frame[first + i] = landmark_nme(p, track.landmarks[i])
                if p.shape == (68, 2):
                    model_landmarks[i] = p
        for i, frame in pending:
            writer.write(composed.get(i, frame))
        pending.clear()

    with VideoReader(video_path) as reader, tqdm(total=track.num_frames, desc="rendering", unit="frame",
                                                 disable=not progress) as bar:
        n_fit = 0
        for index, frame in reader.frames(first, track.stop, track.source_timestamps()):
            i = index - first
            pending.append((i, frame))
            n_fit += bool(merged["fitted"][i])
            if n_fit >= batch or len(pending) >= 4 * batch:
                flush()
                n_fit = 0
            bar.update(1)
        flush()
    writer.finish()
    if writer.frames_written != track.num_frames:
        raise UserError(f"the composed video has {writer.frames_written} frames, expected {track.num_frames}")
    e = np.asarray(list(per_frame.values())) if per_frame else np.zeros(1)
    return {"mean": float(e.mean()), "median": float(np.median(e)), "p95": float(np.percentile(e, 95)),
            "max": float(e.max()), "per_frame": per_frame, "landmarks": model_landmarks}
