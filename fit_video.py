#!/usr/bin/env python
"""Fit a 3D Morphable Face Model to every frame of a talking-head video.

    python fit_video.py --v_path clip.mp4 --res_folder results --ngpus 4 --nworkers 4

Stages: landmarks for every frame (the face is detected once and then tracked), identity
and albedo from --nframes_shape frames spread over the video, then every frame's
expression, light and pose with identity and albedo fixed, by --nworkers processes on
contiguous clips (on GPU i mod --ngpus, or on the CPU, which the workers share).

Writes <video>_fitting_res.pkl ({'id', 'tex', 'fitting_res': {frame: {'rot', 'trans',
'gamma', 'exp', 'bbox'}}, 'tar_size', 'fps', 'frames_without_face', 'num_frames'}),
<video>_recon_video.mp4 (H.264, source fps and size, every frame; frames without a face
show the original) and <video>_info.json (timings, devices, landmark error). Every stage is
cached in --cache_folder; a re-run after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from core import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input and output")
    g.add_argument("--v_path", required=True, help="video to fit (anything OpenCV/FFmpeg decodes)")
    g.add_argument("--res_folder", required=True, help="output folder")
    g.add_argument("--cache_folder", default="fitting_cache",
                   help="folder for the per-stage caches, reused by re-runs (default: fitting_cache; "
                        "'' for a temporary one)")
    g.add_argument("--no_audio", action="store_true", help="do not copy the source's audio into the composed video")
    v = p.add_argument_group("video fitting")
    v.add_argument("--nframes_shape", type=int, default=16,
                   help="frames, spread over the video, used to estimate identity and albedo (default: 16)")
    v.add_argument("--nworkers", type=int, default=1, help="fitting processes, each on a contiguous clip (default: 1)")
    v.add_argument("--ngpus", type=int, default=1, help="GPUs the workers use, worker i on GPU i mod ngpus (default: 1)")
    v.add_argument("--clip_overlap", type=int, default=8,
                   help="warm-up frames fitted and dropped before each clip after the first, so the result does "
                        "not depend on the worker count (default: 8; 0 = the original)")
    v.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: every core for the shape fit and rendering, "
                        "cores // nworkers for each worker)")
    cli.add_model_flags(p)
    cli.add_detection_flags(p)
    cli.add_fit_flags(p, video=True)
    cli.add_runtime_flags(p)
    return p


def video_options(args: argparse.Namespace):
    """The :class:`core.video.VideoOptions` of parsed flags."""
    from core.video import VideoOptions

    return VideoOptions(nframes_shape=args.nframes_shape, nworkers=args.nworkers, ngpus=args.ngpus,
                        clip_overlap=args.clip_overlap, cache_folder=args.cache_folder or None,
                        padding_ratio=args.padding_ratio, keep_audio=not args.no_audio, threads=args.threads)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args)
    from core.errors import UserError
    from core.detect import make_detector
    from core.session import Session, load_model
    from core.video import run_video
    from core.video_io import VideoReader

    for flag in ("nworkers", "ngpus", "nframes_shape"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1; got {getattr(args, flag)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1; got {args.threads}")
    if args.clip_overlap < 0:
        raise UserError(f"--clip_overlap must be >= 0; got {args.clip_overlap}")
    if os.path.exists(args.res_folder) and not os.path.isdir(args.res_folder):
        raise UserError(f"--res_folder '{args.res_folder}' exists and is not a folder")
    VideoReader(args.v_path).close()  # a bad video fails before the model loads
    cfg = cli.fit_config_from_args(args)
    model = load_model(args.recon_model, args.model_path)
    session = Session.create(model, cfg, tar_size=args.tar_size, device=args.device, gpu=args.gpu,
                             renderer=args.renderer, progress=not args.quiet)
    detector = make_detector(args.lm_detector, device=str(session.device))
    logging.getLogger(__name__).info("model %s (%d vertices) on %s, renderer %s, preset %s",
                                     model.name, model.num_vertices, session.device, session.renderer.backend,
                                     args.preset)
    options = video_options(args)
    run_video(session, detector, args.v_path, args.res_folder, options,
              info_extra={"detector": detector.name, "preset": args.preset}, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
