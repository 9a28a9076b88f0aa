"""Building the fitting components once from user options: model, camera, renderer,
detector and fitter (shared by the photo and video pipelines)."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from core.render.camera import Camera
from core.fit.config import FitConfig
from core.device import resolve_device
from core.errors import UserError
from core.fit.fitter import Fitter
from core.models.face_model import FaceModel
from core.models.bfm09 import load_bfm09
from core.render import MeshRenderer
from core.resources import bfm09_candidates, default_bfm09_path

log = logging.getLogger(__name__)

def _load_sfm(path: Optional[str]) -> FaceModel:
    from core.models.sfm import load_sfm
    return load_sfm(path)


def _load_bfm2017(path: Optional[str]) -> FaceModel:
    from core.models.bfm2017 import load_bfm2017
    return load_bfm2017(path)


def _load_bfm09(path: Optional[str]) -> FaceModel:
    return load_bfm09(path or default_bfm09_path() or bfm09_candidates()[0])


# Model registry: --recon_model name -> loader(model_path or None). Everything downstream
# (fitting, rendering, losses, outputs) works on the FaceModel interface alone.
MODELS = {
    "bfm09": _load_bfm09,
    "sfm": _load_sfm,
    "bfm2017": _load_bfm2017,
    "bfm2019": _load_bfm2017,
}


def choose_model(recon_model: Optional[str], model_path: Optional[str]) -> str:
    """The model to load when ``--recon_model`` may be unset (None): ``bfm09`` when a
    ``--model_path`` is given or the converted BFM09 file exists (see
    :func:`core.resources.bfm09_candidates`), else the bundled Surrey Face Model, said in
    one log line. An explicit name is returned as it is (``bfm09`` stays strict)."""
    if recon_model is not None:
        return recon_model
    if model_path is not None or default_bfm09_path() is not None:
        return "bfm09"
    log.info("no converted Basel Face Model (%s): fitting with the bundled Surrey Face Model "
             "(--recon_model sfm); for BFM09 see BFM/README.md (python convert_bfm09_data.py)", bfm09_candidates()[0])
    return "sfm"


def load_model(recon_model: Optional[str] = "bfm09", model_path: Optional[str] = None) -> FaceModel:
    """The face model named ``recon_model`` (None: see :func:`choose_model`) from
    ``model_path`` (None: the model's default place), or a UserError."""
    recon_model = choose_model(recon_model, model_path)
    try:
        loader = MODELS[recon_model]
    except KeyError:
        raise UserError(f"unknown --recon_model '{recon_model}'; choose from {', '.join(MODELS)}") from None
    return loader(model_path)


@dataclass
class Session:
    """Everything a fit needs, on one device."""

    model: FaceModel
    camera: Camera
    renderer: MeshRenderer
    fitter: Fitter
    device: torch.device

    @classmethod
    def create(cls, model: FaceModel, config: FitConfig, tar_size: int = 256, device: str = "auto",
               gpu: Optional[int] = None, renderer: str = "auto", progress: bool = True) -> "Session":
        dev = resolve_device(device, gpu)
        if tar_size < 32 or tar_size > 4096:
            raise UserError(f"--tar_size must be between 32 and 4096; got {tar_size}")
        model = model.to(dev)
        camera = Camera(image_size=tar_size)
        try:
            rend = MeshRenderer(backend=renderer)
        except (ValueError, ImportError) as e:
            raise UserError(f"renderer '{renderer}' unavailable: {e}") from None
        fitter = Fitter(model, rend, camera, config, progress=progress)
        return cls(model=model, camera=camera, renderer=rend, fitter=fitter, device=dev)

    def fitter_for(self, config: FitConfig, progress: bool = False) -> Fitter:
        """A second Fitter with another configuration (e.g. :meth:`FitConfig.following_frames`)
        on this session's model, renderer and camera."""
        return Fitter(self.model, self.renderer, self.camera, config, progress=progress)


@dataclass(frozen=True)
class SessionSpec:
    """What rebuilds a :class:`Session` in another process: picklable (the model on the
    CPU, the renderer backend and the device by name).

    ``SessionSpec.of(session).build()`` is a session like ``session``;
    ``dataclasses.replace(spec, device="cuda:1")`` the same on another device.
    """

    model: FaceModel
    config: FitConfig
    tar_size: int = 256
    renderer: str = "auto"
    device: str = "auto"

    @classmethod
    def of(cls, session: Session) -> "SessionSpec":
        """The spec of ``session`` (its model copied to the CPU when it is elsewhere)."""
        model = session.model if session.device.type == "cpu" else copy.deepcopy(session.model).cpu()
        return cls(model=model, config=session.fitter.cfg, tar_size=session.camera.image_size,
                   renderer=session.renderer.backend, device=str(session.device))

    def build(self, progress: bool = False) -> Session:
        """The session: the model moved to ``device``, a camera, the renderer and a fitter."""
        return Session.create(self.model, self.config, tar_size=self.tar_size, device=self.device,
                              renderer=self.renderer, progress=progress)
