"""The benchmark's machinery (bench/): medians, ratios, the table, NME, the steady-state
clock, and a tiny end-to-end run on a small synthetic model with 1 repeat."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from bench import common
from bench.common import Row, fmt, format_table, median, nme_interocular
from bench.rows_video import steady_fps
from tests.helpers import REPO, SHARED, synthetic_arrays


# --- pure pieces ----------------------------------------------------------------------------

def test_median_ignores_missing_and_nan():
    assert median([3.0, None, 1.0, float("nan"), 2.0]) == 2.0
    assert median([1.0, 2.0]) == 1.5
    assert median([]) is None
    assert median([None, float("nan")]) is None


def test_fmt_three_significant_digits():
    assert fmt(None) == "n/a"
    assert fmt(None, missing="n/a (why)") == "n/a (why)"
    assert fmt(0.0) == "0"
    assert fmt(12.345) == "12.3"
    assert fmt(1.2345) == "1.23"
    assert fmt(0.012345) == "0.0123"
    assert fmt(123.45) == "123"
    assert fmt(12345.6) == "12,346"
    assert fmt(0.00012) == "1.20e-04"


def test_ratio_is_oriented_so_that_above_one_means_default_better():
    assert Row("s", "time", original=10.0, default=2.0, better="lower").ratio == pytest.approx(5.0)
    assert Row("s", "fps", original=2.0, default=10.0, better="higher").ratio == pytest.approx(5.0)
    assert Row("s", "err", original=1.0, default=2.0, better="lower").ratio == pytest.approx(0.5)
    assert Row("s", "missing", original=None, default=2.0).ratio is None
    assert Row("s", "zero", original=1.0, default=0.0).ratio is None
    assert Row("s", "nan", original=float("nan"), default=1.0).ratio is None


def test_format_table_has_every_row_and_reasons():
    rows = [Row("renderer", "forward (ms)", None, 30.0, missing="pytorch3d not installed", note="a | b"),
            Row("single photo", "fit (s)", 20.0, 4.0)]
    text = format_table(rows, ["## title"])
    lines = text.splitlines()
    assert lines[0] == "## title"
    assert "| row | metric | original | default | ratio | notes |" in lines
    assert "| renderer | forward (ms) | n/a (pytorch3d not installed) | 30.0 |  | a / b |" in lines
    assert "| single photo | fit (s) | 20.0 | 4.00 | 5.00x |  |" in lines
    # Every table line has the same number of cells.
    table = [ln for ln in lines if ln.startswith("|")]
    assert len({ln.count("|") for ln in table}) == 1


def test_nme_interocular_matches_its_definition():
    rng = np.random.default_rng(0)
    q = rng.uniform(0, 200, size=(68, 2))
    q[36:42] = [0.0, 0.0]
    q[42:48] = [50.0, 0.0]  # eye centres 50 px apart
    assert nme_interocular(q, q) == 0.0
    p = q + np.array([3.0, 4.0])  # every point 5 px off
    assert nme_interocular(p, q) == pytest.approx(0.1)
    p = q.copy()
    p[:8] += 100.0  # the jaw outside the chin point does not count
    assert nme_interocular(p, q) == 0.0
    with pytest.raises(ValueError, match=r"\(68, 2\)"):
        nme_interocular(q[:10], q[:10])


def test_steady_fps_sums_worker_rates_after_their_first_frame():
    # Worker 0: first frame at t=10, then 4 more in 2 s (2 fps); worker 1: 2 more in 4 s (0.5 fps).
    ticks = {0: [10.0, 10.5, 11.0, 11.5, 12.0], 1: [20.0, 22.0, 24.0]}
    assert steady_fps(ticks) == pytest.approx(2.5)
    assert steady_fps({0: [1.0]}) is None
    assert steady_fps({}) is None


def test_frame_clock_keeps_each_workers_finish_times():
    from bench.rows_video import FrameClock
    from core.pipelines.video import FrameDone

    clock = FrameClock()
    for worker, frame, t in ((1, 8, 20.0), (0, 0, 10.0), (1, 9, 22.0), (0, 1, 10.5)):
        clock(FrameDone(worker=worker, frame=frame, time=t, fitted=True))
    clock(FrameDone(worker=0, frame=2, time=9.0, fitted=True, restored=True))  # not fitted in this run
    assert clock.per_worker() == {0: [10.0, 10.5], 1: [20.0, 22.0]}
    assert steady_fps(clock.per_worker()) == pytest.approx(1 / 0.5 + 1 / 2.0)


def test_fit_clip_reports_every_kept_frame_through_the_hook(tmp_path):
    """The hook the clock relies on, in process: one FrameDone per kept frame (warm-up
    frames are not reported), in order, with the clip's worker id and a finish time."""
    _dlib_or_skip()
    import time
    from core.landmarks.detect import DlibDetector
    from core.pipelines import video
    from core.pipelines.session import SessionSpec

    clip = os.path.join(REPO, "data", "clip.mp4")
    track = video.landmark_pass(clip, DlibDetector(), progress=False, frame_range=(0, 4))
    spec = SessionSpec(model=_tiny_model(), config=_tiny_presets()["default"], tar_size=48, renderer="builtin",
                       device="cpu")
    job = video.ClipJob(worker=3, session=spec, video_path=clip, timestamps=track.timestamps, fit_start=0, start=1,
                        stop=4, landmarks=track.landmarks, crop_boxes=track.crop_boxes(0.3),
                        id=np.zeros(80, np.float32), tex=np.zeros(80, np.float32), threads=1,
                        cache_path=str(tmp_path / "clip.npz"), key="k")
    t0, events = time.time(), []
    video.run_workers([job], on_frame=events.append)
    assert [(e.worker, e.frame, e.restored) for e in events] == [(3, 1, False), (3, 2, False), (3, 3, False)]
    times = [e.time for e in events]
    assert t0 <= times[0] <= times[1] <= times[2] <= time.time()


def test_machine_info_names_cpu_torch_and_device():
    info = common.machine_info(torch.device("cpu"))
    for key in ("cpu", "cores", "torch", "torch_threads", "device"):
        assert info[key] not in (None, "")
    line = common.machine_line(info)
    assert "torch " + torch.__version__ in line and "device cpu" in line


def test_write_report_writes_json_and_markdown(tmp_path):
    rep = common.Report(title="t", machine=common.machine_info(torch.device("cpu")), settings={"x_desc": "hello"},
                        rows=[Row("video", "fps", 1.0, 2.0, better="higher")], details={"a": np.arange(3)},
                        notes=["note"])
    paths = common.write_report(rep, str(tmp_path))
    data = json.loads(open(paths["json"], encoding="utf-8").read())
    assert data["rows"][0]["ratio"] == pytest.approx(2.0)
    assert data["details"]["a"] == [0, 1, 2]
    md = open(paths["md"], encoding="utf-8").read()
    assert md == data["markdown"] and "- hello" in md and "- note" in md


def test_plan_quick_and_full_defaults():
    from bench.run import build_parser, make_plan
    quick = make_plan(build_parser().parse_args(["--quick", "--shared", "/nonexistent"]))
    full = make_plan(build_parser().parse_args(["--shared", "/nonexistent"]))
    assert quick.quick and (quick.repeats, quick.original_repeats) == (2, 1)
    assert (full.repeats, full.original_repeats) == (3, 3)
    assert quick.synthetic_cases < full.synthetic_cases and quick.video_frames < full.video_frames
    assert quick.render_batches == full.render_batches == (1, 16)  # the renderer rows are never reduced
    assert quick.render_vertices == full.render_vertices == full.synthetic_vertices == 35709
    assert quick.synthetic_vertices < 35709
    assert quick.video is None  # no ../shared: the video rows say so instead of failing
    assert all(p.startswith(os.path.join(REPO, "data")) for p in quick.photos) and quick.photos
    explicit = make_plan(build_parser().parse_args(["--quick", "--repeats", "5", "--original_repeats", "2"]))
    assert (explicit.repeats, explicit.original_repeats) == (5, 2)


# --- a tiny end-to-end run ---------------------------------------------------------------------

def _tiny_presets():
    from core.fit.config import get_preset
    return {"original": get_preset("original").with_overrides(first_rf_iters=4, first_nrf_iters=2,
                                                               rest_rf_iters=2, rest_nrf_iters=1),
            "default": get_preset("default").with_overrides(first_rf_iters=2, lm_init_iters=1, first_nrf_iters=2,
                                                             rest_rf_iters=1, rest_nrf_iters=1)}


def _tiny_model():
    from core.models.bfm09 import model_from_arrays
    return model_from_arrays(synthetic_arrays(800), name="synthetic", label="tiny")


def _dlib_or_skip():
    from core.landmarks.detect import DlibDetector
    if not DlibDetector.available():
        pytest.skip("dlib and its landmark model are not installed")


def test_tiny_run_has_every_row_with_both_schedules(tmp_path):
    _dlib_or_skip()
    from bench.run import Plan, run_bench
    model = _tiny_model()
    plan = Plan(sections=("renderer", "photo", "synthetic"), repeats=1, original_repeats=1, render_size=48, render_repeats=2,
                render_batches=(1, 2), photos=[os.path.join(REPO, "data", "astronaut.jpg")], synthetic_cases=1,
                tar_size=64)
    report = run_bench(plan, torch.device("cpu"), _tiny_presets(), renderer="builtin", lm_detector="dlib",
                       render_model=model, synthetic=model, real_model=model)
    by_section = {}
    for r in report.rows:
        by_section.setdefault(r.section, []).append(r)
    assert set(by_section) == {"renderer", "single photo", "synthetic ground truth"}
    assert len(by_section["renderer"]) == 4  # forward, forward+backward x batch 1, 2
    for r in by_section["renderer"]:
        assert r.default is not None and r.default > 0
    for section in ("single photo", "synthetic ground truth"):
        for r in by_section[section]:
            assert r.original is not None and r.default is not None, r
            assert math.isfinite(r.original) and math.isfinite(r.default)
            assert r.ratio is not None
    metrics = [r.metric for r in by_section["synthetic ground truth"]]
    assert any("pose" in m for m in metrics) and any("vertex" in m for m in metrics) \
        and any("landmark" in m for m in metrics)
    md = report.markdown()
    assert "| single photo | fit wall time (s/photo) |" in md and "Machine: CPU" in md
    paths = common.write_report(report, str(tmp_path))
    assert json.loads(open(paths["json"], encoding="utf-8").read())["rows"]


def test_tiny_video_run_with_two_worker_processes(tmp_path):
    """The 2-worker path: run_video's on_frame hook must carry every kept frame's finish
    time from the spawned workers (the in-process path is tested above)."""
    _dlib_or_skip()
    video_src = SHARED / "data" / "sample_video.mp4"
    if not video_src.is_file():
        pytest.skip(f"{video_src} not present (../shared is only beside the project in development and CI)")
    if shutil.which("ffmpeg") is None:
        try:
            import imageio_ffmpeg  # noqa: F401  (the pipeline's writer needs an ffmpeg)
        except ImportError:
            pytest.skip("no ffmpeg")
    from bench.rows_video import make_clip, video_pipeline, video_rows
    if video_pipeline() is None:
        pytest.skip("video pipeline not available")
    from core.landmarks.detect import make_detector
    clip = str(tmp_path / "clip.mp4")
    meta = make_clip(str(video_src), clip, start=0, frames=5, width=320)
    assert meta["frames"] == 5 and meta["size"][0] == 320
    presets = {"default": _tiny_presets()["default"]}  # one schedule: each 2-worker run spawns (slow)
    rows, details = video_rows(_tiny_model(), presets, torch.device("cpu"), make_detector("dlib"), clip,
                               "5 frames", workers=(2,), nframes_shape=1, clip_overlap=1, renderer="builtin",
                               tar_size=64, work_dir=str(tmp_path / "work"))
    metrics = {r.metric: r for r in rows}
    assert metrics["steady-state fps, 2 workers"].default > 0
    assert metrics["steady-state fps, 2 workers"].original is None  # not run: a missing value, not a crash
    assert 0 <= metrics["per-frame landmark NME (%), 2 workers"].default < 1000
    assert metrics["identity/albedo fit (s, once per schedule)"].default > 0
    run = details["runs"]["default"]["2"]
    # Every kept frame was clocked, in both worker processes, and has an NME.
    assert sum(run["ticks"].values()) == 5 and len(run["ticks"]) == 2
    assert len(run["nme"]) == 5


def test_a_failing_section_becomes_a_row_not_a_crash(tmp_path):
    _dlib_or_skip()
    from bench.run import Plan, run_bench
    plan = Plan(sections=("photo",), repeats=1, original_repeats=1, photos=[str(tmp_path / "missing.jpg")],
                tar_size=64)
    report = run_bench(plan, torch.device("cpu"), _tiny_presets(), lm_detector="dlib", real_model=_tiny_model())
    assert list(report.failures) == ["photo"]
    (row,) = report.rows
    assert row.section == "single photo" and row.missing.startswith("failed: ")
    assert "failed" in report.markdown()


def test_busy_cpu_rows_rotate_conditions_and_divide_by_the_adaptive_idle():
    from bench.rows_load import conditions, rows_of

    c = conditions(4)
    assert len(c) == 16 and all(c.count(k) == 4 for k in set(c))
    assert [c[4 * r] for r in range(4)] == [(False, "fixed"), (False, "adaptive"), (True, "fixed"), (True, "adaptive")]
    rows = rows_of({(False, "fixed"): [1.0, 1.2, 1.1], (False, "adaptive"): [1.0, 1.1, 1.05],
                    (True, "fixed"): [4.0, 3.0, 5.0], (True, "adaptive"): [1.2, 1.3, 1.4]}, "photo fit", "s", "n")
    assert [r.metric for r in rows] == ["photo fit, idle (s)", "photo fit, one core busy (s)",
                                        "photo fit, busy / adaptive idle (x)"]
    assert (rows[0].original, rows[0].default) == (1.1, 1.05)
    assert rows[2].original == pytest.approx(4.0 / 1.05) and rows[2].default == pytest.approx(1.3 / 1.05)


def test_whole_command_rows_split_the_wall_time_into_stages():
    """The whole-command rows: real-time factor = clip seconds / wall seconds, the stages
    from info.json, start-up = wall minus the pipeline's total, the slowest stage named."""
    from bench.rows_command import command_rows_from

    info = {"timings_s": {"landmarks_s": 1.0, "shape_s": 6.0, "fit_s": 4.0, "render_s": 2.0, "total_s": 13.5},
            "landmark_nme_interocular": {"mean": 0.04}}
    rows = {r.metric: r for r in command_rows_from(15.0, info, 20.0, "cmd")}
    assert rows["real-time factor (clip s / wall s)"].default == pytest.approx(20.0 / 15.0)
    assert rows["stage: start-up and the rest (s)"].default == pytest.approx(1.5)
    assert rows["stage: identity/albedo fit (s)"].default == 6.0
    assert rows["landmark NME (%, mean over frames)"].default == pytest.approx(4.0)
    assert "slowest stage: identity/albedo fit" in rows["fit_video.py wall time (s)"].note
    assert all(r.original is None and r.missing for r in rows.values())
    # composed by the workers while fitting: the stages say so
    info["timings_s"].update(composed_while_fitting=300, fit_s=9.0)
    rows = {r.metric: r for r in command_rows_from(15.0, info, 20.0, "cmd")}
    fit = rows["stage: per-frame fitting and composing its frames (s)"]
    assert fit.default == 9.0 and "300 frames composed by the fitting workers" in fit.note
    assert rows["stage: composing the rest and joining the parts (s)"].default == 2.0
    assert "slowest stage: per-frame fitting and composing its frames" in rows["fit_video.py wall time (s)"].note


def test_photo_command_rows_compare_the_run_with_its_fit_plus_import(monkeypatch):
    """The one-photo run rows: medians of the command's wall time, of its own fitting time
    (info.json) plus `import torch`, and their ratio; the two commands alternate."""
    import json as _json
    import os as _os

    from bench import rows_command

    calls, walls, fits = [], iter([5.0, 7.0, 6.0]), iter([1.0, 1.4, 1.2])
    imports = iter([2.0, 2.4, 2.2])

    def fake(cmd):
        if cmd[-1] == "import torch":
            calls.append("import")
            return next(imports)
        calls.append("command")
        out = cmd[cmd.index("--res_folder") + 1]
        with open(_os.path.join(out, "a_info.json"), "w") as f:
            _json.dump({"timings_s_fit_per_photo": next(fits)}, f)
        return next(walls)

    monkeypatch.setattr(rows_command, "_timed", fake)
    rows, details = rows_command.photo_command_rows("data/astronaut.jpg", runs=3)
    assert calls == ["import", "command", "command", "import", "import", "command"]
    by = {r.metric: r for r in rows}
    assert by["fit_single_img.py wall time, one photo (s)"].default == 6.0
    assert by["its fitting + `import torch` (s)"].default == pytest.approx(1.2 + 2.2)
    assert by["one-photo run / (fitting + import torch)"].default == pytest.approx(6.0 / 3.4)
    assert details["fit_s"] == [1.0, 1.4, 1.2]


def test_whole_command_rows_are_the_median_run(monkeypatch):
    """The video command runs ``runs`` times; the rows are the median run's wall time and
    that run's own stages (they add up to its wall), the details keep every run."""
    import json as _json
    import os as _os

    from bench import rows_command

    walls = iter([30.0, 10.0, 20.0])
    stages = iter([9.0, 3.0, 6.0])

    def fake(cmd):
        out = cmd[cmd.index("--res_folder") + 1]
        with open(_os.path.join(out, "clip_info.json"), "w") as f:
            _json.dump({"timings_s": {"landmarks_s": next(stages), "total_s": 1.0}}, f)
        return next(walls)

    monkeypatch.setattr(rows_command, "_timed", fake)
    clip = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "data", "clip.mp4")
    rows, details = rows_command.command_rows(clip, runs=3)
    by = {r.metric: r for r in rows}
    assert by["fit_video.py wall time (s)"].default == 20.0
    assert by["stage: landmark pass (s)"].default == 6.0  # the median run's own stage
    assert details["runs_wall_s"] == [30.0, 10.0, 20.0]
    assert "median of 3 runs" in by["fit_video.py wall time (s)"].note
