"""Tests of core/models/convert_bfm09/ and convert_bfm09_data.py.

Inputs are built here from seeded random numbers in the Basel / Exp_Pca.bin / index-file
layouts; the result is compared with a straightforward float64 computation of SPEC §1
written independently below. With ../shared/bfm present, the real index files are used
at their real sizes.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

try:
    import resource  # POSIX only
except ImportError:
    resource = None

import h5py
import numpy as np
import pytest
import scipy.io

import convert_bfm09_data
from core.models import convert_bfm09 as cb
from core.models.convert_bfm09 import conversion
from core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED_BFM = (REPO / ".." / "shared" / "bfm").resolve()
needs_shared = pytest.mark.skipif(
    not all((SHARED_BFM / n).is_file() for n in cb.INDEX_FILES),
    reason=f"real index files not found in {SHARED_BFM} (../shared/bfm beside the repo)")


# --------------------------------------------------------------------------- fixtures

def write_basel(path, raw, v73=False):
    arrays = {k: raw[k] for k in ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV")}
    if not v73:
        scipy.io.savemat(path, arrays)
        return
    # MATLAB v7.3: HDF5 with a 512-byte user block holding the MATLAB header; MATLAB is
    # column-major, so h5py sees every array transposed.
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, a in arrays.items():
            ds = f.create_dataset(k, data=np.ascontiguousarray(a.T))
            ds.attrs["MATLAB_class"] = np.bytes_("single")
    header = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 2024 "
              b"HDF5 schema 1.00 .")
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02" + b"IM")


def write_exp_pca(path, exp_dim, exp_mu, exp_pc_raw):
    with open(path, "wb") as f:
        np.array([exp_dim], dtype="<i4").tofile(f)
        exp_mu.astype("<f4").tofile(f)
        exp_pc_raw.astype("<f4").tofile(f)


def write_index(folder, raw):
    scipy.io.savemat(folder / "BFM_exp_idx.mat", {"trimIndex": raw["trimIndex"]},
                     do_compression=True)
    scipy.io.savemat(folder / "BFM_front_idx.mat", {"idx": raw["idx"]}, do_compression=True)
    scipy.io.savemat(folder / "facemodel_info.mat",
                     {k: raw[k] for k in ("tri", "point_buf", "keypoints", "skinmask",
                                          "frontmask2", "frontmask2_idx", "tri_mask2")},
                     do_compression=True)
    (folder / "std_exp.txt").write_text(" ".join(f"{x:.6g}" for x in raw["std_exp"]))


def synthetic_index(rng, nb, ne, n, exp_dim, n_tri=40):
    return {
        "trimIndex": (rng.permutation(nb)[:ne] + 1).astype(np.uint16).reshape(-1, 1),
        "idx": (rng.permutation(ne)[:n] + 1).astype(np.float32).reshape(-1, 1),
        "tri": rng.integers(1, n + 1, (n_tri, 3)).astype(np.float32),
        "point_buf": rng.integers(1, n_tri + 2, (n, 8)).astype(np.float32),
        "keypoints": rng.integers(1, n + 1, (1, 68)).astype(np.float32),
        "skinmask": (rng.random((1, n)) < 0.5).astype(np.float32),
        "frontmask2": np.ones((1, n), np.float32),
        "frontmask2_idx": np.arange(1, n // 2 + 1, dtype=np.float32).reshape(-1, 1),
        "tri_mask2": rng.integers(1, n // 2 + 1, (7, 3)).astype(np.float32),
        "std_exp": np.sort(rng.uniform(1e3, 5e5, exp_dim))[::-1],
    }


def make_inputs(folder, seed=0, nb=60, ne=50, n=30, k_shape=85, k_tex=83, exp_dim=70,
                index="synthetic", v73=False):
    """Write Basel-shaped inputs to ``folder``; return the raw arrays."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if index == "shared":
        raw = {}
        for name in cb.INDEX_FILES:
            shutil.copyfile(SHARED_BFM / name, folder / name)
        raw.update(scipy.io.loadmat(folder / "BFM_exp_idx.mat"))
        raw.update(scipy.io.loadmat(folder / "BFM_front_idx.mat"))
        raw.update(scipy.io.loadmat(folder / "facemodel_info.mat"))
        raw["std_exp"] = np.loadtxt(folder / "std_exp.txt")
        nb, ne, exp_dim = 53490, raw["trimIndex"].size, raw["std_exp"].size
    else:
        raw = synthetic_index(rng, nb, ne, n, exp_dim)
        if index == "synthetic":
            write_index(folder, raw)
    f4 = np.float32
    raw.update(
        shapeMU=rng.normal(0, 5e4, (3 * nb, 1)).astype(f4),
        shapePC=(rng.standard_normal((3 * nb, k_shape), dtype=f4) / np.sqrt(3 * nb)).astype(f4),
        shapeEV=np.sort(rng.uniform(1e4, 1e6, (k_shape, 1)).astype(f4), axis=0)[::-1],
        texMU=rng.uniform(0, 255, (3 * nb, 1)).astype(f4),
        texPC=(rng.standard_normal((3 * nb, k_tex), dtype=f4) / np.sqrt(3 * nb)).astype(f4),
        texEV=np.sort(rng.uniform(100, 5e3, (k_tex, 1)).astype(f4), axis=0)[::-1],
        exp_dim=exp_dim,
        expMU=rng.normal(0, 1e3, 3 * ne).astype(f4),
        expPC_raw=(rng.standard_normal((exp_dim, 3 * ne), dtype=f4) / np.sqrt(3 * ne)).astype(f4),
    )
    write_basel(folder / cb.BASEL_FILE, raw, v73=v73)
    write_exp_pca(folder / cb.EXP_PCA_FILE, exp_dim, raw["expMU"], raw["expPC_raw"])
    return raw


def reference(raw):
    """SPEC §1, written out plainly in float64 (independent of the library)."""
    f8 = np.float64
    index_exp = raw["idx"].astype(np.int64).reshape(-1) - 1
    index_shape = (raw["trimIndex"].astype(np.int64).reshape(-1) - 1)[index_exp]

    def pick(base, rows, k):  # base (3V, K) -> reshape (V, 3, k), take rows, back to (3V', k)
        return base[:, :k].reshape(-1, 3, k)[rows].reshape(-1, k)

    id_base = raw["shapePC"].astype(f8) * raw["shapeEV"].astype(f8).reshape(1, -1) / 1e5
    tex_base = raw["texPC"].astype(f8) * raw["texEV"].astype(f8).reshape(1, -1)
    exp_pc = raw["expPC_raw"].astype(f8).reshape(raw["exp_dim"], -1).T
    ex_base = exp_pc * raw["std_exp"].reshape(1, -1) / 1e5
    return {
        "meanshape": (raw["shapeMU"].astype(f8).reshape(-1, 3) / 1e5)[index_shape].reshape(1, -1),
        "meantex": raw["texMU"].astype(f8).reshape(-1, 3)[index_shape].reshape(1, -1),
        "idBase": pick(id_base, index_shape, 80),
        "exBase": pick(ex_base, index_exp, 64),
        "texBase": pick(tex_base, index_shape, 80),
        **{k: raw[k] for k in ("tri", "point_buf", "keypoints", "skinmask",
                               "frontmask2_idx", "tri_mask2")},
    }


def assert_matches_reference(model, raw):
    ref = reference(raw)
    assert set(model) == set(ref)
    for k, want in ref.items():
        got = model[k]
        assert got.shape == want.shape, k
        if k in ("meanshape", "meantex", "idBase", "exBase", "texBase"):
            assert got.dtype == np.float32, k
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max(),
                                       err_msg=k)
        else:  # index arrays: stored as they came, 1-based
            assert got.dtype == want.dtype, k
            np.testing.assert_array_equal(got, want, err_msg=k)


@pytest.fixture
def bfm(tmp_path):
    folder = tmp_path / "BFM"
    raw = make_inputs(folder)
    return folder, raw


def run_cli(args, capsys):
    rc = convert_bfm09_data.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_error(args, capsys, *needles, out_path=None):
    rc, out, err = run_cli([*args, "--quiet"], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out_path is not None:
        assert not Path(out_path).exists()
        leftovers = [p.name for p in Path(out_path).parent.iterdir() if p.name.startswith(".")]
        assert not leftovers
    return lines[0]


# --------------------------------------------------------------------------- conversion

def test_convert_matches_independent_computation(bfm):
    folder, raw = bfm
    model = cb.convert(folder / cb.BASEL_FILE, folder / cb.EXP_PCA_FILE,
                       cb.read_index_files(folder))
    assert_matches_reference(model, raw)
    assert model["idBase"].shape == (90, 80) and model["exBase"].shape == (90, 64)


def test_cli_writes_the_model_and_a_summary(bfm, capsys, caplog):
    caplog.set_level("INFO")
    folder, raw = bfm
    rc, out, err = run_cli(["--bfm_folder", folder], capsys)
    assert rc == 0, err
    path = folder / cb.OUT_FILE
    loaded = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    assert_matches_reference(loaded, raw)
    assert "30 vertices" in out and "40 triangles" in out and "id 80 of 85" in out
    assert "exp 64 of 70" in out and "tex 80 of 83" in out and " MB" in out
    assert "reading shapePC" in caplog.text  # progress


def test_out_flag_and_sizes_read_from_files(tmp_path, capsys):
    folder = tmp_path / "in"
    raw = make_inputs(folder, seed=3, nb=44, ne=41, n=25, k_shape=80, k_tex=120, exp_dim=64)
    out = tmp_path / "model.mat"
    rc, _, err = run_cli(["--bfm_folder", folder, "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    loaded = {k: v for k, v in scipy.io.loadmat(out).items() if not k.startswith("__")}
    assert_matches_reference(loaded, raw)


def test_matlab_v73_basel_file_is_read(tmp_path):
    folder = tmp_path / "BFM"
    raw = make_inputs(folder, seed=5, v73=True)
    with pytest.raises(NotImplementedError):  # what the original script would hit
        scipy.io.loadmat(folder / cb.BASEL_FILE)
    model = cb.convert(folder / cb.BASEL_FILE, folder / cb.EXP_PCA_FILE,
                       cb.read_index_files(folder))
    assert_matches_reference(model, raw)


def test_read_exp_pca_layout(bfm):
    folder, raw = bfm
    exp = cb.read_exp_pca(folder / cb.EXP_PCA_FILE)
    assert (exp.exp_dim, exp.n_vertices) == (70, 50)
    np.testing.assert_array_equal(exp.pc, raw["expPC_raw"].T)
    some = cb.read_exp_pca(folder / cb.EXP_PCA_FILE, n_components=5, vertices=[3, 0])
    np.testing.assert_array_equal(some.pc, raw["expPC_raw"].T.reshape(50, 3, 70)[[3, 0], :, :5]
                                  .reshape(6, 5))


def test_read_basel_selects_vertices_and_columns(bfm):
    folder, raw = bfm
    m = cb.read_basel(folder / cb.BASEL_FILE, vertices=np.array([7, 2]), n_shape=4, n_tex=3)
    assert (m.n_vertices, m.n_shape, m.n_tex) == (60, 85, 83)
    np.testing.assert_array_equal(m.shape_pc, raw["shapePC"].reshape(60, 3, 85)[[7, 2], :, :4]
                                  .reshape(6, 4))
    np.testing.assert_array_equal(m.tex_mu, raw["texMU"].reshape(60, 3)[[7, 2]].reshape(-1))
    np.testing.assert_array_equal(m.shape_ev, raw["shapeEV"][:4, 0])
    assert m.tex_ev.shape == (3,)


# --------------------------------------------------------------------------- real index files

@needs_shared
def test_real_index_files_at_real_size_with_download(tmp_path, monkeypatch, capsys):
    """Basel-sized synthetic bases (53490 vertices; 82/81 components instead of 199 to
    stay fast), the real 79-component expression layout (53215 vertices), and the real
    index files, fetched through --download from a fake server."""
    folder = tmp_path / "BFM"
    raw = make_inputs(folder, seed=7, index="shared", k_shape=82, k_tex=81)
    for name in cb.INDEX_FILES:
        (folder / name).unlink()
    served = []

    def fake_urlopen(url, timeout=None):
        served.append(url)
        return io.BytesIO((SHARED_BFM / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    rc, out, err = run_cli(["--bfm_folder", folder, "--download"], capsys)
    assert rc == 0, err
    assert len(served) == 4 and all("microsoft/Deep3DFaceReconstruction" in u for u in served)
    loaded = {k: v for k, v in scipy.io.loadmat(folder / cb.OUT_FILE).items()
              if not k.startswith("__")}
    assert_matches_reference(loaded, raw)
    assert loaded["meanshape"].shape == (1, 3 * 35709)
    assert loaded["tri"].shape == (70789, 3) and loaded["point_buf"].max() == 70790
    assert "35709 vertices, 70789 triangles, 68 keypoints" in out


@needs_shared
def test_embedded_hashes_match_the_real_files():
    import hashlib
    for name in cb.INDEX_FILES:
        digest = hashlib.sha256((SHARED_BFM / name).read_bytes()).hexdigest()
        assert cb.INDEX_SHA256[name] == digest, name
    index = cb.read_index_files(SHARED_BFM)
    assert (index.trim_index.size, index.n_vertices, index.std_exp.size) == (53215, 35709, 79)


# --------------------------------------------------------------------------- download

def test_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="could not download BFM_exp_idx.mat.*by hand from "
                                        "Deep3DFaceReconstruction"):
        cb.download_index_files(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_rejects_content_that_differs(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO(b"<!DOCTYPE html><html>"))
    with pytest.raises(UserError, match="content differs from the published file"):
        cb.download_index_files(tmp_path, ["std_exp.txt"])
    assert list(tmp_path.iterdir()) == []


@needs_shared
def test_download_writes_verified_files(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(
        (SHARED_BFM / url.rsplit("/", 1)[1]).read_bytes()))
    (tmp_path / "std_exp.txt").write_text("1 2 3")  # present files are left alone
    written = cb.download_index_files(tmp_path)
    assert sorted(p.name for p in written) == sorted(cb.INDEX_FILES[:3])
    for p in written:
        assert p.read_bytes() == (SHARED_BFM / p.name).read_bytes()
    assert (tmp_path / "std_exp.txt").read_text() == "1 2 3"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cb.INDEX_FILES)


def test_cli_download_offline(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "BFM"
    make_inputs(folder, index=None)

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert_cli_error(["--bfm_folder", folder, "--download"], capsys, "could not download",
                     "no network", out_path=folder / cb.OUT_FILE)


# --------------------------------------------------------------------------- missing inputs

def test_missing_everything_lists_every_file(tmp_path, capsys):
    line = assert_cli_error(["--bfm_folder", tmp_path], capsys, "01_MorphableModel.mat",
                            "faces.dmi.unibas.ch", "Exp_Pca.bin", "Juyong/3DFace",
                            "BFM_exp_idx.mat", "std_exp.txt", "--download",
                            "BFM_model_front.mat", out_path=tmp_path / cb.OUT_FILE)
    assert "Deep3DFaceReconstruction" in line


def test_missing_index_files_are_named_with_their_source(bfm, capsys):
    folder, _ = bfm
    (folder / "BFM_front_idx.mat").unlink()
    (folder / "std_exp.txt").unlink()
    line = assert_cli_error(["--bfm_folder", folder], capsys,
                            "BFM_front_idx.mat, std_exp.txt",
                            "github.com/microsoft/Deep3DFaceReconstruction/tree/master/BFM",
                            "MIT", "--download", out_path=folder / cb.OUT_FILE)
    assert "BFM_exp_idx.mat" not in line


def test_missing_folder(tmp_path, capsys):
    assert_cli_error(["--bfm_folder", tmp_path / "nope"], capsys, "does not exist")


# --------------------------------------------------------------------------- malformed Exp_Pca.bin

def test_exp_pca_saved_html_page(bfm, capsys):
    folder, _ = bfm
    (folder / cb.EXP_PCA_FILE).write_bytes(b"\n<!DOCTYPE html>\n<html lang='en'>" + b"x" * 999)
    assert_cli_error(["--bfm_folder", folder], capsys, "Exp_Pca.bin", "is an HTML page",
                     out_path=folder / cb.OUT_FILE)


@pytest.mark.parametrize("cut, needle", [
    (3, "not a whole number of float32"),          # bytes length not a multiple of item size
    (4 * 5, "the download is truncated"),          # not a whole number of vertices
    (4 * 3 * 71, "holds 49 vertices (exp_dim=70) but BFM_exp_idx.mat's trimIndex lists 50"),
])
def test_exp_pca_truncated(bfm, capsys, cut, needle):
    folder, _ = bfm
    path = folder / cb.EXP_PCA_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    assert_cli_error(["--bfm_folder", folder], capsys, needle, out_path=folder / cb.OUT_FILE)


def test_exp_pca_not_an_expression_basis(bfm, capsys):
    folder, _ = bfm
    (folder / cb.EXP_PCA_FILE).write_bytes(np.array([-5, 1, 2], "<i4").tobytes())
    assert_cli_error(["--bfm_folder", folder], capsys, "does not start with a component count")


def test_exp_pca_components_disagree_with_std_exp(tmp_path, capsys):
    folder = tmp_path / "BFM"
    raw = make_inputs(folder, exp_dim=70)
    write_exp_pca(folder / cb.EXP_PCA_FILE, 69, raw["expMU"], raw["expPC_raw"][:69])
    assert_cli_error(["--bfm_folder", folder], capsys, "std_exp.txt has 70 values",
                     "exp_dim=69")


@pytest.mark.parametrize("kw, needle", [
    (dict(k_shape=79), "has 79 shape components; the model needs 80"),
    (dict(k_tex=70), "has 70 texture components; the model needs 80"),
    (dict(exp_dim=60), "has 60 expression components; the model needs 64"),
])
def test_too_few_components(tmp_path, capsys, kw, needle):
    folder = tmp_path / "BFM"
    make_inputs(folder, **kw)
    assert_cli_error(["--bfm_folder", folder], capsys, needle, out_path=folder / cb.OUT_FILE)


# --------------------------------------------------------------------------- malformed .mat files

def test_basel_not_a_mat_file(bfm, capsys):
    folder, _ = bfm
    (folder / cb.BASEL_FILE).write_bytes(b"\x01\x02\x03\x04" * 100)
    assert_cli_error(["--bfm_folder", folder], capsys, "01_MorphableModel.mat",
                     "is not a MATLAB .mat file", "Unknown mat file type")


@pytest.mark.parametrize("head, needle", [
    (b"PK\x03\x04", "is a zip archive"),
    (b"\x1f\x8b\x08", "is a gzip archive"),
    (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer"),
    (b"<html><body>Please log in", "is an HTML page"),
])
def test_basel_is_something_else(bfm, capsys, head, needle):
    folder, _ = bfm
    (folder / cb.BASEL_FILE).write_bytes(head + b"\0" * 600)
    assert_cli_error(["--bfm_folder", folder], capsys, needle, "faces.dmi.unibas.ch")


def test_basel_truncated(bfm, capsys):
    folder, _ = bfm
    path = folder / cb.BASEL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert_cli_error(["--bfm_folder", folder], capsys, "01_MorphableModel.mat", "is truncated",
                     "incomplete download", out_path=folder / cb.OUT_FILE)


def test_basel_missing_variable(bfm, capsys):
    folder, raw = bfm
    scipy.io.savemat(folder / cb.BASEL_FILE, {k: raw[k] for k in
                                              ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC")})
    assert_cli_error(["--bfm_folder", folder], capsys, "has no variable texEV")


def test_basel_sizes_disagree(bfm, capsys):
    folder, raw = bfm
    bad = dict(raw, texPC=raw["texPC"][:-3])
    write_basel(folder / cb.BASEL_FILE, bad)
    assert_cli_error(["--bfm_folder", folder], capsys, "texPC has shape (177, 83)",
                     "expected (180, K)")


def test_basel_has_fewer_vertices_than_trim_index(tmp_path, capsys):
    folder = tmp_path / "BFM"
    raw = make_inputs(folder)
    small = dict(raw, **{k: raw[k][: 3 * 20] for k in ("shapeMU", "shapePC", "texMU", "texPC")})
    write_basel(folder / cb.BASEL_FILE, small)
    assert_cli_error(["--bfm_folder", folder], capsys, "BFM_exp_idx.mat: trimIndex refers to "
                     "vertex", "has 20 vertices")


def test_index_v73_file_is_read(bfm):
    folder, raw = bfm
    path = folder / "BFM_front_idx.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("idx", data=raw["idx"].T)
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file".ljust(124) + b"\x00\x02IM")
    np.testing.assert_array_equal(cb.read_index_files(folder).front_idx, raw["idx"].ravel())


@pytest.mark.parametrize("change, needle", [
    (dict(idx=np.array([[1.0], [51.0]])), "BFM_front_idx.mat: idx refers to vertex 51 but "
                                           "BFM_exp_idx.mat's trimIndex lists only 50"),
    (dict(idx=np.array([[0.0], [2.0]])), "idx holds ids 0..2; expected 1.."),
    (dict(idx=np.array([[1.5], [2.0]])), "idx must hold whole numbers"),
    (dict(tri=np.full((40, 3), 31.0)), "facemodel_info.mat (", ),
    (dict(tri=np.full((40, 3), 31.0)), "tri holds ids 31..31; expected 1..30"),
    (dict(tri=np.ones((40, 4))), "tri has shape (40, 4); expected (n, 3)"),
    (dict(point_buf=np.full((30, 8), 42.0)), "point_buf holds ids 42..42; expected 1..41"),
    (dict(keypoints=np.ones((1, 67))), "keypoints has shape (1, 67); expected (1, 68)"),
    (dict(skinmask=np.ones((1, 29))), "skinmask has shape (1, 29)"),
    (dict(idx=np.arange(1, 30.0).reshape(-1, 1)), "point_buf has 30 rows but "
                                                   "BFM_front_idx.mat's idx selects 29"),
])
def test_malformed_index_files(bfm, capsys, change, needle):
    folder, raw = bfm
    write_index(folder, dict(raw, **change))
    assert_cli_error(["--bfm_folder", folder], capsys, needle, out_path=folder / cb.OUT_FILE)


@pytest.mark.parametrize("text, needle", [
    ("<!DOCTYPE html><html></html>", "std_exp.txt (" ),
    ("<!DOCTYPE html><html></html>", "is an HTML page"),
    ("1 2 three", "is not a whitespace-separated list of numbers"),
    ("1 -2 3", "must hold positive standard deviations"),
    ("", "is empty"),
])
def test_malformed_std_exp(bfm, capsys, text, needle):
    folder, _ = bfm
    (folder / "std_exp.txt").write_text(text)
    assert_cli_error(["--bfm_folder", folder], capsys, needle)


def test_index_file_missing_variable(bfm, capsys):
    folder, raw = bfm
    scipy.io.savemat(folder / "BFM_exp_idx.mat", {"trimindex": raw["trimIndex"]})
    assert_cli_error(["--bfm_folder", folder], capsys, "BFM_exp_idx.mat (",
                     "has no variable trimIndex (it has: trimindex)", "Deep3DFaceReconstruction")


# --------------------------------------------------------------------------- BFM_model_front.mat

def front_mat_from(bfm, path):
    folder, raw = bfm
    model = cb.convert(folder / cb.BASEL_FILE, folder / cb.EXP_PCA_FILE,
                       cb.read_index_files(folder))
    # Deep3DFaceRecon_pytorch's converter saves float64 (no cast to float32).
    saved = {k: (v.astype(np.float64) if k in ("meanshape", "idBase") else v)
             for k, v in model.items()}
    scipy.io.savemat(path, saved)
    return raw, saved


def test_front_mat_is_accepted(bfm, tmp_path, capsys):
    raw, _ = front_mat_from(bfm, tmp_path / "BFM_model_front.mat")
    out = tmp_path / "out.mat"
    rc, stdout, err = run_cli(["--from_front_mat", tmp_path / "BFM_model_front.mat",
                               "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    loaded = {k: v for k, v in scipy.io.loadmat(out).items() if not k.startswith("__")}
    assert_matches_reference(loaded, raw)  # float32 again, indices unchanged
    assert "BFM_model_front.mat" in stdout


def test_front_mat_auto_detected(bfm, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    folder = tmp_path / "d3d"
    folder.mkdir()
    raw, _ = front_mat_from(bfm, folder / cb.FRONT_MAT_FILE)
    rc, _, err = run_cli(["--bfm_folder", folder], capsys)
    assert rc == 0, err
    assert "using Deep3DFaceRecon_pytorch's BFM_model_front.mat" in caplog.text
    loaded = {k: v for k, v in scipy.io.loadmat(folder / cb.OUT_FILE).items()
              if not k.startswith("__")}
    assert_matches_reference(loaded, raw)


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.pop("exBase"), "has no exBase"),
    (lambda m: m.update(meanshape=m["meanshape"] * 1e5), "looks like the Basel file's "
                                                          "micrometres"),
    (lambda m: m.update(idBase=m["idBase"][:, :79]), "idBase has shape (90, 79); expected "
                                                     "(90, 80)"),
    (lambda m: m.update(tri=m["tri"] - 1), "tri holds ids 0..29; expected 1..30"),
    (lambda m: m.update(keypoints=m["keypoints"][:, :60]), "keypoints has shape (1, 60)"),
    (lambda m: m.update(meantex=m["meantex"][:, :-3]), "meantex has shape (1, 87)"),
])
def test_front_mat_validation(bfm, tmp_path, capsys, change, needle):
    path = tmp_path / "BFM_model_front.mat"
    _, saved = front_mat_from(bfm, path)
    change(saved)
    scipy.io.savemat(path, saved)
    out = tmp_path / "out.mat"
    assert_cli_error(["--from_front_mat", path, "--out", out], capsys, "BFM_model_front.mat (",
                     needle, out_path=out)


def test_front_mat_missing(tmp_path, capsys):
    assert_cli_error(["--from_front_mat", tmp_path / "BFM_model_front.mat"], capsys,
                     "not found", "Deep3DFaceRecon_pytorch")


# --------------------------------------------------------------------------- output

@pytest.mark.parametrize("code, hint", [
    (errno.ENOSPC, "the disk is full"),
    (errno.EFBIG, "ulimit -f"),
    (errno.EROFS, "read-only"),
    (errno.EACCES, "choose a folder you can write to"),
])
def test_failed_write_is_one_line_and_leaves_the_old_file(bfm, monkeypatch, capsys, code, hint):
    folder, _ = bfm
    out = folder / cb.OUT_FILE
    out.write_bytes(b"old")
    before = sorted(p.name for p in folder.iterdir())

    def broken(f, *args, **kwargs):
        f.write(b"partial" * 1000)  # something reached the temporary file first
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(scipy.io, "savemat", broken)
    line = assert_cli_error(["--bfm_folder", folder], capsys, f"cannot write '{out}'",
                            os.strerror(code), hint)
    assert line.count("--out") == 1
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in folder.iterdir()) == before  # no temporary file left


def test_output_folder_is_created(bfm, capsys, tmp_path):
    folder, raw = bfm
    out = tmp_path / "no" / "deeper" / "m.mat"
    rc, _, err = run_cli(["--bfm_folder", folder, "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    assert_matches_reference({k: v for k, v in scipy.io.loadmat(out).items()
                              if not k.startswith("__")}, raw)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.mat"]


def _no_conversion(monkeypatch):
    """Make the (long) conversion fail loudly: a check that must come first cannot reach it
    (patched where convert_folder looks them up)."""
    def boom(*args, **kwargs):
        raise AssertionError("the conversion ran before the output was checked")
    monkeypatch.setattr(conversion, "convert", boom)
    monkeypatch.setattr(conversion, "read_front_mat", boom)


def test_out_that_is_a_folder_fails_before_converting(bfm, capsys, monkeypatch, tmp_path):
    folder, _ = bfm
    _no_conversion(monkeypatch)
    target = tmp_path / "existing"
    target.mkdir()
    assert_cli_error(["--bfm_folder", folder, "--out", target], capsys,
                     f"output '{target}' is an existing folder", f"--out {target / cb.OUT_FILE}")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("below", ["file.txt/m.mat", "file.txt/sub/dir/m.mat"])
def test_out_below_a_regular_file_fails_before_converting(bfm, capsys, monkeypatch, tmp_path, below):
    folder, _ = bfm
    _no_conversion(monkeypatch)
    (tmp_path / "file.txt").write_text("a file")
    assert_cli_error(["--bfm_folder", folder, "--out", tmp_path / below], capsys,
                     f"'{tmp_path / 'file.txt'}' is a file, not a folder", "choose another --out")
    assert (tmp_path / "file.txt").read_text() == "a file"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")
@pytest.mark.parametrize("target", ["/proc/BFM09_model_info.mat", "/proc/self/sub/m.mat"])
def test_out_under_proc_fails_before_converting(bfm, capsys, monkeypatch, target):
    folder, _ = bfm
    _no_conversion(monkeypatch)
    assert_cli_error(["--bfm_folder", folder, "--out", target], capsys,
                     f"cannot write '{target}'", "choose another --out")
    assert not os.path.exists(target)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_out_that_is_not_a_regular_file(bfm, capsys, monkeypatch, tmp_path):
    folder, _ = bfm
    _no_conversion(monkeypatch)
    fifo = tmp_path / "pipe.mat"
    os.mkfifo(fifo)
    assert_cli_error(["--bfm_folder", folder, "--out", fifo], capsys, "is not a regular file")
    assert fifo.is_fifo()


def test_not_enough_space_fails_before_converting(bfm, capsys, monkeypatch, tmp_path):
    folder, _ = bfm
    _no_conversion(monkeypatch)
    real = os.statvfs

    def small(path):  # the file system of the output has 50 kB left
        st = real(path)
        return types.SimpleNamespace(f_bavail=50_000 // st.f_frsize, f_frsize=st.f_frsize,
                                     f_blocks=st.f_blocks)

    monkeypatch.setattr(os, "statvfs", small)
    line = assert_cli_error(["--bfm_folder", folder, "--out", tmp_path / "m.mat"], capsys,
                            "the model needs at least", "are free there", "free some space")
    # 30 vertices: 3 * 30 * (2 + 80 + 64 + 80) float32 = 81.4 kB, plus 1.9 kB of index arrays
    assert "needs at least 83.3 kB but only 49.2 kB are free" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BFM"]


def test_check_output_accepts_writable_places(tmp_path):
    cb.check_output(tmp_path / "m.mat")
    cb.check_output(tmp_path / "new" / "sub" / "m.mat")  # folders that can be created
    (tmp_path / "m.mat").write_bytes(b"old")
    cb.check_output(tmp_path / "m.mat")  # an existing file is replaced later
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mat"]  # probe removed, nothing created


def _script(args, tmp_path, fsize=None, patch=""):
    """Run convert_bfm09_data.py in a subprocess, optionally under RLIMIT_FSIZE = fsize bytes;
    ``patch`` is Python run before main() (to reach a code path on purpose)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    code = ("import sys\nimport convert_bfm09_data as c\n"
            "from core.models.convert_bfm09 import conversion\n"
            f"{patch}\nsys.exit(c.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env,
                          preexec_fn=limit if fsize else None)


def _assert_one_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


@pytest.mark.parametrize("kind", ["folder", "below_file", "proc"])
def test_script_bad_out_is_one_line(bfm, tmp_path, kind):
    folder, _ = bfm
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    out = {"folder": tmp_path / "d", "below_file": tmp_path / "f" / "m.mat",
           "proc": "/proc/m.mat"}[kind]
    if kind == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    # Without --quiet too: the check comes before any progress message.
    needle = {"folder": "is an existing folder", "below_file": "is a file, not a folder",
              "proc": "does not accept new files"}[kind]
    _assert_one_line(_script(["--bfm_folder", folder, "--out", out], tmp_path), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BFM", "d", "f"]
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.skipif(resource is None or not hasattr(signal, "SIGXFSZ"), reason="no file size limits here")
def test_script_under_a_file_size_limit(bfm, tmp_path):
    folder, _ = bfm
    out = tmp_path / "out" / "m.mat"
    out.parent.mkdir()
    # Checked up front: the model (about 100 kB) cannot fit a 20 kB limit.
    proc = _script(["--bfm_folder", folder, "--out", out, "--quiet"], tmp_path, fsize=20_000)
    _assert_one_line(proc, "needs at least", "limited to 20.0 kB here (ulimit -f)")
    assert list(out.parent.iterdir()) == []
    # Without that check the write itself fails (EFBIG, as SIGXFSZ is ignored): same result,
    # and the temporary file is gone.
    proc = _script(["--bfm_folder", folder, "--out", out, "--quiet"], tmp_path, fsize=20_000,
                   patch="conversion.check_output_space = lambda *a: None")
    _assert_one_line(proc, f"cannot write '{out}'", os.strerror(errno.EFBIG), "ulimit -f")
    assert list(out.parent.iterdir()) == []
    # And with room to spare the same command works.
    proc = _script(["--bfm_folder", folder, "--out", out, "--quiet"], tmp_path, fsize=10_000_000)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.mat"]


def test_usage_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        convert_bfm09_data.main(["--bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: unrecognized arguments: --bogus (see --help)\n"
    proc = subprocess.run([sys.executable, "convert_bfm09_data.py", "--out"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    _assert_one_line(proc, "argument --out: expected one argument (see --help)")


def test_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "convert_bfm09_data.py", "--bfm_folder",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: missing in ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_help_documents_every_flag():
    text = convert_bfm09_data.build_parser().format_help()
    for flag in ("--bfm_folder", "--out", "--download", "--from_front_mat", "--quiet"):
        assert flag in text
    assert all(a.help for a in convert_bfm09_data.build_parser()._actions)


def test_main_leaves_the_core_log_level_as_it_was(bfm, capsys):
    """--quiet must not silence the library's logging for the rest of a process that
    called main() (it did: a later fit in the same process lost its INFO lines)."""
    import logging
    folder, _ = bfm
    core_log = logging.getLogger("core")
    before = core_log.level
    rc, _, err = run_cli(["--bfm_folder", folder, "--quiet"], capsys)
    assert rc == 0, err
    assert core_log.level == before
    assert_cli_error(["--bfm_folder", folder / "missing"], capsys, "does not exist")
    assert core_log.level == before
