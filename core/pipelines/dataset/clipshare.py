"""Clips of a long video shared with idle ranks.

The rank that fits a video (its owner) splits the per-frame fitting into clips of at most
``clip_frames`` frames and posts them as a "clip set" in the shared store; it then fits
clips of the set itself, one at a time, taking each from the set's counter. A rank with no
unit of its own left (:meth:`ClipSharing.help`, called by the work queue when its counter
is spent) takes clips from every open set meanwhile. A clip's result goes into the owner's
cache folder (``<cache_folder>/<video>/clip_*.npz``, written atomically), so the folder
must be one both ranks can reach (always on one machine; a shared file system across
machines). The owner waits for every clip of its set and fits again, itself, any clip whose
helper failed or whose result it cannot read, so a helper that cannot reach the folder
costs time, never the video.

Store keys (under the job attempt's prefix, :meth:`Ranks.key`): ``clipsets`` (sets posted),
``clipset/<b>/n``, ``.../job/<k>`` (the pickled :class:`ClipJob` without its session),
``.../ready``, ``.../next`` (the claim counter), ``.../done/<k>`` ({"rank", "error"}) and
``.../closed``.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import time
from dataclasses import replace
from typing import Callable, Optional, Sequence, Set

from ..session import Session, SessionSpec
from ..video import ClipJob, FrameDone
from ..video.cache import load_npz
from ..video.workers import run_workers
from .ranks import Ranks

log = logging.getLogger(__name__)

POLL_S = 0.2


class ClipSharing:
    """The clip runner of one rank (passed to :func:`~core.pipelines.video.run_video` as
    ``clip_runner``) and its help for the other ranks.

    clip_frames: the most frames in one clip (a video of n frames gets at least
    ceil(n / clip_frames) clips). threads: CPU threads for the clips this rank fits.
    """

    def __init__(self, ranks: Ranks, session: Session, clip_frames: int, threads: int, poll_s: float = POLL_S):
        self.ranks, self.store = ranks, ranks.store
        self.clip_frames = int(clip_frames)
        self.threads = int(threads)
        self.poll_s = poll_s
        self._session = session
        self._spec: Optional[SessionSpec] = None
        self.helped = 0  # clips of other ranks' videos fitted here

    def clips_for(self, n_frames: int) -> int:
        """How many clips a video of ``n_frames`` frames is fitted in."""
        return max(1, math.ceil(n_frames / self.clip_frames))

    def _key(self, b: int, name: str) -> str:
        return self.ranks.key(f"clipset/{b}/{name}")

    # --- the owner ----------------------------------------------------------------------------

    def run(self, jobs: Sequence[ClipJob], on_frame: Optional[Callable[[FrameDone], None]] = None) -> None:
        """Fit ``jobs`` (one video's clips) with whichever ranks are free; return when every
        job's result is in its cache file (UserError when a clip cannot be fitted here)."""
        store, n = self.store, len(jobs)
        if n == 1:  # nothing to share
            run_workers(jobs, on_frame=on_frame)
            return
        b = int(store.add(self.ranks.key("clipsets"), 1)) - 1
        for k, job in enumerate(jobs):
            store.set(self._key(b, f"job/{k}"), pickle.dumps(replace(job, session=None)))
        store.set(self._key(b, "n"), str(n))
        store.set(self._key(b, "ready"), "1")
        try:
            while True:
                k = int(store.add(self._key(b, "next"), 1)) - 1
                if k >= n:
                    break
                self._fit_own(b, k, jobs[k], on_frame)
            done = [self._key(b, f"done/{k}") for k in range(n)]
            while not store.check(done):
                time.sleep(self.poll_s)
            for k, job in enumerate(jobs):
                record = json.loads(store.get(done[k]))
                if record["rank"] == self.ranks.rank:
                    continue
                if record["error"] or load_npz(job.cache_path, job.key) is None:
                    log.warning("clip %d-%d: rank %d %s; fitting it here", job.start, job.stop - 1, record["rank"],
                                f"failed ({record['error']})" if record["error"] else "wrote no result here")
                    run_workers([job], on_frame=on_frame)
        finally:
            store.set(self._key(b, "closed"), "1")

    def _fit_own(self, b: int, k: int, job: ClipJob, on_frame) -> None:
        try:
            run_workers([job], on_frame=on_frame)
        finally:
            self.store.set(self._key(b, f"done/{k}"), json.dumps({"rank": self.ranks.rank, "error": None}))

    # --- the helpers --------------------------------------------------------------------------

    def help(self, finished: Callable[[], bool]) -> None:
        """Fit clips of the other ranks' open sets until ``finished()``."""
        closed: Set[int] = set()
        while not finished():
            if not self._help_once(closed):
                time.sleep(self.poll_s)

    def _help_once(self, closed: Set[int]) -> bool:
        """Claim and fit one clip of an open set; False when there was none."""
        store = self.store
        for b in range(int(store.add(self.ranks.key("clipsets"), 0))):
            if b in closed or not store.check([self._key(b, "ready")]):
                continue
            if store.check([self._key(b, "closed")]):
                closed.add(b)
                continue
            n = int(store.get(self._key(b, "n")))
            k = int(store.add(self._key(b, "next"), 1)) - 1
            if k >= n:
                closed.add(b)  # every clip taken: nothing more to do there
                continue
            self._fit_for_other(b, k)
            return True
        return False

    def _fit_for_other(self, b: int, k: int) -> None:
        error = None
        try:
            job = pickle.loads(self.store.get(self._key(b, f"job/{k}")))
            if self._spec is None:
                self._spec = SessionSpec.of(self._session)
            job = replace(job, session=self._spec, threads=self.threads, adaptive_threads=True)
            t0 = time.perf_counter()
            run_workers([job])
            self.helped += 1
            log.info("helped with clip %d-%d of %s (%.1f s)", job.start, job.stop - 1, job.video_path,
                     time.perf_counter() - t0)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the owner fits the clip again itself
            error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("could not help with a clip (set %d, clip %d): %s", b, k, error)
        finally:
            self.store.set(self._key(b, f"done/{k}"), json.dumps({"rank": self.ranks.rank, "error": error}))
