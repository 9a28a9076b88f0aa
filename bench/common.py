"""Shared plumbing of the benchmark: machine details, timing, rows, the table, outputs.

A benchmark result is a list of :class:`Row` objects, one metric each, measured with the
original schedule (``--preset original``; for the renderer rows: pytorch3d's rasterizer,
the original's renderer) and with this project's default (``--preset default``; the
built-in rasterizer), side by side in the same run. ``ratio`` is always oriented so that
> 1 means the default is better: original / default for times, errors and losses,
default / original for rates (fps).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger("bench")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHARED = os.path.join(os.path.dirname(REPO), "shared")
RESULTS_DIR = os.path.join(REPO, "bench", "results")

LOWER, HIGHER = "lower", "higher"


# --- rows -----------------------------------------------------------------------------------

@dataclass
class Row:
    """One metric, measured with both schedules.

    section: "renderer", "single photo", "synthetic ground truth" or "video".
    metric: what is measured, with its unit.
    original, default: the values (None: not measured; ``missing`` says why).
    better: "lower" or "higher" (orients ``ratio``).
    note: how it was measured (inputs, repeats, what is excluded).
    n_original, n_default: how many inputs / repeats each value is a median over.
    """

    section: str
    metric: str
    original: Optional[float] = None
    default: Optional[float] = None
    better: str = LOWER
    note: str = ""
    missing: str = ""
    n_original: int = 0
    n_default: int = 0

    @property
    def ratio(self) -> Optional[float]:
        """> 1: the default is better (faster, more accurate); None when not computable."""
        o, d = self.original, self.default
        if o is None or d is None or not (math.isfinite(o) and math.isfinite(d)):
            return None
        num, den = (o, d) if self.better == LOWER else (d, o)
        if den == 0:
            return None
        return num / den

    def as_dict(self) -> Dict[str, object]:
        out = asdict(self)
        out["ratio"] = self.ratio
        return out


def median(values: Sequence[float]) -> Optional[float]:
    """Median of the finite values, None when there are none."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return statistics.median(v) if v else None


def fmt(value: Optional[float], missing: str = "n/a") -> str:
    """A number with 3 significant digits (no exponent for ordinary magnitudes)."""
    if value is None:
        return missing
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 0.01:
        digits = max(0, 2 - int(math.floor(math.log10(a))))
        return f"{value:.{digits}f}"
    return f"{value:.2e}"


def fmt_ratio(r: Optional[float]) -> str:
    return "" if r is None else f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def format_table(rows: Sequence[Row], header: Sequence[str] = ()) -> str:
    """The markdown report: header lines, then one table of every row."""
    lines = list(header)
    if lines:
        lines.append("")
    lines.append("| row | metric | original | default | ratio | notes |")
    lines.append("|---|---|---:|---:|---:|---|")
    for r in rows:
        orig = fmt(r.original, missing=f"n/a ({r.missing})" if r.missing and r.original is None else "n/a")
        dflt = fmt(r.default, missing=f"n/a ({r.missing})" if r.missing and r.default is None else "n/a")
        note = r.note.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.section} | {r.metric} | {orig} | {dflt} | {fmt_ratio(r.ratio)} | {note} |")
    return "\n".join(lines) + "\n"


# --- machine ----------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> Dict[str, object]:
    """CPU, cores, torch, threads, device and GPU name (when CUDA), pytorch3d version."""
    info: Dict[str, object] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import pytorch3d
        info["pytorch3d"] = getattr(pytorch3d, "__version__", "installed")
    except Exception:  # ImportError or a broken build
        info["pytorch3d"] = None
    return info


def code_version() -> str:
    """``<commit> (+ uncommitted changes)`` of the checkout, or ``unknown`` outside git."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" (+ uncommitted changes)" if dirty else "")


def machine_line(info: Dict[str, object]) -> str:
    parts = [f"CPU {info['cpu']}", f"{info['cores']} cores ({info['usable_cores']} usable)",
             f"torch {info['torch']} ({info['torch_threads']} threads)", f"device {info['device']}"]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']} (CUDA {info.get('cuda')})")
    parts.append(f"pytorch3d {info['pytorch3d'] or 'not installed'}")
    la = [info.get("load_average_start"), info.get("load_average_end")]
    if any(v is not None for v in la):
        parts.append(f"load average {la[0]} at start, {la[1]} at end")
    return ", ".join(parts)


# --- timing -----------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings are real (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device):
    """(seconds, result) of ``fn()``, synchronized before and after on CUDA."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def warm_up_config(cfg):
    """A very short version of a FitConfig: one fit with it before the timed ones keeps
    first-call costs (allocator, kernels, thread pools) out of the timings."""
    return cfg.with_overrides(first_rf_iters=min(cfg.first_rf_iters, 3), first_nrf_iters=min(cfg.first_nrf_iters, 2),
                              lm_init_iters=min(cfg.lm_init_iters, 2))


# --- landmark error -------------------------------------------------------------------------

def nme_interocular(predicted: np.ndarray, detected: np.ndarray) -> float:
    """Landmark NME as ``core.pipelines.photo`` writes it into ``<name>_info.json``
    (:func:`core.landmarks.metrics.landmark_nme`): the mean distance over the chin point (8) and the
    inner points 17-67, divided by the distance between the eye centres (mean of 36-41 and
    of 42-47) of the detected landmarks. The photo and the video rows both use it.

    predicted, detected: (68, 2) points in the same pixel frame.
    """
    from core.landmarks.metrics import landmark_nme

    p = np.asarray(predicted, dtype=np.float64)
    q = np.asarray(detected, dtype=np.float64)
    if p.shape != (68, 2) or q.shape != (68, 2):
        raise ValueError(f"Expected (68, 2) landmarks; got {p.shape} and {q.shape}")
    return landmark_nme(p, q)


# --- outputs -------------------------------------------------------------------------------------

@dataclass
class Report:
    """Everything a run produced: machine, settings, rows, raw details, notes."""

    title: str
    machine: Dict[str, object]
    settings: Dict[str, object]
    rows: List[Row] = field(default_factory=list)
    details: Dict[str, object] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    failures: Dict[str, str] = field(default_factory=dict)  # section -> error

    def header(self) -> List[str]:
        lines = [f"## {self.title}", "", f"Machine: {machine_line(self.machine)}."]
        if self.settings.get("code"):
            lines.append(f"Code: commit {self.settings['code']}.")
        lines.append("")
        for k, v in self.settings.items():
            if isinstance(v, str) and k.endswith("_desc"):
                lines.append(f"- {v}")
        return lines

    def markdown(self) -> str:
        text = format_table(self.rows, self.header())
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return text

    def as_json(self) -> Dict[str, object]:
        return {"title": self.title, "machine": self.machine, "settings": self.settings,
                "rows": [r.as_dict() for r in self.rows], "details": self.details, "notes": self.notes,
                "failures": self.failures,
                "markdown": self.markdown()}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_report(report: Report, folder: str = RESULTS_DIR, stem: str = "latest") -> Dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``folder`` (each renamed into place)."""
    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, f"{stem}.json"), "md": os.path.join(folder, f"{stem}.md")}
    for kind, path in paths.items():
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            if kind == "json":
                json.dump(_jsonable(report.as_json()), f, indent=1)
            else:
                f.write(report.markdown())
        os.replace(tmp, path)
    return paths


def command_line() -> str:
    """How this run was started, for the report."""
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv and sys.argv[0] else "bench/run.py"]
                                + sys.argv[1:])
