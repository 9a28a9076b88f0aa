"""iBUG-68 landmark mappings and contour definitions in eos's file formats (the files
themselves are bundled in ``BFM/``, see :mod:`core.resources`)."""
from __future__ import annotations

import re
from typing import Dict, Sequence, Tuple

import numpy as np

from core.errors import UserError

# iBUG jaw landmarks (0-based) whose vertex follows the silhouette, per contour side.
RIGHT_JAW = tuple(range(0, 8))
LEFT_JAW = tuple(range(9, 17))


def read_ibug_mapping(path: str) -> Dict[int, int]:
    """iBUG number (1-based) -> vertex id (0-based) from an eos mapping file
    (``ibug_to_sfm.txt``, ``ibug_to_bfm2017-1_bfm_nomouth.txt``: ``[landmark_mappings]``
    lines ``N = vertex``)."""
    out = {}
    section = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("["):
                section = line
                continue
            m = re.match(r"^(\d+)\s*=\s*(\d+)$", line)
            if m and section == "[landmark_mappings]":
                out[int(m.group(1))] = int(m.group(2))
    return out


def ibug68_vertices(mapping: Dict[int, int], contours: dict) -> np.ndarray:
    """(68,) 0-based vertex ids for iBUG points 1..68. Points the mapping lacks take the
    jaw contour (1-8 and 10-17: spread evenly from the temple towards the chin; 9: the
    contour's last vertex) and, for the inner mouth corners 61 / 65, the outer ones."""
    right = contours["model_contour"]["right_contour"]
    left = contours["model_contour"]["left_contour"]
    ids = []
    for k in range(1, 69):
        if k in mapping:
            ids.append(mapping[k])
        elif 1 <= k <= 8:
            ids.append(right[round((k - 1) * (len(right) - 1) / 8)])
        elif 10 <= k <= 17:
            ids.append(left[round((17 - k) * (len(left) - 1) / 8)])
        elif k == 9:
            ids.append(right[-1])
        elif k == 61:
            ids.append(mapping[49])
        elif k == 65:
            ids.append(mapping[55])
        else:
            raise UserError(f"iBUG point {k} has no vertex in the landmark mapping")
    return np.asarray(ids, dtype=np.int64)


def contour_definition(contours: dict) -> Tuple[Sequence[int], np.ndarray]:
    """The dynamic jaw contour of a ``*_model_contours.json``: (landmark ids (16,),
    candidates (16, K)): each right-jaw landmark may take any right-contour vertex, each
    left one any left-contour vertex (the shorter list padded with its last vertex)."""
    right = list(contours["model_contour"]["right_contour"])
    left = list(contours["model_contour"]["left_contour"])
    k = max(len(right), len(left))
    right += [right[-1]] * (k - len(right))
    left += [left[-1]] * (k - len(left))
    cand = np.asarray([right] * len(RIGHT_JAW) + [left] * len(LEFT_JAW), dtype=np.int64)
    return list(RIGHT_JAW) + list(LEFT_JAW), cand
