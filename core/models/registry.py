"""The face models the scripts know by name (``--recon_model``) and how to load each.

Each loader takes the ``--model_path`` given, or None for the model's default place: for
bfm09 the converted file found by :func:`core.resources.default_bfm09_path` (``BFM/`` of
the working directory, then the project's ``BFM/``), for sfm the copy bundled with the
project, for bfm2017 / bfm2019 :data:`core.resources.DEFAULT_BFM2017`; the model modules'
own loaders take explicit paths. Everything downstream (fitting, rendering, losses,
outputs) works on the :class:`~core.models.face_model.FaceModel` interface alone.

The model modules are imported when a model is loaded, so reading the names
(:data:`MODEL_NAMES`, for the scripts' flags) costs nothing.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Dict, Optional

from core import resources
from core.errors import UserError

if TYPE_CHECKING:
    from .face_model import FaceModel

log = logging.getLogger(__name__)


def _load_sfm(path: Optional[str]) -> FaceModel:
    from .sfm import load_sfm
    return load_sfm(path)


def _load_bfm2017(path: Optional[str]) -> FaceModel:
    from .bfm2017 import load_bfm2017
    return load_bfm2017(path or resources.DEFAULT_BFM2017)


def _load_bfm09(path: Optional[str]) -> FaceModel:
    from .bfm09 import load_bfm09
    return load_bfm09(path or resources.default_bfm09_path() or resources.bfm09_candidates()[0])


# --recon_model name -> loader(model_path or None).
MODELS: Dict[str, Callable[[Optional[str]], "FaceModel"]] = {
    "bfm09": _load_bfm09,
    "sfm": _load_sfm,
    "bfm2017": _load_bfm2017,
    "bfm2019": _load_bfm2017,
}
MODEL_NAMES = tuple(MODELS)


def choose_model(recon_model: Optional[str], model_path: Optional[str]) -> str:
    """The model to load when ``--recon_model`` may be unset (None): ``bfm09`` when a
    ``--model_path`` is given or the converted BFM09 file exists (see
    :func:`core.resources.bfm09_candidates`), else the bundled Surrey Face Model, said in
    one log line. An explicit name is returned as it is (``bfm09`` stays strict)."""
    if recon_model is not None:
        return recon_model
    if model_path is not None or resources.default_bfm09_path() is not None:
        return "bfm09"
    log.info("no converted Basel Face Model (%s): fitting with the bundled Surrey Face Model "
             "(--recon_model sfm); for BFM09 see BFM/README.md (python convert_bfm09_data.py)",
             resources.bfm09_candidates()[0])
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
