"""Building the fitting components once from user options: model, camera, renderer,
detector and fitter (shared by the photo and video pipelines)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from core import defaults
from core.render.camera import Camera
from core.fit.config import FitConfig
from core.device import resolve_device
from core.errors import UserError
from core.fit.fitter import Fitter
from core.models.face_model import FaceModel
from core.models.registry import choose_model, load_model  # noqa: F401 (the scripts import them from here)
from core.render import MeshRenderer


@dataclass
class Session:
    """Everything a fit needs, on one device."""

    model: FaceModel
    camera: Camera
    renderer: MeshRenderer
    fitter: Fitter
    device: torch.device

    @classmethod
    def create(cls, model: FaceModel, config: FitConfig, tar_size: int = defaults.TAR_SIZE,
               device: str = defaults.DEVICE, gpu: Optional[int] = None, renderer: str = defaults.RENDERER,
               progress: bool = True) -> "Session":
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


@dataclass(frozen=True)
class SessionSpec:
    """What rebuilds a :class:`Session` in another process: picklable (the model on the
    CPU, the renderer backend and the device by name).

    ``SessionSpec.of(session).build()`` is a session like ``session``;
    ``dataclasses.replace(spec, device="cuda:1")`` the same on another device.
    """

    model: FaceModel
    config: FitConfig
    tar_size: int = defaults.TAR_SIZE
    renderer: str = defaults.RENDERER
    device: str = defaults.DEVICE

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
