"""The single-photo pipeline (SPEC §5): read, detect, crop, fit, write.

Several photos are fitted together as one batch (one optimisation, independent frames).
A photo that cannot be used (unreadable, no face) is reported and skipped; the others are
still fitted and written.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from core import defaults, threads
from core.models.coeffs import BFM09_LAYOUT
from core.landmarks.crop import crop_face, crop_to_photo, paste_back, photo_to_crop, square_box
from core.landmarks.detect import pick_face
from core.errors import UserError
from core.fit.fitter import FitResult
from core.fit.lanes import cpu_lanes
from core.io.image import read_image
from core.landmarks.metrics import landmark_nme
from core.fit.focal import profile_focal
from core.io.outputs import check_unique, format_obj, write_outputs
from core.render.camera import Camera, FrameCamera, crop_cameras, default_focal
from .session import Session

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
COMPOSED_SUFFIX = "_composed_img.jpg"  # <name>_composed_img.jpg: the render pasted on the photo


@dataclass
class PreparedPhoto:
    """A photo ready for fitting: the crop, its box and the landmarks in crop pixels."""

    path: str
    name: str
    image: np.ndarray            # (H, W, 3) uint8, the full photo
    box: tuple                   # (x0, y0, x1, y1) square crop box in photo pixels
    crop: np.ndarray             # (T, T, 3) uint8
    landmarks_photo: np.ndarray  # (68, 2) detected, photo pixels
    landmarks_crop: np.ndarray   # (68, 2) detected, crop pixels
    detect_s: float = 0.0
    num_faces: int = 1


@dataclass
class PhotoReport:
    """What happened to each input photo."""

    written: Dict[str, Dict[str, str]] = field(default_factory=dict)  # name -> files
    failed: Dict[str, str] = field(default_factory=dict)              # path -> reason


def expand_inputs(paths: Sequence[str], res_folder: Optional[str] = None) -> List[str]:
    """Files as given; folders replaced by the images they contain (sorted), except, in
    ``res_folder`` itself, the composed images this script wrote there (a re-run must not
    fit its own outputs)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            ours = res_folder is not None and os.path.realpath(p) == os.path.realpath(res_folder)
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS)
                           and not (ours and f.endswith(COMPOSED_SUFFIX)))
            if not found:
                raise UserError(f"folder '{p}' contains no images ({', '.join(IMAGE_EXTS)})")
            out += found
        else:
            out.append(p)
    # The same file under the same name given twice is fitted once (links under other names
    # are other outputs); two files that would write the same outputs (one name in two
    # folders) are refused before any fitting.
    unique, seen = [], set()
    for p in out:
        key = (os.path.realpath(p), photo_stem(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    check_unique([photo_stem(p) for p in unique], unique)
    return unique


def photo_stem(path: str) -> str:
    """The name a photo's outputs are written under: its file name without the extension."""
    return os.path.splitext(os.path.basename(path))[0]


def prepare_photo(path: str, detector, tar_size: int, padding_ratio: float,
                  face_index: Union[str, int] = defaults.FACE_INDEX) -> PreparedPhoto:
    """Read the photo, detect the chosen face and crop it (UserError when impossible)."""
    image = read_image(path)
    t0 = time.perf_counter()
    faces = detector.detect(image)
    face = pick_face(faces, face_index, label=path)
    detect_s = time.perf_counter() - t0
    box = square_box(face.box, padding_ratio)
    crop = crop_face(image, box, tar_size)
    lms = np.asarray(face.landmarks, dtype=np.float64)
    return PreparedPhoto(path=path, name=photo_stem(path), image=image, box=box,
                         crop=crop, landmarks_photo=lms, landmarks_crop=photo_to_crop(lms, box, tar_size),
                         detect_s=detect_s, num_faces=len(faces))


def photo_camera(photo: PreparedPhoto, focal: Union[str, float]) -> FrameCamera:
    """The photo's own camera before the fit: focal ``focal`` pixels, or for "auto" the
    start of the estimate; principal point at the photo centre."""
    h, w = photo.image.shape[:2]
    return FrameCamera(focal=default_focal(w, h) if focal == "auto" else float(focal), width=w, height=h)


def photo_cameras(session: Session, photos: Sequence[PreparedPhoto], focal: Union[str, float]):
    """Each photo's own camera (principal point at its centre) of focal ``focal`` pixels or,
    for "auto", of the focal its landmarks determine (:func:`core.fit.focal.profile_focal`,
    else the 50° start): the batched crop camera of the photos and each photo's focal
    source ("given", "estimated" or "assumed")."""
    dev, dt = session.device, session.fitter.dtype
    cams = [photo_camera(p, focal) for p in photos]
    boxes, size = [p.box for p in photos], session.camera.image_size
    sources = ["given"] * len(photos)
    if focal == "auto":
        start = np.array([c.focal for c in cams])
        lms = torch.as_tensor(np.stack([p.landmarks_crop for p in photos]), dtype=dt, device=dev)

        def camera_at(f):  # every photo's start scaled alike
            return crop_cameras([c.with_focal(f * c.focal / start[0]) for c in cams], boxes, size, dtype=dt,
                                device=dev)

        found, prof = profile_focal(session.fitter, camera_at, lms, session.fitter.zeros(len(photos)),
                                    float(start[0]), shared=False)
        for k, (p, ok) in enumerate(zip(photos, prof["determined"])):
            if ok:
                cams[k] = cams[k].with_focal(float(found[k]) * cams[k].focal / start[0])
            else:
                log.warning("%s: the landmarks do not determine the focal length: using %.0f px (a 50° field of "
                            "view); give --focal PIXELS when the camera is known", p.name, cams[k].focal)
            sources[k] = "estimated" if ok else "assumed"
    return crop_cameras(cams, boxes, size, dtype=dt, device=dev), sources


def fit_photos(session: Session, photos: Sequence[PreparedPhoto], camera: Optional[Camera] = None) -> FitResult:
    """Fit all prepared photos in one batch, seen through the original crop camera or
    ``camera`` (per-photo crop cameras, :func:`photo_cameras`); on a CPU in parts side by
    side, one per free core (:mod:`core.fit.lanes`)."""
    dev, dt = session.device, session.fitter.dtype
    lms = torch.as_tensor(np.stack([p.landmarks_crop for p in photos]), dtype=dt, device=dev)
    imgs = torch.as_tensor(np.stack([p.crop for p in photos]), dtype=dt, device=dev)
    fitter = session.fitter if camera is None else session.fitter.with_camera(camera)
    threads.tick()  # the governor's count of free cores, sampled when due, chooses the lanes
    return fitter.fit(lms, imgs, lanes=cpu_lanes(dev, len(photos)))


def photo_outputs(session: Session, photo: PreparedPhoto, result: FitResult, index: int,
                  info_extra: Optional[dict] = None, focal_source: str = "") -> Dict[str, object]:
    """The four output files of one photo (SPEC §5 + info), as name -> content
    (``focal_source``: how the focal of the photo's own camera was found, when it has one)."""
    model, cam = session.model, session.camera
    if result.camera is not None and result.camera.batched:  # the photo's own camera
        cam = result.camera.frame(index)
    c = result.coeffs
    one = type(c)(**{k: v[index:index + 1] for k, v in c.as_dict().items()})
    kp = result.keypoints[index]
    # The fit's own render and this photo's own losses (the batch's are means over its
    # photos), both from the one evaluation at the end of the fit.
    rgba = result.renders[index].cpu().numpy()
    verts_t = result.output.vertices[index]
    terms = {k: float(v[index]) for k, v in result.frame_losses.items()}
    composed = paste_back(photo.image, np.clip(rgba[..., :3], 0, 255).astype(np.uint8),
                          rgba[..., 3], photo.box)
    model_lms_crop = cam.project_points(verts_t[kp.to(verts_t.device)]).cpu().numpy()
    model_lms_photo = crop_to_photo(model_lms_crop, photo.box, cam.image_size)
    nme = landmark_nme(model_lms_photo, photo.landmarks_photo)
    info = {
        "image": os.path.abspath(photo.path),
        "image_size": [int(photo.image.shape[1]), int(photo.image.shape[0])],
        "bbox": [int(v) for v in photo.box],
        "tar_size": cam.image_size,
        "camera": _camera_info(photo, cam, focal_source),
        "recon_model": model.name,
        "coeff_layout": {k: [s.start, s.stop] for k, s in model.layout.slices().items()},
        "landmark_vertex_ids": kp.cpu().numpy(),
        "landmarks_detected": photo.landmarks_photo.round(3),
        "landmarks_model": model_lms_photo.round(3),
        "landmark_nme_interocular": round(nme, 5),
        "faces_found": photo.num_faces,
        "losses": {k: round(float(v), 6) for k, v in terms.items()},
        "timings_s": {"detect": round(photo.detect_s, 4), **{k: round(v, 4) for k, v in result.timings.items()}},
        "device": str(session.device),
        "renderer": session.renderer.backend,
    }
    info.update(info_extra or {})
    verts = verts_t.cpu().numpy()
    colors = result.output.colors[index].cpu().numpy()
    log.info("%s: landmark loss %.6f, photo loss %.4f, landmark NME %.2f%% of the inter-ocular distance",
             photo.name, float(terms["lm"]), float(terms["photo"]), 100 * nme)
    names = output_names(photo.name, model)
    if model.layout == BFM09_LAYOUT:  # the original's 257-vector
        coeffs = model.layout.pack(one)[0].cpu().numpy().astype(np.float32)
    else:  # other models: named arrays, each with its own size
        coeffs = {k: v[0].cpu().numpy().astype(np.float32) for k, v in one.as_dict().items()}
    return dict(zip(names, (coeffs, format_obj(verts, model.tri.cpu().numpy(), colors), composed, info)))


def output_names(name: str, model) -> List[str]:
    """The output files of the photo ``name`` (its file name without extension), in the
    order they are renamed into place (the info last): the coefficients (``.npy``, the
    original's 257-vector, for the BFM09 layout; ``.npz`` named arrays otherwise), the
    mesh, the composed image and the info."""
    coeffs = f"{name}_coeffs.npy" if model.layout == BFM09_LAYOUT else f"{name}_coeffs.npz"
    return [coeffs, f"{name}_mesh.obj", f"{name}{COMPOSED_SUFFIX}", f"{name}_info.json"]


def _camera_info(photo: PreparedPhoto, cam, source: str) -> Dict[str, object]:
    """info.json's camera: the original crop camera ("model": "crop", crop pixels), or
    the photo's own camera ("model": "frame", photo pixels, 3x3 intrinsics)."""
    if not cam.batched:
        return {"model": "crop", "focal": cam.focal, "distance": cam.distance, "center": [cam.center, cam.center]}
    s = cam.image_size / float(photo.box[2] - photo.box[0])
    h, w = photo.image.shape[:2]
    frame = FrameCamera(focal=float(cam.focal.reshape(-1)[0]) / s, width=w, height=h)
    return {"model": "frame", **frame.as_dict(), "focal_source": source}


def run_photos(session: Session, detector, paths: Sequence[str], res_folder: str,
               padding_ratio: float = defaults.PADDING_RATIO, face_index: Union[str, int] = defaults.FACE_INDEX,
               batch_size: int = defaults.PHOTO_BATCH_SIZE, info_extra: Optional[dict] = None,
               focal: Optional[Union[str, float]] = None) -> PhotoReport:
    """Fit every photo in ``paths`` and write its outputs into ``res_folder`` (``focal``:
    see :func:`photo_cameras`)."""
    report = PhotoReport()
    prepared: List[PreparedPhoto] = []
    for p in paths:
        try:
            prepared.append(prepare_photo(p, detector, session.camera.image_size, padding_ratio, face_index))
        except UserError as e:
            if len(paths) == 1:
                raise
            report.failed[p] = str(e)
            log.warning("skipped: %s", e)
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        t0 = time.perf_counter()
        camera, sources = photo_cameras(session, chunk, focal) if focal is not None else (None, [""] * len(chunk))
        result = fit_photos(session, chunk, camera)
        batch_s = time.perf_counter() - t0
        fit_s = batch_s / len(chunk)
        if len(chunk) == 1:
            log.info("%s: fitted in %.2f s", chunk[0].name, batch_s)
        else:
            log.info("fitted %d photos together in %.2f s (%.2f s per photo): %s", len(chunk), batch_s, fit_s,
                     ", ".join(p.name for p in chunk))
        for i, photo in enumerate(chunk):
            extra = dict(info_extra or {})
            extra["timings_s_fit_per_photo"] = round(fit_s, 4)
            extra["timings_s_fit_batch"] = round(batch_s, 4)
            extra["batch_size"] = len(chunk)
            extra["fit_lanes"] = result.lanes
            files = photo_outputs(session, photo, result, i, extra, focal_source=sources[i])
            report.written[photo.name] = write_outputs(res_folder, files)
    log.info("%d photo(s) written to %s%s", len(report.written), res_folder,
             f"; {len(report.failed)} skipped (named above)" if report.failed else "")
    return report
