"""Photos as work units for a job of many ranks: batches of ``--batch_size`` photos in
input order, each fitted and written by :func:`core.pipelines.photo.run_photos`."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from core.io.outputs import check_unique

from ..photo import output_names, photo_stem, run_photos
from ..session import Session
from .ranks import Ranks
from .workqueue import Unit, share_units


def photo_units(paths: Sequence[str], batch_size: int) -> List[Unit]:
    """Batches of ``batch_size`` photos in the order given (UserError when two photos
    would write the same outputs)."""
    check_unique([photo_stem(p) for p in paths], paths)
    units = []
    for k in range(0, len(paths), max(1, int(batch_size))):
        chunk = tuple(paths[k:k + batch_size])
        names = [os.path.basename(p) for p in chunk]
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} photos)"
        units.append(Unit(name=label, items=chunk))
    return units


def photo_written(path: str, res_folder: str, model) -> bool:
    """Whether every output file of the photo ``path`` is in ``res_folder``."""
    stem = photo_stem(path)
    return all(os.path.isfile(os.path.join(res_folder, f)) for f in output_names(stem, model))


def run_photo_dataset(ranks: Ranks, session: Session, detector, paths: Sequence[str], res_folder: str,
                      batch_size: int, **photo_args) -> int:
    """Fit ``paths`` in batches shared among the ranks (``photo_args``: those of
    :func:`run_photos`); photos already written are skipped. Returns the exit status of
    :func:`share_units`."""
    def is_done(unit: Unit) -> bool:
        return all(photo_written(p, res_folder, session.model) for p in unit.items)

    def work(unit: Unit) -> Optional[str]:
        todo = [p for p in unit.items if not photo_written(p, res_folder, session.model)]
        report = run_photos(session, detector, todo, res_folder, batch_size=len(todo), **photo_args)
        return "; ".join(report.failed.values()) or None

    return share_units(ranks, photo_units(paths, batch_size), work, is_done, res_folder)
