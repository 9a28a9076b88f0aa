"""fit_single_img.py with a broken converted model: one stderr line, exit 2, nothing written
(before strict validation a NaN meanshape fitted to an all-NaN mesh with exit 0, and 10
keypoints or an empty mesh ended in a RuntimeError traceback)."""
import os

import numpy as np
import pytest
import scipy.io as sio

import fit_single_img
from core.pipelines.cli import run_main
from tests.helpers import REPO, synthetic_arrays


def _broken(name):
    a = dict(synthetic_arrays())
    if name == "nan_meanshape":
        ms = np.array(a["meanshape"])
        ms[0, 5] = np.nan
        a["meanshape"] = ms
    elif name == "ten_keypoints":
        a["keypoints"] = a["keypoints"][:, :10]
    elif name == "empty_tri":
        a["tri"] = np.zeros((0, 3), np.int32)
    return a


@pytest.mark.parametrize("name, needle", [
    ("nan_meanshape", "'meanshape' holds 1 NaN or infinite value"),
    ("ten_keypoints", "'keypoints' has 10 ids; expected 68 (iBUG-68 landmarks)"),
    ("empty_tri", "'tri' has shape (0, 3); expected (F, 3)"),
])
def test_fit_single_img_refuses_a_broken_model(tmp_path, capsys, name, needle):
    model = tmp_path / f"{name}.mat"
    sio.savemat(model, _broken(name))
    out = tmp_path / "res"
    rc = run_main(fit_single_img.main, ["--img_path", str(REPO / "data" / "grace_hopper.jpg"),
                                        "--res_folder", str(out), "--model_path", str(model),
                                        "--lm_detector", "dlib", "--quiet", "--first_nrf_iters", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: face model '{model}': ") and needle in err[0], err[0]
    assert not out.exists() or not os.listdir(out)
