"""The first module the video worker pool's forkserver imports (``set_forkserver_preload``;
it lives outside core.pipelines.video, whose package imports torch).

The forkserver ignores Ctrl-C once it serves, but imports its preloaded modules (torch and
this project, about a second) before that; a Ctrl-C in the terminal then (it reaches the
whole process group, e.g. early in the landmark pass) printed the server's
KeyboardInterrupt traceback under the run's "error: interrupted". Imported by the server,
this module makes it ignore SIGINT from the start; imported anywhere else it does nothing.
The workers forked from the server start with SIGINT ignored too, and
:func:`core.pipelines.video.workers._pool_entry` gives them Python's usual handler back.
"""
from __future__ import annotations

import signal
import sys


def _imported_by_forkserver() -> bool:
    """Whether this import runs inside ``multiprocessing.forkserver.main`` (its preload)."""
    server = sys.modules.get("multiprocessing.forkserver")
    main = getattr(server, "main", None)
    code = getattr(main, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


if _imported_by_forkserver():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The workers and the tracking helper are forked from the server: they keep its malloc
    # settings (core.malloc; the main process sets its own in core.pipelines.cli.run_main).
    from core.malloc import keep_freed_memory
    keep_freed_memory()
