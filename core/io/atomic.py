"""Atomic file output: write to a temporary name in the target folder, then rename.

A reader never sees a half-written file under the final name: either the old file (or
none) or the complete new one.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from typing import Callable, Dict, Iterator, Sequence


def ignore_file_size_signal() -> None:
    """Make a file-size limit (``ulimit -f``) an OSError (EFBIG) at the write instead of a
    silent kill by SIGXFSZ, so it can become a one-line error. CPython already ignores the
    signal at start-up; embedded interpreters may not. A no-op where the signal does not
    exist, or outside the main thread (where handlers cannot be set)."""
    sig = getattr(signal, "SIGXFSZ", None)
    if sig is None or signal.getsignal(sig) == signal.SIG_IGN:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def _temporary(path: str, suffix: str | None = None) -> Iterator[str]:
    """A new empty file beside ``path`` (extension ``suffix``, default that of ``path``)
    with the usual permissions; removed on the way out unless renamed by then."""
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if suffix is None:
        suffix = os.path.splitext(base)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp" + suffix, dir=folder)
    try:
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    ``suffix`` is the temporary file's extension (default: that of ``path``), for writers
    that pick the format from the name (cv2.imwrite, imageio). On an exception the
    temporary file is removed and the exception propagates.
    """
    with _temporary(path, suffix) as tmp:
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_group(paths: Sequence[str]) -> Iterator[Dict[str, str]]:
    """Yield {final path: temporary path} for several files written as one group: when
    the block ends without an exception each is renamed into place, else none is and every
    temporary file is removed (a failed rename leaves the ones before it renamed)."""
    with contextlib.ExitStack() as stack:
        tmps = {p: stack.enter_context(_temporary(p)) for p in paths}
        yield tmps
        for p, tmp in tmps.items():
            os.replace(tmp, p)


def write_atomic(path: str, writer: Callable[[str], object], suffix: str | None = None) -> None:
    """Call ``writer(tmp_path)`` and rename the result to ``path`` if it succeeds."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (utf-8) to ``path`` atomically."""
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, _write)
