"""Running clip jobs in worker processes (torch.multiprocessing: forkserver for CPU
workers where the platform has it, else spawn): the pool of
workers (started ahead of their jobs, or when they are run), the worker entry, the
parent's message loop with its checks of every worker's exit, the watchdog that ends a
worker with its parent, and how many threads and which device each worker gets."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue as queue_mod
import re
import signal
import sys
import threading
import time
import traceback
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from core import threads as thread_control
from core.errors import UserError
from core.io.interrupts import sigint_ignored
from core.malloc import keep_freed_memory

from .. import forkserver
from ..session import Session
from .clips import ClipJob, FrameDone, fit_clip, prepare_reader

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def threads_per_worker(cores: int, nworkers: int) -> int:
    """CPU threads for each of ``nworkers`` processes sharing ``cores`` cores."""
    return max(1, int(cores) // max(1, int(nworkers)))


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_oversubscription(n_workers: int, cores: int, threads: int = 1) -> Optional[str]:
    """The warning for ``n_workers`` CPU worker processes of ``threads`` threads each on
    ``cores`` cores, or None when every worker thread has a core of its own (more threads
    than cores: each operation waits for threads that share a core; on 2 cores
    ``--threads 2 --nworkers 2`` made the per-frame stage 3-5x slower)."""
    if n_workers <= cores and n_workers * threads <= cores:
        return None
    if n_workers > cores:
        return (f"--nworkers {n_workers}: the {n_workers} CPU workers will compete for {cores} core(s) "
                f"({threads} thread{'s' if threads != 1 else ''} each); fewer workers (at most {cores}) will be faster")
    return (f"--threads {threads} is per process: the {n_workers} CPU workers run {n_workers * threads} threads on "
            f"{cores} core(s) and wait for each other's (several times slower); --threads {cores // n_workers}, or no "
            f"--threads, fits the cores")


def worker_devices(session: Session, n: int, ngpus: int) -> List[str]:
    """Worker i on cuda:(i mod ngpus) when the session runs on CUDA (its own card when
    ngpus is 1), else on the CPU."""
    if session.device.type != "cuda":
        return ["cpu"] * n
    if ngpus <= 1:
        return [str(session.device)] * n
    available = torch.cuda.device_count()
    if ngpus > available:
        log.warning("--ngpus %d but torch sees %d GPU(s); using %d", ngpus, available, available)
        ngpus = available
    return [f"cuda:{i % ngpus}" for i in range(n)]


def _die_with_parent(main_pid: int, poll_s: float = 0.5) -> None:
    """End this worker process as soon as the main process ``main_pid`` is gone, however
    it ended (even SIGKILL, which runs no clean-up there).

    The worker's parent is the main process (spawn) or the forkserver (which exits when
    the main process does). On Linux the kernel sends SIGKILL at that parent's death
    (prctl PR_SET_PDEATHSIG); it may have died before that was set, so the main process
    is checked once afterwards; and a daemon thread polls every ``poll_s`` seconds
    everywhere (the portable fallback: an orphan is re-parented, so its parent pid
    changes; and the main process must still exist)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as e:
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", e)
    parent = os.getppid()

    def gone() -> bool:
        if os.getppid() != parent:
            return True
        if parent == main_pid:
            return False
        try:
            os.kill(main_pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists (another user's pid: not ours, but then the server exits too)
            return False
        return False

    if gone():
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if gone():
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_entry(job: ClipJob, messages) -> None:
    """Run :func:`fit_clip` in a worker process and put its messages on the queue
    ``messages``: ``("frame", worker, FrameDone)`` for each kept frame, then ``("done",
    worker)`` or ``("error", worker, one-line message, traceback)``."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    thread_control.install(None if job.adaptive_threads else job.threads, max_threads=job.threads)
    try:
        fit_clip(job, on_frame=lambda event: messages.put(("frame", job.worker, event)))
    except BaseException as e:  # report everything, including KeyboardInterrupt
        text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        messages.put(("error", job.worker, text.splitlines()[0] if text else type(e).__name__,
                      traceback.format_exc()))
        raise SystemExit(1)
    messages.put(("done", job.worker))


@contextlib.contextmanager
def _shared_memory_errors():
    """torch hands a job's tensors (the face model) to a worker through shared memory
    files; when /dev/shm is full or a file-size limit stops them, a one-line UserError."""
    try:
        yield
    except RuntimeError as e:
        if "</torch_" not in str(e):
            raise
        detail = re.sub(r"\s*</torch_[^>]*>\s*", " ", str(e)).strip()
        raise UserError(f"cannot hand the jobs to the worker processes through shared memory ({detail}): "
                        f"free space in /dev/shm, or use --nworkers 1") from None


def _pool_entry(inbox, messages, main_pid: int, interruptible: bool = True) -> None:
    """Process target of a :class:`WorkerPool` process: end with the main process
    ``main_pid`` (see :func:`_die_with_parent`), wait for a job on ``inbox`` and run it
    (:func:`_worker_entry`; None: end without one; a job comes pickled, see
    :meth:`WorkerPool.give`). ``interruptible``: whether the main process takes Ctrl-C
    (SIGINT not ignored there); if not (started with ``nohup`` or in the background of a
    script), neither does the worker, which would otherwise die of a SIGINT to the group
    that the main process ignores, and be reported as killed."""
    _die_with_parent(main_pid)
    keep_freed_memory()  # a spawned worker (GPU runs); forked ones have it from the server
    # A forkserver's children start with SIGINT ignored (server_preload): Ctrl-C as usual
    # here, as in the main process.
    signal.signal(signal.SIGINT, signal.default_int_handler if interruptible else signal.SIG_IGN)
    try:
        job = inbox.get()
        while isinstance(job, tuple):  # ("prepare", video, frame, timestamps, threads): see WorkerPool.prepare
            prepare_reader(*job[1:])
            job = inbox.get()
        if job is not None:
            from multiprocessing.reduction import ForkingPickler

            job = ForkingPickler.loads(job)
    except KeyboardInterrupt:  # Ctrl-C while waiting (the terminal signals the whole process
        raise SystemExit(1)    # group): the main process reports it; no traceback here
    if job is not None:
        _worker_entry(job, messages)


def start_method(cuda: bool = False) -> str:
    """How worker processes start: ``forkserver`` for CPU workers where the platform has
    it (one fresh interpreter imports torch and this project, then forks each worker
    ready-made: on a 2-core CPU that import is about 2 s of a core, paid once instead of
    once per worker), else ``spawn`` (a fresh interpreter each; CUDA workers always). Never
    a plain fork of this process: once torch has run a parallel operation here, its
    OpenMP threads do not survive a fork and the child hangs in its first one."""
    return "forkserver" if not cuda and forkserver.available() else "spawn"


class WorkerPool:
    """``size`` worker processes started before their jobs exist (:func:`start_method`;
    started from a thread, so the constructor returns at once), so that their start-up
    runs while this process is still busy with the stages before the fitting, which leave
    part of the cores idle. :func:`run_workers` ``(jobs, pool=...)``
    hands each process one job (and starts a pool of its own when given none). ``close``
    ends the processes that got none (and stops any still running); the pool is a context
    manager that closes on the way out. ``cuda``: the jobs will run on a GPU."""

    def __init__(self, size: int, cuda: bool = False):
        import torch.multiprocessing as mp

        self.method = start_method(cuda)
        ctx = forkserver.context() if self.method == "forkserver" else mp.get_context(self.method)
        self.messages = ctx.Queue()
        self._inboxes = [ctx.SimpleQueue() for _ in range(int(size))]
        interruptible = not sigint_ignored()
        self._procs = [ctx.Process(target=_pool_entry, args=(inbox, self.messages, os.getpid(), interruptible),
                                   name=f"fit-worker-{k}", daemon=True) for k, inbox in enumerate(self._inboxes)]
        self._given = [False] * len(self._procs)
        self._closed = False
        # Started from a thread: a forkserver's first start waits for the server's imports
        # (about a second), which this process need not wait for.
        self._start_error: Optional[BaseException] = None
        self._starter = threading.Thread(target=self._start_all, name="worker-pool-start", daemon=True)
        self._starter.start()

    def _start_all(self) -> None:
        try:
            for p in self._procs:
                p.start()
        except BaseException as e:  # raised again by wait_started()
            self._start_error = e

    def wait_started(self) -> None:
        """Wait until every process has started; raise what stopped a start (the pool then
        keeps only the processes that did start, and closes)."""
        self._starter.join()
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            self.close()
            raise error

    @property
    def size(self) -> int:
        return len(self._procs)

    def prepare(self, readers: Sequence[Tuple[str, int, Sequence[float], int]]) -> None:
        """Ask the processes without a job, in order, to open a video and seek to a frame
        now (:func:`~core.pipelines.video.clips.prepare_reader`): ``readers`` = [(video,
        frame, timestamps, decoder threads)], meant for the jobs :meth:`give` will then hand
        them in the same order (a job that reads from elsewhere opens its own reader)."""
        self.wait_started()
        free = [k for k, given in enumerate(self._given) if not given]
        for (video, frame, timestamps, threads), k in zip(readers, free):
            msg = ("prepare", str(video), int(frame), np.asarray(timestamps, dtype=np.float64)[:int(frame) + 1],
                   int(threads))
            threading.Thread(target=self._inboxes[k].put, args=(msg,), name=f"prepare-worker-{k}",
                             daemon=True).start()

    def give(self, jobs: Sequence[ClipJob]) -> dict:
        """Send each job to a process that has none yet; returns {job.worker: process}."""
        self.wait_started()
        free = [k for k, given in enumerate(self._given) if not given]
        if len(jobs) > len(free):
            raise ValueError(f"{len(jobs)} jobs for {len(free)} free pool processes")
        from multiprocessing.reduction import ForkingPickler

        procs = {}
        for job, k in zip(jobs, free):
            # Pickled here (a failure to share its tensors is raised here), written by a
            # thread: the write blocks until the process has read a job larger than the
            # pipe's buffer, and forever when that process is gone (this process holds the
            # pipe's reading end too); the caller's loop notices the death instead.
            data = bytes(ForkingPickler.dumps(job))
            threading.Thread(target=self._inboxes[k].put, args=(data,), name=f"job-to-worker-{k}",
                             daemon=True).start()
            self._given[k] = True
            procs[job.worker] = self._procs[k]
        return procs

    def close(self) -> None:
        """End the processes: those without a job at once, the others when done (at most
        5 s, then stopped). Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._starter.join()
        self._procs = [p for p in self._procs if p.pid is not None]  # (a failed start: those started)
        for k, p in enumerate(self._procs):
            if not self._given[k] and p.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    self._inboxes[k].put(None)
                self._given[k] = True
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        self.messages.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_workers(jobs: Sequence[ClipJob], on_frame: Optional[Callable[[FrameDone], None]] = None,
                in_process: Optional[bool] = None, poll_s: float = 0.2,
                pool: Optional[WorkerPool] = None) -> None:
    """Run :func:`fit_clip` for every job, each in its own worker process (one job: in
    this process unless ``in_process`` is False): a process of ``pool`` (already started)
    when it has enough free ones, else of a :class:`WorkerPool` started now. ``on_frame``
    is called in this process with the :class:`FrameDone` of every kept frame of every
    worker, as its message arrives (each worker's as it finishes them). Any failing worker stops the others and raises
    ``UserError("worker k failed: ...")``; results are in the jobs' cache files."""
    on_frame = on_frame or (lambda event: None)
    if in_process is None:
        in_process = len(jobs) == 1
    if in_process:
        for job in jobs:
            try:
                fit_clip(job, on_frame)
            except UserError as e:
                raise UserError(f"worker {job.worker} failed: {e}") from None
        return
    with contextlib.ExitStack() as stack:
        if pool is None or pool.size < len(jobs):
            pool = stack.enter_context(WorkerPool(len(jobs), cuda=any(j.session.device != "cpu" for j in jobs)))
        _run_in(pool, jobs, on_frame, poll_s)


def _run_in(pool: WorkerPool, jobs: Sequence[ClipJob], on_frame: Callable[[FrameDone], None],
            poll_s: float) -> None:
    """:func:`run_workers`' message loop over the jobs given to ``pool``'s processes."""
    messages = pool.messages
    finished = set()
    procs = {}
    try:
        with _shared_memory_errors():
            procs = pool.give(jobs)
        while len(finished) < len(procs):
            try:
                msg = messages.get(timeout=poll_s)
            except queue_mod.Empty:
                msg = None
            if msg is not None:
                kind, worker = msg[0], msg[1]
                if kind == "frame":
                    on_frame(msg[2])
                elif kind == "done":
                    finished.add(worker)
                elif kind == "error":
                    log.debug("worker %d traceback:\n%s", worker, msg[3])
                    raise UserError(f"worker {worker} failed: {msg[2]}")
                continue
            for worker, p in procs.items():
                if worker not in finished and p.exitcode is not None:
                    # Give a last message time to arrive before calling it a silent death.
                    with contextlib.suppress(queue_mod.Empty):
                        while True:
                            msg = messages.get(timeout=1.0)
                            if msg[0] == "error":
                                log.debug("worker %d traceback:\n%s", msg[1], msg[3])
                                raise UserError(f"worker {msg[1]} failed: {msg[2]}")
                            if msg[0] == "done":
                                finished.add(msg[1])
                            elif msg[0] == "frame":
                                on_frame(msg[2])
                    if worker not in finished:
                        raise UserError(f"worker {worker} failed: the process exited with code {p.exitcode} "
                                        f"(killed, e.g. out of memory?)")
        for worker, p in procs.items():
            p.join(timeout=60)
            if p.exitcode not in (0, None):
                raise UserError(f"worker {worker} failed: the process exited with code {p.exitcode}")
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
        for p in procs.values():
            p.join(timeout=10)
