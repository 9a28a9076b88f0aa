"""Settings of a video run (:class:`VideoOptions`) and the frame range: parsing
``--frame_range START:STOP``, checking it against the video, checking the options."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

from core import defaults
from core.errors import UserError
from core.io.video import VideoReader
from core.landmarks.smoothing import window_error

FrameRange = Tuple[int, Optional[int]]
# --export formats
EXPORTS = ("nerf",)


@dataclass(frozen=True)
class VideoOptions:
    """Settings of a video run beyond the fit configuration.

    nframes_shape: frames used for identity and albedo (None: the fit preset's
    ``shape_frames``: 16 for the original, 8 for the default). nworkers: fitting processes.
    ngpus: GPUs used round-robin by the workers when the session runs on CUDA.
    clip_overlap: warm-up frames before each clip after the first (0: the original).
    cache_folder: where stages are cached, ``<cache_folder>/<video name>/`` (None: a
    temporary folder, removed afterwards; fit_video.py's --cache_folder gives the
    original's ``fitting_cache``).
    padding_ratio: face box enlargement for the crop. checkpoint_s: seconds between
    checkpoints of a running stage. keep_audio: copy the source audio into the video.
    threads: torch CPU threads of each process (this one for the shape fit and the
    rendering, and each worker); None: all cores here, cores // nworkers per worker.
    frame_range: (start, stop) 0-based source frame indices, stop exclusive or None for
    the end of the video; only those frames are read, fitted and composed (None: all).
    focal: None (the original's crop camera, unless an export asks for a frame camera),
    "auto" (one focal length for the video, estimated with the identity) or a focal
    length in pixels of the source frame.
    export: export formats ("nerf": transforms_train.json / transforms_val.json,
    track_params.pt and the landmarks, see :mod:`core.pipelines.video.export`).
    save_meshes: write every frame's posed vertices (float16 .npy).
    principal: the frame camera's principal point (cx, cy) in source pixels (None: the
    frame centre (w/2, h/2)).
    cores: the CPU cores this run may use (None: every core of this process; a torchrun
    rank gets its share of the machine's).
    lm_smooth: smooth the inner landmarks' tracks over this many frames (odd) before fitting
    (:mod:`core.landmarks.smoothing`; 0: off; None: the fit preset's ``lm_smooth``). The
    landmark NME, the pkl and the exports keep the detector's landmarks.
    shape_seeds: start a chain of warm-started frames at each identity frame too, from its
    identity-fit coefficients, and fit a clip's chains in lockstep batches
    (:mod:`core.pipelines.video.clips`; None: the fit preset's ``shape_seeds``).
    Any of focal, export, save_meshes and principal fits the video with one frame camera
    (:attr:`frame_camera`).
    """

    nframes_shape: Optional[int] = None
    nworkers: int = 1
    ngpus: int = 1
    clip_overlap: int = 8
    cache_folder: Optional[str] = None
    padding_ratio: float = defaults.PADDING_RATIO
    checkpoint_s: float = 30.0
    keep_audio: bool = True
    threads: Optional[int] = None
    frame_range: Optional[FrameRange] = None
    focal: Optional[Union[str, float]] = None
    export: Tuple[str, ...] = ()
    save_meshes: bool = False
    principal: Optional[Tuple[float, float]] = None
    cores: Optional[int] = None
    lm_smooth: Optional[int] = None
    shape_seeds: Optional[bool] = None

    @property
    def frame_camera(self) -> bool:
        """Whether the video is fitted with one full-frame camera (see the class docstring)."""
        return self.focal is not None or bool(self.export) or self.save_meshes or self.principal is not None

    @property
    def estimate_focal(self) -> bool:
        return self.frame_camera and (self.focal is None or self.focal == "auto")


def resolve_options(options: VideoOptions, cfg) -> VideoOptions:
    """``options`` with what it leaves to the fit preset ``cfg`` (a FitConfig) filled in:
    ``nframes_shape`` None -> ``cfg.shape_frames``, ``lm_smooth`` None -> ``cfg.lm_smooth``,
    ``shape_seeds`` None -> ``cfg.shape_seeds``."""
    if options.nframes_shape is None:
        options = replace(options, nframes_shape=cfg.shape_frames)
    if options.lm_smooth is None:
        options = replace(options, lm_smooth=cfg.lm_smooth)
    if options.shape_seeds is None:
        options = replace(options, shape_seeds=cfg.shape_seeds)
    return options


def check_options(options: VideoOptions) -> None:
    """Raise UserError for counts below their minimum or an inverted frame range."""
    if options.nworkers < 1 or options.ngpus < 1 or (options.nframes_shape is not None and options.nframes_shape < 1) or options.clip_overlap < 0 \
            or (options.threads is not None and options.threads < 1):
        raise UserError("--nworkers, --ngpus, --nframes_shape and --threads must be >= 1 and --clip_overlap >= 0")
    if options.lm_smooth is not None and window_error(options.lm_smooth):
        raise UserError(f"--lm_smooth {window_error(options.lm_smooth)}")
    if options.focal is not None and options.focal != "auto" and not (
            isinstance(options.focal, (int, float)) and 0 < float(options.focal) < float("inf")):
        raise UserError(f"--focal must be 'auto' or a focal length in pixels > 0; got {options.focal!r}")
    unknown = sorted(set(options.export) - set(EXPORTS))
    if unknown:
        raise UserError(f"--export {', '.join(unknown)}: unknown format (known: {', '.join(EXPORTS)})")
    if options.frame_range is not None:
        start, stop = options.frame_range
        if start < 0 or (stop is not None and stop <= start):
            raise UserError(f"--frame_range {format_frame_range(options.frame_range)}: expected 0 <= START < STOP")


_RANGE_RE = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*$")


def format_frame_range(frame_range: Optional[FrameRange]) -> str:
    """'START:STOP' ('100:' for an open end); '' for None."""
    if frame_range is None:
        return ""
    start, stop = frame_range
    return f"{start}:{'' if stop is None else stop}"


def parse_frame_range(text: str) -> FrameRange:
    """``'START:STOP'`` -> (start, stop): 0-based source frame indices, STOP excluded;
    either side may be empty (``'100:'`` to the end, ``':250'`` from frame 0). Raises
    UserError for anything else or START >= STOP."""
    m = _RANGE_RE.match(text or "")
    if m is None:
        raise UserError(f"--frame_range '{text}' is not START:STOP (0-based frame indices, STOP excluded, "
                        f"either may be empty: 100: or :250)")
    start = int(m.group(1)) if m.group(1) else 0
    stop = int(m.group(2)) if m.group(2) else None
    if stop is not None and start >= stop:
        raise UserError(f"--frame_range '{text}': START must be below STOP")
    return start, stop


def check_frame_range(video_path: str, frame_range: Optional[FrameRange]) -> None:
    """Raise UserError when ``frame_range`` starts beyond the end of the video (checked by
    seeking to its first frame; the container's frame count settles clear cases at once)."""
    if frame_range is None or frame_range[0] == 0:
        return
    start = int(frame_range[0])
    with VideoReader(video_path) as reader:
        n = reader.info.num_frames
        found = False
        if not (n and start >= n + max(10, n // 100)):  # the count can be an estimate: seek to be sure
            found = any(True for _ in reader.frames(start, start + 1, reader.estimated_timestamps(start + 1)))
    if not found:
        count = f" ({n} frames)" if n else ""
        raise UserError(f"--frame_range {format_frame_range(frame_range)} starts beyond the end of the video "
                        f"'{video_path}'{count}")


def cache_range(frame_range: Optional[FrameRange]) -> Optional[FrameRange]:
    """The frame range as caches see it: None for the whole video (also '0:')."""
    if frame_range is None or (int(frame_range[0]) == 0 and frame_range[1] is None):
        return None
    return int(frame_range[0]), None if frame_range[1] is None else int(frame_range[1])


def range_suffix(frame_range: Optional[FrameRange]) -> str:
    """'' for the whole video, '_START_STOP' ('_START_end') for a frame range (cache file
    names)."""
    frame_range = cache_range(frame_range)
    if frame_range is None:
        return ""
    return f"_{frame_range[0]}_{'end' if frame_range[1] is None else frame_range[1]}"
