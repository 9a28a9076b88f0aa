import numpy as np
import pytest
import scipy.io as sio
import torch

from core.errors import UserError
from core.models.bfm09 import load_bfm09
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


# --------------------------------------------------------------------------- strict validation

def _load_changed(tmp_path, **changes):
    """Save the synthetic model with ``changes`` applied and load it; return the UserError text."""
    arrays = dict(synthetic_arrays(), **changes)
    path = tmp_path / "x.mat"
    sio.savemat(path, arrays)
    with pytest.raises(UserError) as info:
        load_bfm09(str(path))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"face model '{path}': "), msg
    return msg


def _with(key, index, value):
    a = np.array(synthetic_arrays()[key], dtype=np.float32 if key not in ("tri", "point_buf", "keypoints")
                 else np.float64)
    a.reshape(-1)[index] = value
    return a


def test_keypoint_count_must_be_68(tmp_path):
    kp = synthetic_arrays()["keypoints"]
    msg = _load_changed(tmp_path, keypoints=kp[:, :10])
    assert "'keypoints' has 10 ids; expected 68 (iBUG-68 landmarks)" in msg
    msg = _load_changed(tmp_path, keypoints=np.zeros((1, 0), np.int32))
    assert "'keypoints' has 0 ids; expected 68" in msg
    msg = _load_changed(tmp_path, keypoints=np.concatenate([kp, kp[:, :1]], axis=1))
    assert "'keypoints' has 69 ids" in msg


def test_empty_or_malformed_triangles(tmp_path):
    assert "'tri' has shape (0, 3); expected (F, 3) with F > 0" in _load_changed(tmp_path, tri=np.zeros((0, 3), np.int32))
    tri = synthetic_arrays()["tri"]
    assert "'tri' has shape" in _load_changed(tmp_path, tri=tri[:, :2])
    n = synthetic_arrays()["meanshape"].size // 3
    msg = _load_changed(tmp_path, tri=_with("tri", 5, n + 1))
    assert f"'tri' holds ids 1..{n + 1}; expected 1..{n} (1-based vertex ids" in msg
    assert "'tri' holds values that are not whole numbers" in _load_changed(tmp_path, tri=_with("tri", 5, 2.5))
    assert "'tri' holds values that are not whole numbers" in _load_changed(tmp_path, tri=_with("tri", 5, np.nan))
    assert "'tri' holds <U" in _load_changed(tmp_path, tri="abc")


def test_point_buf_and_keypoint_ranges(tmp_path):
    a = synthetic_arrays()
    n, f = a["meanshape"].size // 3, a["tri"].shape[0]
    msg = _load_changed(tmp_path, point_buf=_with("point_buf", 7, f + 2))
    assert f"'point_buf' holds ids 1..{f + 2}; expected 1..{f + 1} (1-based triangle ids, {f + 1} = no triangle)" in msg
    assert "'point_buf' holds ids 0.." in _load_changed(tmp_path, point_buf=_with("point_buf", 7, 0))
    assert f"'point_buf' has shape ({n - 1}, 8); expected ({n}, 8)" in _load_changed(tmp_path, point_buf=a["point_buf"][:-1])
    msg = _load_changed(tmp_path, keypoints=_with("keypoints", 3, n + 5))
    assert f"'keypoints' holds ids 1..{n + 5}; expected 1..{n}" in msg


@pytest.mark.parametrize("key", ["meanshape", "idBase", "exBase", "meantex", "texBase", "skinmask"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_refused(tmp_path, key, value):
    msg = _load_changed(tmp_path, **{key: _with(key, 40, value)})
    assert f"'{key}' holds 1 NaN or infinite value (first at " in msg and "expected finite numbers" in msg
    assert "convert_bfm09_data.py" in msg


def test_non_finite_message_points_at_the_first_bad_value(tmp_path):
    a = np.array(synthetic_arrays()["idBase"])
    a[7, 3] = a[9, 0] = np.nan
    assert "'idBase' holds 2 NaN or infinite values (first at row 7, column 3, 0-based)" in _load_changed(tmp_path, idBase=a)
    assert "'meanshape' holds 1 NaN or infinite value (first at index 40, 0-based)" in \
        _load_changed(tmp_path, meanshape=_with("meanshape", 40, np.nan))


def test_sizes_across_keys(tmp_path):
    a = synthetic_arrays()
    n = a["meanshape"].size // 3
    longer = np.concatenate([a["meanshape"], [[0.5]]], axis=1)
    assert f"'meanshape' has {3 * n + 1} values; expected 3N > 0" in _load_changed(tmp_path, meanshape=longer)
    assert f"'idBase' has shape ({3 * n - 3}, 80); expected ({3 * n}, K)" in _load_changed(tmp_path, idBase=a["idBase"][:-3])
    assert f"'meantex' has {3 * n - 3} values; expected {3 * n}" in _load_changed(tmp_path, meantex=a["meantex"][:, :-3])
    assert f"'skinmask' has {n - 1} values; expected {n}" in _load_changed(tmp_path, skinmask=a["skinmask"][:, :-1])
    assert "'meanshape' has 0 values" in _load_changed(tmp_path, meanshape=np.zeros((1, 0), np.float32))


def test_valid_edge_values_still_load(tmp_path):
    a = synthetic_arrays()
    n, f = a["meanshape"].size // 3, a["tri"].shape[0]
    # float-stored whole-number ids at both ends of their ranges, keypoints as a column
    tri = a["tri"].astype(np.float32)
    tri[0] = [1, n, 2]
    pb = a["point_buf"].astype(np.float32)
    pb[:, -1] = f + 1
    kp = a["keypoints"].reshape(68, 1).astype(np.float64)
    kp[0] = n
    sio.savemat(tmp_path / "m.mat", dict(a, tri=tri, point_buf=pb, keypoints=kp))
    m = load_bfm09(str(tmp_path / "m.mat"))
    assert m.tri[0].tolist() == [0, n - 1, 1] and int(m.point_buf.max()) == f and int(m.keypoints[0]) == n - 1
    assert m.num_landmarks == 68
