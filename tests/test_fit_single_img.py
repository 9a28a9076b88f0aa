"""fit_single_img.py end to end: real photos with dlib, outputs checked independently with
SPEC's formulas, and every bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io as sio

import fit_single_img
from core.pipelines.cli import run_main
from tests.helpers import REPO, shared_path, synthetic_arrays

FAST = ["--lm_detector", "dlib", "--quiet", "--first_nrf_iters", "20"]


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "synthetic.mat"
    sio.savemat(path, synthetic_arrays(1500))
    return str(path)


def spec_landmarks(model_file: str, coeffs: np.ndarray, bbox, tar_size: int) -> np.ndarray:
    """Landmarks in photo pixels from saved coefficients, written from SPEC §1-3 alone."""
    m = sio.loadmat(model_file)
    kp = m["keypoints"].reshape(-1).astype(int) - 1
    n = m["meanshape"].size // 3
    idc, exc, ang, tr = coeffs[:80], coeffs[80:144], coeffs[224:227], coeffs[254:257]
    s = m["meanshape"].reshape(-1) + m["idBase"] @ idc + m["exBase"] @ exc
    s = s.reshape(n, 3) - m["meanshape"].reshape(n, 3).mean(0)
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    v = s[kp] @ (rz @ ry @ rx).T + tr
    zc = 10 - v[:, 2]
    u = 1015 * v[:, 0] / zc + tar_size / 2
    row = tar_size - (1015 * v[:, 1] / zc + tar_size / 2)
    side = bbox[2] - bbox[0]
    return np.stack([bbox[0] + u * side / tar_size, bbox[1] + row * side / tar_size], 1)


def nme(pred, ref):
    iod = np.linalg.norm(ref[36:42].mean(0) - ref[42:48].mean(0))
    inner = np.r_[8, 17:68]
    return np.linalg.norm(pred[inner] - ref[inner], axis=1).mean() / iod


def check_outputs(folder, name, model_file, max_nme):
    files = sorted(os.listdir(folder))
    assert files == sorted(f"{name}_{s}" for s in ("coeffs.npy", "mesh.obj", "composed_img.jpg", "info.json"))
    coeffs = np.load(os.path.join(folder, f"{name}_coeffs.npy"))
    assert coeffs.shape == (257,) and coeffs.dtype == np.float32
    info = json.load(open(os.path.join(folder, f"{name}_info.json")))
    bbox, size = info["bbox"], info["tar_size"]
    assert bbox[2] - bbox[0] == bbox[3] - bbox[1] and size == 256
    detected = np.array(info["landmarks_detected"])
    ours = spec_landmarks(model_file, coeffs.astype(np.float64), bbox, size)
    assert np.allclose(ours, np.array(info["landmarks_model"]), atol=0.05)
    err = nme(ours, detected)
    assert err < max_nme, err
    # The mesh holds the posed vertices whose keypoints are those landmarks.
    verts = np.array([l.split()[1:4] for l in open(os.path.join(folder, f"{name}_mesh.obj")) if l.startswith("v ")], float)
    m = sio.loadmat(model_file)
    assert verts.shape[0] == m["meanshape"].size // 3
    kp = verts[m["keypoints"].reshape(-1).astype(int) - 1]
    side = bbox[2] - bbox[0]
    u = 1015 * kp[:, 0] / (10 - kp[:, 2]) + size / 2
    assert np.allclose(bbox[0] + u * side / size, ours[:, 0], atol=0.05)
    for k in ("lm", "photo", "total"):
        assert np.isfinite(info["losses"][k])
    assert info["detector"] == "dlib" and info["renderer"] in ("builtin", "pytorch3d")
    return err


def test_cli_real_photo_end_to_end(tmp_path, synth_model):
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "fit_single_img.py", "--img_path", "data/grace_hopper.jpg",
                           "--res_folder", str(out), "--model_path", synth_model, *FAST],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    check_outputs(out, "grace_hopper", synth_model, max_nme=0.12)
    info = json.load(open(out / "grace_hopper_info.json"))
    assert info["preset"] == "default" and info["fit_config"]["nonrigid_solver"] == "gn"


def test_cli_solver_flag_is_applied_and_recorded(tmp_path, synth_model):
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "fit_single_img.py", "--img_path", "data/grace_hopper.jpg",
                           "--res_folder", str(out), "--model_path", synth_model, *FAST,
                           "--nonrigid_solver", "adam", "--first_nrf_iters", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cfg = json.load(open(out / "grace_hopper_info.json"))["fit_config"]
    assert cfg["nonrigid_solver"] == "adam" and cfg["first_nrf_iters"] == 3


def test_real_shape_model_on_real_photos(tmp_path):
    """The public Surrey Face Model written in the BFM09 layout, on shared CelebA photos."""
    pytest.importorskip("eos")
    from core.models.sfm import sfm_to_bfm09_arrays
    model_file = str(tmp_path / "sfm09.mat")
    sio.savemat(model_file, sfm_to_bfm09_arrays(str(shared_path("sfm"))))
    photos = [str(shared_path("data", f)) for f in ("000002.jpg", "000006.jpg")]
    out = tmp_path / "res"
    rc = run_main(fit_single_img.main, ["--img_path", *photos, "--res_folder", str(out), "--model_path", model_file,
                                        "--lm_detector", "dlib", "--quiet"])
    assert rc == 0
    for p in photos:
        name = os.path.splitext(os.path.basename(p))[0]
        sub = tmp_path / name
        sub.mkdir()
        for f in os.listdir(out):
            if f.startswith(name + "_"):
                os.rename(out / f, sub / f)
        check_outputs(sub, name, model_file, max_nme=0.08)


def _run_bad(args, capsys):
    rc = run_main(fit_single_img.main, args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("kind", ["missing", "folder_without_images", "empty", "text", "truncated"])
def test_bad_images_give_one_line(kind, tmp_path, synth_model, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    target = {"missing": bad / "nope.jpg", "folder_without_images": bad, "empty": bad / "e.jpg",
              "text": bad / "t.jpg", "truncated": bad / "c.jpg"}[kind]
    if kind == "empty":
        target.write_bytes(b"")
    elif kind == "text":
        target.write_text("hello, not an image")
    elif kind == "truncated":
        target.write_bytes((REPO / "data" / "grace_hopper.jpg").read_bytes()[:3000])
    out = tmp_path / "res"
    rc, err = _run_bad(["--img_path", str(target), "--res_folder", str(out), "--model_path", synth_model, *FAST], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists() or not os.listdir(out)


def test_no_face_and_bad_models(tmp_path, synth_model, capsys):
    import cv2
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    out = tmp_path / "res"
    rc, err = _run_bad(["--img_path", str(blank), "--res_folder", str(out), "--model_path", synth_model, *FAST], capsys)
    assert rc == 2 and len(err) == 1 and "no face" in err[0]
    photo = str(REPO / "data" / "grace_hopper.jpg")
    rc, err = _run_bad(["--img_path", photo, "--res_folder", str(out), "--model_path", str(tmp_path / "none.mat"), *FAST], capsys)
    assert rc == 2 and len(err) == 1 and "convert_bfm09_data.py" in err[0]
    broken = tmp_path / "broken.mat"
    sio.savemat(broken, {k: v for k, v in synthetic_arrays(1500).items() if k != "keypoints"})
    rc, err = _run_bad(["--img_path", photo, "--res_folder", str(out), "--model_path", str(broken), *FAST], capsys)
    assert rc == 2 and len(err) == 1 and "keypoints" in err[0]
    assert not out.exists() or not os.listdir(out)


def test_several_photos_one_without_face(tmp_path, synth_model, capsys):
    import cv2
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    out = tmp_path / "res"
    rc = run_main(fit_single_img.main, ["--img_path", str(REPO / "data" / "grace_hopper.jpg"), str(blank),
                                        "--res_folder", str(out), "--model_path", synth_model, *FAST])
    assert rc == 1
    assert "blank" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == sorted(f"grace_hopper_{s}" for s in ("coeffs.npy", "mesh.obj", "composed_img.jpg", "info.json"))


# --- the bundled default model and write faults ---------------------------------------------

def test_without_recon_model_and_bfm09_the_bundled_sfm_fits(tmp_path, monkeypatch, capsys):
    """A fresh clone: no BFM09 file, no --recon_model -> the bundled Surrey Face Model,
    said in one log line on stdout; an explicit --recon_model bfm09 stays strict."""
    pytest.importorskip("eos")
    from core import resources
    monkeypatch.setattr(resources, "bfm09_candidates", lambda: [str(tmp_path / "BFM" / "BFM09_model_info.mat")])
    out = tmp_path / "res"
    photo = str(REPO / "data" / "astronaut.jpg")
    rc = run_main(fit_single_img.main, ["--img_path", photo, "--res_folder", str(out), "--lm_detector", "dlib"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0 and stderr == "", stderr
    assert [l for l in stdout.splitlines() if "bundled Surrey Face Model" in l and "BFM/README.md" in l]
    assert sorted(os.listdir(out)) == [f"astronaut_{s}" for s in ("coeffs.npz", "composed_img.jpg", "info.json", "mesh.obj")]
    info = json.load(open(out / "astronaut_info.json"))
    assert info["recon_model"] == "sfm" and info["landmark_nme_interocular"] < 0.06
    rc, err = _run_bad(["--img_path", photo, "--res_folder", str(tmp_path / "r2"), "--recon_model", "bfm09",
                        "--lm_detector", "dlib"], capsys)
    assert rc == 2 and len(err) == 1 and "convert_bfm09_data.py" in err[0]


@pytest.mark.parametrize("where", ["below_a_file", "proc", "is_a_file"])
def test_unwritable_res_folder_fails_before_the_fit(where, tmp_path, synth_model, capsys, monkeypatch):
    import core.pipelines.session
    monkeypatch.setattr(core.pipelines.session, "load_model", lambda *a, **k: pytest.fail("checked after the model loaded"))
    (tmp_path / "file.txt").write_text("x")
    res = {"below_a_file": tmp_path / "file.txt" / "out", "proc": "/proc/no_such_dir/out",
           "is_a_file": tmp_path / "file.txt"}[where]
    rc, err = _run_bad(["--img_path", str(REPO / "data" / "grace_hopper.jpg"), "--res_folder", str(res),
                        "--model_path", synth_model, *FAST], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --res_folder"), err


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path, synth_model):
    """A file-size limit (what a full disk does to the .obj): exit 2, one line, no file of
    the photo left, not even a temporary one."""
    import resource

    out = tmp_path / "res"
    out.mkdir()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run([sys.executable, "fit_single_img.py", "--img_path", "data/grace_hopper.jpg",
                           "--res_folder", str(out), "--model_path", synth_model, *FAST],
                          cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("error: cannot write") and "grace_hopper_mesh.obj" in err[0] and "too large" in err[0]
    assert os.listdir(out) == []


def test_a_decompression_bomb_in_a_folder_skips_only_itself(tmp_path, synth_model):
    """A 50000x50000 PNG among good photos: exit 1, one stderr line naming it, the good
    photo written."""
    import shutil

    from tests.test_image_io import _png_of_zeros

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(_png_of_zeros(50000, 50000, rows_per_chunk=2000))
    shutil.copy(REPO / "data" / "grace_hopper.jpg", folder / "grace_hopper.jpg")
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "fit_single_img.py", "--img_path", str(folder), "--res_folder", str(out),
                           "--model_path", synth_model, *FAST], cwd=REPO, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert "bomb.png" in err[0] and "megapixel limit" in err[0]
    assert sorted(os.listdir(out)) == sorted(f"grace_hopper_{s}" for s in ("coeffs.npy", "mesh.obj", "composed_img.jpg",
                                                                         "info.json"))


def test_a_batch_says_its_time_once_and_the_info_has_both(tmp_path, synth_model):
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "fit_single_img.py", "--img_path", "data/grace_hopper.jpg",
                           "data/astronaut.jpg", "--res_folder", str(out), "--model_path", synth_model,
                           "--lm_detector", "dlib", "--first_nrf_iters", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    timed = [l for l in proc.stdout.splitlines() if " s" in l and "fitted" in l]
    assert len(timed) == 1 and timed[0].startswith("fitted 2 photos together in "), proc.stdout
    for name in ("grace_hopper", "astronaut"):
        t = json.load(open(out / f"{name}_info.json"))
        assert t["batch_size"] == 2
        assert t["timings_s_fit_batch"] == pytest.approx(2 * t["timings_s_fit_per_photo"], abs=2e-4)


def test_help_names_both_coefficient_files(capsys):
    with pytest.raises(SystemExit):
        fit_single_img.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "_coeffs.npy" in text and "_coeffs.npz" in text and "--threads" in text


def test_readme_example_files_exist():
    """Every data/ file the README's commands name is in the repository."""
    import re
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"data/[\w.-]+\.(?:jpg|png|mp4)", readme))
    assert {"data/astronaut.jpg", "data/clip.mp4"} <= named
    assert [p for p in sorted(named) if not (REPO / p).is_file()] == []
