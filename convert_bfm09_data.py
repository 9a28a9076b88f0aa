"""Convert the Basel Face Model 2009 into BFM/BFM09_model_info.mat (SPEC §1).

    python convert_bfm09_data.py [--bfm_folder BFM] [--out BFM/BFM09_model_info.mat]
                                 [--download] [--from_front_mat PATH] [--quiet]

See BFM/README.md for where the input files come from. The work is done by the package
core/models/convert_bfm09/.
"""
from __future__ import annotations

import argparse
import logging
import sys

from core.models import convert_bfm09
from core.io.atomic import ignore_file_size_signal
from core.errors import UserError


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error of the script."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description="Convert the Basel Face Model 2009 (01_MorphableModel.mat), the "
                    "expression basis (Exp_Pca.bin) and Deep3DFaceReconstruction's index "
                    "files into the face model used for fitting. See BFM/README.md.")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--bfm_folder", default="BFM",
        help="folder holding 01_MorphableModel.mat, Exp_Pca.bin and the index files "
             "BFM_exp_idx.mat, BFM_front_idx.mat, facemodel_info.mat, std_exp.txt "
             "(or Deep3DFaceRecon_pytorch's BFM_model_front.mat instead) (default: BFM)")
    inputs.add_argument(
        "--download", action="store_true",
        help="download the missing index files from Deep3DFaceReconstruction's BFM/ folder "
             "on GitHub (MIT licence) into --bfm_folder, checked against their known "
             "sha256 before use")
    inputs.add_argument(
        "--from_front_mat", metavar="PATH", default=None,
        help="take the model from Deep3DFaceRecon_pytorch's already converted "
             "BFM_model_front.mat instead of the Basel files (used automatically when "
             "--bfm_folder has it but no 01_MorphableModel.mat)")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", default=None,
        help="converted model to write, replaced atomically "
             "(default: <bfm_folder>/BFM09_model_info.mat)")
    output.add_argument(
        "--quiet", action="store_true",
        help="no progress messages; only the summary line (stdout) and errors (stderr)")
    return parser


def main(argv: list[str] | None = None) -> int:
    ignore_file_size_signal()  # ulimit -f: an EFBIG write error (one line), not a silent kill
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    core_log = logging.getLogger("core")
    saved_level = core_log.level
    core_log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        summary = convert_bfm09.convert_folder(args.bfm_folder, out=args.out,
                                               download=args.download,
                                               from_front_mat=args.from_front_mat)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # main() may run inside another program (tests): leave its logging as it was
        core_log.setLevel(saved_level)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
