"""The Surrey Face Model behind the common model interface (--recon_model sfm)."""
import json
import os

import numpy as np
import pytest
import torch

import fit_single_img
from core.models import landmark_maps, sfm
from core.render.camera import Camera
from core.pipelines.cli import run_main
from core.errors import UserError
from core.models.face_model import FaceModel
from tests.helpers import REPO
from tests.test_fit_single_img import nme


def test_ibug_mapping_and_contour_fill(tmp_path):
    (tmp_path / "map.txt").write_text("[landmark_mappings]\n 9 = 33 # chin\n18 = 225\n# 61 missing\n49 = 398\n55 = 812\n"
                                      "[contour_landmarks]\nright = [ 1,\n 2 ]\n")
    mapping = landmark_maps.read_ibug_mapping(str(tmp_path / "map.txt"))
    assert mapping == {9: 33, 18: 225, 49: 398, 55: 812}
    contours = {"model_contour": {"right_contour": list(range(100, 117)), "left_contour": list(range(200, 217))}}
    full = {k: 1000 + k for k in range(1, 69)}
    for k in list(range(1, 9)) + list(range(10, 18)) + [61, 65]:
        del full[k]
    ids = landmark_maps.ibug68_vertices(full, contours)
    assert ids[0] == 100 and ids[7] == 114 and ids[16] == 200 and ids[9] == 214
    assert ids[60] == full[49] and ids[64] == full[55] and ids[8] == full[9]


def test_bundled_model_is_eos_sfm_and_loads_offline(monkeypatch):
    """No --model_path: the copy shipped in BFM/sfm, read without any network access."""
    pytest.importorskip("eos")
    import socket

    from core.resources import BUNDLED_SFM

    def no_network(*a, **k):
        raise AssertionError("the bundled model must load without the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert sorted(f for f in os.listdir(BUNDLED_SFM) if not f.endswith(".md")) == sorted(sfm.SFM_FILES)
    m = sfm.load_sfm(None)
    assert m.name == "sfm" and m.num_vertices == 3448 and m.tri.shape == (6736, 3)
    assert (m.layout.n_id, m.layout.n_exp, m.layout.n_tex) == (63, 6, 0)
    assert "non-commercial" in open(os.path.join(BUNDLED_SFM, "README.md"), encoding="utf-8").read()


def test_missing_files_name_them(tmp_path):
    (tmp_path / "ibug_to_sfm.txt").write_text("[landmark_mappings]\n")
    with pytest.raises(UserError, match="sfm_shape_3448.bin"):
        sfm.load_sfm(str(tmp_path))
    with pytest.raises(UserError, match="must be the folder"):
        sfm.load_sfm(str(tmp_path / "nope"))


def test_real_sfm_layout_units_and_contour():
    pytest.importorskip("eos")
    m = sfm.load_sfm(None)
    assert (m.layout.n_id, m.layout.n_exp, m.layout.n_tex) == (63, 6, 0) and m.layout.total == 102
    assert not m.has_albedo_basis and m.has_contour
    s = m.shape(torch.zeros(1, 63), torch.zeros(1, 6))[0]
    assert s.mean(0).abs().max() < 1e-5                  # centred
    width = s[:, 0].max() - s[:, 0].min()
    assert 1.2 < width < 1.8                             # decimetres: a face ~15 cm wide
    # Turning the head moves the chosen jaw vertices along the contour.
    cam = Camera()
    zero = m.layout.zeros(1)
    targets = cam.project_points(m.landmarks_3d(zero))
    kp0 = m.contour_keypoints(zero, cam.project_points, targets)
    turned = zero.replace(angles=torch.tensor([[0.0, 0.6, 0.0]]))
    kp1 = m.contour_keypoints(turned, cam.project_points, targets)
    assert torch.equal(kp0[0, 17:], m.keypoints[17:]) and torch.equal(kp1[0, 17:], m.keypoints[17:])
    assert not torch.equal(kp0[0, :17], kp1[0, :17])


def test_contour_selection_picks_nearest_candidate():
    # 4 vertices on the x axis; landmark 0 may be any of vertices 1, 2, 3.
    mean = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], float).reshape(-1) / 10
    m = FaceModel(mean, np.zeros((12, 1)), np.zeros((12, 1)), np.full(12, 100.0), np.zeros((12, 0)),
                  [[0, 1, 2], [1, 2, 3]], np.array([[0, 2], [0, 1], [0, 1], [1, 2]]), keypoints=[0, 1],
                  contour=([0], [[1, 2, 3]]))
    cam = Camera()
    c = m.layout.zeros(1)
    pts = cam.project_points(m.landmarks_3d(c, torch.tensor([[3, 1]])))
    kp = m.contour_keypoints(c, cam.project_points, pts)
    assert kp.tolist() == [[3, 1]]


def test_cli_sfm_on_real_photos(tmp_path):
    """--recon_model sfm (the bundled model): npz coefficients, landmarks from the saved
    mesh within 8% IOD."""
    pytest.importorskip("eos")
    photos = [str(REPO / "data" / f) for f in ("astronaut.jpg", "grace_hopper.jpg")]
    out = tmp_path / "res"
    rc = run_main(fit_single_img.main, ["--img_path", *photos, "--res_folder", str(out), "--recon_model", "sfm",
                                        "--lm_detector", "dlib", "--quiet"])
    assert rc == 0
    errs = []
    for p in photos:
        name = os.path.splitext(os.path.basename(p))[0]
        z = np.load(out / f"{name}_coeffs.npz")
        assert {k: z[k].shape for k in z.files} == {"id": (63,), "exp": (6,), "tex": (0,), "angles": (3,),
                                                      "gamma": (27,), "trans": (3,)}
        info = json.load(open(out / f"{name}_info.json"))
        verts = np.array([l.split()[1:4] for l in open(out / f"{name}_mesh.obj") if l.startswith("v ")], float)
        assert verts.shape == (3448, 3)
        kp = np.array(info["landmark_vertex_ids"])
        v = verts[kp]
        size, box = info["tar_size"], info["bbox"]
        zc = 10 - v[:, 2]
        u, row = 1015 * v[:, 0] / zc + size / 2, size - (1015 * v[:, 1] / zc + size / 2)
        s = (box[2] - box[0]) / size
        pred = np.stack([box[0] + u * s, box[1] + row * s], 1)
        errs.append(nme(pred, np.array(info["landmarks_detected"])))
    assert max(errs) < 0.08, errs  # astronaut 3.9%, grace_hopper 7.1% when written
