"""Ground-truth scenes for camera and focal tests: a talking-head video rendered with a
known full-frame pinhole camera and known per-frame head poses, textured from a photo so a
real landmark detector finds the face.

Camera (SPEC §3, for a full W x H frame): the camera sits at (0, 0, 10) looking down −z;
a world point (x, y, z) has camera depth z_c = 10 − z and lands in frame pixels at::

    col = W/2 + focal · x / z_c        row = H/2 − focal · y / z_c

(pixel (i, j) covers [i, i+1) x [j, j+1), as in :mod:`core.render.camera`). This is
``Camera(focal, image_size=S)`` with S = max(W, H) (S − W and S − H even) cut down to its
central W x H pixels; :func:`frame_camera` gives that camera, :func:`project_to_frame` the
formula.

Poses follow SPEC §3: angles (x, y, z) = (pitch, yaw, roll) in radians, M = Rz·Ry·Rx,
vertices v·Mᵀ + trans, in the model's units (decimetres).

Texture: the photo is warped onto the model's frontal (x, y) by its 68 landmarks (a
thin-plate spline through the 68 pairs by default, so each landmark vertex shows the
photo's landmark; or one affine / similarity transform) and sampled bilinearly at every
vertex; the colours are rendered as they are (no light). ``PhotoTexture`` samples the photo
per pixel instead (sharper on coarse meshes).

Which model: a real face shape. With the Surrey Face Model (bundled, ``load_sfm(None)``)
dlib finds the face in about 99% of 640 x 480 frames at ±25° yaw, its inner landmarks
(17-67) 3.5-5.5 px from the truth; the synthetic height-field model
(:mod:`core.models.synthetic`) looks too little like a face (a tall narrow nose, a wide
round jaw) for that: 65-95% and 7-11 px. Jaw points differ by definition (the model's
fixed keypoints are not the silhouette a detector follows).

Detectors report integer coordinates at pixel centres; ``SceneTruth.landmarks`` put pixel
(i, j) at [i, i+1) x [j, j+1), so compare ``detected + 0.5`` with them.

    truth = render_scene_video("scene.mp4", model, photo, photo_landmarks)
    truth.save("scene.npz"); SceneTruth.load("scene.npz").landmarks   # (T, 68, 2)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import cv2
import numpy as np
import torch

from core.render import MeshRenderer, interpolate
from core.render.camera import Camera, FrameCamera
from .coeffs import Coeffs
from .face_model import FaceModel

__all__ = ["SceneTruth", "frame_camera", "project_to_frame", "PhotoTexture", "photo_vertex_uv", "photo_texture",
           "photo_vertex_colors", "make_scene", "scene_background", "render_frames", "render_scene_video"]

CAMERA_DISTANCE = 10.0   # SPEC §3: the camera sits at (0, 0, 10)
ID_SCALE = 0.5           # identity = N(0, 1) · ID_SCALE clipped to ±2 · ID_SCALE (bases scaled by
ID_MAX_RMS = 0.025       # their std), shrunk to move the vertices by at most this RMS (2.5 mm)
EXP_COMPONENTS = 8       # expressions move the first few components only, each within
EXP_MAX_MOVE = 0.04      # [0, a] with a moving no vertex more than this (model units, 4 mm)
MARGIN_PX = 4.0          # every projected vertex stays this far inside the frame
_FIELDS = ("width", "height", "fps", "focal", "cx", "cy", "id", "tex", "exp", "angles", "trans", "landmarks")


@dataclass
class SceneTruth:
    """What a scene video was rendered with (one frame per row of the per-frame arrays).

    width, height: frame size in pixels. fps: frame rate.
    focal: focal length in frame pixels. cx, cy: principal point = (width/2, height/2).
    id: (n_id,) float32 identity. tex: (n_tex,) zeros (the texture comes from the photo).
    exp: (T, n_exp) float32 expressions.
    angles: (T, 3) float32 radians (x, y, z) = (pitch, yaw, roll), M = Rz·Ry·Rx (SPEC §3).
    trans: (T, 3) float32 model units, world space, camera at (0, 0, 10) looking down −z.
    landmarks: (T, 68, 2) float32 the model's landmark vertices (its fixed keypoints)
        projected into frame pixels (col, row), pixel (i, j) centred at (i + .5, j + .5).
    """

    width: int
    height: int
    fps: float
    focal: float
    cx: float
    cy: float
    id: np.ndarray
    tex: np.ndarray
    exp: np.ndarray
    angles: np.ndarray
    trans: np.ndarray
    landmarks: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.angles.shape[0])

    def coeffs(self, start: int = 0, stop: Optional[int] = None) -> Coeffs:
        """Coefficients of frames start..stop-1 (float32 tensors; gamma zero)."""
        stop = self.num_frames if stop is None else stop
        b = len(range(start, stop))
        t = lambda a: torch.as_tensor(np.asarray(a, np.float32))
        return Coeffs(id=t(self.id)[None].expand(b, -1), exp=t(self.exp[start:stop]),
                      tex=t(self.tex)[None].expand(b, -1), angles=t(self.angles[start:stop]),
                      gamma=torch.zeros(b, 27), trans=t(self.trans[start:stop]))

    def camera(self) -> Camera:
        """The square camera whose central width x height pixels are the frame."""
        return frame_camera(self.width, self.height, self.focal)

    def project(self, world: torch.Tensor) -> torch.Tensor:
        """World points (..., 3) -> frame pixels (..., 2) (col, row)."""
        return project_to_frame(world, self.width, self.height, self.focal)

    def save(self, path) -> None:
        """Write every field to an ``.npz`` file (numpy's savez; no pickles)."""
        np.savez(path, **{f: np.asarray(getattr(self, f)) for f in _FIELDS})

    @classmethod
    def load(cls, path) -> "SceneTruth":
        """Read a file written by :meth:`save`; ValueError when a field is missing."""
        with np.load(path, allow_pickle=False) as d:
            missing = [f for f in _FIELDS if f not in d.files]
            if missing:
                raise ValueError(f"'{path}' is not a scene truth file: missing {', '.join(missing)}")
            v = {f: d[f] for f in _FIELDS}
        for f in ("width", "height"):
            v[f] = int(v[f])
        for f in ("fps", "focal", "cx", "cy"):
            v[f] = float(v[f])
        return cls(**v)


def frame_camera(width: int, height: int, focal: float) -> Camera:
    """``Camera(focal, image_size=S)``, S = max(width, height), whose central width x height
    pixels are the frame. ValueError when S − width or S − height is odd (no central cut)."""
    s = max(int(width), int(height))
    if (s - width) % 2 or (s - height) % 2:
        raise ValueError(f"Expected width and height of the same parity (the frame is the central "
                         f"cut of a square image); got {width} x {height}")
    return Camera(focal=float(focal), distance=CAMERA_DISTANCE, image_size=s)


def project_to_frame(world: torch.Tensor, width: int, height: int, focal: float) -> torch.Tensor:
    """World points (..., 3) -> frame pixels (..., 2): col = W/2 + f·x/z_c, row = H/2 − f·y/z_c,
    z_c = 10 − z."""
    cam = FrameCamera(focal=float(focal), width=int(width), height=int(height), distance=CAMERA_DISTANCE)
    return cam.as_camera().project_points(world)


# --- texture ---------------------------------------------------------------------------------

def _tps_fit(src: np.ndarray, dst: np.ndarray, smooth: float):
    """Thin-plate spline (K, 2) -> (K, 2) through the pairs (``smooth`` relaxes it)."""
    k = src.shape[0]
    r2 = ((src[:, None] - src[None]) ** 2).sum(-1)
    kern = 0.5 * r2 * np.log(np.maximum(r2, 1e-300))
    p = np.concatenate([np.ones((k, 1)), src], 1)
    a = np.zeros((k + 3, k + 3))
    a[:k, :k] = kern + smooth * np.eye(k)
    a[:k, k:], a[k:, :k] = p, p.T
    rhs = np.concatenate([dst, np.zeros((3, 2))], 0)
    sol = np.linalg.solve(a, rhs)
    return src, sol[:k], sol[k:]


def _tps_apply(tps, pts: np.ndarray) -> np.ndarray:
    src, w, aff = tps
    r2 = ((pts[:, None] - src[None]) ** 2).sum(-1)
    kern = 0.5 * r2 * np.log(np.maximum(r2, 1e-300))
    return kern @ w + np.concatenate([np.ones((len(pts), 1)), pts], 1) @ aff


def _least_squares_map(src: np.ndarray, dst: np.ndarray, kind: str):
    """Affine or similarity (no reflection) src -> dst as a function of (M, 2) points."""
    if kind == "affine":
        a = np.concatenate([src, np.ones((len(src), 1))], 1)
        m, *_ = np.linalg.lstsq(a, dst, rcond=None)
        return lambda p: np.concatenate([p, np.ones((len(p), 1))], 1) @ m
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    u, sv, vt = np.linalg.svd(d.T @ s)
    r = u @ np.diag([1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    scale = float((sv * [1.0, np.sign(np.linalg.det(u @ vt))]).sum() / (s ** 2).sum())
    return lambda p: (p - ms) @ (scale * r).T + md


@dataclass(frozen=True)
class PhotoTexture:
    """A photo and where each model vertex sits in it (rendered per pixel).

    image: (H, W, 3) uint8 RGB. uv: (N, 2) float32 photo pixels (col, row), integer = pixel
    centre, of every vertex of the model.
    """

    image: np.ndarray
    uv: torch.Tensor


def _merge_coincident(src: np.ndarray, dst: np.ndarray, tol: float):
    """Landmarks whose sources lie within ``tol`` of an earlier one (a model's closed mouth:
    inner and outer lip corners on one vertex) become one pair, their targets averaged."""
    groups = []
    for k in range(len(src)):
        for g in groups:
            if np.linalg.norm(src[g[0]] - src[k]) < tol:
                g.append(k)
                break
        else:
            groups.append([k])
    return np.stack([src[g[0]] for g in groups]), np.stack([dst[g].mean(0) for g in groups])


def photo_vertex_uv(model: FaceModel, landmarks68: np.ndarray, warp: str = "tps") -> torch.Tensor:
    """Where every vertex of the model sits in a photo with the 68 landmarks ``landmarks68``:
    (N, 2) float32 photo pixels (col, row).

    The model's frontal (x, −y) at zero coefficients is mapped so that its 68 landmark
    vertices meet the photo's landmarks: ``warp`` "tps" (a thin-plate spline through the
    pairs, so every landmark lands on its point; landmarks sharing a vertex, as the lip
    corners of a closed mouth, are merged and their points averaged), "affine" or
    "similarity" (least squares).

    landmarks68: (68, 2) photo pixels (x, y) = (col, row), integer = pixel centre (as
    detectors report them).
    """
    dst = np.asarray(landmarks68, np.float64)
    if dst.shape != (68, 2) or not np.all(np.isfinite(dst)):
        raise ValueError(f"Expected 68 finite photo landmarks of shape (68, 2); got {dst.shape}")
    if model.num_landmarks != 68:
        raise ValueError(f"Expected a model with 68 landmarks; got {model.num_landmarks}")
    if warp not in ("tps", "affine", "similarity"):
        raise ValueError(f"Expected warp 'tps', 'affine' or 'similarity'; got {warp!r}")
    xy = model.meanshape.detach().cpu().double().numpy().reshape(-1, 3)[:, :2] * [1.0, -1.0]  # rows down
    src = xy[model.keypoints.cpu().numpy()]
    mean = src.mean(0)
    scale = np.sqrt(((src - mean) ** 2).sum(1).mean())
    if warp == "tps":  # in normalised coordinates, which keep the kernel well scaled
        s, d = _merge_coincident((src - mean) / scale, dst, tol=0.02)
        uv = _tps_apply(_tps_fit(s, d, smooth=1e-6), (xy - mean) / scale)
    else:
        uv = _least_squares_map(src, dst, warp)(xy)
    return torch.from_numpy(uv.astype(np.float32))


def _check_photo(photo_rgb) -> np.ndarray:
    img = np.asarray(photo_rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"Expected photo_rgb to be an (H, W, 3) uint8 RGB image; got {img.shape} {img.dtype}")
    return np.ascontiguousarray(img)


def _sample(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``img`` at float arrays (u, v) (edge pixels repeat outside)."""
    return cv2.remap(img.astype(np.float32), u.astype(np.float32), v.astype(np.float32),
                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def photo_texture(model: FaceModel, photo_rgb: np.ndarray, landmarks68: np.ndarray,
                  warp: str = "tps") -> PhotoTexture:
    """The photo mapped onto the model (:func:`photo_vertex_uv`), for per-pixel rendering."""
    return PhotoTexture(image=_check_photo(photo_rgb), uv=photo_vertex_uv(model, landmarks68, warp))


def photo_vertex_colors(model: FaceModel, photo_rgb: np.ndarray, landmarks68: np.ndarray,
                        warp: str = "tps") -> torch.Tensor:
    """Per-vertex colours (N, 3) float32 0..255: the photo, smoothed to about the vertex
    spacing (anti-aliasing), sampled bilinearly at :func:`photo_vertex_uv`.

    photo_rgb: (H, W, 3) uint8 RGB; landmarks68: (68, 2) its landmarks (x, y)."""
    img = _check_photo(photo_rgb)
    uv = photo_vertex_uv(model, landmarks68, warp).double().numpy()
    spacing = math.sqrt(max(np.ptp(uv[:, 0]) * np.ptp(uv[:, 1]), 1.0) / len(uv))
    if 0.5 * spacing > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), 0.5 * spacing)
    cols = _sample(img, uv[None, :, 0], uv[None, :, 1])[0]
    return torch.from_numpy(np.ascontiguousarray(cols)).float()


# --- poses -----------------------------------------------------------------------------------

def _smooth(rng: np.random.Generator, t: np.ndarray, cycles: float) -> np.ndarray:
    """A smooth signal over t in [0, 1): a few low-frequency sinusoids, max |value| = 1."""
    ph = rng.uniform(0.0, 1.0, size=3)
    g = (np.sin(2 * np.pi * (cycles * t + ph[0])) + 0.4 * np.sin(2 * np.pi * (2.3 * cycles * t + ph[1]))
         + 0.15 * np.sin(2 * np.pi * (3.7 * cycles * t + ph[2])))
    return g / max(np.abs(g).max(), 1e-12)


def make_scene(model: FaceModel, *, width: int = 640, height: int = 480, fps: float = 25.0, frames: int = 40,
               focal: float = 800.0, face_height_px: float = 220.0, yaw_deg: float = 25.0,
               pitch_deg: float = 10.0, roll_deg: float = 5.0, seed: int = 0) -> SceneTruth:
    """The ground truth of a scene, without rendering it.

    A fixed random identity (N(0, 1)·ID_SCALE clipped to ±2·ID_SCALE, shrunk to move the
    vertices by at most ID_MAX_RMS root-mean-square), small smooth expressions (the first
    EXP_COMPONENTS components, each moving no vertex more than EXP_MAX_MOVE), smooth poses:
    yaw, pitch, roll within ±yaw_deg, ±pitch_deg, ±roll_deg (one slow swing per 4 s, at
    least one per clip, plus two faster harmonics), a small sway and zoom. The distance
    makes the frontal face (the landmarks' brow-to-chin extent) face_height_px tall; the
    sway is shrunk until every vertex of every frame is MARGIN_PX inside the frame
    (ValueError when even the still face does not fit).
    """
    if frames < 1 or width < 16 or height < 16 or focal <= 0 or fps <= 0 or face_height_px <= 0:
        raise ValueError(f"Expected frames >= 1, a frame of at least 16 x 16, focal, fps and face height > 0; "
                         f"got frames={frames}, {width} x {height}, focal={focal}, fps={fps}, "
                         f"face_height_px={face_height_px}")
    frame_camera(width, height, focal)  # the parity check
    rng = np.random.default_rng(seed)
    lay = model.layout
    id_ = np.clip(rng.normal(size=lay.n_id), -2.0, 2.0) * ID_SCALE
    move = (torch.from_numpy(id_).to(model.id_base) @ model.id_base.detach().T).reshape(-1, 3)
    rms = float(move.pow(2).sum(1).mean().sqrt())
    id_ = (id_ * min(1.0, ID_MAX_RMS / max(rms, 1e-12))).astype(np.float32)
    t = np.arange(frames) / frames
    cycles = max(1.0, frames / fps / 4.0)
    exp = np.zeros((frames, lay.n_exp), np.float32)
    moves = model.exp_base.detach().cpu().double().reshape(-1, 3, lay.n_exp).norm(dim=1).amax(0).numpy()
    for k in range(min(EXP_COMPONENTS, lay.n_exp)):
        a = rng.uniform(0.3, 1.0) * EXP_MAX_MOVE / max(moves[k], 1e-9)
        exp[:, k] = a * 0.5 * (1.0 + _smooth(rng, t, 1.5 * cycles))
    angles = np.stack([math.radians(pitch_deg) * _smooth(rng, t, cycles),
                       math.radians(yaw_deg) * _smooth(rng, t, cycles),
                       math.radians(roll_deg) * _smooth(rng, t, cycles)], 1).astype(np.float32)
    sway = np.stack([_smooth(rng, t, cycles) for _ in range(3)], 1)

    still = Coeffs(id=torch.from_numpy(id_)[None], exp=torch.zeros(1, lay.n_exp), tex=torch.zeros(1, lay.n_tex),
                   angles=torch.zeros(1, 3), gamma=torch.zeros(1, 27), trans=torch.zeros(1, 3))
    with torch.no_grad():
        lms0 = model.landmarks_3d(still)[0].double().numpy()
    face_h = float(np.ptp(lms0[:, 1]))
    zc = focal * face_h / face_height_px
    tz = CAMERA_DISTANCE - zc - float(lms0[:, 2].mean())
    base = np.array([0.0, 0.0, tz])
    amp = np.array([0.15 * face_h, 0.1 * face_h, 0.05 * zc])  # largest sway, model units
    for shrink in [0.6 ** k for k in range(10)] + [0.0]:
        trans = (base + shrink * amp * sway).astype(np.float32)
        truth = SceneTruth(width=int(width), height=int(height), fps=float(fps), focal=float(focal),
                           cx=width / 2.0, cy=height / 2.0, id=id_, tex=np.zeros(lay.n_tex, np.float32),
                           exp=exp, angles=angles, trans=trans,
                           landmarks=np.zeros((frames, model.num_landmarks, 2), np.float32))
        lo, hi = _extent(model, truth)
        if lo[0] >= MARGIN_PX and lo[1] >= MARGIN_PX and hi[0] <= width - MARGIN_PX and hi[1] <= height - MARGIN_PX:
            break
    else:
        raise ValueError(f"A {face_height_px:g} px face (the whole mesh: {hi[0] - lo[0]:.0f} x "
                         f"{hi[1] - lo[1]:.0f} px) does not fit a {width} x {height} frame at "
                         f"±{yaw_deg:g}° yaw; ask for a smaller face_height_px")
    with torch.no_grad():
        lms = truth.project(model.landmarks_3d(truth.coeffs()))
    truth.landmarks = lms.numpy().astype(np.float32)
    return truth


@torch.no_grad()
def _extent(model: FaceModel, truth: SceneTruth, chunk: int = 16) -> Tuple[np.ndarray, np.ndarray]:
    """(min, max) over all frames and vertices of the projected (col, row)."""
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for s in range(0, truth.num_frames, chunk):
        pts = truth.project(model(truth.coeffs(s, min(s + chunk, truth.num_frames))).vertices)
        lo = np.minimum(lo, pts.amin((0, 1)).numpy())
        hi = np.maximum(hi, pts.amax((0, 1)).numpy())
    return lo, hi


# --- rendering -------------------------------------------------------------------------------

def scene_background(photo_rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """A soft (H, W, 3) uint8 background: the photo scaled to cover the frame, blurred far
    beyond recognition and mixed half and half with a grey vertical gradient."""
    img = np.asarray(photo_rgb)
    s = max(width / img.shape[1], height / img.shape[0])
    big = cv2.resize(img, (max(width, math.ceil(img.shape[1] * s)), max(height, math.ceil(img.shape[0] * s))),
                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    y0, x0 = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
    blur = cv2.GaussianBlur(big[y0:y0 + height, x0:x0 + width].astype(np.float32), (0, 0), 0.05 * max(width, height))
    grad = np.linspace(150.0, 90.0, height, dtype=np.float32)[:, None, None]
    return np.clip(0.5 * blur + 0.5 * grad, 0, 255).astype(np.uint8)


@torch.no_grad()
def render_frames(model: FaceModel, texture: Union[torch.Tensor, PhotoTexture], truth: SceneTruth,
                  background: np.ndarray, renderer: Optional[MeshRenderer] = None, start: int = 0,
                  stop: Optional[int] = None, chunk: int = 4) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Frames start..stop-1 of the scene: (H, W, 3) uint8 RGB and the (H, W) bool face mask.

    The model posed by ``truth`` is rendered by ``frame_camera`` on the square image (the
    renderer's rasterize + shade), whose central W x H pixels are composited over
    ``background`` (H, W, 3), the silhouette softened by a 1-px blur. ``texture``: vertex
    colours (N, 3) 0..255 shown as they are (no light), or a :class:`PhotoTexture` whose
    photo coordinates are interpolated (perspective-correct) and sampled per pixel.
    """
    renderer = renderer or MeshRenderer("builtin")
    cam = truth.camera()
    s, w, h = cam.image_size, truth.width, truth.height
    r0, c0 = (s - h) // 2, (s - w) // 2
    bg = np.asarray(background, np.float32)
    if bg.shape != (h, w, 3):
        raise ValueError(f"Expected a background of shape {(h, w, 3)}; got {bg.shape}")
    per_pixel = isinstance(texture, PhotoTexture)
    attrs = (texture.uv if per_pixel else texture).to(torch.float32)
    if attrs.shape != (model.num_vertices, 2 if per_pixel else 3):
        raise ValueError(f"Expected a texture of shape ({model.num_vertices}, {2 if per_pixel else 3}); "
                         f"got {tuple(attrs.shape)}")
    stop = truth.num_frames if stop is None else stop
    for a in range(start, stop, chunk):
        c = truth.coeffs(a, min(a + chunk, stop))
        screen = cam.project(model(c, normals_grad=False).vertices)
        pix = renderer.rasterize(screen, model.tri, (s, s)).pix_to_face
        if per_pixel:
            img = interpolate(attrs[None].expand(screen.shape[0], -1, -1), screen, model.tri, pix, alpha=True)
        else:
            img = renderer.shade(screen, model.tri, attrs[None].expand(screen.shape[0], -1, -1), pix)
        for one in img[:, r0:r0 + h, c0:c0 + w].numpy():
            mask = one[..., -1] > 0
            face = _sample(texture.image, one[..., 0], one[..., 1]) if per_pixel else one[..., :3]
            soft = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.6)[..., None]
            # Inside the silhouette the face; on its edge pixels a blend with the background.
            alpha = np.where(mask[..., None], np.maximum(soft, 0.5), 0.0)
            out = alpha * face + (1.0 - alpha) * bg
            yield np.clip(out + 0.5, 0, 255).astype(np.uint8), mask


def render_scene_video(path: str, model: FaceModel, photo_rgb: np.ndarray, photo_landmarks: np.ndarray, *,
                       width: int = 640, height: int = 480, fps: float = 25.0, frames: int = 40,
                       focal: float = 800.0, face_height_px: float = 220.0, yaw_deg: float = 25.0,
                       pitch_deg: float = 10.0, roll_deg: float = 5.0, seed: int = 0, crf: int = 10,
                       warp: str = "tps", texture: str = "vertex") -> SceneTruth:
    """Render a scene (see :func:`make_scene`) textured from ``photo_rgb`` (H, W, 3) uint8
    RGB with its 68 landmarks ``photo_landmarks`` (68, 2) (x, y) (``texture`` "vertex":
    per-vertex colours, :func:`photo_vertex_colors`; "pixel": the photo sampled per pixel,
    :func:`photo_texture`; ``warp`` as there), over
    :func:`scene_background`, into the H.264 video ``path`` (:class:`core.io.video.VideoWriter`,
    crf ``crf``: near lossless, so the detector sees the rendering, not the codec).
    Returns the :class:`SceneTruth`."""
    from core.io.video import VideoWriter

    truth = make_scene(model, width=width, height=height, fps=fps, frames=frames, focal=focal,
                       face_height_px=face_height_px, yaw_deg=yaw_deg, pitch_deg=pitch_deg,
                       roll_deg=roll_deg, seed=seed)
    if texture not in ("pixel", "vertex"):
        raise ValueError(f"Expected texture 'pixel' or 'vertex'; got {texture!r}")
    make = photo_texture if texture == "pixel" else photo_vertex_colors
    tex = make(model, photo_rgb, photo_landmarks, warp=warp)
    background = scene_background(photo_rgb, width, height)
    with VideoWriter(os.fspath(path), (width, height), fps, crf=crf, preset="veryfast") as out:
        for frame, _ in render_frames(model, tex, truth, background):
            out.write(frame)
    return truth
