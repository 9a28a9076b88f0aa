"""Tests for core.landmarks.detect: dlib on real photos, face choice, detector choice, FAN wrapper."""
from __future__ import annotations

import enum
import importlib.machinery
import logging
import os
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.landmarks import detect
from core.landmarks.detect import DlibDetector, Face, FanDetector, make_detector, pick_face
from core.errors import UserError
from core.io.image import read_image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def _shared_photo() -> Path:
    path = SHARED / "data" / "000002.jpg"
    if not path.is_file():
        pytest.skip(f"shared sample photo not available ({path} missing: no ../shared beside the repo)")
    return path


@pytest.fixture(scope="module")
def dlib_detector() -> DlibDetector:
    return DlibDetector()


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, so FAN's availability does not depend on this machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _check_plausible_face(face: Face) -> None:
    box, lms = face.box, face.landmarks
    assert box.shape == (4,) and lms.shape == (68, 2) and lms.dtype == np.float32
    w, h = box[2] - box[0], box[3] - box[1]
    # dlib's box is tight: the jaw line may leave it by ~10% of its side.
    m = 0.15 * max(w, h)
    assert np.all(lms[:, 0] >= box[0] - m) and np.all(lms[:, 0] <= box[2] + m)
    assert np.all(lms[:, 1] >= box[1] - m) and np.all(lms[:, 1] <= box[3] + m)
    eyes_y = lms[36:48, 1].mean()
    nose_y = lms[30, 1]
    mouth_y = lms[48:68, 1].mean()
    assert eyes_y < nose_y < mouth_y
    right_eye, left_eye = lms[36:42].mean(0), lms[42:48].mean(0)  # the subject's right eye is on the image left
    assert right_eye[0] < left_eye[0]
    iod = np.linalg.norm(left_eye - right_eye)
    assert 0.3 * w < iod < 0.6 * w


@pytest.mark.parametrize("path", [REPO / "data" / "astronaut.jpg", REPO / "data" / "grace_hopper.jpg", "shared"],
                         ids=["astronaut", "grace_hopper", "shared_000002"])
def test_dlib_finds_one_plausible_face(dlib_detector, path):
    if path == "shared":
        path = _shared_photo()
    faces = dlib_detector.detect(read_image(path))
    assert len(faces) == 1, [f.box for f in faces]
    _check_plausible_face(faces[0])
    assert faces[0].score > dlib_detector.min_score


def test_dlib_landmarks_in_box_matches_detection(dlib_detector):
    image = read_image(REPO / "data" / "grace_hopper.jpg")
    face = dlib_detector.detect(image)[0]
    lms = dlib_detector.landmarks_in_box(image, face.box)
    assert lms.shape == (68, 2) and lms.dtype == np.float32
    np.testing.assert_array_equal(lms, face.landmarks)  # the box convention round-trips


def test_two_faces_largest_first(dlib_detector):
    photo = read_image(REPO / "data" / "grace_hopper.jpg")  # 600 x 512
    small = cv2.resize(photo, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    canvas = np.full((600, 512 + 40 + small.shape[1], 3), 255, np.uint8)
    canvas[:, :512] = photo
    canvas[100:100 + small.shape[0], 552:552 + small.shape[1]] = small
    faces = dlib_detector.detect(canvas)
    assert len(faces) == 2
    big, other = pick_face(faces), pick_face(faces, 1)
    assert big.box[2] <= 512 and other.box[0] >= 552
    assert big.area > other.area
    assert pick_face(faces, 0) is big
    assert pick_face(list(reversed(faces))) is big
    with pytest.raises(UserError, match="face index 2 out of range for 'two.jpg': 2 face"):
        pick_face(faces, 2, label="two.jpg")


def test_blank_image_has_no_face(dlib_detector):
    faces = dlib_detector.detect(np.full((300, 300, 3), 128, np.uint8))  # small: upsampled retry too
    assert faces == []
    with pytest.raises(UserError, match="no face found in 'blank.png'"):
        pick_face(faces, label="blank.png")


def test_detect_rejects_wrong_arrays(dlib_detector):
    with pytest.raises(ValueError, match="uint8 RGB"):
        dlib_detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        dlib_detector.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="box"):
        dlib_detector.landmarks_in_box(np.zeros((10, 10, 3), np.uint8), [5, 5, 1, 1])


def test_face_is_validated_and_read_only():
    face = Face(box=[1, 2, 3, 4], landmarks=np.zeros((68, 2)), score=1)
    assert face.box.dtype == np.float64 and face.landmarks.dtype == np.float32
    assert face.area == 4.0
    with pytest.raises(ValueError):
        face.landmarks[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"\(68, 2\)"):
        Face(box=[1, 2, 3, 4], landmarks=np.zeros((5, 2)), score=1)
    with pytest.raises(ValueError, match="4 values"):
        Face(box=[1, 2, 3], landmarks=np.zeros((68, 2)), score=1)
    with pytest.raises(ValueError, match="'largest' or a face index"):
        pick_face([face], "smallest")


# --- detector choice ---------------------------------------------------------------------

def test_fan_availability_follows_the_cache(empty_torch_home):
    assert not FanDetector.available()
    assert str(empty_torch_home) in FanDetector.why_unavailable()
    empty_torch_home.mkdir(parents=True)
    names = [os.path.basename(u) for u in detect._fan_weight_urls()]
    assert any(n.startswith("2DFAN4") for n in names) and any(n.startswith("s3fd") for n in names)
    for name in names[:-1]:
        (empty_torch_home / name).write_bytes(b"")
    assert not FanDetector.available()  # one file still missing
    (empty_torch_home / names[-1]).write_bytes(b"")
    assert FanDetector.available() and FanDetector.why_unavailable() == ""


def test_fan_without_weights_explains_the_fix(empty_torch_home):
    with pytest.raises(UserError) as err:
        FanDetector("cpu")
    msg = str(err.value)
    assert "\n" not in msg and str(empty_torch_home) in msg and "internet" in msg
    # the flag it suggests is one the scripts have
    import fit_single_img
    flag = msg.split("use ")[-1].split()[0]
    assert flag == "--lm_detector" and fit_single_img.build_parser().parse_args(
        ["--img_path", "x", "--res_folder", "o", flag, "dlib"]).lm_detector == "dlib"
    with pytest.raises(UserError, match="face-alignment weights not found"):
        make_detector("fan")


def test_auto_falls_back_to_dlib_and_says_why(empty_torch_home, caplog):
    with caplog.at_level(logging.INFO, logger="core.landmarks.detect"):
        det = make_detector("auto")
    assert det.name == "dlib"
    assert "landmarks: dlib" in caplog.text and "face-alignment" in caplog.text
    assert "fallback" in caplog.text


def test_unknown_detector_name():
    with pytest.raises(UserError, match="unknown landmark detector 'bogus'.*auto, fan, dlib"):
        make_detector("bogus")


# --- the FAN wrapper, against a stand-in face_alignment module ----------------------------

class _NewLandmarksType(enum.IntEnum):
    TWO_D = 1
    THREE_D = 3


class _OldLandmarksType(enum.Enum):
    _2D = 1
    _3D = 3


def test_both_landmarks_type_spellings():
    assert detect._two_d_landmarks_type(_NewLandmarksType) is _NewLandmarksType.TWO_D
    assert detect._two_d_landmarks_type(_OldLandmarksType) is _OldLandmarksType._2D
    with pytest.raises(UserError, match="face-alignment"):
        detect._two_d_landmarks_type(enum.Enum("Other", "THREE_D"))


def _fake_face_alignment(landmarks_type_enum, new_api: bool):
    """A module with face_alignment's API shape: FaceAlignment(landmarks_type, device=...)."""
    box = np.array([10.0, 20.0, 110.0, 140.0, 0.99])
    lms = np.stack([np.linspace(20, 100, 68), np.linspace(30, 130, 68)], axis=1)
    calls = []

    class Sfd:
        def detect_from_image(self, image):
            calls.append(("detect_from_image",))
            return [box] if image.any() else []

    if new_api:
        class FaceAlignment:
            def __init__(self, landmarks_type, device="cuda", face_detector="sfd", compile=True):
                calls.append(("init", landmarks_type, device, compile))
                self.face_detector = Sfd()

            def get_landmarks_from_image(self, image, detected_faces=None, return_bboxes=False,
                                         return_landmark_score=False):
                calls.append(("landmarks", None if detected_faces is None else list(detected_faces),
                              return_bboxes))
                faces = self.face_detector.detect_from_image(image) if detected_faces is None else detected_faces
                if len(faces) == 0:
                    return (None, None, None) if return_bboxes else None
                out = [lms + i for i in range(len(faces))]
                return (out, None, faces) if return_bboxes else out
    else:
        class FaceAlignment:
            def __init__(self, landmarks_type, device="cuda", face_detector="sfd", flip_input=False):
                calls.append(("init", landmarks_type, device, None))
                self.face_detector = Sfd()

            def get_landmarks_from_image(self, image, detected_faces=None):
                calls.append(("landmarks", None if detected_faces is None else list(detected_faces), None))
                faces = self.face_detector.detect_from_image(image) if detected_faces is None else detected_faces
                return [np.c_[lms, np.zeros(68)] for _ in faces] or None  # old 2-D results may carry a z column

    module = types.ModuleType("face_alignment")
    module.__spec__ = importlib.machinery.ModuleSpec("face_alignment", None)
    module.LandmarksType = landmarks_type_enum
    module.FaceAlignment = FaceAlignment
    return module, calls, box, lms


@pytest.mark.parametrize("new_api", [True, False], ids=["face-alignment>=1.4", "old"])
def test_fan_wrapper(monkeypatch, new_api):
    enum_type = _NewLandmarksType if new_api else _OldLandmarksType
    module, calls, box, lms = _fake_face_alignment(enum_type, new_api)
    monkeypatch.setitem(sys.modules, "face_alignment", module)
    monkeypatch.setattr(detect, "_fan_missing_files", lambda: [])

    det = make_detector("auto", device="cpu")
    assert det.name == "fan"
    init = calls[0]
    assert init[1] is detect._two_d_landmarks_type(enum_type) and init[2] == "cpu"
    if new_api:
        assert init[3] is False  # no torch.compile warm-up

    image = np.full((200, 200, 3), 90, np.uint8)
    faces = det.detect(image)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, box[:4])
    assert faces[0].score == pytest.approx(0.99)
    np.testing.assert_allclose(faces[0].landmarks, lms, atol=1e-4)
    assert det.detect(np.zeros((200, 200, 3), np.uint8)) == []

    calls.clear()
    out = det.landmarks_in_box(image, [5, 6, 105, 116])
    assert out.shape == (68, 2) and out.dtype == np.float32
    (name, passed, *_), = [c for c in calls if c[0] == "landmarks"]
    np.testing.assert_allclose(passed[0], [5, 6, 105, 116])
    assert not any(c[0] == "detect_from_image" for c in calls)  # no face detection


def test_fan_on_missing_cuda_is_a_user_error(monkeypatch):
    module, *_ = _fake_face_alignment(_NewLandmarksType, True)
    monkeypatch.setitem(sys.modules, "face_alignment", module)
    monkeypatch.setattr(detect, "_fan_missing_files", lambda: [])
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        FanDetector("cuda:0")


def test_dlib_models_load_on_first_use_only(monkeypatch):
    """Building the detector loads nothing (a video re-run with cached landmarks never pays
    dlib's ~1.5 s); the first frame loads the models once; a missing model fails at once."""
    from core.landmarks import detect

    detect._dlib_models.cache_clear()
    det = DlibDetector()
    assert detect._dlib_models.cache_info().currsize == 0
    assert det.detect(np.zeros((64, 64, 3), np.uint8)) == []
    assert detect._dlib_models.cache_info().currsize == 1
    monkeypatch.setattr(detect, "_dlib_model_path", lambda: (_ for _ in ()).throw(UserError("dlib landmark model missing")))
    with pytest.raises(UserError, match="model missing"):
        DlibDetector()
