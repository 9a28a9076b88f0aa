"""The whole video pipeline, :func:`run_video`: the stages in order, each cached under
``<cache_folder>/<video name>/``.

``VideoOptions.frame_range`` restricts every stage to source frames [start, stop): the
landmark pass seeks to start, caches are keyed (and named) by the range, frame indices in
the outputs stay source indices. One run at a time uses a cache folder
(:func:`~core.pipelines.video.cache.cache_lock`); on a first run (no finished landmark
pass in the cache) the worker processes start before the landmark pass, so their start-up
overlaps it (:class:`~core.pipelines.video.workers.WorkerPool`); they end with the main
process however it ends (:mod:`core.pipelines.video.workers`).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from core.errors import UserError
from core.io.outputs import check_writable_folder
from core.io.video import VideoReader, VideoWriter

from ..session import Session, SessionSpec
from .cache import CACHE_VERSION, array_digest, cache_lock, digest, load_npz, model_fingerprint, video_cache_dir
from .chains import CHAIN_CROP_BYTES, chain_seeds, first_chain_back, lockstep_pays
from .clips import ClipJob, FrameDone, segment_arrays_path, split_clips
from .compose import commit_outputs, merge_clips, output_names, pkl_contents, render_video, video_writer
from .composer import gather_parts
from .export import write_nerf
from .landmarks import LandmarkTrack, landmark_key, landmark_pass, landmarks_cached
from .options import VideoOptions, check_frame_range, check_options, resolve_options
from .shape import ShapeResult, fit_shape, planned_shape_frames
from .workers import WorkerPool, cpu_count, cpu_oversubscription, run_workers, threads_per_worker, worker_devices

log = logging.getLogger(__name__)

# Name prefix of the folder (in the cache folder) of a run's composed clips.
COMPOSE_PREFIX = "compose_"

# At most this much memory for the frames the landmark pass keeps for the identity fit.
KEEP_FRAMES_BYTES = 1 << 30


@dataclass
class VideoReport:
    """What a run wrote and found."""

    files: Dict[str, str]
    num_frames: int
    frames_without_face: List[int]
    timings: Dict[str, float]
    info: Dict[str, object]


def run_video(session: Session, detector, video_path: str, res_folder: str,
              options: VideoOptions = VideoOptions(), info_extra: Optional[dict] = None,
              progress: bool = True, on_frame: Optional[Callable[[FrameDone], None]] = None,
              clip_runner=None) -> VideoReport:
    """Fit every frame of ``video_path`` (or of ``options.frame_range``) and write the
    outputs into ``res_folder``. The cache folder is locked for the run (see
    :func:`cache_lock`).

    ``info_extra``: more keys for ``<video>_info.json``. ``progress``: tqdm bars.
    ``on_frame``: called in this process, in the thread that runs ``run_video``, with the
    :class:`FrameDone` (worker, source frame, finish time in the worker, ...) of each kept
    frame of each clip fitted in this run, whichever worker process fits it (clips reused
    from the cache report nothing). Each worker's frames arrive as it finishes them (in frame
    order unless its clip is fitted as several chains, see :mod:`.chains`).
    ``clip_runner``: fits the clips instead of ``options.nworkers`` worker processes: an
    object with ``clips_for(n_frames)`` (how many clips) and ``run(jobs, on_frame)``
    (:class:`core.pipelines.dataset.clipshare.ClipSharing`: clips shared with other ranks).
    """
    check_options(options)
    options = resolve_options(options, session.fitter.cfg)
    t_start = time.perf_counter()
    with VideoReader(video_path) as reader:  # fail early on a missing / corrupt / empty video
        video_info = reader.info
    check_frame_range(video_path, options.frame_range)
    check_writable_folder(res_folder, "output folder")
    names = output_names(video_path)
    with contextlib.ExitStack() as stack:
        if options.cache_folder:
            cache_dir = video_cache_dir(options.cache_folder, video_path)
            check_writable_folder(cache_dir, "cache folder")
            os.makedirs(cache_dir, exist_ok=True)
            stack.enter_context(cache_lock(cache_dir))
            log.info("cache: %s (re-runs reuse it; --cache_folder '' for none)", os.path.abspath(cache_dir))
        else:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fit_video_"))
        # The clips' composed videos (fit_clip composes as it fits), joined at the end. A
        # folder a killed run left behind goes now: the lock says no other run uses it.
        for stale in glob.glob(os.path.join(cache_dir, COMPOSE_PREFIX + "*")):
            shutil.rmtree(stale, ignore_errors=True)
        seg_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=COMPOSE_PREFIX, dir=cache_dir))
        pool = None
        if clip_runner is None and options.nworkers > 1 and not landmarks_cached(cache_dir, options.frame_range):
            # A first run: start the workers now; their start-up overlaps the landmark pass.
            pool = stack.enter_context(WorkerPool(options.nworkers, cuda=session.device.type == "cuda"))
        threads = torch.get_num_threads()
        if options.threads:
            torch.set_num_threads(options.threads)
        try:
            return _run(session, detector, video_path, video_info, res_folder, options, info_extra or {}, progress,
                        on_frame, cache_dir, names, t_start, clip_runner, pool,
                        seg_dir if clip_runner is None else None)
        finally:
            if options.threads:  # else the count is the adaptive governor's (core.threads): leave it
                torch.set_num_threads(threads)


def _run(session, detector, video_path, video_info, res_folder, options, info_extra, progress, on_frame, cache_dir,
         names, t_start, clip_runner, pool=None, seg_dir=None):
    timings: Dict[str, float] = {}
    cfg = session.fitter.cfg
    tar_size = session.camera.image_size

    # 1. landmarks (keeping the frames the identity fit will most likely use: no seeking back)
    t0 = time.perf_counter()
    # With chains (fitted from kept crops), the pass also cuts the crops: the workers then
    # need not decode the video for them.
    cut = (options.padding_ratio, tar_size) if clip_runner is None and options.shape_seeds else None
    track = landmark_pass(video_path, detector, cache_dir, progress=progress, checkpoint_s=options.checkpoint_s,
                          frame_range=options.frame_range, keep=_planned_shape_frames(video_info, options),
                          crops=cut, crop_bytes=CHAIN_CROP_BYTES,
                          ahead=pool is not None and pool.method == "forkserver")
    timings["landmarks_s"] = time.perf_counter() - t0
    n, first = track.num_frames, track.start
    no_face = track.frames_without_face
    n_face = n - len(no_face)
    span = f"the {n} frames of '{video_path}'" if options.frame_range is None else \
        f"the {n} frames {first}-{track.stop - 1} of '{video_path}'"
    if n_face == 0:
        raise UserError(f"no face found in any of {span}")
    if no_face:
        log.warning("%d of %d frames have no face (they get no fit and show the original frame): %s",
                    len(no_face), n, _ranges(no_face))
    boxes = track.crop_boxes(options.padding_ratio)
    # What the fits aim at: the track smoothed over time (--lm_smooth). The landmark NME,
    # the pkl and the exports keep the detector's landmarks (``track``).
    fit_track = track.smoothed(options.lm_smooth)
    # The clips of stage 3 (source frame bounds) and each worker's threads.
    n_clips = options.nworkers if clip_runner is None else clip_runner.clips_for(n)
    clips = [(first + a, first + b) for a, b in split_clips(n, n_clips)]
    cores = options.cores or cpu_count()
    threads = options.threads or threads_per_worker(cores, len(clips) if clip_runner is None else 1)
    if pool is not None and track.crops is not None and session.device.type == "cpu":
        # The workers wait for their jobs through the identity fit, which keeps one core
        # busy: each opens the video now and seeks to where its clip's compose will read.
        pool.prepare([(video_path, start, track.source_timestamps(), threads) for start, _ in clips])

    # 2. identity and albedo
    t0 = time.perf_counter()
    base_key = digest({"v": CACHE_VERSION, "landmarks": landmark_key(video_path, detector, options.frame_range),
                       "config": cfg.as_dict(), "tar_size": tar_size, "padding": options.padding_ratio,
                       "model": model_fingerprint(session.model), "renderer": session.renderer.backend,
                       **({"focal": options.focal, "principal": options.principal} if options.frame_camera else {}),
                       **({"lm_smooth": options.lm_smooth} if options.lm_smooth else {})})
    shape = fit_shape(session, fit_track, video_path, options, cache_dir, base_key)
    timings["shape_s"] = time.perf_counter() - t0

    # 3. per-frame fits (clip bounds in source frame indices)
    t0 = time.perf_counter()
    devices = worker_devices(session, len(clips), options.ngpus)
    shape_key = digest({"base": base_key, "id": array_digest(shape.id, shape.tex),
                        **({"camera": shape.camera.as_dict()} if shape.camera else {})})
    jobs, results = _clip_jobs(session, video_path, track, fit_track, boxes, shape, clips, devices, threads, options,
                               cache_dir, shape_key, seg_dir)
    reused = len(clips) - len(jobs)
    todo = sum(j.stop - j.start for j in jobs)
    if not jobs:
        log.info("fitting: all %d clip%s reused from %s", len(clips), "s" if len(clips) > 1 else "", cache_dir)
    else:
        if reused:
            log.info("fitting: reusing %d of %d finished clips from %s", reused, len(clips), cache_dir)
        log.info("fitting %d frames in %d clip(s) on %s (%s%d thread(s) each)", todo, len(jobs),
                 ", ".join(sorted(set(j.session.device for j in jobs))),
                 "adaptive, at most " if options.threads is None else "", threads)
        n_cpu = sum(j.session.device == "cpu" for j in jobs) if clip_runner is None else 1  # a runner: one at a time
        warning = cpu_oversubscription(n_cpu, cores, threads) if n_cpu > 1 else None
        if warning:
            log.warning("%s", warning)
    with tqdm(total=todo, desc="fitting", unit="frame", disable=not progress or not jobs) as bar:
        def frame_done(event: FrameDone) -> None:
            bar.update(1)
            if on_frame is not None:
                on_frame(event)

        if clip_runner is None:
            run_workers(jobs, on_frame=frame_done, pool=pool)
        else:
            clip_runner.run(jobs, on_frame=frame_done)
    if pool is not None:  # its processes without a job (clips from the cache) end now
        pool.close()
    for job in jobs:
        loaded = load_npz(job.cache_path, job.key)
        if loaded is None:
            raise UserError(f"worker {job.worker} failed: its result {job.cache_path} is missing")
        results[job.worker] = loaded
    timings["fit_s"] = time.perf_counter() - t0
    timings["fit_frames"] = todo

    # 4. merge and write (merged arrays by position in the track; pkl keys are source indices)
    merged = merge_clips(results, len(clips), first, n)
    fitted = merged["fitted"]
    lost = np.flatnonzero(track.has_face & ~fitted)
    if lost.size:
        raise UserError(f"internal error: frames {(lost[:5] + first).tolist()} have a face but no fit")
    pkl = pkl_contents(track, boxes, shape, merged, tar_size, options.frame_range is not None)

    t0 = time.perf_counter()
    final = {key: os.path.join(res_folder, name) for key, name in names.items()}
    try:
        os.makedirs(res_folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder '{res_folder}': {e.strerror or e}") from None
    meshes = None
    if options.save_meshes:
        meshes = np.full((n, session.model.num_vertices, 3), np.nan, dtype=np.float16)
    segments, nme, inline = _compose_rest(session, video_path, track, boxes, shape, merged, clips, jobs, progress,
                                          meshes)
    with video_writer(final["video"], video_path, track, options, segments=segments) as writer:
        if not segments:  # nothing composed while fitting (every clip from the cache): all of it here
            part = render_video(session, video_path, track, boxes, shape, merged, writer, progress,
                                meshes=meshes is not None)
            nme = gather_parts([part], first, n, meshes)
        else:
            writer.finish()  # the join (checked), timed with this stage
        timings["render_s"] = time.perf_counter() - t0
        timings["composed_while_fitting"] = inline
        export = None
        if "nerf" in options.export:
            idx = np.flatnonzero(fitted)

            def export(folder):
                write_nerf(folder, shape.camera, idx + first, shape.id, merged["exp"][idx], merged["angles"][idx],
                           merged["trans"][idx], track.landmarks[idx])
        timings["total_s"] = time.perf_counter() - t_start
        info = _info(session, detector, video_path, track, shape, options, timings, nme, len(jobs), devices,
                     threads, reused, info_extra)
        written = {k: v for k, v in final.items() if k in ("pkl", "video", "info")
                   or (k == "meshes" and meshes is not None) or (k == "nerf" and export is not None)}
        commit_outputs(writer, final, pkl, info, res_folder, meshes=meshes, export=export)
    final = written
    log.info("%d frames (%d with a fit, %d without a face) -> %s", n, int(fitted.sum()), len(no_face),
             ", ".join(final.values()))
    speeds = ", ".join(f"{stage} " + ("reused" if info["fps"][stage] is None else f"{info['fps'][stage]:.{d}f} fps")
                       for stage, d in (("landmarks", 1), ("fitting", 2)))
    speeds += ", rendering " + ("while fitting" if inline == n else f"{info['fps']['rendering']:.1f} fps"
                                + (f" ({inline} frames while fitting)" if inline else ""))
    log.info("speed: %s; landmark NME %.1f%% of the inter-ocular distance (mean over frames)", speeds,
             100.0 * nme["mean"])
    return VideoReport(files=final, num_frames=n, frames_without_face=no_face, timings=timings, info=info)


def _planned_shape_frames(info, options: VideoOptions) -> List[int]:
    """The identity fit's frames when every frame has a face, from the container's frame
    count in ``info`` (:class:`core.io.video.VideoInfo`; an estimate: frames that turn out
    different are read again later)."""
    n, w, h = info.num_frames or 0, info.width, info.height
    if w * h * 3 * options.nframes_shape > KEEP_FRAMES_BYTES:
        return []  # too much memory: the identity fit seeks to its frames
    start, stop = options.frame_range or (0, None)
    stop = n if stop is None else min(int(stop), n)
    return planned_shape_frames(max(0, stop - int(start)), int(start), options.nframes_shape)


def _compose_rest(session, video_path, track, boxes, shape, merged, clips, jobs, progress, meshes):
    """The composed video's parts when the workers composed some clips while fitting them:
    [(segment path, frames)] in order, the video's figures (:func:`gather_parts`) and how
    many frames the workers composed; the clips they did not compose (from the cache, or
    resumed) are rendered here into segments of their own. ([], None, 0) when they composed
    none. ``meshes`` is filled from all of them."""
    done = {}
    for job in jobs:
        arrays = load_npz(segment_arrays_path(job.segment), job.key) if job.segment else None
        if arrays is not None and os.path.isfile(job.segment):
            done[(job.start, job.stop)] = (job.segment, arrays)
    if not done:
        return [], None, 0
    first = track.start
    segments, parts = [], []
    for a, b in clips:
        if (a, b) in done:
            path, arrays = done[(a, b)]
        else:
            path = os.path.join(os.path.dirname(jobs[0].segment), f"here_{a:07d}_{b:07d}.mp4")
            with VideoWriter(path, (track.width, track.height), track.fps) as writer:
                arrays = render_video(session, video_path, track, boxes, shape, merged, writer, progress,
                                      meshes=meshes is not None, span=(a - first, b - first))
        segments.append((path, b - a))
        parts.append(arrays)
    inline = sum(b - a for a, b in done)
    return segments, gather_parts(parts, first, track.num_frames, meshes), inline


def _clip_jobs(session, video_path, track, fit_track, boxes, shape, clips, devices, threads, options, cache_dir,
               shape_key, seg_dir=None):
    """The jobs of the clips that are not cached yet, and the cached clips' results
    ({clip index: arrays}). The frames are fitted to ``fit_track``'s landmarks and their
    NMEs measured against ``track``'s. With ``seg_dir``, each job also composes its clip
    into a video there (:func:`fit_clip`)."""
    cfg, first = session.fitter.cfg, track.start
    source_ts = track.source_timestamps()
    spec = None  # built for the first job (a model on a GPU is copied to the CPU)
    jobs, results = [], {}
    seed_frames = chain_seeds(shape.frames, first, track.stop, options.clip_overlap) \
        if options.shape_seeds and shape.coeffs else []
    tar = session.camera.image_size
    for k, (start, stop) in enumerate(clips):
        # With a seed's chain in the clip, the first chain runs backwards from it: no cold
        # start, no warm-up frames before the clip. Else it starts cold clip_overlap frames early.
        cold = max(first, start - options.clip_overlap)  # where a forward first chain starts
        near = {f: v for f, v in shape.seeds(cold + 1, stop).items() if f in seed_frames}
        seeds = {f: v for f, v in near.items() if f > start}
        back = bool(seeds) and first_chain_back(start, stop, seeds, options.clip_overlap, tar)
        fit_start = start if back else cold
        if not back:
            seeds = near
        if seeds and not lockstep_pays(fit_start, stop, seeds, options.clip_overlap, tar):
            seeds = {}  # chains too long to keep side by side: one chain, composed as it is read
        key = digest({"shape": shape_key, "fit_start": fit_start, "start": start, "stop": stop,
                      "rest_nrf_lr": cfg.rest_nrf_lr, "overlap": options.clip_overlap,
                      **({"seeds": {str(f): array_digest(*v.values()) for f, v in sorted(seeds.items())}} if seeds else {}),
                      **({"first_back": True} if back else {})})
        cache_path = os.path.join(cache_dir, f"clip_{start:07d}_{stop:07d}.npz")
        cached = load_npz(cache_path, key)
        if cached is not None:
            results[k] = cached
            continue
        spec = spec or SessionSpec.of(session)
        jobs.append(ClipJob(
            worker=k, session=replace(spec, device=devices[k]), video_path=video_path, timestamps=source_ts,
            fit_start=fit_start, start=start, stop=stop, landmarks=fit_track.landmarks[fit_start - first:stop - first],
            target_landmarks=None if fit_track is track else track.landmarks[fit_start - first:stop - first],
            crop_boxes=boxes[fit_start - first:stop - first], id=shape.id, tex=shape.tex, threads=threads,
            cache_path=cache_path, key=key, checkpoint_s=options.checkpoint_s,
            adaptive_threads=options.threads is None, camera=shape.camera,
            segment=os.path.join(seg_dir, f"clip_{start:07d}_{stop:07d}.mp4") if seg_dir else None,
            frame_size=(track.width, track.height), fps=track.fps, meshes=options.save_meshes, seeds=seeds,
            seed_warmup=options.clip_overlap, first_back=back,
            crops=track.crops[fit_start - first:stop - first] if seeds and track.crops is not None else None))
    return jobs, results


def _info(session: Session, detector, video_path: str, track: LandmarkTrack, shape: ShapeResult,
          options: VideoOptions, timings, nme, n_jobs, devices, threads, reused, extra) -> Dict[str, object]:
    """The contents of ``<video>_info.json``."""
    n = track.num_frames
    n_face = int(track.has_face.sum())

    def rate(frames, key):
        s = timings.get(key, 0.0)
        return round(frames / s, 3) if s > 0 else None

    info = {
        "video": os.path.abspath(video_path),
        "num_frames": n,
        "frame_range": [track.start, track.stop],
        "fps_source": track.fps,
        "frame_size": [track.width, track.height],
        "frames_with_fit": n_face,
        "frames_without_face": track.frames_without_face,
        "landmarks": {"detector": getattr(detector, "name", "?"),
                      "detected_frames": int((track.source == 1).sum()),
                      "tracked_frames": int((track.source == 2).sum())},
        "shape_frames": [int(v) for v in shape.frames],
        "shape_losses": {k: round(v, 6) for k, v in shape.losses.items()},
        "tar_size": session.camera.image_size,
        "padding_ratio": options.padding_ratio,
        "recon_model": session.model.name,
        "device": str(session.device),
        "worker_devices": devices,
        "nworkers": options.nworkers,
        "ngpus": options.ngpus,
        "threads_per_worker": threads,
        "clip_overlap": options.clip_overlap,
        "clips_fitted": n_jobs,
        "clips_reused": reused,
        "cache": {"folder": os.path.abspath(options.cache_folder) if options.cache_folder else None,
                  "landmarks_reused": track.reused, "shape_reused": shape.reused, "clips_reused": reused},
        "renderer": session.renderer.backend,
        "camera": _camera_info(session, shape),
        "exports": list(options.export) + (["meshes"] if options.save_meshes else []),
        "fit_config": session.fitter.cfg.as_dict(),
        "rest_nrf_lr": session.fitter.cfg.rest_nrf_lr or session.fitter.cfg.nrf_lr,
        # core.landmarks.metrics.landmark_nme (chin + 51 inner points, / eye-centre distance) as for photos:
        # a fraction; per_frame by source frame index (JSON keys are strings).
        "landmark_nme_interocular": {**{k: round(float(nme[k]), 5) for k in ("mean", "median", "p95", "max")},
                                     "per_frame": {str(i): round(v, 6) for i, v in sorted(nme["per_frame"].items())}},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        # frames per second of each stage; null for a stage reused from the cache
        "fps": {"landmarks": None if track.reused else rate(n, "landmarks_s"),
                "fitting": rate(timings.get("fit_frames", 0), "fit_s") if n_jobs else None,
                # rendering: of the frames composed after the fitting (the rest were composed while fitted)
                "rendering": rate(n - timings.get("composed_while_fitting", 0), "render_s")
                if n > timings.get("composed_while_fitting", 0) else None,
                "overall": rate(n, "total_s")},
    }
    info.update(extra)
    return info


def _camera_info(session: Session, shape: ShapeResult) -> Dict[str, object]:
    """info.json's camera: the video's frame camera (focal, principal point, 3x3
    intrinsics in frame pixels; whether the focal was estimated), or the original's crop
    camera (focal and principal point in crop pixels, the pose relative to each frame's crop)."""
    if shape.camera is not None:
        return {"model": "frame", **shape.camera_info()}
    cam = session.camera
    return {"model": "crop", "focal": cam.focal, "cx": cam.center, "cy": cam.center, "width": cam.image_size,
            "height": cam.image_size, "distance": cam.distance}


def _ranges(indices: Sequence[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]."""
    out, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(out)
