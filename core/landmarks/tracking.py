"""Following one face through a video: detect once, then track from the previous landmarks.

:class:`FaceTracker` turns a stream of frames into per-frame 68-point landmarks:

1. No face yet (first frame, or after a loss): run the full detector; none found means
   *no face in this frame* (and the next frame tries again).
2. A face in the previous frame: the next frame's face box is predicted from the previous
   landmarks and the detector's landmark stage runs on it alone (``landmarks_in_box``), a
   few milliseconds instead of a full detection. The box is the detector's own kind of box:
   at each detection the tracker records where the detector's box lies relative to the
   landmarks' bounding box (centre offset and size, as fractions of that box) and applies
   the same relation to the tracked landmarks. (Feeding the landmarks' bounding box itself
   back to dlib's predictor drifts within a few frames: it was trained on detector boxes.)
   The landmark stage then runs once more on the box of its own result, which settles
   fast motion.
3. Every tracked result is checked (:func:`landmarks_plausible` and
   :meth:`FaceTracker._same_face_patch`): implausible geometry, a big jump in position or
   size, a face region without texture (a blank frame), or a face region that does not
   look like the previous frame's (a cut) count as *lost*; then the frame is searched with
   the full detector again (step 1). A landmark predictor always answers, even on a black
   frame, so these checks are what says "no face".

Coordinates: photo pixels (x, y) = (column, row), integer = pixel centre, as the
detectors report them. Boxes are [x0, y0, x1, y1] floats (``core.landmarks.detect.Face.box``).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from .crop import crop_face, square_box
from .detect import Face
from .metrics import interocular

log = logging.getLogger(__name__)

__all__ = ["TrackedFace", "TrackerState", "FaceTracker", "face_arrays", "landmarks_plausible", "landmarks_box", "interocular",
           "box_relation", "apply_box_relation", "SOURCE_NONE", "SOURCE_DETECT", "SOURCE_TRACK"]

SOURCE_NONE, SOURCE_DETECT, SOURCE_TRACK = 0, 1, 2
_SOURCE_NAMES = {SOURCE_NONE: "none", SOURCE_DETECT: "detect", SOURCE_TRACK: "track"}

# dlib's HOG box relative to the landmarks' bounding box, measured over the 501 frames of
# shared/data/sample_video.mp4 (mean; std about 0.05): used until a detection says otherwise.
DEFAULT_RELATION = np.array([0.0, -0.12, 1.08, 1.03])


@dataclass(frozen=True)
class TrackedFace:
    """The face in one frame.

    landmarks: (68, 2) float32 photo pixels.
    box: (4,) float64 face box [x0, y0, x1, y1] of the detector's kind (detector output,
        or predicted from the previous landmarks).
    source: SOURCE_DETECT (full detection) or SOURCE_TRACK (from the previous frame).
    """

    landmarks: np.ndarray
    box: np.ndarray
    source: int

    @property
    def source_name(self) -> str:
        return _SOURCE_NAMES[self.source]


def landmarks_box(landmarks: np.ndarray) -> np.ndarray:
    """(4,) [x0, y0, x1, y1] bounding box of (L, 2) points."""
    p = np.asarray(landmarks, dtype=np.float64)
    return np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])


def box_relation(landmarks: np.ndarray, face_box) -> np.ndarray:
    """(4,) where ``face_box`` lies relative to the landmarks' bounding box: centre offset
    (dx, dy) in units of that box's width / height, then width and height ratios."""
    lb = landmarks_box(landmarks)
    b = np.asarray(face_box, dtype=np.float64)
    lw = np.maximum(lb[2:] - lb[:2], 1e-6)
    lc = (lb[:2] + lb[2:]) / 2
    return np.r_[((b[:2] + b[2:]) / 2 - lc) / lw, (b[2:] - b[:2]) / lw]


def apply_box_relation(landmarks: np.ndarray, relation: np.ndarray) -> np.ndarray:
    """The face box that stands in ``relation`` (see :func:`box_relation`) to ``landmarks``."""
    lb = landmarks_box(landmarks)
    lw = np.maximum(lb[2:] - lb[:2], 1e-6)
    c = (lb[:2] + lb[2:]) / 2 + relation[:2] * lw
    half = relation[2:] * lw / 2
    return np.r_[c - half, c + half]


def landmarks_plausible(landmarks: np.ndarray, image_shape: Optional[Sequence[int]] = None,
                        min_interocular: float = 6.0) -> bool:
    """Loose sanity checks of 68 iBUG points: finite; eyes far enough apart; in the frame
    of the eye line, brows above eyes above the nose tip above the mouth above the chin;
    face proportions within wide limits; mostly inside the image."""
    p = np.asarray(landmarks, dtype=np.float64)
    if p.shape != (68, 2) or not np.all(np.isfinite(p)):
        return False
    r_eye, l_eye = p[36:42].mean(0), p[42:48].mean(0)
    iod = float(np.linalg.norm(l_eye - r_eye))
    if iod < min_interocular:
        return False
    # Rotate so the eye line is the x axis (the subject's right eye on the image left).
    ex = (l_eye - r_eye) / iod
    ey = np.array([-ex[1], ex[0]])  # image "down" in the face frame
    q = (p - (r_eye + l_eye) / 2) @ np.stack([ex, ey], 1)
    brows, eyes = q[17:27, 1].mean(), q[36:48, 1].mean()
    nose, mouth, chin = q[30, 1], q[48:68, 1].mean(), q[8, 1]
    if not (brows < eyes < nose < mouth < chin):
        return False
    height = chin - brows
    if not (0.8 * iod < height < 4.0 * iod):
        return False
    width = q[:, 0].max() - q[:, 0].min()
    if not (1.2 * iod < width < 4.0 * iod):
        return False
    mouth_w = float(np.linalg.norm(p[54] - p[48]))
    if not (0.25 * iod < mouth_w < 2.0 * iod):
        return False
    if image_shape is not None:
        h, w = image_shape[:2]
        inside = (p[:, 0] >= -0.5) & (p[:, 0] <= w - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] <= h - 0.5)
        if inside.mean() < 0.5:
            return False
    return True


def _face_patch(image: np.ndarray, landmarks: np.ndarray, size: int = 24) -> np.ndarray:
    """(size, size) float64 grey patch of the landmarks' square box (appearance checks):
    the box cut at 4 x size (anti-aliased, :func:`crop_face`), made grey and averaged over
    4 x 4 blocks. (Blurring the box for ``size`` directly, a Gaussian of a sixth of the
    face's width, cost about 1 ms a frame on 720p video, a fifth of the tracking.)"""
    lb = landmarks_box(landmarks)
    if lb[2] - lb[0] < 1 or lb[3] - lb[1] < 1:
        return np.zeros((size, size))
    big = crop_face(np.asarray(image), square_box(lb, 0.0), 4 * size)
    if big.ndim == 3:
        big = cv2.cvtColor(np.ascontiguousarray(big), cv2.COLOR_RGB2GRAY)
    return cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 1e-9 else 0.0


def face_arrays(face: Optional[TrackedFace]) -> Tuple[np.ndarray, np.ndarray, int]:
    """One frame's entries in a landmark track's arrays: (68, 2) float32 landmarks, (4,)
    float64 box and the source; NaN and SOURCE_NONE for a frame without a face (None)."""
    if face is None:
        return np.full((68, 2), np.nan, dtype=np.float32), np.full(4, np.nan), SOURCE_NONE
    return face.landmarks.astype(np.float32), np.asarray(face.box, dtype=np.float64), face.source


@dataclass(frozen=True, eq=False)
class TrackerState:
    """Everything a :class:`FaceTracker`'s next frame depends on besides the frame: the
    previous frame's landmarks and face patch (None: no face, the next frame runs the
    detector) and the detector-box relation. Two trackers in the same state give the same
    results on the same frames from then on (:meth:`same_as`)."""

    landmarks: Optional[np.ndarray]  # (68, 2) float32
    patch: Optional[np.ndarray]      # (24, 24) float64
    relation: np.ndarray             # (4,) float64

    def key(self) -> bytes:
        """A digest of the state, exactly: equal states have equal keys and (but for a
        collision of a 128-bit hash) different ones different keys."""
        h = hashlib.blake2b(digest_size=16)
        for a, dtype in ((self.landmarks, np.float32), (self.patch, np.float64), (self.relation, np.float64)):
            h.update(b"-" if a is None else b"+" + np.ascontiguousarray(a, dtype=dtype).tobytes())
        return h.digest()


class FaceTracker:
    """Per-frame landmarks of one face in a video (see the module docstring).

    Args:
        detector: a :class:`core.landmarks.detect.Detector` (``detect`` and ``landmarks_in_box``).
        min_similarity: the face region (grey, normalised) must correlate at least this much
            with the previous frame's, else tracking is lost. Consecutive frames of real
            footage correlate > 0.9; a different face or background < 0.55.
        min_texture: grey-level standard deviation below which the face region is blank.
        max_jump: largest move of the landmarks' centre per frame, in inter-ocular distances.
        max_scale: largest change of the inter-ocular distance per frame (factor).
        refine: extra landmark passes on the box of the frame's own landmarks.
    """

    def __init__(self, detector, min_similarity: float = 0.6, min_texture: float = 4.0,
                 max_jump: float = 1.0, max_scale: float = 1.5, refine: int = 1):
        self.detector = detector
        self.min_similarity = float(min_similarity)
        self.min_texture = float(min_texture)
        self.max_jump = float(max_jump)
        self.max_scale = float(max_scale)
        self.refine = int(refine)
        self.relation = DEFAULT_RELATION.copy()
        self.num_detections = 0
        self.num_losses = 0
        self.reset()

    def reset(self) -> None:
        """Forget the current face (the next frame runs the full detector)."""
        self._prev: Optional[np.ndarray] = None
        self._prev_patch: Optional[np.ndarray] = None

    @property
    def tracking(self) -> bool:
        return self._prev is not None

    def settings(self) -> dict:
        """The constructor's arguments but the detector: ``FaceTracker(detector,
        **settings())`` tracks as this one does."""
        return {"min_similarity": self.min_similarity, "min_texture": self.min_texture, "max_jump": self.max_jump,
                "max_scale": self.max_scale, "refine": self.refine}

    def state(self) -> TrackerState:
        """What the next frame depends on (a copy)."""
        return TrackerState(landmarks=None if self._prev is None else self._prev.copy(),
                            patch=None if self._prev_patch is None else self._prev_patch.copy(),
                            relation=self.relation.copy())

    def resume(self, image: np.ndarray, landmarks: np.ndarray, relation: Optional[np.ndarray] = None) -> None:
        """Continue from ``landmarks`` found in ``image`` (the previous frame), e.g. after
        reloading a partial landmark pass."""
        self._accept(image, np.asarray(landmarks, dtype=np.float32))
        if relation is not None:
            self.relation = np.asarray(relation, dtype=np.float64).copy()

    # -- one frame -----------------------------------------------------------------------
    def update(self, image: np.ndarray) -> Optional[TrackedFace]:
        """The face in ``image`` ((H, W, 3) uint8 RGB), or None when there is none."""
        if self._prev is not None:
            tracked = self._track(image)
            if tracked is not None:
                return tracked
            self.num_losses += 1
            log.debug("tracking lost; detecting again")
        return self._detect(image)

    def _track(self, image: np.ndarray) -> Optional[TrackedFace]:
        lms = self._prev
        box = None
        for _ in range(1 + max(0, self.refine)):
            box = apply_box_relation(lms, self.relation)
            lms = np.asarray(self.detector.landmarks_in_box(image, box), dtype=np.float32)
            if not np.all(np.isfinite(lms)):
                return None
        if not landmarks_plausible(lms, image.shape):
            return None
        patch = self._same_face_patch(image, lms)
        if patch is None:
            return None
        self._accept(image, lms, patch)
        return TrackedFace(landmarks=lms, box=box, source=SOURCE_TRACK)

    def _same_face_patch(self, image: np.ndarray, lms: np.ndarray) -> Optional[np.ndarray]:
        """The face patch at ``lms`` when they still show the tracked face (scale, jump,
        texture and similarity to the previous patch within limits), else None."""
        prev = self._prev
        iod0, iod1 = interocular(prev), interocular(lms)
        if not (1.0 / self.max_scale <= iod1 / max(iod0, 1e-6) <= self.max_scale):
            return None
        if np.linalg.norm(lms.mean(0) - prev.mean(0)) > self.max_jump * iod0:
            return None
        patch = _face_patch(image, lms)
        if patch.std() < self.min_texture:
            return None
        return patch if _ncc(patch, self._prev_patch) >= self.min_similarity else None

    def _detect(self, image: np.ndarray) -> Optional[TrackedFace]:
        faces = [f for f in self.detector.detect(image) if landmarks_plausible(f.landmarks, image.shape)]
        self.num_detections += 1
        if not faces:
            self.reset()
            return None
        face = self._choose(faces)
        patch = _face_patch(image, face.landmarks)
        if patch.std() < self.min_texture:
            self.reset()
            return None
        self.relation = box_relation(face.landmarks, face.box)
        self._accept(image, np.asarray(face.landmarks, dtype=np.float32), patch)
        return TrackedFace(landmarks=np.asarray(face.landmarks, dtype=np.float32),
                           box=np.asarray(face.box, dtype=np.float64), source=SOURCE_DETECT)

    def _choose(self, faces: Sequence[Face]) -> Face:
        """The face nearest the one just lost (within a face size), else the largest."""
        if self._prev is not None:
            centre, size = self._prev.mean(0), max(interocular(self._prev), 1.0) * 3
            dist = [np.linalg.norm(np.asarray(f.landmarks).mean(0) - centre) for f in faces]
            k = int(np.argmin(dist))
            if dist[k] < size:
                return faces[k]
        return max(faces, key=lambda f: f.area)

    def _accept(self, image: np.ndarray, lms: np.ndarray, patch: Optional[np.ndarray] = None) -> None:
        self._prev = lms
        self._prev_patch = _face_patch(image, lms) if patch is None else patch
