import numpy as np
import pytest
import scipy.io as sio
import torch

from core.errors import UserError
from core.model_io import load_bfm09
from tests.helpers import synthetic_arrays


def test_loads_converted_layout_and_fixes_one_based(tmp_path):
    arrays = synthetic_arrays()
    path = tmp_path / "m.mat"
    sio.savemat(path, arrays)
    m = load_bfm09(str(path))
    assert m.layout.total == 257
    assert m.tri.min() == 0 and torch.equal(m.tri, torch.as_tensor(arrays["tri"], dtype=torch.long) - 1)
    # "no triangle" (F + 1 in the file) becomes F, the appended zero row.
    assert m.point_buf.max() == m.tri.shape[0]
    assert torch.equal(m.keypoints, torch.as_tensor(arrays["keypoints"][0], dtype=torch.long) - 1)


def test_missing_file_says_how_to_convert(tmp_path):
    with pytest.raises(UserError, match="convert_bfm09_data.py"):
        load_bfm09(str(tmp_path / "nope.mat"))


def test_missing_keys_and_wrong_columns(tmp_path):
    arrays = dict(synthetic_arrays())
    bad = {k: v for k, v in arrays.items() if k != "exBase"}
    sio.savemat(tmp_path / "a.mat", bad)
    with pytest.raises(UserError, match="exBase"):
        load_bfm09(str(tmp_path / "a.mat"))
    bad = dict(arrays, idBase=arrays["idBase"][:, :60])
    sio.savemat(tmp_path / "b.mat", bad)
    with pytest.raises(UserError, match="80 columns"):
        load_bfm09(str(tmp_path / "b.mat"))
    bad = dict(arrays, tri=arrays["tri"] - 1)
    sio.savemat(tmp_path / "c.mat", bad)
    with pytest.raises(UserError, match="1-based"):
        load_bfm09(str(tmp_path / "c.mat"))
    (tmp_path / "d.mat").write_text("not a mat file")
    with pytest.raises(UserError, match="cannot read face model"):
        load_bfm09(str(tmp_path / "d.mat"))


def test_zero_albedo_basis_is_valid(tmp_path):
    arrays = dict(synthetic_arrays(), texBase=np.zeros_like(synthetic_arrays()["texBase"]))
    sio.savemat(tmp_path / "m.mat", arrays)
    m = load_bfm09(str(tmp_path / "m.mat"))
    c = m.layout.zeros(1).replace(tex=torch.ones(1, 80))
    assert torch.allclose(m.albedo(c.tex), m.meantex.reshape(1, -1, 3))
