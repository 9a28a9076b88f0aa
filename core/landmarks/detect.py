"""Face detection and the 68 iBUG landmarks: face-alignment's FAN, or dlib as the fallback.

Both detectors share one small interface::

    detector.name                              "fan" or "dlib"
    detector.detect(image_rgb) -> list[Face]   every face found, each with 68 landmarks
    detector.landmarks_in_box(image_rgb, box)  (68, 2) landmarks for a known face box,
                                               no face detection (video tracking)

``image_rgb`` is an (H, W, 3) uint8 RGB array (``core.io.image.read_image``).
Coordinates are photo pixels, (x, y) = (column, row), integer = pixel centre, as both
libraries report them; they are used at face value downstream.

``make_detector("auto")`` uses FAN when its weights are already in the torch hub cache
(nothing is ever downloaded behind the user's back) and dlib otherwise, and logs which one
runs and why.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import logging
import os
import re
import sys
import warnings
from typing import Protocol, Sequence

import numpy as np

from core import defaults
from core.errors import UserError

__all__ = ["Face", "Detector", "DlibDetector", "FanDetector", "make_detector", "pick_face",
           "NUM_LANDMARKS"]

log = logging.getLogger(__name__)

NUM_LANDMARKS = 68


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
    """One detected face.

    box: (4,) float64 [x0, y0, x1, y1], photo pixels (the face's extent; for dlib the
        outer edges of its pixel rectangle, i.e. pixels left..right give [left - 0.5,
        right + 0.5]).
    landmarks: (68, 2) float32 (x, y) photo pixels, iBUG 68-point order.
    score: detector confidence (dlib: HOG SVM margin, > 0; FAN: S3FD probability, 0..1).
    The arrays are read-only copies.
    """
    box: np.ndarray
    landmarks: np.ndarray
    score: float

    def __post_init__(self):
        box = np.array(self.box, dtype=np.float64).reshape(-1)
        lms = np.array(self.landmarks, dtype=np.float32)
        if box.shape != (4,):
            raise ValueError(f"Face.box must have 4 values [x0, y0, x1, y1]; got shape {box.shape}")
        if lms.shape != (NUM_LANDMARKS, 2):
            raise ValueError(f"Face.landmarks must have shape (68, 2); got {lms.shape}")
        box.flags.writeable = False
        lms.flags.writeable = False
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "landmarks", lms)
        object.__setattr__(self, "score", float(self.score))

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


class Detector(Protocol):
    name: str

    def detect(self, image_rgb: np.ndarray) -> list[Face]: ...

    def landmarks_in_box(self, image_rgb: np.ndarray, box) -> np.ndarray: ...


def _check_image(image_rgb) -> np.ndarray:
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image; got {img.shape} {img.dtype}")
    return np.ascontiguousarray(img)


def _check_box(box) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)) or b[2] <= b[0] or b[3] <= b[1]:
        raise ValueError(f"expected a box [x0, y0, x1, y1] with x1 > x0, y1 > y0; got {box!r}")
    return b


# --- dlib ------------------------------------------------------------------------------------

_DLIB_INSTALL = "pip install dlib-bin face-recognition-models"
# HOG finds faces down to about 80 px; on small photos upsample once when nothing is found.
_DLIB_UPSAMPLE_BELOW = 400


def _dlib_model_path() -> str:
    """Path of shape_predictor_68_face_landmarks.dat inside face-recognition-models.

    The package is located without importing it: its __init__ needs pkg_resources, which
    recent setuptools no longer provide.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"dlib landmarks need the face-recognition-models package: {_DLIB_INSTALL}")
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "models", "shape_predictor_68_face_landmarks.dat")
    if not os.path.isfile(path):
        raise UserError(f"dlib landmark model missing ({path}); reinstall: "
                        f"pip install --force-reinstall face-recognition-models")
    return path


@functools.lru_cache(maxsize=None)
def _dlib_models():
    """(HOG face detector, 68-point shape predictor); loaded once per process (~2 s)."""
    try:
        import dlib
    except ImportError:
        raise UserError(f"dlib is not installed: {_DLIB_INSTALL}") from None
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(_dlib_model_path())


class DlibDetector:
    """dlib's HOG frontal face detector + the 68-point shape predictor (iBUG 300-W).

    CPU only, no download; less precise than FAN on profiles and expressions.
    """
    name = "dlib"
    # Its work runs on one core (and holds Python's lock): a second one in another process
    # doubles the rate (core.pipelines.video.ahead).
    single_core = True

    def __init__(self, min_score: float = 0.3):
        """min_score: drop HOG detections scoring below this. Real faces score about 0.8
        to 2.5; below 0.3 are mostly false positives (the mission patch in data/astronaut.jpg
        scores 0.1).
        dlib's own default is 0."""
        self.min_score = float(min_score)
        # Fail now, in one line, when dlib or its landmark model is missing; load them (~1.5 s)
        # only when a frame is first looked at (a video re-run with cached landmarks never does).
        if importlib.util.find_spec("dlib") is None:
            raise UserError(f"dlib is not installed: {_DLIB_INSTALL}")
        _dlib_model_path()

    @property
    def _dlib(self):
        return _dlib_models()[0]

    @property
    def _detector(self):
        return _dlib_models()[1]

    @property
    def _predictor(self):
        return _dlib_models()[2]

    @staticmethod
    def available() -> bool:
        """True when dlib and the landmark model are installed (loads nothing)."""
        try:
            _dlib_model_path()
        except UserError:
            return False
        return importlib.util.find_spec("dlib") is not None

    def _shape(self, img: np.ndarray, rect) -> np.ndarray:
        shape = self._predictor(img, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        img = _check_image(image_rgb)
        rects, scores, _ = self._detector.run(img, 0, self.min_score)
        if len(rects) == 0 and max(img.shape[:2]) < _DLIB_UPSAMPLE_BELOW:
            rects, scores, _ = self._detector.run(img, 1, self.min_score)
        faces = []
        for rect, score in zip(rects, scores):
            # dlib rectangles are inclusive pixel ranges; report their outer edges.
            box = [rect.left() - 0.5, rect.top() - 0.5, rect.right() + 0.5, rect.bottom() + 0.5]
            faces.append(Face(box=box, landmarks=self._shape(img, rect), score=score))
        return faces

    def landmarks_in_box(self, image_rgb: np.ndarray, box) -> np.ndarray:
        """(68, 2) float32 landmarks for ``box`` ([x0, y0, x1, y1], as in ``Face.box``)."""
        img = _check_image(image_rgb)
        b = _check_box(box)
        rect = self._dlib.rectangle(int(round(b[0] + 0.5)), int(round(b[1] + 0.5)),
                                    int(round(b[2] - 0.5)), int(round(b[3] - 0.5)))
        return self._shape(img, rect)


# --- face-alignment (FAN) --------------------------------------------------------------------

# Fallbacks if the installed version's modules cannot be read (file names of 1.4 / 1.5).
_FAN_URL = "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar"
_S3FD_URL = "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"


def _two_d_landmarks_type(landmarks_type_enum):
    """face-alignment's 2-D landmarks enum member: ``TWO_D`` (>= 1.4) or ``_2D`` (older)."""
    for attr in ("TWO_D", "_2D"):
        member = getattr(landmarks_type_enum, attr, None)
        if member is not None:
            return member
    raise UserError("unsupported face-alignment version (no LandmarksType.TWO_D or _2D); "
                    "pip install 'face-alignment>=1.3'")


def _fan_weight_urls() -> list[str]:
    """URLs of the FAN 2-D network and the S3FD detector of the installed face-alignment.

    The file names change between versions, so they are read from the package's source
    (``api.py`` and ``detection/sfd/sfd_detector.py``) without importing it: importing
    face-alignment takes seconds, too slow for a mere "are the weights there?".
    The module-level constants are the fallback.
    """
    spec = importlib.util.find_spec("face_alignment")
    folder = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else ""
    wanted = [(os.path.join("api.py"), "2DFAN-4", _FAN_URL),
              (os.path.join("detection", "sfd", "sfd_detector.py"), "s3fd", _S3FD_URL)]
    urls = []
    for rel, key, fallback in wanted:
        try:
            with open(os.path.join(folder, rel), encoding="utf-8") as f:
                m = re.search(rf"""['"]{re.escape(key)}['"]\s*:\s*['"]([^'"]+)['"]""", f.read())
            urls.append(m.group(1) if m else fallback)
        except OSError:
            urls.append(fallback)
    return urls


def _fan_cache_dir() -> str:
    """``torch.hub.get_dir()/checkpoints``, where face-alignment keeps its weights.

    Without importing torch when it is not loaded yet (a cold import takes seconds): then
    ``set_dir`` cannot have been called and the folder follows from the environment.
    """
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "hub"):
        hub = torch.hub.get_dir()
    else:
        cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
        hub = os.path.join(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch"))), "hub")
    return os.path.join(hub, "checkpoints")


def _fan_missing_files() -> list[str]:
    """Paths of FAN weight files that are not in the torch hub cache."""
    folder = _fan_cache_dir()
    paths = [os.path.join(folder, os.path.basename(url.split("?")[0])) for url in _fan_weight_urls()]
    return [p for p in paths if not os.path.isfile(p)]


class FanDetector:
    """face-alignment: S3FD face detector + 2-D FAN landmarks (Bulat & Tzimiropoulos 2017).

    The weights are downloaded by face-alignment on first use into
    ``torch.hub.get_dir()/checkpoints``; this class never triggers that download: it
    refuses to start (UserError) when they are missing.
    """
    name = "fan"

    def __init__(self, device: str = "cpu"):
        if importlib.util.find_spec("face_alignment") is None:
            raise UserError("FAN landmarks need face-alignment: pip install face-alignment")
        missing = _fan_missing_files()
        if missing:
            urls = " and ".join(_fan_weight_urls())
            raise UserError(
                f"face-alignment weights not found ({', '.join(os.path.basename(p) for p in missing)} "
                f"missing in {_fan_cache_dir()}): run once with internet access, or download "
                f"{urls} into that folder; or use --lm_detector dlib")
        if device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise UserError(f"device '{device}' requested but CUDA is not available; use cpu")
        import face_alignment
        kwargs = {"device": device, "face_detector": "sfd"}
        params = inspect.signature(face_alignment.FaceAlignment.__init__).parameters
        if "compile" in params:
            # torch.compile costs minutes per process on a CPU for a handful of images.
            kwargs["compile"] = False
        self.device = device
        self._fa = face_alignment.FaceAlignment(
            _two_d_landmarks_type(face_alignment.LandmarksType), **kwargs)
        self._has_return_bboxes = "return_bboxes" in inspect.signature(
            self._fa.get_landmarks_from_image).parameters

    @staticmethod
    def available() -> bool:
        """True when face-alignment is installed and its weights are cached (no download)."""
        if importlib.util.find_spec("face_alignment") is None:
            return False
        return not _fan_missing_files()

    @staticmethod
    def why_unavailable() -> str:
        """A short reason for ``available() == False`` (empty when available)."""
        if importlib.util.find_spec("face_alignment") is None:
            return "face-alignment is not installed"
        if _fan_missing_files():
            return f"face-alignment weights not found in {_fan_cache_dir()}"
        return ""

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        img = _check_image(image_rgb)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No faces were detected." is an empty list here
            if self._has_return_bboxes:
                landmarks, _, boxes = self._fa.get_landmarks_from_image(img, return_bboxes=True)
            else:  # face-alignment < 1.3: detect first, then ask for those boxes
                boxes = self._fa.face_detector.detect_from_image(img.copy())
                landmarks = (self._fa.get_landmarks_from_image(img, detected_faces=boxes)
                             if len(boxes) else None)
        if landmarks is None or boxes is None:
            return []
        faces = []
        for lms, b in zip(landmarks, boxes):
            b = np.asarray(b, dtype=np.float64).reshape(-1)
            score = float(b[4]) if b.size > 4 else 1.0
            faces.append(Face(box=b[:4], landmarks=np.asarray(lms)[:, :2], score=score))
        return faces

    def landmarks_in_box(self, image_rgb: np.ndarray, box) -> np.ndarray:
        """(68, 2) float32 landmarks for ``box`` ([x0, y0, x1, y1]) without face detection."""
        img = _check_image(image_rgb)
        b = _check_box(box)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            landmarks = self._fa.get_landmarks_from_image(img, detected_faces=[b])
        return np.asarray(landmarks[0], dtype=np.float32)[:, :2]


# --- choice -----------------------------------------------------------------------------------

DETECTORS = ("auto", "fan", "dlib")


def make_detector(name: str = "auto", device: str = "cpu") -> Detector:
    """Build the landmark detector ``name``: "fan", "dlib" or "auto".

    "auto" takes FAN when face-alignment and its cached weights are there, dlib otherwise.
    ``device`` ('cpu', 'cuda:0', ...) is used by FAN; dlib always runs on the CPU.
    Logs (INFO) which detector runs and, for an automatic fallback, why.
    """
    if name not in DETECTORS:
        raise UserError(f"unknown landmark detector '{name}'; choose one of: {', '.join(DETECTORS)}")
    if name == "fan":
        det = FanDetector(device)
        log.info("landmarks: fan (face-alignment on %s)", device)
        return det
    if name == "dlib":
        det = DlibDetector()
        log.info("landmarks: dlib")
        return det
    if FanDetector.available():
        det = FanDetector(device)
        log.info("landmarks: fan (face-alignment on %s)", device)
        return det
    reason = FanDetector.why_unavailable()
    if not DlibDetector.available():
        raise UserError(f"no landmark detector available: {reason} and dlib is not installed; "
                        f"{_DLIB_INSTALL}, or run face-alignment once with internet access")
    det = DlibDetector()
    log.info("landmarks: dlib (%s; using dlib fallback)", reason)
    return det


def pick_face(faces: Sequence[Face], which: str | int = defaults.FACE_INDEX, label: str = "image") -> Face:
    """Choose one face: ``"largest"`` (default) or an index into the faces sorted by box
    area, largest first (0 = largest). ``label`` names the input in error messages.

    Raises UserError when there is no face or the index is out of range.
    """
    if not faces:
        raise UserError(f"no face found in '{label}'; use a photo with a clearly visible, "
                        f"roughly frontal face at least ~80 px wide")
    ordered = sorted(faces, key=lambda f: f.area, reverse=True)
    if which == "largest":
        return ordered[0]
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        if 0 <= which < len(ordered):
            return ordered[int(which)]
        raise UserError(f"face index {which} out of range for '{label}': {len(ordered)} "
                        f"face(s) found (0 = largest)")
    raise ValueError(f"which must be 'largest' or a face index; got {which!r}")
