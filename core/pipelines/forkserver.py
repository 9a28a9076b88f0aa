"""The forkserver the CPU worker processes start from (:mod:`core.pipelines.video.workers`):
its configuration, in one place, and :func:`start_early`.

The server is a fresh interpreter that imports torch and this project once (its preload,
about 1.5 s of a core) and then forks each worker ready-made. It starts when the first
worker does; :func:`start_early` starts it at once instead, so that its imports run
beside the script's own (one core is otherwise idle then) rather than beside the landmark
pass. This module imports neither torch nor the pipeline, so a script can call it before
its own heavy imports.
"""
from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import sys
from typing import Sequence

# What the server imports before it serves: first the module that makes it ignore Ctrl-C
# while it imports (see core.pipelines.server_preload), then the workers' module (torch
# and the fitting code).
PRELOAD = ("core.pipelines.server_preload", "core.pipelines.video.workers")

# After a worker was killed mid-run (forkserver; not seen with spawn), multiprocessing's
# resource tracker removed the queues' semaphores at exit and warned about them on stderr
# ("leaked semaphore objects"), after the run's one-line error. The tracker takes its
# warning filters from these options when it starts (with the server, or the first queue).
TRACKER_QUIET = "ignore:resource_tracker:UserWarning"


def available() -> bool:
    """Whether this platform starts processes with a forkserver (Linux, macOS)."""
    return "forkserver" in multiprocessing.get_all_start_methods()


def context():
    """The forkserver's multiprocessing context, configured (:data:`PRELOAD`, the
    tracker's filter). The preload list is read once per process, when the server starts."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    if TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(TRACKER_QUIET)
    return ctx


def gpu_likely() -> bool:
    """Whether torch would probably see a GPU (without importing torch: a CUDA or ROCm
    device node, unless CUDA_VISIBLE_DEVICES hides every device). Only a guess, for
    :func:`start_early`'s callers: GPU workers start with spawn, not from the server."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def start_early() -> bool:
    """Start the server now, if the platform has one and it is not running yet; returns
    whether it runs. Returns at once: the server imports in its own process. A server
    nobody uses costs that import of a core, and ends with this process."""
    if not available():
        return False
    context()
    from multiprocessing import forkserver

    try:
        forkserver.ensure_running()
    except OSError:  # no processes left, no pipes: the pool reports it when it starts
        return False
    return True


def start_for(nworkers: int, device: str) -> bool:
    """:func:`start_early` when a video run of ``nworkers`` processes with the ``--device``
    flag ``device`` (auto, cpu, cuda, cuda:N) will most likely start CPU workers: more
    than one, and the CPU asked for or no GPU in sight. Returns whether it started one."""
    spec = (device or "auto").strip().lower()
    if int(nworkers) < 2 or spec.startswith("cuda") or (spec == "auto" and gpu_likely()):
        return False
    return start_early()


def start_for_argv(argv: Sequence[str]) -> bool:
    """:func:`start_for` with ``--nworkers`` and ``--device`` as a video script's command
    line ``argv`` gives them, read before the script's parser is built (its defaults import
    torch): an ``--nworkers`` of 2 or more must be on the line, and a ``--v_path`` that
    exists; nothing starts for a line the script's parser will reject, for ``--help``, or
    for a missing video (the script fails at once: a server would import for nothing)."""
    pre = _QuietParser(add_help=False, allow_abbrev=False)
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("--nworkers", type=int, default=1)
    pre.add_argument("--device", default="auto")
    pre.add_argument("--v_path", default=None)
    try:
        known, _ = pre.parse_known_args(list(argv))
    except ValueError:  # a bad value: the script's parser says so
        return False
    if known.help or known.v_path is None or not os.path.exists(known.v_path):
        return False
    return start_for(known.nworkers, known.device)


class _QuietParser(argparse.ArgumentParser):
    """A parser that raises ValueError instead of printing an error and exiting."""

    def error(self, message):
        raise ValueError(message)
