"""Command-line plumbing shared by the scripts: the parser (one-line errors), flag groups,
logging, threads, and the wrapper that turns every failure into one line on stderr.

Streams: progress messages (INFO) go to stdout, warnings and errors to stderr, progress
bars to stderr only when it is a terminal. A failing run therefore prints exactly one
line on stderr, ``error: <what is wrong>``, and exits 2 (bad input, unwritable or full
disk, broken media), 1 (an unexpected internal error: ``--verbose`` shows the traceback)
or 130 (Ctrl-C).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from typing import Callable, NoReturn, Optional, Sequence

from core import defaults
from core.io.atomic import ignore_file_size_signal
from core.malloc import keep_freed_memory
from core.fit.config import FitConfig, PRESETS, get_preset
from core.models.registry import MODEL_NAMES
from core.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``error: <message> (see --help)``, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def make_parser(doc: Optional[str]) -> ArgumentParser:
    """The scripts' parser: the module docstring as description, one-line errors."""
    return ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("face model")
    g.add_argument("--recon_model", default=None, choices=MODEL_NAMES,
                   help="which 3DMM: bfm09 (converted Basel 2009 + expressions), sfm (the public Surrey Face "
                        "Model, bundled in BFM/sfm, free for non-commercial use), bfm2017/bfm2019 (Basel .h5) "
                        "(default: bfm09 when BFM/BFM09_model_info.mat exists or --model_path is given, else the "
                        "bundled sfm, said in the log)")
    g.add_argument("--model_path", default=None,
                   help="bfm09: the converted .mat (default BFM/BFM09_model_info.mat, see BFM/README.md); "
                        "sfm: a folder with eos's SFM files (default: the bundled BFM/sfm); "
                        "bfm2017/2019: the .h5 file (default BFM/model2017-1_bfm_nomouth.h5)")


def add_detection_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("face detection and crop")
    g.add_argument("--lm_detector", default=defaults.LM_DETECTOR, choices=["auto", "fan", "dlib"],
                   help="68-landmark detector: face-alignment's FAN when its weights are available, "
                        "else dlib (default: %(default)s)")
    g.add_argument("--tar_size", type=_ranged(int, 32, 4096), default=defaults.TAR_SIZE,
                   help="side of the square crop that is fitted and rendered, 32..4096 (default: %(default)s)")
    g.add_argument("--padding_ratio", type=_ranged(float, 0.0, 10.0), default=defaults.PADDING_RATIO,
                   help="enlarge the detected face box by this ratio, 0..10 (default: %(default)s)")


def add_fit_flags(parser: argparse.ArgumentParser, video: bool = False) -> None:
    """The SPEC §4 flags; each defaults to the chosen preset's value."""
    g = parser.add_argument_group("fitting (defaults come from --preset)")
    g.add_argument("--preset", default=defaults.PRESET, choices=sorted(PRESETS),
                   help="'original' is exactly the original schedule (Adam, 1000 rigid + 500 non-rigid iterations); "
                        "'default' is the fast schedule (default: %(default)s)")
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
        "lm_jaw_w": "relative weight of the jaw-contour landmarks (iBUG 1-17)",
        "lm_heavy_w": "relative weight of the nose-bridge and mouth landmarks (iBUG 29-31, 49-68)",
        "lm_inner_w": "relative weight of the other landmarks (brows, nose, eyes)",
        "lm_robust_px": "robust landmark loss: Charbonnier scale in crop pixels (0: squared distances, SPEC)",
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


def _number(typ, text: str):
    try:
        v = typ(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if typ is int else 'a number'}; got '{text}'") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
    return v


def _positive(typ):
    def parse(text: str):
        v = _number(typ, text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
        return v
    return parse


def _non_negative(typ):
    def parse(text: str):
        v = _number(typ, text)
        if not v >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
        return v
    return parse


def _ranged(typ, lo, hi):
    def parse(text: str):
        v = _number(typ, text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}; got {text}")
        return v
    return parse


def focal_length(text: str):
    """argparse type of --focal: 'auto' or a focal length in pixels (> 0)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a focal length in pixels; got '{text}'") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"a focal length must be a number of pixels > 0; got '{text}'")
    return value


def principal_point(text: str):
    """argparse type of --principal: 'CX,CY' in pixels."""
    try:
        cx, cy = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CX,CY in pixels (e.g. 640,360); got '{text}'") from None
    if not (math.isfinite(cx) and math.isfinite(cy)):
        raise argparse.ArgumentTypeError(f"expected finite pixel coordinates; got '{text}'")
    return cx, cy


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    v = _number(int, text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {text}")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _non_negative(int)(text)


def add_runtime_flags(parser: argparse.ArgumentParser, threads_help: Optional[str] = None) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=defaults.DEVICE, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--gpu", type=int, default=None, help="GPU index used by --device auto/cuda (the original's flag)")
    g.add_argument("--renderer", default=defaults.RENDERER, choices=["auto", "builtin", "pytorch3d"],
                   help="rasterizer: pytorch3d when it imports, else the built-in one (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help=threads_help or "CPU threads (default: adaptive: every core that other programs leave free, "
                                        "re-checked while fitting)")
    g.add_argument("--quiet", action="store_true", help="no progress messages or bars, warnings and errors only")
    g.add_argument("--verbose", action="store_true", help="debug logging (and the traceback of an internal error)")


def fit_config_from_args(args: argparse.Namespace) -> FitConfig:
    cfg = get_preset(args.preset)
    names = [n for n in cfg.as_dict() if hasattr(args, n)]
    cfg = cfg.with_overrides(**{n: getattr(args, n) for n in names})
    from core.fit.losses import landmark_weights  # torch: not at import (the --help path)

    try:  # the weights' own check, as a user error naming the flags
        landmark_weights(jaw=cfg.lm_jaw_w, inner=cfg.lm_inner_w, heavy=cfg.lm_heavy_w)
    except ValueError:
        raise UserError("--lm_jaw_w, --lm_heavy_w and --lm_inner_w cannot all be 0") from None
    return cfg


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _PipeHandler(logging.StreamHandler):
    """A stream handler that goes quiet when its reader has gone (a closed pipe, e.g.
    ``fit_video.py ... | head -1``): the run goes on and writes its files, instead of a
    logging traceback on stderr for every line after."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            self.setStream(open(os.devnull, "w", encoding="utf-8"))
            return
        super().handleError(record)


def setup_logging(args: argparse.Namespace) -> None:
    """INFO (and DEBUG with --verbose) to stdout, warnings and errors to stderr; --quiet:
    warnings and errors only. A closed stdout or stderr silences its lines only."""
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    out = _PipeHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = _PipeHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    fmt = logging.Formatter("%(message)s")
    for h in (out, err):
        h.setFormatter(fmt)
    logging.basicConfig(level=level, handlers=[out, err], force=True)


def show_progress(args: argparse.Namespace, ranks=None) -> bool:
    """Progress bars: not with --quiet, not with other ranks writing to the same terminal,
    and only when stderr is a terminal."""
    return not args.quiet and sys.stderr.isatty() and (ranks is None or ranks.world_size == 1)


def setup_threads(args: argparse.Namespace, max_threads: Optional[int] = None):
    """``--threads N``: exactly N; else the adaptive count of :mod:`core.threads`, at most
    ``max_threads`` (default: every core)."""
    from core import threads
    return threads.install(getattr(args, "threads", None), max_threads=max_threads)


@contextlib.contextmanager
def started(args: argparse.Namespace):
    """The scripts' start: logging, the ranks of a torchrun job
    (:mod:`core.pipelines.dataset.ranks`; a world of one otherwise) and the CPU threads.
    Under torchrun each rank's log lines start with ``[rank r/n]``, its progress bars are
    off and its threads are its share of the cores. Yields the
    :class:`~core.pipelines.dataset.ranks.Ranks`; leaves the process group at the end."""
    from core.pipelines.dataset import ranks as rank_mod

    setup_logging(args)
    ranks = rank_mod.start(args.device)
    if ranks.label:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[{ranks.label}] %(message)s"))
    setup_threads(args, max_threads=ranks.cpu_threads())
    try:
        yield ranks
    finally:
        ranks.close()


def session_from_args(args: argparse.Namespace, ranks, progress: bool):
    """The model, :class:`~core.pipelines.session.Session` and landmark detector of the
    flags, on this rank's device; logs which. Returns (session, detector)."""
    from core.landmarks.detect import make_detector
    from core.pipelines.session import Session, load_model

    model = load_model(args.recon_model, args.model_path)
    device, gpu = ranks.device_flags(args.device, args.gpu)
    session = Session.create(model, fit_config_from_args(args), tar_size=args.tar_size, device=device, gpu=gpu,
                             renderer=args.renderer, progress=progress)
    detector = make_detector(args.lm_detector, device=str(session.device))
    logging.getLogger(__name__).info("model %s (%d vertices) on %s, renderer %s, preset %s", model.name,
                                     model.num_vertices, session.device, session.renderer.backend, args.preset)
    return session, detector


def exit_process(code: Optional[int]) -> NoReturn:
    """End this process with exit status ``code`` as the interpreter would, less its final
    teardown: non-daemon threads are waited for, the atexit handlers run (logging,
    multiprocessing's helpers) and the standard streams are flushed; then the process
    ends without freeing every module and tensor one by one (half a second and more once
    torch is loaded, which the operating system does at once). For a script's last line;
    where ``atexit._run_exitfuncs`` is missing (not CPython), a plain ``sys.exit``."""
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:
        sys.exit(code)
    try:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    except KeyboardInterrupt:  # Ctrl-C while waiting for them: end now
        code = code or 130
    # The run is over: a Ctrl-C now (a second one after "error: interrupted", or timeout's
    # signal to the command and then to its process group) would only break into the
    # handlers with a traceback.
    with contextlib.suppress(ValueError):  # signals are set from the main thread only
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing more to say
            stream.flush()
    # sys.exit's statuses: None is 0, an int itself (run_main returns nothing else)
    os._exit(0 if code is None else code if isinstance(code, int) else EXIT_USER_ERROR)


OUT_OF_MEMORY = "error: out of memory (try a smaller --batch_size, --tar_size or fewer --nworkers)"


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a failure to allocate: torch's RuntimeError from its CPU allocator
    ("DefaultCPUAllocator: can't allocate memory") or its OutOfMemoryError (a GPU's), or
    OpenCV's error -4 ("Insufficient memory", e.g. a decoded frame under ``ulimit -v``)."""
    if type(e).__name__ == "OutOfMemoryError":
        return True
    if isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e):
        return True
    return type(e).__module__ == "cv2" and type(e).__name__ == "error" and (
        getattr(e, "code", None) == -4 or "Insufficient memory" in str(e))


def run_main(main: Callable[[Sequence[str]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)`` and turn every failure into one line on stderr: a UserError or
    an OSError (unwritable folder, full disk) or running out of memory (:func:`out_of_memory`)
    exits 2, Ctrl-C 130, anything else 1 (its
    traceback only with ``--verbose``). A file-size limit (SIGXFSZ) becomes an OSError
    instead of killing the process."""
    args = list(sys.argv[1:] if argv is None else argv)
    ignore_file_size_signal()
    keep_freed_memory()
    try:
        return main(args)
    except SystemExit as e:  # argparse: --help (0) or its one-line error (2), already printed
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
        print(f"error: cannot write or read{where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print(OUT_OF_MEMORY, file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # an internal error: one line unless asked for the traceback
        if out_of_memory(e):
            print(OUT_OF_MEMORY, file=sys.stderr)
            return EXIT_USER_ERROR
        if "--verbose" in args:
            raise
        text = str(e).strip().splitlines()
        print(f"error: internal error: {type(e).__name__}: {text[0] if text else ''} "
              f"(run with --verbose for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    finally:
        from core import threads
        threads.uninstall()  # a governor installed by main ends with it (callers in this process)
