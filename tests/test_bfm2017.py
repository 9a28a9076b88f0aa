"""BFM 2017/2019 (.h5) behind the common model interface, on a small file in its layout."""
import json
import os

import numpy as np
import pytest
import torch

from core.models.bfm2017 import CONTOUR_FILE, MAPPING_FILE, load_bfm2017
from core.errors import UserError
from tests.helpers import synthetic_arrays

h5py = pytest.importorskip("h5py")


def write_fake_bfm2017(folder, with_maps=True):
    """A BFM2017-layout h5 (millimetres, colours 0..1, orthonormal bases + variances) built
    from the synthetic face, and eos-style mapping/contour files beside it."""
    a = synthetic_arrays(1500)
    n = a["meanshape"].size // 3
    rng = np.random.default_rng(0)
    mean_mm = a["meanshape"].reshape(-1).astype(np.float64) * 100.0

    def ortho(k):
        q, _ = np.linalg.qr(rng.normal(size=(3 * n, k)))
        return q

    path = folder / "model2017-1_bfm_nomouth.h5"
    with h5py.File(path, "w") as f:
        f["shape/model/mean"] = mean_mm - 1.0           # the expression mean adds it back
        f["shape/model/pcaBasis"] = ortho(10)
        f["shape/model/pcaVariance"] = np.linspace(100, 10, 10)
        f["expression/model/mean"] = np.ones(3 * n)
        f["expression/model/pcaBasis"] = ortho(5)
        f["expression/model/pcaVariance"] = np.linspace(50, 5, 5)
        f["color/model/mean"] = np.full(3 * n, 0.6)
        f["color/model/pcaBasis"] = ortho(4)
        f["color/model/pcaVariance"] = np.full(4, 0.01)
        f["shape/representer/cells"] = (a["tri"].astype(np.int64) - 1).T
    if with_maps:
        lines = ["[landmark_mappings]"] + [f"{k + 1} = {k}" for k in range(68) if not (k < 17 and k != 8)]
        (folder / MAPPING_FILE).write_text("\n".join(lines) + "\n")
        contour = {"model_contour": {"right_contour": list(range(0, 8)), "left_contour": list(range(16, 8, -1))}}
        (folder / CONTOUR_FILE).write_text(json.dumps(contour))
    return path


def test_loads_units_layout_and_landmarks(tmp_path):
    m = load_bfm2017(str(write_fake_bfm2017(tmp_path)))
    a = synthetic_arrays(1500)
    n = a["meanshape"].size // 3
    assert (m.layout.n_id, m.layout.n_exp, m.layout.n_tex) == (10, 5, 4) and m.num_vertices == n
    # mm -> dm and centred: equal to the synthetic mean shape, centred.
    ref = a["meanshape"].reshape(n, 3).astype(np.float64)
    assert np.allclose(m.meanshape.reshape(n, 3).numpy(), ref - ref.mean(0), atol=1e-5)
    # Bases scaled by the standard deviation (and to dm): first column's norm = sqrt(100) / 100.
    assert abs(m.id_base[:, 0].norm().item() - 0.1) < 1e-5
    assert torch.allclose(m.meantex, torch.full_like(m.meantex, 153.0))
    assert m.keypoints[8] == 8 and m.keypoints[30] == 30 and m.has_contour


def test_missing_maps_and_bad_files(tmp_path, monkeypatch):
    from core.models import bfm2017

    path = write_fake_bfm2017(tmp_path, with_maps=False)
    # Neither beside the model nor bundled: the error names the files and where they are.
    monkeypatch.setattr(bfm2017, "BUNDLED_LANDMARKS", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=MAPPING_FILE.replace(".", r"\.")):
        load_bfm2017(str(path))
    monkeypatch.undo()
    # The bundled files are for the real 53149-vertex topology: a small model is refused.
    with pytest.raises(UserError):
        load_bfm2017(str(path))
    with pytest.raises(UserError, match="not found"):
        load_bfm2017(str(tmp_path / "none.h5"))
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="HDF5"):
        load_bfm2017(str(tmp_path / "bad.h5"))


def test_bundled_landmark_files_are_eos_bfm_nomouth():
    """The shipped mapping and contour as eos has them: the chin, nose tip, eye corners and
    the 20 mouth points (no brows or nose bridge), ids inside the 53149-vertex mesh."""
    from core.models.landmark_maps import contour_definition, read_ibug_mapping
    from core.resources import BUNDLED_LANDMARKS

    mapping = read_ibug_mapping(os.path.join(BUNDLED_LANDMARKS, MAPPING_FILE))
    assert sorted(mapping) == [9, 31, 37, 40, 43, 46] + list(range(49, 69))
    assert mapping[31] == 8156 and max(mapping.values()) < 53149
    lm, cand = contour_definition(json.load(open(os.path.join(BUNDLED_LANDMARKS, CONTOUR_FILE))))
    assert len(lm) == 16 and cand.shape[0] == 16 and 0 <= cand.min() and cand.max() < 53149


def test_fits_a_real_photo(tmp_path):
    """End to end through the CLI: npz coefficients with the model's own sizes."""
    import fit_single_img
    from core.pipelines.cli import run_main
    from tests.helpers import REPO

    path = write_fake_bfm2017(tmp_path)
    out = tmp_path / "res"
    rc = run_main(fit_single_img.main, ["--img_path", str(REPO / "data" / "grace_hopper.jpg"), "--res_folder", str(out),
                                        "--recon_model", "bfm2017", "--model_path", str(path), "--lm_detector", "dlib",
                                        "--quiet", "--first_nrf_iters", "10"])
    assert rc == 0
    z = np.load(out / "grace_hopper_coeffs.npz")
    assert z["id"].shape == (10,) and z["exp"].shape == (5,) and z["tex"].shape == (4,) and z["gamma"].shape == (27,)
    info = json.load(open(out / "grace_hopper_info.json"))
    assert info["recon_model"] == "bfm2017" and info["landmark_nme_interocular"] < 0.2
