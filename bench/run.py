#!/usr/bin/env python
"""Benchmark: speed and accuracy of the original schedule and the default, side by side.

    python bench/run.py --quick                 # a few minutes on a CPU
    python bench/run.py                         # the full run (all photos, more repeats)
    python bench/run.py --device cuda           # on a GPU

Rows (each measured with ``--preset original`` and ``--preset default`` in the same run,
medians over repeats; ratio > 1 means the default is better):

* renderer: forward and forward+backward ms per frame at 256 x 256 with a BFM-sized mesh,
  batch 1 and 16 (original column: pytorch3d's rasterizer, where it imports);
* single photo: fit wall seconds, landmark NME and photometric loss on real photos;
* synthetic ground truth: pose, vertex and landmark errors of fits to renders of known
  coefficients;
* video: steady-state fps and per-frame NME on a real clip, 1 and 2 workers;
* whole command: ``fit_video.py`` on a clip as a user runs it (wall time, real-time factor,
  each stage);
* busy CPU: photo fits, the photo command and video frame fits on an idle machine and with
  one core kept busy by another program, fixed threads vs the adaptive count;
* ranks: a folder of clips and a folder of photos under torchrun with 1 and 2 ranks
  (original column: 1 rank, default column: 2 ranks);
* vs eos: landmark NME of ``--recon_model sfm`` against eos-py's fit_shape_and_pose on the
  same photos and landmarks (original column: eos).

Prints the markdown table and writes ``bench/results/latest.json`` and ``latest.md``.
The machine is often shared: compare the ratios, which are measured in the same run with
the schedules alternating, rather than absolute times across runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import Report, Row  # noqa: E402
from core import defaults  # noqa: E402

log = logging.getLogger("bench")

SECTIONS = ("renderer", "photo", "synthetic", "video", "command", "load", "camera", "ranks", "eos")
SAMPLE_CLIP = os.path.join(REPO, "data", "clip.mp4")
BFM_VERTICES = 35709
# --quick fits the synthetic cases on a 10k-vertex version of the same synthetic face (the
# same smooth random bases, sampled more coarsely): the BFM-sized one costs ~4x more per
# photometric iteration, which the 500 iterations of the original schedule multiply.
QUICK_SYNTHETIC_VERTICES = 10000
PHOTO_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class Plan:
    """What to measure and how much of it (see :func:`make_plan`)."""

    quick: bool = False
    sections: Tuple[str, ...] = SECTIONS
    repeats: int = 3
    original_repeats: int = 3
    render_size: int = 256
    render_batches: Tuple[int, ...] = (1, 16)
    # The renderer rows are cheap (milliseconds): many repeats make their medians robust
    # to the load swings of a shared machine.
    render_repeats: int = 15
    render_vertices: int = BFM_VERTICES
    photos: List[str] = field(default_factory=list)
    synthetic_cases: int = 8
    synthetic_vertices: int = BFM_VERTICES
    noise_px: float = 1.0
    video: Optional[str] = None
    video_start: int = 0
    video_frames: int = 48
    video_width: int = 640
    nframes_shape: int = 8
    clip_overlap: Optional[int] = None
    workers: Tuple[int, ...] = (1, 2)
    # The whole-command rows: fit_video.py on this clip (--quick: the shipped 3 s clip; the
    # full run: the whole sample video, 20 s of 1280x720).
    command_clip: Optional[str] = None
    camera_frames: int = 60
    tar_size: int = defaults.TAR_SIZE
    seed: int = 0
    threads: Optional[int] = None  # torch CPU threads (None: adaptive, core.threads); also each video worker's
    load_rounds: int = 3            # busy-CPU rows: rounds of the four conditions
    ranks_clips: int = 3            # ranks rows: clips in the folder of videos
    ranks_repeats: int = 2          # ranks rows: alternating runs of each rank count


def shipped_photos() -> List[str]:
    folder = os.path.join(REPO, "data")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(PHOTO_EXTS))


def make_plan(args: argparse.Namespace) -> Plan:
    """Sizes for --quick or the full run; explicit flags win."""
    q = args.quick
    shared_data = os.path.join(args.shared, "data")
    photos = args.photos
    if photos is None:
        photos = shipped_photos()
        if not q and os.path.isdir(shared_data):
            photos += sorted(os.path.join(shared_data, f) for f in os.listdir(shared_data)
                             if f.lower().endswith(PHOTO_EXTS))
    if args.max_photos:
        photos = photos[:args.max_photos]
    video = args.video
    if video is None:
        candidate = os.path.join(shared_data, "sample_video.mp4")
        video = candidate if os.path.isfile(candidate) else None
    repeats = args.repeats or (2 if q else 3)

    def pick(value, quick_value, full_value):
        return value if value is not None else (quick_value if q else full_value)

    return Plan(
        quick=q, sections=tuple(args.sections), repeats=repeats,
        original_repeats=pick(args.original_repeats, 1, repeats),
        render_batches=tuple(args.render_batches),
        photos=photos, synthetic_cases=pick(args.synthetic_cases, 2, 8),
        synthetic_vertices=pick(args.synthetic_vertices, QUICK_SYNTHETIC_VERTICES, BFM_VERTICES),
        noise_px=args.noise_px,
        command_clip=args.command_clip or (SAMPLE_CLIP if q or not video else video),
        video=video, video_start=args.video_start, video_frames=pick(args.video_frames, 12, 48),
        video_width=args.video_width, nframes_shape=pick(args.nframes_shape, 2, 8),
        clip_overlap=pick(args.clip_overlap, 2, None), workers=tuple(args.workers), seed=args.seed,
        threads=args.threads, load_rounds=pick(args.load_rounds, 2, 3), camera_frames=pick(None, 30, 60),
        ranks_clips=pick(None, 2, 3), ranks_repeats=pick(None, 1, 2))


# --- models -----------------------------------------------------------------------------------

_SYNTHETIC: Dict[int, object] = {}


def synthetic_model(vertices: int):
    """The synthetic face model of about ``vertices`` vertices (built once per size)."""
    if vertices not in _SYNTHETIC:
        from core.models.bfm09 import model_from_arrays
        from core.models.synthetic import make_face_model_arrays
        log.info("building the synthetic face model (%d vertices)", vertices)
        _SYNTHETIC[vertices] = model_from_arrays(make_face_model_arrays(vertices), name="synthetic", label="synthetic")
    m = _SYNTHETIC[vertices]
    return m, f"synthetic face model ({m.num_vertices} vertices, {m.tri.shape[0]} triangles)"


def photo_model(model_path: Optional[str], shared: str, fallback_vertices: int = BFM_VERTICES):
    """The model for the real-image rows: --model_path (a converted BFM09 file), else the
    Surrey Face Model (<shared>/sfm when there, else the copy bundled in BFM/sfm, the same
    files) in the BFM09 layout, else the synthetic model (eos-py missing)."""
    from core.errors import UserError
    from core.models.bfm09 import load_bfm09, model_from_arrays
    from core.resources import BUNDLED_SFM
    if model_path:
        m = load_bfm09(model_path)
        return m, f"BFM09 from {model_path} ({m.num_vertices} vertices)"
    sfm = os.path.join(shared, "sfm")
    if not os.path.isdir(sfm):
        sfm = BUNDLED_SFM
    try:
        from core.models.sfm import sfm_to_bfm09_arrays
        m = model_from_arrays(sfm_to_bfm09_arrays(sfm), name="sfm", label=sfm)
        return m, f"Surrey Face Model in the BFM09 layout ({os.path.relpath(sfm, REPO)}, {m.num_vertices} vertices)"
    except UserError as e:
        log.warning("Surrey Face Model unusable (%s); using the synthetic model", e)
    m, desc = synthetic_model(fallback_vertices)
    return m, desc + " (no BFM09 file, the Surrey Face Model unusable)"


# --- the run ----------------------------------------------------------------------------------

def describe_preset(cfg) -> str:
    """One line of a FitConfig's schedule (fields that an older config lacks are skipped)."""
    gn = getattr(cfg, "nonrigid_solver", "adam") == "gn"
    unit = "Gauss-Newton steps (at most)" if gn else "Adam iterations"

    def photometric(iters, coarse, fine):
        if coarse and iters > fine:
            return f"{iters - fine} photometric {unit} at {coarse} px + {fine} at the crop size"
        return f"{iters} photometric {unit}"

    coarse, fine = getattr(cfg, "coarse_size", 0), getattr(cfg, "fine_iters", 0)
    rest_fine = fine if getattr(cfg, "rest_fine_iters", None) is None else cfg.rest_fine_iters
    rest_lm = getattr(cfg, "rest_lm_init_iters", 0)
    text = (f"{cfg.first_rf_iters} rigid ({cfg.rigid_solver}) + {cfg.lm_init_iters} landmark-init + "
            f"{photometric(cfg.first_nrf_iters, coarse, fine)} per photo; per following video frame "
            f"{cfg.rest_rf_iters} rigid + {rest_lm} landmark-init + {photometric(cfg.rest_nrf_iters, coarse, rest_fine)}")
    return text


def run_bench(plan: Plan, device: torch.device, presets: Dict[str, object], renderer: str = defaults.RENDERER,
              lm_detector: str = "auto", model_path: Optional[str] = None, shared: str = common.DEFAULT_SHARED,
              render_model=None, synthetic=None, real_model=None) -> Report:
    """Measure every section of ``plan``; models may be passed in (tests), else they are
    chosen as the issue asks (``photo_model``, ``synthetic_model``)."""
    if set(presets) != {"original", "default"}:
        raise ValueError(f"Expected presets 'original' and 'default'; got {sorted(presets)}")
    t_start = time.perf_counter()
    repeats = {"original": plan.original_repeats, "default": plan.repeats}
    machine = common.machine_info(device)
    # Import every pipeline module now, so the whole run uses one snapshot of the code even
    # when the checkout changes while it runs (spawned video workers import their own).
    import core.landmarks.detect  # noqa: F401
    import core.pipelines.photo  # noqa: F401
    from bench.rows_video import video_pipeline
    video_pipeline()
    settings: Dict[str, object] = {"plan": asdict(plan), "presets": {k: v.as_dict() for k, v in presets.items()},
                                   "renderer": renderer, "command": common.command_line(),
                                   "code": common.code_version()}
    notes: List[str] = []
    report = Report(title=f"3DMM fitting benchmark{' (--quick)' if plan.quick else ''}", machine=machine,
                    settings=settings, notes=notes)
    settings["a_command_desc"] = f"Command: `{settings['command']}`"
    settings["b_presets_desc"] = ("Columns: original = `--preset original` (" + describe_preset(presets["original"])
                                  + "); default = `--preset default` (" + describe_preset(presets["default"])
                                  + "), both read from core.fit.config at run time. Renderer rows: original = "
                                    "pytorch3d's rasterizer, default = the built-in one.")
    settings["c_ratio_desc"] = ("ratio > 1 means the default is better: original / default for times, errors and "
                                "losses, default / original for fps.")
    settings["d_repeats_desc"] = (f"Repeats: default {plan.repeats}, original {plan.original_repeats} (medians) for "
                                  f"the photo rows, {plan.render_repeats} for the renderer rows; "
                                  "the synthetic cases and the video runs are fitted once "
                                  "(their errors do not change between repeats; their times are medians over cases / "
                                  "rates over frames). The two schedules alternate input by input, so they share "
                                  "the machine's load.")
    if plan.quick:
        settings["e_quick_desc"] = ("--quick: fewer inputs (shipped photos only, "
                                    f"{plan.synthetic_cases} synthetic cases on a {plan.synthetic_vertices}-vertex "
                                    f"model, a {plan.video_frames}-frame clip with "
                                    f"nframes_shape {plan.nframes_shape}, clip_overlap {plan.clip_overlap}) and the "
                                    f"original schedule {plan.original_repeats} repeat(s); both schedules always run "
                                    "on the same inputs. Run without --quick for the full set.")

    needs_real = {"photo", "video", "load"} & set(plan.sections)
    detector = None
    if needs_real:
        from core.landmarks.detect import make_detector
        if real_model is None:
            real_model, real_desc = photo_model(model_path, shared)
        else:
            real_desc = f"{getattr(real_model, 'name', 'model')} ({real_model.num_vertices} vertices)"
        detector = make_detector(lm_detector, device=str(device))
        settings["f_models_desc"] = (f"Photo and video rows: {real_desc}; landmarks: {detector.name}; "
                                     f"tar_size {plan.tar_size}.")
        machine["detector"] = detector.name

    def renderer_section():
        from bench.rows_renderer import renderer_rows
        m, desc = (render_model, f"{render_model.num_vertices}-vertex model") if render_model is not None \
            else synthetic_model(plan.render_vertices)
        rows, details = renderer_rows(m, device, repeats=plan.render_repeats, size=plan.render_size,
                                      batches=plan.render_batches, model_desc=desc)
        report.details["renderer"] = details
        if machine.get("pytorch3d") is None and device.type == "cpu":
            notes.append("pytorch3d is not installed here, so the renderer rows have no original column. SPEC §3 "
                         "records pytorch3d on a 2-core CPU at 12.3 s forward + 1.1 s backward for one 256² frame "
                         "of 70k triangles (measured once by the renderer's author, not in this run).")
        return rows

    def photo_section():
        from bench.rows_photo import photo_rows
        if not plan.photos:
            return [Row("single photo", "fit wall time (s/photo)", missing="no photos", note="no photos")]
        rows, details = photo_rows(real_model, plan.photos, detector, presets, device, repeats,
                                   renderer=renderer, tar_size=plan.tar_size)
        report.details["photo"] = details
        return rows

    def synthetic_section():
        from bench.rows_synthetic import synthetic_rows
        m, desc = (synthetic, f"{synthetic.num_vertices}-vertex model") if synthetic is not None \
            else synthetic_model(plan.synthetic_vertices)
        once = {name: 1 for name in presets}
        rows, details = synthetic_rows(m, presets, device, once, plan.synthetic_cases, renderer=renderer,
                                       tar_size=plan.tar_size, noise_px=plan.noise_px, seed=plan.seed,
                                       model_desc=desc)
        report.details["synthetic"] = details
        return rows

    def load_section():
        from bench.rows_load import load_rows
        photos = [p for p in plan.photos if os.path.dirname(os.path.abspath(p)) == os.path.join(REPO, "data")]
        rows, details = load_rows(real_model, photos or plan.photos[:2], detector, presets["default"], device,
                                  plan.load_rounds, clip=SAMPLE_CLIP if os.path.isfile(SAMPLE_CLIP) else None,
                                  renderer=renderer, tar_size=plan.tar_size)
        report.details["load"] = details
        return rows

    def command_section():
        from bench.rows_command import ORIGINAL_NOTE, command_rows, photo_command_rows
        if not plan.command_clip or not os.path.isfile(plan.command_clip):
            return [Row("whole command", "fit_video.py wall time (s)", missing="no clip", note="no clip")]
        rows, details = command_rows(plan.command_clip, nworkers=2, device=str(device), lm_detector=lm_detector,
                                     threads=plan.threads or None, runs=plan.repeats)
        report.details["command"] = details
        notes.append(ORIGINAL_NOTE)
        if plan.photos:
            photo_rows, photo_details = photo_command_rows(plan.photos[0], runs=max(3, plan.repeats),
                                                           device=str(device), lm_detector=lm_detector,
                                                           threads=plan.threads or None)
            rows += photo_rows
            report.details["photo_command"] = photo_details
        return rows

    def camera_section():
        from bench.rows_camera import camera_rows
        rows, details = camera_rows(frames=plan.camera_frames, threads=plan.threads or 0)
        report.details["camera"] = details
        return rows

    def ranks_section():
        from bench.rows_ranks import ranks_rows
        photos = plan.photos[:8]
        rows, details = ranks_rows(SAMPLE_CLIP, photos, n_clips=plan.ranks_clips, repeats=plan.ranks_repeats,
                                   device=str(device), lm_detector=lm_detector)
        report.details["ranks"] = details
        return rows

    def eos_section():
        from bench.rows_eos import default_sfm_folder, eos_rows
        folder = default_sfm_folder(shared)
        if folder is None:
            return [Row("vs eos", "landmark NME, 50 points (%, mean)", missing="no ../shared/sfm",
                        note="eos needs the SFM edge topology (../shared/sfm)")]
        rows, details = eos_rows(plan.photos, folder, device=str(device),
                                 lm_detector="dlib" if lm_detector == "auto" else lm_detector)
        report.details["eos"] = details
        return rows

    sections = {"renderer": ("renderer", renderer_section), "ranks": ("ranks", ranks_section),
                "eos": ("vs eos", eos_section), "photo": ("single photo", photo_section),
                "camera": ("camera", camera_section),
                "command": ("whole command", command_section),
                "load": ("busy CPU", load_section),
                "synthetic": ("synthetic ground truth", synthetic_section),
                "video": ("video", lambda: video_section(plan, real_model, presets, device, detector, renderer,
                                                         report))}
    for key in SECTIONS:
        if key not in plan.sections:
            continue
        label, run = sections[key]
        try:
            report.rows += run()
        except Exception as e:  # one broken section must not lose the others' numbers
            log.exception("%s rows failed", label)
            reason = f"failed: {type(e).__name__}"
            report.failures[key] = f"{type(e).__name__}: {e}"
            report.rows.append(Row(label, "(section failed)", missing=reason, note=f"{type(e).__name__}: {e}"))
            notes.append(f"The {label} rows failed ({type(e).__name__}: {e}); see the log.")

    machine["load_average_end"] = common.load_average()
    # The start value is mostly other processes' load; the end value includes this run's own.
    start, end, cores = machine.get("load_average_start"), machine["load_average_end"], machine["usable_cores"]
    if device.type == "cpu" and ((start or 0.0) > cores / 2 or (end or 0.0) > cores + 1):
        notes.append(f"Other processes shared the CPU (load average {start} at the start, {end} at the end, on "
                     f"{cores} usable cores). When another process holds a core, torch's "
                     f"{machine['torch_threads']} threads wait on each other and times can grow several-fold: "
                     "compare the ratios (same run, schedules alternating), or rerun on a quiet machine "
                     "(--threads 1 is much less sensitive to a busy CPU).")
    machine["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    notes.append(f"Whole run: {machine['bench_wall_s']:.0f} s wall.")
    return report


def video_section(plan: Plan, model, presets, device, detector, renderer, report: Report) -> List[Row]:
    from bench.rows_video import make_clip, unavailable_rows, video_pipeline, video_rows
    if video_pipeline() is None:
        report.notes.append("Video rows: video pipeline not available (core.pipelines.video does not import); "
                            "rerun when it exists.")
        return unavailable_rows("video pipeline not available")
    if not plan.video or not os.path.isfile(plan.video):
        report.notes.append(f"Video rows: no clip (pass --video PATH; {plan.video or 'sample_video.mp4 of --shared'} "
                            "is absent).")
        return unavailable_rows("no video clip")
    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        meta = make_clip(plan.video, clip, plan.video_start, plan.video_frames, plan.video_width)
        desc = (f"{meta['frames']} frames of {os.path.basename(plan.video)} from frame {meta['start']}, "
                f"{meta['size'][0]}x{meta['size'][1]}")
        rows, details = video_rows(model, presets, device, detector, clip, desc, workers=plan.workers,
                                   nframes_shape=plan.nframes_shape, clip_overlap=plan.clip_overlap,
                                   renderer=renderer, tar_size=plan.tar_size, work_dir=os.path.join(tmp, "work"),
                                   threads=plan.threads or None)
    details["clip_meta"] = meta
    report.details["video"] = details
    return rows


# --- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--quick", action="store_true",
                   help="a few minutes on a CPU: fewer inputs, the original schedule measured once")
    g.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="which rows to measure")
    g.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; --quick 2)")
    g.add_argument("--original_repeats", type=int, default=None,
                   help="repeats of the original schedule (default: --repeats; --quick 1)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--out", default=common.RESULTS_DIR,
                   help="folder for latest.json / latest.md (default: bench/results)")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic cases")
    g.add_argument("--quiet", action="store_true", help="only the table")
    m = p.add_argument_group("models and inputs")
    m.add_argument("--model_path", default=None,
                   help="converted BFM09 file for the photo/video rows (default: the Surrey Face Model from "
                        "<shared>/sfm in the BFM09 layout, else the synthetic model)")
    m.add_argument("--shared", default=common.DEFAULT_SHARED, help="the reference folder (default: ../shared)")
    m.add_argument("--photos", nargs="+", default=None,
                   help="photos (default: data/*.jpg, plus <shared>/data/*.jpg without --quick)")
    m.add_argument("--max_photos", type=int, default=None, help="use at most this many photos")
    m.add_argument("--lm_detector", default="auto", choices=["auto", "fan", "dlib"], help="landmark detector")
    m.add_argument("--renderer", default="auto", choices=["auto", "builtin", "pytorch3d"],
                   help="rasterizer used by the fits (default: auto)")
    r = p.add_argument_group("renderer and synthetic rows")
    r.add_argument("--render_batches", type=int, nargs="+", default=[1, 16], help="renderer batch sizes")
    r.add_argument("--synthetic_cases", type=int, default=None, help="synthetic cases (default 8; --quick 2)")
    r.add_argument("--synthetic_vertices", type=int, default=None,
                   help=f"vertices of the synthetic ground-truth model (default {BFM_VERTICES}, BFM-sized; "
                        f"--quick {QUICK_SYNTHETIC_VERTICES})")
    r.add_argument("--noise_px", type=float, default=1.0, help="landmark noise of the synthetic cases, pixels")
    v = p.add_argument_group("video rows")
    v.add_argument("--video", default=None, help="source video (default: <shared>/data/sample_video.mp4)")
    v.add_argument("--command_clip", default=None,
                   help="clip of the whole-command rows (default: data/clip.mp4 with --quick, else the source video)")
    v.add_argument("--video_start", type=int, default=0, help="first frame of the clip")
    v.add_argument("--video_frames", type=int, default=None, help="clip length (default 48; --quick 12)")
    v.add_argument("--video_width", type=int, default=640, help="clip width in pixels (default 640)")
    v.add_argument("--nframes_shape", type=int, default=None, help="identity/albedo frames (default 8; --quick 2)")
    v.add_argument("--clip_overlap", type=int, default=None,
                   help="warm-up frames of later clips (default: the pipeline's; --quick 2)")
    v.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    b = p.add_argument_group("busy CPU rows")
    b.add_argument("--load_rounds", type=int, default=None,
                   help="rounds of (idle, busy) x (fixed, adaptive threads) (default 3; --quick 2)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)
    from core.fit.config import get_preset
    from core.device import resolve_device
    from core.errors import UserError
    try:
        device = resolve_device(args.device)
        plan = make_plan(args)
        from core import threads
        from core.malloc import keep_freed_memory
        threads.install(plan.threads)  # as the scripts do: --threads N, else adaptive
        keep_freed_memory()  # as the scripts do (core.pipelines.cli.run_main)
        presets = {"original": get_preset("original"), "default": get_preset("default")}
        report = run_bench(plan, device, presets, renderer=args.renderer, lm_detector=args.lm_detector,
                           model_path=args.model_path, shared=args.shared)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = common.write_report(report, args.out)
    print(report.markdown())
    log.info("wrote %s and %s", paths["json"], paths["md"])
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
