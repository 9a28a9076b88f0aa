"""The stage cache of a video run: keys (digests of what a result depends on), ``.npz``
files written atomically with their key, and the lock that keeps one run per cache folder.

A cache file holds its arrays and ``cache_key``; :func:`load_npz` returns them only when
the key matches, so a changed video, model, configuration or frame range recomputes the
stage instead of reusing a stale result.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Dict, Optional

import numpy as np

from core.errors import UserError
from core.io.atomic import atomic_path
from core.models.face_model import FaceModel

log = logging.getLogger(__name__)

CACHE_VERSION = 1
LOCK_NAME = "run.lock"


def video_cache_dir(cache_folder: str, video_path: str) -> str:
    """The folder of one video's caches: ``<cache_folder>/<video name without extension>``."""
    return os.path.join(cache_folder, os.path.splitext(os.path.basename(video_path))[0])


def digest(obj) -> str:
    """A short digest of a JSON-able description (keys sorted; other values by str)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def array_digest(*arrays) -> str:
    """A short digest of the dtypes, shapes and bytes of ``arrays``."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: FaceModel) -> str:
    """A digest of every buffer of the model (cache keys must change with the model)."""
    return array_digest(*(b.detach().cpu().numpy() for _, b in sorted(model.named_buffers())))


def partial_path(path: str) -> str:
    """The checkpoint file of the cache file ``path``: ``x.npz`` -> ``x.partial.npz``."""
    root, ext = os.path.splitext(path)
    return f"{root}.partial{ext}"


def save_npz(path: str, key: str, **arrays) -> None:
    """Write ``arrays`` and ``key`` to ``path`` atomically (UserError when it cannot)."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, cache_key=np.array(key), **arrays)
    except OSError as e:  # disk full, file-size limit, folder removed
        raise UserError(f"cannot write the cache file '{path}': {e.strerror or e}") from None


def load_npz(path: str, key: str) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a cache file written with ``key``, or None (missing, stale, unreadable)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["cache_key"]) != key:
                log.debug("cache %s is for other settings; recomputing", path)
                return None
            return {k: data[k] for k in data.files if k != "cache_key"}
    except Exception as e:  # a damaged cache is recomputed, never fatal
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


@contextlib.contextmanager
def cache_lock(cache_dir: str):
    """Hold an exclusive lock on ``cache_dir`` (``run.lock`` in it, with this process's
    pid) for the duration of the block. A second run on the same folder fails at once with
    a UserError naming the holder's pid. The lock is an ``fcntl.flock``, so the system
    releases it when the holder dies, however it dies. (No lock where fcntl is missing.)"""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = os.path.join(cache_dir, LOCK_NAME)
    try:
        f = open(path, "a+", encoding="ascii")
    except OSError as e:
        raise UserError(f"cache folder '{cache_dir}' is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = ""
        for _ in range(3):  # the holder writes its pid just after locking
            f.seek(0)
            pid = f.read().strip()
            if pid.isdigit():
                break
            time.sleep(0.05)
        f.close()
        raise UserError(f"another fit_video.py run (pid {pid if pid.isdigit() else 'unknown'}) is using the cache "
                        f"folder '{cache_dir}'; wait for it or pass another --cache_folder") from None
    try:
        with contextlib.suppress(OSError):  # the pid is for the message only
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        yield
    finally:
        f.close()  # releases the lock
