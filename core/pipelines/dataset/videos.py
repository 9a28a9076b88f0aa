"""Videos as work units for a job of many ranks: ``--v_path`` as a folder of videos or a
text file listing them, each video fitted and written by
:func:`core.pipelines.video.run_video`."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import List, Optional, Sequence

import torch

from core.errors import UserError
from core.io.outputs import check_unique

from ..session import Session
from ..video import VideoOptions, output_names, run_video
from ..video.compose import RECON_SUFFIX
from .clipshare import ClipSharing
from .ranks import Ranks
from .workqueue import Unit, share_units

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts")
LIST_EXTS = (".txt", ".lst", ".list")
# Under torchrun, the most frames of a video fitted as one clip (40 s at 25 fps): a long
# video's clips are shared with ranks that have no video of their own left.
CLIP_FRAMES = 1000


def is_video_list(path: str) -> bool:
    """Whether ``--v_path`` names several videos: a folder, or a list file (.txt, .lst,
    .list)."""
    return os.path.isdir(path) or path.lower().endswith(LIST_EXTS)


def expand_videos(path: str, res_folder: Optional[str] = None) -> List[str]:
    """The videos of ``--v_path``: a folder's video files (sorted; not its sub-folders, nor,
    when the folder is ``res_folder``, the composed videos written there), a list file's
    lines (blank lines and ``#`` comments skipped; relative paths from the list file's
    folder), or the one video. UserError when there are none."""
    if os.path.isdir(path):
        ours = res_folder is not None and os.path.realpath(path) == os.path.realpath(res_folder)
        found = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(VIDEO_EXTS) and os.path.isfile(os.path.join(path, f))
                       and not (ours and f.endswith(RECON_SUFFIX)))
        if not found:
            raise UserError(f"folder '{path}' contains no videos ({', '.join(VIDEO_EXTS)})")
        return found
    if not path.lower().endswith(LIST_EXTS):
        return [path]
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the video list '{path}': {getattr(e, 'strerror', None) or e}") from None
    base = os.path.dirname(os.path.abspath(path))
    found = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines if ln and not ln.startswith("#")]
    if not found:
        raise UserError(f"the video list '{path}' names no videos (one path per line)")
    return found


def video_units(paths: Sequence[str]) -> List[Unit]:
    """One unit per video (UserError when two videos would write the same outputs)."""
    check_unique([os.path.splitext(os.path.basename(p))[0] for p in paths], paths)
    return [Unit(name=os.path.basename(p), items=(p,)) for p in paths]


def video_written(path: str, res_folder: str, options: VideoOptions) -> bool:
    """Whether every output ``options`` asks for of the video ``path`` is in ``res_folder``
    (the info goes last: with it, the pkl and the video are complete)."""
    names = output_names(path)
    need = ["pkl", "video", "info"] + (["meshes"] if options.save_meshes else [])
    files = [os.path.join(res_folder, names[k]) for k in need]
    if "nerf" in options.export:
        files.append(os.path.join(res_folder, names["nerf"], "transforms_train.json"))
    return all(os.path.isfile(f) for f in files)


def run_video_dataset(ranks: Ranks, session: Session, detector, paths: Sequence[str], res_folder: str,
                      options: VideoOptions, info_extra: Optional[dict] = None, progress: bool = False,
                      clip_frames: int = CLIP_FRAMES) -> int:
    """Fit ``paths``, one video per unit, shared among the ranks; videos already written
    are skipped. With more than one rank and ``clip_frames`` > 0, each video is fitted in
    clips of at most ``clip_frames`` frames that ranks without a video of their own help
    with (:mod:`.clipshare`). Returns the exit status of :func:`share_units`."""
    sharing = None
    if ranks.distributed:  # each rank keeps to its own GPU (or its share of the CPU)
        options = replace(options, ngpus=1)
        if ranks.world_size > 1 and clip_frames > 0:
            sharing = ClipSharing(ranks, session, clip_frames,
                                  threads=options.threads or options.cores or torch.get_num_threads())

    def work(unit: Unit) -> None:
        run_video(session, detector, unit.items[0], res_folder, options, info_extra=info_extra, progress=progress,
                  clip_runner=sharing)

    return share_units(ranks, video_units(paths), work,
                       lambda unit: video_written(unit.items[0], res_folder, options), res_folder,
                       idle=sharing.help if sharing else None,
                       rank_info=(lambda: {"clips_helped": sharing.helped}) if sharing else None)
