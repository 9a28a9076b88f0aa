"""Units of work handed out one at a time to whichever rank asks first, and the job's
manifest.

Every rank calls :func:`share_units` with the same list of units in the same order. A rank
claims the next unit with an atomic counter in the shared store (``store.add``), so a slow
rank or a long unit holds nobody up. A unit already finished by an earlier run is skipped
(``is_done``); a unit whose work raises is recorded as failed and the rank goes on. Each
unit's record goes into the store; rank 0 waits for all of them, writes
``manifest.json`` atomically and posts the job's exit status, which every rank returns.

manifest.json::

    {"units": [{"unit": name, "rank": r, "status": "done" | "failed" | "skipped",
                "seconds": s, "error": message or null}, ...],   # in the units' order
     "world_size": n, "units_total": ..., "done": ..., "failed": ..., "skipped": ...,
     "ranks": [{"rank": r, "units": k, "seconds": s}, ...], "wall_s": ...}

"skipped": the unit's outputs were already there (an earlier run, or a rank that died
after writing them); "done": fitted by this run; "failed": ``error`` says why. A re-run
tries the failed units again (so does torchrun's ``--max_restarts``, which restarts every
rank when one exits non-zero).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from core.errors import UserError
from core.io.atomic import write_text_atomic

from .ranks import Ranks

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
STATUSES = ("done", "failed", "skipped")
EXIT_ALL_DONE, EXIT_SOME_FAILED, EXIT_NO_MANIFEST = 0, 1, 2
POLL_S = 0.2


@dataclass(frozen=True)
class Unit:
    """One piece of work: a name for the manifest and the inputs (paths)."""

    name: str
    items: Tuple[str, ...]


def _run_one(unit: Unit, work: Callable[[Unit], Optional[str]], is_done: Callable[[Unit], bool]) -> Tuple[str, str]:
    """(status, error) of one unit."""
    try:
        if is_done(unit):
            return "skipped", ""
        error = work(unit)
    except (KeyboardInterrupt, SystemExit):
        raise
    except UserError as e:
        return "failed", str(e)
    except OSError as e:
        where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
        return "failed", f"cannot write or read{where}: {e.strerror or e}"
    except Exception as e:  # noqa: BLE001 - one unit's bug must not end the job
        text = str(e).strip().splitlines()
        log.debug("unit %s", unit.name, exc_info=True)
        return "failed", f"internal error: {type(e).__name__}: {text[0] if text else ''}"
    return ("failed", error) if error else ("done", "")


def share_units(ranks: Ranks, units: Sequence[Unit], work: Callable[[Unit], Optional[str]],
                is_done: Callable[[Unit], bool], res_folder: str, poll_s: float = POLL_S,
                idle: Optional[Callable[[Callable[[], bool]], None]] = None,
                rank_info: Optional[Callable[[], dict]] = None) -> int:
    """Work through ``units`` together with the other ranks. Rank 0 returns the job's
    exit status: 0 every unit done or skipped, 1 some failed, 2 the manifest could not be
    written; the other ranks return 0 once rank 0 has written the manifest (their failed
    units are in it), so torchrun's status is rank 0's.

    work(unit): fits the unit and writes its outputs (atomically) under ``res_folder``;
    returns None, or a message when part of the unit failed; raising fails the unit.
    is_done(unit): whether the unit's outputs are all there already.
    idle(finished): called once this rank finds no unit left, with a function that says
    whether every unit is finished (a rank helps the others meanwhile, :mod:`.clipshare`).
    rank_info(): more keys for this rank's entry in the manifest's ``ranks``.
    """
    store, n = ranks.store, len(units)
    # Start together: a rank still loading its model would otherwise find the first units
    # taken by a faster one.
    store.add(ranks.key("ready"), 1)
    while int(store.add(ranks.key("ready"), 0)) < ranks.world_size:
        time.sleep(poll_s / 4)
    t_start = time.perf_counter()
    mine = 0
    while True:
        i = int(store.add(ranks.key("next"), 1)) - 1
        if i >= n:
            break
        unit = units[i]
        t0 = time.perf_counter()
        status, error = _run_one(unit, work, is_done)
        seconds = time.perf_counter() - t0
        mine += 1
        record = {"unit": unit.name, "rank": ranks.rank, "status": status, "seconds": round(seconds, 3),
                  "error": error or None}
        store.set(ranks.key(f"unit/{i}"), json.dumps(record))
        store.add(ranks.key("records"), 1)
        if status == "failed":
            log.warning("%s failed: %s", unit.name, error)
        else:
            log.info("%s: %s (%d of %d, %.1f s)", unit.name, "fitted" if status == "done" else
                     "already done, skipped", i + 1, n, seconds)
    def finished() -> bool:  # one store operation, however many units (ranks poll it)
        return int(store.add(ranks.key("records"), 0)) >= n

    if idle is not None:
        idle(finished)
    busy = time.perf_counter() - t_start
    store.set(ranks.key(f"rank/{ranks.rank}"), json.dumps({"rank": ranks.rank, "units": mine, "seconds": round(busy, 3),
                                                           **(rank_info() if rank_info else {})}))
    if ranks.is_main:
        status = EXIT_NO_MANIFEST
        try:
            while not finished():
                time.sleep(poll_s)
            _wait(store, [ranks.key(f"rank/{r}") for r in range(ranks.world_size)], poll_s)
            manifest = _manifest(ranks, n, time.perf_counter() - t_start)
            os.makedirs(res_folder, exist_ok=True)  # when no unit wrote anything
            write_text_atomic(os.path.join(res_folder, MANIFEST_NAME), json.dumps(manifest, indent=2))
            status = EXIT_SOME_FAILED if manifest["failed"] else EXIT_ALL_DONE
            log.info("%d units: %d done, %d skipped (already done), %d failed; %s", n, manifest["done"],
                     manifest["skipped"], manifest["failed"], os.path.join(res_folder, MANIFEST_NAME))
        finally:
            store.set(ranks.key("status"), str(status))
        _wait(store, [ranks.key(f"left/{r}") for r in range(1, ranks.world_size)], poll_s, limit_s=60.0)
        return status
    _wait(store, [ranks.key("status")], poll_s)
    store.set(ranks.key(f"left/{ranks.rank}"), "1")  # rank 0 may now close the store it hosts
    # The job's status is rank 0's: were the other ranks to exit with it too, the first of
    # them to exit non-zero would make torchrun stop rank 0 before it closes down.
    return EXIT_ALL_DONE


def _wait(store, keys: List[str], poll_s: float, limit_s: Optional[float] = None) -> bool:
    """Poll until every key is in the store (no store timeout however long the units
    take); False after ``limit_s`` seconds."""
    t0 = time.monotonic()
    while not store.check(keys):
        if limit_s is not None and time.monotonic() - t0 > limit_s:
            return False
        time.sleep(poll_s)
    return True


def _manifest(ranks: Ranks, n: int, wall_s: float) -> dict:
    store = ranks.store
    units = [json.loads(store.get(ranks.key(f"unit/{i}"))) for i in range(n)]
    per_rank = [json.loads(store.get(ranks.key(f"rank/{r}"))) for r in range(ranks.world_size)]
    counts = {s: sum(u["status"] == s for u in units) for s in STATUSES}
    return {"units": units, "world_size": ranks.world_size, "units_total": n, **counts, "ranks": per_rank,
            "wall_s": round(wall_s, 3)}
