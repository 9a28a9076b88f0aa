"""The video pipeline (SPEC §5): landmarks, shared identity/albedo, per-frame fits in
worker processes, merged results and a composed video.

Stages, one module each (each with a tqdm bar, each cached under
``<cache_folder>/<video name>/`` by :mod:`.cache`):

1. :mod:`.landmarks`: one streaming pass over the video, 68 landmarks and a face box per
   frame, or "no face";
2. :mod:`.shape`: identity and albedo from ``nframes_shape`` face frames spread over the
   video, in one batched fit;
3. :mod:`.clips` and :mod:`.workers`: every frame fitted with id/tex fixed, on contiguous
   clips in ``nworkers`` processes, each warm-started from the previous frame;
4. :mod:`.compose`: ``<video>_fitting_res.pkl``, ``<video>_recon_video.mp4`` and
   ``<video>_info.json``, renamed into place together at the end.

:func:`run_video` (:mod:`.run`) runs them in order with the settings of
:class:`VideoOptions` (:mod:`.options`); its ``on_frame`` callback receives a
:class:`FrameDone` (worker, source frame, finish time) for every frame a worker finishes,
in this process, whichever process fitted it.
"""
from .cache import cache_lock
from .chains import PER_FRAME_GROUPS, transfer_pose
from .clips import ClipJob, FrameDone, fit_clip, split_clips
from .compose import output_names
from .landmarks import LandmarkTrack, landmark_pass
from .options import VideoOptions, check_frame_range, format_frame_range, parse_frame_range
from .run import VideoReport, run_video
from .shape import ShapeResult, fit_shape, select_shape_frames
from .workers import WorkerPool, cpu_oversubscription, run_workers, threads_per_worker

__all__ = ["VideoOptions", "LandmarkTrack", "ShapeResult", "ClipJob", "FrameDone", "VideoReport", "PER_FRAME_GROUPS",
           "WorkerPool", "split_clips", "select_shape_frames", "transfer_pose", "landmark_pass", "fit_shape", "fit_clip",
           "run_workers", "run_video", "output_names", "threads_per_worker", "cpu_oversubscription",
           "parse_frame_range", "format_frame_range", "check_frame_range", "cache_lock"]
