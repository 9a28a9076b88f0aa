#!/usr/bin/env python
"""Fit a 3D Morphable Face Model to every frame of a talking-head video.

    python fit_video.py --v_path clip.mp4 --res_folder results --ngpus 4 --nworkers 4
    python fit_video.py --v_path long.mp4 --res_folder results --frame_range 100:250

Stages: landmarks for every frame (the face is detected once and then tracked), identity
and albedo from --nframes_shape frames spread over the video, then every frame's
expression, light and pose with identity and albedo fixed, by --nworkers processes on
contiguous clips (on GPU i mod --ngpus, or on the CPU, which the workers share).

Writes <video>_fitting_res.pkl ({'id', 'tex', 'fitting_res': {frame: {'rot', 'trans',
'gamma', 'exp', 'bbox'}}, 'tar_size', 'fps', 'frames_without_face', 'num_frames'}),
<video>_recon_video.mp4 (H.264, source fps and size, every frame; frames without a face
show the original) and <video>_info.json (timings, devices, landmark error). Every stage is
cached in --cache_folder; a re-run after an interruption continues where it stopped (one
run at a time per cache folder: a second one fails at once).

--v_path may also be a folder of videos or a .txt file listing them, and the script runs
unchanged under torchrun (one machine or many: README "Datasets on many machines"): each
video is a unit that the next free rank takes, finished videos are skipped on a re-run,
and <res_folder>/manifest.json says which rank did what (exit status 1 when a video failed).

--frame_range START:STOP fits only the source frames START..STOP-1 (0-based, either side
may be empty: 100: to the end, :250 from the start): only they are read, fitted and
composed; the pkl keeps source frame indices as keys, its num_frames counts the range and
its 'frame_range' is [START, STOP] as fitted (STOP clipped to the end of the video).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from core.pipelines import cli


CACHE_FOLDER = "fitting_cache"  # relative to the working directory, as in the original


def build_parser() -> argparse.ArgumentParser:
    from core.pipelines.video import VideoOptions

    defaults = VideoOptions()
    p = cli.make_parser(__doc__)
    g = p.add_argument_group("input and output")
    g.add_argument("--v_path", required=True, help="video to fit (anything OpenCV/FFmpeg decodes), a folder of videos, "
                                                   "or a .txt file listing them, one per line")
    g.add_argument("--res_folder", required=True, help="output folder")
    g.add_argument("--cache_folder", default=CACHE_FOLDER,
                   help=f"folder for the per-stage caches, reused by re-runs (default: {CACHE_FOLDER}; "
                        "'' for a temporary one)")
    g.add_argument("--no_audio", action="store_true", help="do not copy the source's audio into the composed video")
    g.add_argument("--frame_range", default=None, metavar="START:STOP",
                   help="fit only source frames START..STOP-1 (0-based, STOP excluded; either may be empty: "
                        "'100:' to the end, ':250' from the start); outputs keep source frame indices "
                        "(default: every frame)")
    v = p.add_argument_group("video fitting")
    v.add_argument("--nframes_shape", type=cli.positive_int, default=None,
                   help="frames, spread over the video, used to estimate identity and albedo "
                        "(default: from --preset: original 16, default 8)")
    v.add_argument("--nworkers", type=cli.positive_int, default=defaults.nworkers,
                   help=f"fitting processes, each on a contiguous clip (default: {defaults.nworkers})")
    v.add_argument("--ngpus", type=cli.positive_int, default=defaults.ngpus,
                   help=f"GPUs the workers use, worker i on GPU i mod ngpus (default: {defaults.ngpus})")
    v.add_argument("--clip_overlap", type=cli.non_negative_int, default=defaults.clip_overlap,
                   help="warm-up frames fitted and dropped before each clip after the first, so the result does "
                        f"not depend on the worker count (default: {defaults.clip_overlap}; 0 = the original)")
    v.add_argument("--clip_frames", type=cli.non_negative_int, default=None, metavar="N",
                   help="under torchrun with several ranks: fit each video in clips of at most N frames, which "
                        "ranks with no video of their own left help with (default: 1000; 0: each video by its "
                        "own rank alone, with --nworkers processes)")
    v.add_argument("--lm_smooth", type=cli.non_negative_int, default=None, metavar="N",
                   help="smooth the inner landmarks' tracks (not the jaw contour) over N frames (odd) before "
                        "fitting: a Savitzky-Golay filter (quadratic), which does not lag behind motion, within runs "
                        "of tracked frames; "
                        "the NME and the outputs keep the detector's landmarks; 0: off (default: from --preset: "
                        "original 0, default 5)")
    v.add_argument("--shape_seeds", choices=["on", "off"], default=None,
                   help="'on': the identity frames, already fitted with the identity, also start chains of "
                        "warm-started frames, and each worker fits its clip's chains in lockstep batches (faster, "
                        "above all on a GPU); 'off': each clip one chain, every frame warm-started from the one "
                        "before, as the original (default: from --preset: original off, default on)")
    c = p.add_argument_group("camera and exports (README: 'Use with talking-head pipelines')")
    c.add_argument("--focal", type=cli.focal_length, default=None, metavar="auto|PIXELS",
                   help="fit the video with one pinhole camera for the whole frame (principal point at the frame "
                        "centre) of this focal length in source-frame pixels, or 'auto': the one the landmarks "
                        "fit best, else a 50-degree field of view (info.json's camera.focal_source says which); "
                        "the pose is then the head's pose in that camera (default: the original's camera of each "
                        "frame's crop)")
    c.add_argument("--principal", type=cli.principal_point, default=None, metavar="CX,CY",
                   help="the frame camera's principal point in source pixels (default: the frame centre; implies "
                        "the frame camera)")
    c.add_argument("--export", action="append", choices=["nerf"], default=None,
                   help="'nerf': <video>_nerf/ with transforms_train.json, transforms_val.json, track_params.pt "
                        "and the landmarks (implies the frame camera; --focal auto unless given)")
    c.add_argument("--save_meshes", action="store_true",
                   help="write <video>_meshes.npy: every frame's posed vertices, float16 (frames, V, 3) "
                        "(implies the frame camera)")
    cli.add_model_flags(p)
    cli.add_detection_flags(p)
    cli.add_fit_flags(p, video=True)
    cli.add_runtime_flags(p, threads_help="CPU threads per process (default: adaptive: every core that other "
                                          "programs leave free for the shape fit and rendering, at most "
                                          "cores // nworkers for each worker, re-checked while fitting)")
    return p


def video_options(args: argparse.Namespace):
    """The :class:`core.pipelines.video.VideoOptions` of parsed flags (UserError for a bad
    --frame_range)."""
    from core.pipelines.video import VideoOptions, parse_frame_range

    frame_range = parse_frame_range(args.frame_range) if args.frame_range is not None else None
    return VideoOptions(nframes_shape=args.nframes_shape, nworkers=args.nworkers, ngpus=args.ngpus,
                        clip_overlap=args.clip_overlap, cache_folder=args.cache_folder or None,
                        padding_ratio=args.padding_ratio, keep_audio=not args.no_audio, threads=args.threads,
                        frame_range=frame_range, focal=args.focal, export=tuple(dict.fromkeys(args.export or ())),
                        save_meshes=args.save_meshes, principal=args.principal, lm_smooth=args.lm_smooth,
                        shape_seeds=None if args.shape_seeds is None else args.shape_seeds == "on")


def main(argv: Sequence[str]) -> int:
    from core.pipelines import forkserver

    # The workers' server imports torch beside this process's imports, not beside the landmark pass.
    forkserver.start_for_argv(argv)
    args = build_parser().parse_args(argv)
    with cli.started(args) as ranks:  # torchrun's ranks (a world of one without torchrun)
        return _fit(args, ranks)


def _fit(args: argparse.Namespace, ranks) -> int:
    from dataclasses import replace

    from core.io.outputs import check_writable_folder
    from core.pipelines.dataset.videos import expand_videos, is_video_list, run_video_dataset
    from core.pipelines.video import check_frame_range, run_video
    from core.io.video import VideoReader

    dataset = ranks.distributed or is_video_list(args.v_path)
    check_writable_folder(args.res_folder, "--res_folder")
    if args.cache_folder:
        check_writable_folder(args.cache_folder, "--cache_folder")
    options = video_options(args)  # a bad --frame_range fails here
    if dataset:
        videos = expand_videos(args.v_path, res_folder=args.res_folder)
        if args.threads is None:
            options = replace(options, cores=ranks.cpu_threads())
    else:
        VideoReader(args.v_path).close()  # a bad video fails before the model loads
        check_frame_range(args.v_path, options.frame_range)
    progress = cli.show_progress(args, ranks)
    session, detector = cli.session_from_args(args, ranks, progress)
    extra = {"detector": detector.name, "preset": args.preset}
    if dataset:
        return run_video_dataset(ranks, session, detector, videos, args.res_folder, options, info_extra=extra,
                                 progress=progress, **({} if args.clip_frames is None else
                                                       {"clip_frames": args.clip_frames}))
    run_video(session, detector, args.v_path, args.res_folder, options, info_extra=extra, progress=progress)
    return 0


if __name__ == "__main__":
    cli.exit_process(cli.run_main(main))
