"""Stage 4 of the video pipeline: the clips' results merged into the pkl, the composed
video (the clips the workers composed while fitting them, joined, and the frames of
clips from the cache rendered and pasted back here, :class:`~.composer.Composer`), and
the three outputs (pkl, video, info) renamed into place together at the end, the video
only once it reads back complete."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from core.errors import UserError
from core.io.atomic import atomic_path
from core.io.video import VideoConcat, VideoReader, VideoWriter

from ..session import Session
from .chains import PER_FRAME_GROUPS
from .composer import Composer
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
def video_writer(path: str, video_path: str, track: LandmarkTrack, options: VideoOptions,
                 segments: Sequence[Tuple[str, int]] = ()) -> Iterator[VideoWriter]:
    """The composed video's writer (source size and rate; the source's audio, of the frame
    range only, unless ``options.keep_audio`` is off), aborted when the block raises; with
    ``segments`` ([(path, frames)], in order), the :class:`VideoConcat` that joins them."""
    audio = {}
    if options.frame_range is not None and options.keep_audio:
        audio = {"audio_start": max(0.0, float(track.timestamps[0]) / 1000.0) if track.start else 0.0,
                 "audio_duration": track.num_frames / float(track.fps)}
    audio_from = video_path if options.keep_audio else None
    if segments:
        writer = VideoConcat(path, [p for p, _ in segments], [n for _, n in segments], audio_from=audio_from, **audio)
    else:
        writer = VideoWriter(path, (track.width, track.height), track.fps, audio_from=audio_from, **audio)
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
                 batch: int = 8, meshes: bool = False, span: Optional[Tuple[int, int]] = None) -> Dict[str, np.ndarray]:
    """Paste each fitted frame's render into it and write every frame of the track (or
    of the positions ``span`` = [a, b) of it) in order, then finish the video
    (:class:`Composer`). Returns the Composer's arrays (:meth:`Composer.arrays`: each
    fitted frame's landmark NME, model landmarks and, with ``meshes``, posed vertices);
    :func:`gather_parts` turns them into the video's figures."""
    first = track.start
    a, b = span or (0, track.num_frames)
    composer = Composer(session, shape.id, shape.tex, shape.camera, writer, batch=batch, meshes=meshes)
    with VideoReader(video_path) as reader, tqdm(total=b - a, desc="rendering", unit="frame",
                                                 disable=not progress) as bar:
        for index, frame in reader.frames(first + a, first + b, track.source_timestamps()):
            i = index - first
            coeffs = {g: merged[g][i] for g in PER_FRAME_GROUPS} if merged["fitted"][i] else None
            composer.add(index, frame, coeffs, boxes[i], track.landmarks[i])
            bar.update(1)
        composer.flush()
    writer.finish()
    if writer.frames_written != b - a:
        raise UserError(f"the composed video has {writer.frames_written} frames, expected {b - a}")
    return composer.arrays()
