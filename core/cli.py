"""Command-line plumbing shared by the scripts: flag groups, logging, and the error
wrapper that turns a UserError into one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from .config import FitConfig, PRESETS, get_preset
from .errors import UserError

EXIT_USER_ERROR = 2


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("face model")
    g.add_argument("--recon_model", default="bfm09", choices=["bfm09", "sfm", "bfm2017", "bfm2019"],
                   help="which 3DMM: bfm09 (converted Basel 2009 + expressions), sfm (the public Surrey Face "
                        "Model, downloaded on first use, non-commercial licence), bfm2017/bfm2019 (Basel .h5) "
                        "(default: bfm09)")
    g.add_argument("--model_path", default=None,
                   help="bfm09: the converted .mat (default BFM/BFM09_model_info.mat, see BFM/README.md); "
                        "sfm: the folder with eos's SFM files (default: download to ~/.cache/3dmm-fitting/sfm); "
                        "bfm2017/2019: the .h5 file (default BFM/model2017-1_bfm_nomouth.h5)")


def add_detection_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("face detection and crop")
    g.add_argument("--lm_detector", default="auto", choices=["auto", "fan", "dlib"],
                   help="68-landmark detector: face-alignment's FAN when its weights are available, "
                        "else dlib (default: auto)")
    g.add_argument("--tar_size", type=int, default=256, help="side of the square crop that is fitted and rendered (default: 256)")
    g.add_argument("--padding_ratio", type=float, default=0.3, help="enlarge the detected face box by this ratio (default: 0.3)")


def add_fit_flags(parser: argparse.ArgumentParser, video: bool = False) -> None:
    """The SPEC §4 flags; each defaults to the chosen preset's value."""
    g = parser.add_argument_group("fitting (defaults come from --preset)")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="'original' is exactly the original schedule (Adam, 1000 rigid + 500 non-rigid iterations); "
                        "'default' is the fast schedule (default: default)")
    ref = PRESETS["original"]
    helps = {
        "first_rf_iters": "rigid iterations (photo, or a clip's first frame)",
        "first_nrf_iters": "non-rigid iterations (photo, or a clip's first frame)",
        "rest_rf_iters": "rigid iterations per following video frame",
        "rest_nrf_iters": "non-rigid iterations per following video frame",
        "rf_lr": "rigid-stage Adam learning rate", "nrf_lr": "non-rigid-stage Adam learning rate",
        "rest_nrf_lr": "non-rigid Adam learning rate of video frames warm-started from the previous one "
                       "(unset: --nrf_lr)",
        "lm_loss_w": "landmark loss weight", "rgb_loss_w": "photometric loss weight",
        "id_reg_w": "identity regulariser weight", "exp_reg_w": "expression regulariser weight",
        "tex_reg_w": "albedo regulariser weight", "tex_w": "albedo smoothness (reflectance) weight",
        "rot_reg_w": "video: rotation temporal weight", "trans_reg_w": "video: translation temporal weight",
    }
    for name, text in helps.items():
        if not video and name.startswith("rest_"):
            continue
        typ = int if name.endswith("iters") else float
        g.add_argument(f"--{name}", type=_positive(typ) if name.endswith("lr") else _non_negative(typ), default=None,
                       help=f"{text} (original: {getattr(ref, name)})")
    g.add_argument("--nonrigid_solver", choices=["adam", "gn"], default=None,
                   help="photometric stage: 'adam' (the original) or 'gn' (Gauss-Newton / Levenberg-Marquardt "
                        "steps; the non-rigid iteration counts are then the most steps) "
                        f"(original: {ref.nonrigid_solver}; default preset: {PRESETS['default'].nonrigid_solver})")


def _positive(typ):
    def parse(text: str):
        v = typ(text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
        return v
    return parse


def _non_negative(typ):
    def parse(text: str):
        v = typ(text)
        if not v >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
        return v
    return parse


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--gpu", type=int, default=None, help="GPU index used by --device auto/cuda (the original's flag)")
    g.add_argument("--renderer", default="auto", choices=["auto", "builtin", "pytorch3d"],
                   help="rasterizer: pytorch3d when it imports, else the built-in one (default: auto)")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    g.add_argument("--verbose", action="store_true", help="debug logging")


def fit_config_from_args(args: argparse.Namespace) -> FitConfig:
    cfg = get_preset(args.preset)
    names = [n for n in cfg.as_dict() if hasattr(args, n)]
    return cfg.with_overrides(**{n: getattr(args, n) for n in names})


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def run_main(main: Callable[[Sequence[str]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)``; a UserError becomes ``error: <message>`` on stderr and exit 2,
    Ctrl-C exit 130."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
