"""Whether this process ignores interrupts: the one test that both the encoders
(:mod:`core.io.video_out`, an ffmpeg child's session) and the video worker pool
(:mod:`core.pipelines.video.workers`, whether its workers take Ctrl-C) make."""
from __future__ import annotations

import signal

__all__ = ["sigint_ignored"]


def sigint_ignored() -> bool:
    """True when SIGINT is ignored here: a run started under nohup or as a script's
    background job, or a video worker of such a run. A SIGINT to the process group is then
    not meant for it, nor for what it starts."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN
