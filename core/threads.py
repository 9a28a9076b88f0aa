"""CPU threads that survive a busy machine.

torch splits each large operation over its OpenMP threads and waits for the slowest. When
another program holds one of the cores, the thread that shares its core runs half the time
and every operation waits for it: on 2 cores, one busy core made a photo fit 3-4x slower
with 2 threads than with 1, and a process using 30% of the other core already made 2
threads slower than 1 (measured here, torch 2.13 CPU).

So the number of threads follows the cores that are free *of other programs*:

* :class:`CpuLoad` samples ``/proc/stat`` (busy time of the CPUs this process may run on)
  and this process's own CPU time; the difference is what other programs used, in cores;
* :class:`ThreadGovernor` sets ``torch.set_num_threads(n)`` with ``n = floor(free +
  SLACK)`` between 1 and its maximum, ``free = cores - others``; it re-samples at most
  every ``interval_s`` seconds when :func:`tick` is called (the fitting loops call it once
  per iteration: a clock read when nothing is due);
* a thread inside :func:`one_thread` (a lane of :mod:`core.fit.lanes`: the batch's
  parts, one per free core) runs torch at one thread and its ticks change nothing;
* the scripts :func:`install` one at start-up (the first window then spans the imports,
  the model loading and the detection), video workers one each with their share of the
  cores. An explicit ``--threads N`` fixes the count and installs none.

Our own process's CPU time (including any OpenMP spinning) is subtracted, so the decision
does not feed back on itself. Where ``/proc/stat`` is missing (not Linux) the count stays
at its maximum.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = ["cpu_cores", "CpuLoad", "ThreadGovernor", "install", "uninstall", "tick", "current", "threads_for",
           "one_thread"]

SLACK = 0.2          # a free core counts when at least 80% of it is free
INTERVAL_S = 0.5     # seconds between samples


def cpu_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, int(math.ceil(quota))))
    return max(1, n)


def _cgroup_quota() -> Optional[float]:
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            q, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if q == "max":
        return None
    try:
        return float(q) / float(period)
    except (ValueError, ZeroDivisionError):
        return None


def _allowed_cpus() -> Optional[List[int]]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None


class CpuLoad:
    """CPU time used by *other* processes on this process's CPUs, from ``/proc/stat``.

    ``others()`` returns the average number of cores they kept busy since the previous
    call (or since construction); None where ``/proc/stat`` cannot be read.
    """

    def __init__(self, stat_path: str = "/proc/stat", cpus: Optional[Sequence[int]] = None):
        self.stat_path = stat_path
        allowed = _allowed_cpus() if cpus is None else list(cpus)
        self.cpus = set(allowed) if allowed else None  # None: every cpuN line
        self._hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._last = self._sample()

    def _busy_seconds(self) -> Optional[float]:
        try:
            with open(self.stat_path, encoding="ascii") as f:
                lines = f.readlines()
        except OSError:
            return None
        busy = 0.0
        seen = False
        for line in lines:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            parts = line.split()
            try:
                cpu = int(parts[0][3:])
            except ValueError:
                continue
            if self.cpus is not None and cpu not in self.cpus:
                continue
            v = [int(x) for x in parts[1:9]] + [0] * max(0, 8 - len(parts[1:9]))
            user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
            busy += user + nice + system + irq + softirq + steal
            seen = True
        return busy / self._hz if seen else None

    def _sample(self):
        t = os.times()
        return time.monotonic(), self._busy_seconds(), t.user + t.system

    def others(self) -> Optional[float]:
        """Cores' worth of CPU used by other processes since the last call."""
        now = self._sample()
        (t0, b0, o0), (t1, b1, o1) = self._last, now
        self._last = now
        if b0 is None or b1 is None or t1 - t0 <= 0:
            return None
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (t1 - t0))


def threads_for(free_cores: float, max_threads: int) -> int:
    """Threads for ``free_cores`` cores free of other programs: ``floor(free + SLACK)``,
    between 1 and ``max_threads``."""
    return int(max(1, min(int(max_threads), math.floor(free_cores + SLACK))))


class ThreadGovernor:
    """Keeps ``torch``'s thread count at the cores other programs leave free.

    max_threads: the most threads (the process's share of the cores). cores: the cores
    the load is measured against (default :func:`cpu_cores`). interval_s: least seconds
    between samples.
    """

    def __init__(self, max_threads: Optional[int] = None, cores: Optional[int] = None,
                 interval_s: float = INTERVAL_S, load: Optional[CpuLoad] = None):
        self.cores = int(cores or cpu_cores())
        self.max_threads = max(1, int(max_threads or self.cores))
        self.interval_s = float(interval_s)
        self.load = load or CpuLoad()
        self.threads = self.max_threads
        self.changes = 0
        self._next = time.monotonic() + self.interval_s
        torch.set_num_threads(self.threads)

    def update(self, force: bool = False) -> int:
        """Re-sample when due (or ``force``) and set the thread count; returns it."""
        now = time.monotonic()
        if not force and now < self._next:
            return self.threads
        self._next = now + self.interval_s
        others = self.load.others()
        if others is None:
            return self.threads
        n = threads_for(self.cores - others, self.max_threads)
        if n != self.threads:
            log.debug("threads %d -> %d (other programs use %.2f of %d cores)", self.threads, n, others, self.cores)
            self.threads = n
            self.changes += 1
        if torch.get_num_threads() != n:  # also when other code changed it meanwhile
            torch.set_num_threads(n)
        return self.threads


_active: Optional[ThreadGovernor] = None
_local = threading.local()  # .pinned: this thread is a lane (one_thread)


def install(threads: Optional[int] = None, max_threads: Optional[int] = None) -> Optional[ThreadGovernor]:
    """Start-up: a fixed ``threads`` count (``--threads N``: no governor), or a governor
    with at most ``max_threads`` (default: every core) threads. Returns the governor."""
    global _active
    if threads is not None:
        _active = None
        torch.set_num_threads(max(1, int(threads)))
        return None
    _active = ThreadGovernor(max_threads=max_threads)
    return _active


def uninstall() -> None:
    """Stop adapting (the thread count stays where it is)."""
    global _active
    _active = None


def tick() -> None:
    """Called by the fitting loops once per iteration: adapt when a sample is due (not in
    a thread inside :func:`one_thread`)."""
    if _active is not None and not getattr(_local, "pinned", False):
        _active.update()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run this thread's torch operations at one thread, out of the governor's reach: for
    threads that each take a core (:mod:`core.fit.lanes`). ``torch.set_num_threads`` is
    also the process's default, so whoever started such threads sets its own count again
    once they are done."""
    _local.pinned = True
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _local.pinned = False


def current() -> Optional[ThreadGovernor]:
    """The installed governor, or None."""
    return _active
