"""Stage 1 of the video pipeline: one streaming pass over the video with a
:class:`~core.landmarks.tracking.FaceTracker`, 68 landmarks and a face box per frame (or
"no face"), cached in ``landmarks.npz`` (checkpointed while it runs) under a key of the
video's path, size and modification time, the detector and the frame range."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Collection, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from core.errors import UserError
from core.io.video import VideoReader
from core.landmarks.crop import crop_face, square_box
from core.landmarks.tracking import SOURCE_NONE, FaceTracker, face_arrays

from .ahead import MIN_FRAMES, Ahead
from .cache import CACHE_VERSION, digest, load_npz, partial_path, save_npz
from .options import FrameRange, cache_range, format_frame_range, range_suffix

log = logging.getLogger(__name__)

# The helper tracking ahead (``ahead``) starts this many frames' worth of time after the pass
# (the same detector load, then a second detection and a seek): it takes the later part of
# the frames, shorter by that much, so that the two end together.
HELPER_LAG_FRAMES = 60


@dataclass
class LandmarkTrack:
    """Per-frame results of the landmark pass (N frames: source frames start..start+N-1).

    Arrays are indexed by the position in the pass (0..N-1); source frame index =
    ``start`` + position (``start`` > 0 for a frame range).

    landmarks: (N, 68, 2) float32 photo pixels, NaN where no face.
    face_boxes: (N, 4) float64 detector-style face boxes, NaN where no face.
    source: (N,) int8, core.landmarks.tracking.SOURCE_* (0 = no face).
    timestamps: (N,) float64 ms, the decoder's timestamp of each frame (seek checks).
    fps, width, height: of the source video.
    """

    landmarks: np.ndarray
    face_boxes: np.ndarray
    source: np.ndarray
    timestamps: np.ndarray
    fps: float
    width: int
    height: int
    reused: bool = False  # loaded from the cache
    start: int = 0        # source index of the first frame
    # Decoded frames kept by the pass ({source index: RGB frame}; see landmark_pass ``keep``).
    frames: Dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # The frames' crops cut by the pass ((N, T, T, 3) uint8, zeros where no face; see
    # landmark_pass ``crops``), or None.
    crops: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return int(self.source.shape[0])

    @property
    def stop(self) -> int:
        """Source index one past the last frame."""
        return self.start + self.num_frames

    @property
    def has_face(self) -> np.ndarray:
        return self.source != SOURCE_NONE

    @property
    def frames_without_face(self) -> List[int]:
        """Source indices of the frames without a face."""
        return [self.start + int(i) for i in np.flatnonzero(~self.has_face)]

    def source_timestamps(self) -> np.ndarray:
        """Timestamps indexed by source frame (NaN before ``start``), for
        :meth:`core.io.video.VideoReader.frames` seeks."""
        return np.concatenate([np.full(self.start, np.nan), self.timestamps])

    def smoothed(self, window: int) -> "LandmarkTrack":
        """This track with its inner landmarks smoothed over ``window`` frames
        (:func:`core.landmarks.smoothing.smooth_landmarks`; 0: itself). Everything else,
        the face boxes (so the crops) included, is the same."""
        if not window:
            return self
        from core.landmarks.smoothing import smooth_landmarks
        return replace(self, landmarks=smooth_landmarks(self.landmarks, self.source, window))

    def crop_boxes(self, padding_ratio: float) -> np.ndarray:
        """(N, 4) int64 square crop boxes (SPEC §5), zeros where no face."""
        out = np.zeros((self.num_frames, 4), dtype=np.int64)
        for i in np.flatnonzero(self.has_face):
            out[i] = square_box(self.face_boxes[i], padding_ratio)
        return out


def landmark_key(video_path: str, detector, frame_range: Optional[FrameRange] = None) -> str:
    """The cache key of a landmark pass: the video file (path, size, modification time),
    the detector's name and the frame range."""
    frame_range = cache_range(frame_range)
    st = os.stat(video_path)
    spec = {"v": CACHE_VERSION, "video": os.path.abspath(video_path), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "detector": getattr(detector, "name", type(detector).__name__)}
    if frame_range is not None:  # (the whole video keeps its key: caches of earlier runs stay valid)
        spec["frame_range"] = [int(frame_range[0]), None if frame_range[1] is None else int(frame_range[1])]
    return digest(spec)


def _landmark_files(cache_dir: Optional[str], frame_range) -> Tuple[Optional[str], Optional[str]]:
    """(final, partial) cache files of a landmark pass; one pair per frame range."""
    if not cache_dir:
        return None, None
    final = os.path.join(cache_dir, f"landmarks{range_suffix(frame_range)}.npz")
    return final, partial_path(final)


def landmarks_cached(cache_dir: Optional[str], frame_range: Optional[FrameRange] = None) -> bool:
    """Whether ``cache_dir`` holds a finished landmark pass of ``frame_range`` (a file
    check only: :func:`landmark_pass` still checks its key)."""
    final, _ = _landmark_files(cache_dir, frame_range)
    return bool(final) and os.path.isfile(final)


def landmark_pass(video_path: str, detector, cache_dir: Optional[str] = None, progress: bool = True,
                  checkpoint_s: float = 30.0, tracker: Optional[FaceTracker] = None,
                  frame_range: Optional[FrameRange] = None, keep: Collection[int] = (),
                  crops: Optional[Tuple[float, int]] = None, crop_bytes: int = 0,
                  ahead: bool = False) -> LandmarkTrack:
    """Stage 1: landmarks and face box of every frame (see :mod:`core.landmarks.tracking`), or of
    the source frames ``frame_range`` = (start, stop or None) only (the reader seeks to
    start; the track's ``start`` is then ``start``).

    With ``cache_dir``, a finished pass is reused and an interrupted one resumes from its
    last checkpoint (each frame range has its own cache). Raises UserError for an
    unreadable video or a range that holds no frame.

    ``keep``: source frame indices whose decoded frames the track keeps in memory
    (``LandmarkTrack.frames``; a later stage then need not seek back to them). Frames a
    reused or resumed pass did not decode are not kept.

    ``crops`` = (padding_ratio, tar_size): also cut each frame's crop as the fits will
    (:func:`~core.landmarks.crop.crop_face` of the frame in ``crop_boxes(padding_ratio)``),
    so that the fitting workers need not decode the video for them, when all of them take
    at most ``crop_bytes`` (``LandmarkTrack.crops``; None for a reused or resumed pass, or
    one whose crops would not fit).

    ``ahead``: on a fresh pass of at least :data:`~.ahead.MIN_FRAMES` frames with a
    ``single_core`` detector, a helper process tracks the second half at the same time
    (:mod:`core.pipelines.video.ahead`; the workers' forkserver must be running): the same
    results, sooner.
    """
    key = landmark_key(video_path, detector, frame_range)
    final, partial = _landmark_files(cache_dir, frame_range)
    first = int(frame_range[0]) if frame_range else 0
    last = frame_range[1] if frame_range else None
    if final:
        cached = load_npz(final, key)
        if cached is not None:
            log.info("landmarks: reusing %s", final)
            track = _track_from_arrays(cached)
            track.reused = True
            return track
    tracker = tracker or FaceTracker(detector)
    keep = set(int(i) for i in keep)
    cut: Optional[np.ndarray] = None  # (total, T, T, 3) the crops, filled as the frames come
    n_cut = 0
    kept: Dict[int, np.ndarray] = {}
    lms, boxes, src, ts = [], [], [], []
    resume_from = 0
    saved = load_npz(partial, key) if partial else None
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(VideoReader(video_path))
        info = reader.info
        if saved is not None:
            resume_from = int(saved["source"].shape[0])
            lms, boxes = list(saved["landmarks"]), list(saved["face_boxes"])
            src, ts = list(saved["source"]), list(saved["timestamps"])
            log.info("landmarks: resuming at frame %d from %s", first + resume_from, partial)
        end = info.num_frames or None
        if last is not None:
            end = last if end is None else min(end, last)
        total = end - first if end is not None and end > first else None
        if crops is not None and saved is None and total is not None \
                and total * int(crops[1]) ** 2 * 3 <= int(crop_bytes):
            cut = np.zeros((total, int(crops[1]), int(crops[1]), 3), dtype=np.uint8)
        helper = None
        if ahead and saved is None and total is not None and total >= MIN_FRAMES \
                and getattr(detector, "single_core", False):
            mid = first + min(total - 1, (total + HELPER_LAG_FRAMES) // 2)
            helper = Ahead(video_path, detector, first, mid, last, crops=None if cut is None else crops, keep=keep,
                           settings=tracker.settings())
            stack.callback(helper.close)
            # Two trackers take both cores: one decoder thread each (see VideoReader).
            reader.close()
            reader = stack.enter_context(VideoReader(video_path, threads=1))
        bar = tqdm(total=total, initial=resume_from, desc="landmarks", unit="frame", disable=not progress)
        last_save = time.monotonic()
        # Seek checks: recorded timestamps of the frames done, else those a constant rate gives.
        if ts:
            seek_ts = np.concatenate([np.full(first, np.nan), np.asarray(ts, dtype=np.float64)])
        else:
            seek_ts = reader.estimated_timestamps(first + 1) if first > 0 else None
        begin = first + max(0, resume_from - 1)
        for index, frame in reader.frames(begin, last, seek_ts):
            if index < first + resume_from:  # the frame before the checkpoint: restore the tracker
                tracker.relation = np.asarray(saved["relation"], dtype=np.float64)
                if src[index - first] != SOURCE_NONE:
                    tracker.resume(frame, lms[index - first])
                continue
            face = tracker.update(frame)
            if index in keep:
                kept[index] = frame
            ts.append(reader.last_timestamp)
            face_lms, face_box, face_src = face_arrays(face)
            lms.append(face_lms)
            boxes.append(face_box)
            src.append(face_src)
            if cut is not None:  # the crop of crop_boxes(), from the box as stored (zeros: no face)
                if n_cut >= total:  # more frames than the container said: no crops
                    cut = None
                else:
                    if face is not None:
                        cut[n_cut] = crop_face(frame, square_box(boxes[-1], crops[0]), int(crops[1]))
                    n_cut += 1
            bar.update(1)
            rest = None if helper is None else helper.rest(
                index, tracker.state(), ts[-1], None if cut is None or face is None else cut[n_cut - 1])
            if rest is not None:  # the helper's tracker stands where this one does: its results from here on
                lms += list(rest.landmarks)
                boxes += list(rest.boxes)
                src += list(rest.source)
                ts += list(rest.timestamps)
                kept.update(rest.kept)
                if cut is not None:
                    if rest.crops is None or n_cut + rest.num_frames > total:
                        cut = None
                    else:
                        cut[n_cut:n_cut + rest.num_frames] = rest.crops
                        n_cut += rest.num_frames
                bar.update(rest.num_frames)
                log.debug("landmarks: frames %d-%d from the helper that started at frame %d", index + 1,
                          index + rest.num_frames, helper.mid)
                break
            if partial and time.monotonic() - last_save > checkpoint_s:
                save_npz(partial, key, **_track_arrays(lms, boxes, src, ts, info, first),
                         relation=tracker.relation)
                last_save = time.monotonic()
        bar.close()
    if not src:
        if frame_range is not None:
            raise UserError(f"--frame_range {format_frame_range(frame_range)} holds no frame of the video "
                            f"'{video_path}' ({info.num_frames} frames)")
        raise UserError(f"video '{video_path}' has no readable frame")
    if frame_range is None and info.num_frames and len(src) != info.num_frames:
        log.warning("video '%s': the container says %d frames, %d were decoded; using %d",
                    video_path, info.num_frames, len(src), len(src))
    arrays = _track_arrays(lms, boxes, src, ts, info, first)
    if final:
        save_npz(final, key, **arrays)
        with contextlib.suppress(OSError):
            os.remove(partial)
    track = _track_from_arrays(arrays)
    track.frames = kept
    if cut is not None and n_cut == track.num_frames:
        track.crops = cut[:n_cut]
    return track


def _track_arrays(lms, boxes, src, ts, info, start: int = 0) -> Dict[str, np.ndarray]:
    n = len(src)
    return {
        "landmarks": np.asarray(lms, dtype=np.float32).reshape(n, 68, 2),
        "face_boxes": np.asarray(boxes, dtype=np.float64).reshape(n, 4),
        "source": np.asarray(src, dtype=np.int8).reshape(n),
        "timestamps": np.asarray(ts, dtype=np.float64).reshape(n),
        "meta": np.array([info.fps, info.width, info.height], dtype=np.float64),
        "start": np.array(int(start), dtype=np.int64),
    }


def _track_from_arrays(a: Dict[str, np.ndarray]) -> LandmarkTrack:
    fps, w, h = (float(v) for v in a["meta"])
    start = int(a["start"]) if "start" in a else 0
    return LandmarkTrack(landmarks=a["landmarks"], face_boxes=a["face_boxes"], source=a["source"],
                         timestamps=a["timestamps"], fps=fps, width=int(w), height=int(h), start=start)
