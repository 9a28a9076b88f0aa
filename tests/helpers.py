"""Shared test fixtures' plumbing: where ../shared is, small synthetic models on disk."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path inside ../shared, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (../shared is only beside the project in development and CI)")
    return p


@functools.lru_cache(maxsize=None)
def synthetic_arrays(target_vertices: int = 1500, seed: int = 0):
    from core.models.synthetic import make_face_model_arrays
    return make_face_model_arrays(target_vertices, seed=seed)
