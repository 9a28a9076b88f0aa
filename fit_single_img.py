#!/usr/bin/env python
"""Fit a 3D Morphable Face Model to one or more photos.

    python fit_single_img.py --img_path data/astronaut.jpg --res_folder results

Writes, per photo: the coefficients, <name>_mesh.obj (posed vertices with colours),
<name>_composed_img.jpg (the render pasted on the photo) and <name>_info.json (crop box,
landmarks, losses, timings). The coefficients are <name>_coeffs.npy for BFM09 (257 float32:
id 80 | exp 64 | tex 80 | angles 3 | gamma 27 | trans 3) and <name>_coeffs.npz for the other
models (the named arrays id, exp, tex, angles, gamma, trans with the model's own sizes; the
bundled Surrey Face Model, used when BFM/BFM09_model_info.mat is absent, has id 63, exp 6,
tex 0).

Exit status: 0 every photo fitted, 1 some photos skipped (each named on stderr), 2 bad
input or an output that cannot be written (one line on stderr, nothing half-written).

Under torchrun (README "Datasets on many machines") the photos are shared out in batches
of --batch_size to the next free rank, photos already written are skipped, and
<res_folder>/manifest.json says which rank did what.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from core import defaults
from core.pipelines import cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__)
    g = p.add_argument_group("input and output")
    g.add_argument("--img_path", required=True, nargs="+",
                   help="photo(s) to fit, or folders of photos")
    g.add_argument("--res_folder", required=True, help="output folder")
    g.add_argument("--face_index", default=defaults.FACE_INDEX,
                   help="which face when a photo has several: 'largest' or an index into the faces sorted "
                        "by size, 0 = largest (default: %(default)s)")
    g.add_argument("--batch_size", type=cli.positive_int, default=defaults.PHOTO_BATCH_SIZE,
                   help="photos fitted together in one batch (default: %(default)s)")
    g.add_argument("--cache_folder", default="fitting_cache", help="accepted for compatibility (photos need no cache)")
    g.add_argument("--focal", type=cli.focal_length, default=None, metavar="auto|PIXELS",
                   help="fit each photo with a pinhole camera for the whole photo (principal point at its centre) "
                        "of this focal length in photo pixels, or 'auto' to estimate it per photo; info.json "
                        "reports it with the 3x3 intrinsics (default: the original's crop camera)")
    cli.add_model_flags(p)
    cli.add_detection_flags(p)
    cli.add_fit_flags(p)
    cli.add_runtime_flags(p)
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    with cli.started(args) as ranks:  # torchrun's ranks (a world of one without torchrun)
        return _fit(args, ranks)


def _fit(args: argparse.Namespace, ranks) -> int:
    from core.errors import UserError
    from core.io.outputs import check_writable_folder
    from core.pipelines.dataset.photos import run_photo_dataset
    from core.pipelines.photo import expand_inputs, run_photos

    face_index = args.face_index if args.face_index == "largest" else _int(args.face_index, "--face_index")
    paths = expand_inputs(args.img_path, res_folder=args.res_folder)
    check_writable_folder(args.res_folder, "--res_folder")
    session, detector = cli.session_from_args(args, ranks, cli.show_progress(args, ranks))
    photo_args = dict(padding_ratio=args.padding_ratio, face_index=face_index, focal=args.focal,
                      info_extra={"detector": detector.name, "preset": args.preset,
                                  "fit_config": session.fitter.cfg.as_dict()})
    if ranks.distributed:  # batches of photos handed out to the ranks, with a manifest
        return run_photo_dataset(ranks, session, detector, paths, args.res_folder, args.batch_size, **photo_args)
    report = run_photos(session, detector, paths, args.res_folder, batch_size=args.batch_size, **photo_args)
    if not report.written:
        raise UserError("no photo could be fitted")
    return 1 if report.failed else 0


def _int(text: str, flag: str) -> int:
    from core.errors import UserError
    try:
        v = int(text)
    except ValueError:
        raise UserError(f"{flag} must be 'largest' or a face index (0 = largest); got '{text}'") from None
    if v < 0:
        raise UserError(f"{flag} must be >= 0; got {v}")
    return v


if __name__ == "__main__":
    cli.exit_process(cli.run_main(main))
