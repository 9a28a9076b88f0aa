"""Files shipped with the project, located from this package (never from the working
directory): the bundled Surrey Face Model and the landmark definitions of other models.

``BFM/`` beside ``core/`` holds them:

* ``BFM/sfm/``: the public Surrey Face Model from eos's ``share/`` folder (free for
  non-commercial use; ``BFM/sfm/README.md``);
* ``BFM/landmarks/``: eos's iBUG-68 mapping and jaw contour of the Basel 2017/2019
  ``bfm_nomouth`` topology (Apache 2.0);
* ``BFM/BFM09_model_info.mat``: where ``convert_bfm09_data.py`` writes the converted
  Basel Face Model 2009 (not shipped: it needs a registration);
* ``BFM/model2017-1_bfm_nomouth.h5``: where the Basel Face Model 2017 is looked for when
  no ``--model_path`` is given (not shipped either).

The model loaders take explicit paths; these defaults are applied by
:mod:`core.models.registry`.
"""
from __future__ import annotations

import os

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BFM_FOLDER = os.path.join(PROJECT_ROOT, "BFM")
BUNDLED_SFM = os.path.join(BFM_FOLDER, "sfm")
BUNDLED_LANDMARKS = os.path.join(BFM_FOLDER, "landmarks")
BFM09_FILE = "BFM09_model_info.mat"
DEFAULT_BFM2017 = os.path.join(BFM_FOLDER, "model2017-1_bfm_nomouth.h5")


def bfm09_candidates() -> list:
    """Where a converted BFM09 model is looked for when no ``--model_path`` is given, in
    order: ``BFM/BFM09_model_info.mat`` under the working directory (the original
    scripts' place), then in the project's own ``BFM/`` folder."""
    out = [os.path.join("BFM", BFM09_FILE)]
    mine = os.path.join(BFM_FOLDER, BFM09_FILE)
    if os.path.abspath(out[0]) != mine:
        out.append(mine)
    return out


def default_bfm09_path() -> str | None:
    """The first of :func:`bfm09_candidates` that exists, or None."""
    for p in bfm09_candidates():
        if os.path.isfile(p):
            return p
    return None
