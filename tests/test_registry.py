"""Tests of core/models/registry.py: the model names, the choice of a default model and
where each model is looked for when no --model_path is given."""
import logging
import re

import pytest

from core import resources
from core.errors import UserError
from core.models import registry


def test_names_are_the_scripts_choices():
    from core.pipelines import cli
    assert registry.MODEL_NAMES == ("bfm09", "sfm", "bfm2017", "bfm2019")
    assert cli.MODEL_NAMES is registry.MODEL_NAMES


def test_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown --recon_model 'bfm'; choose from bfm09, sfm, bfm2017, bfm2019"):
        registry.load_model("bfm", "x.mat")


def test_choose_model(tmp_path, monkeypatch, caplog):
    missing = str(tmp_path / "BFM" / resources.BFM09_FILE)
    monkeypatch.setattr(resources, "bfm09_candidates", lambda: [missing])
    assert registry.choose_model("bfm2017", None) == "bfm2017"  # an explicit name as it is
    assert registry.choose_model(None, "any.mat") == "bfm09"
    with caplog.at_level(logging.INFO, logger="core"):
        assert registry.choose_model(None, None) == "sfm"
    assert f"no converted Basel Face Model ({missing})" in caplog.text
    (tmp_path / "BFM").mkdir()
    (tmp_path / "BFM" / resources.BFM09_FILE).write_bytes(b"")
    assert registry.choose_model(None, None) == "bfm09"


def test_bfm09_default_place_is_the_lookup_of_resources(tmp_path, monkeypatch):
    first, second = tmp_path / "a" / resources.BFM09_FILE, tmp_path / "b" / resources.BFM09_FILE
    monkeypatch.setattr(resources, "bfm09_candidates", lambda: [str(first), str(second)])
    with pytest.raises(UserError, match=re.escape(f"face model not found at '{first}'") + ".*convert_bfm09_data.py"):
        registry.load_model("bfm09", None)  # none exists: the error names the first place
    second.parent.mkdir()
    second.write_text("not a mat file")
    with pytest.raises(UserError, match=re.escape(f"cannot read face model '{second}'")):
        registry.load_model("bfm09", None)  # the first that exists is loaded


def test_bfm2017_default_place(tmp_path, monkeypatch):
    path = str(tmp_path / "model2017-1_bfm_nomouth.h5")
    monkeypatch.setattr(resources, "DEFAULT_BFM2017", path)
    for name in ("bfm2017", "bfm2019"):
        with pytest.raises(UserError, match=re.escape(f"BFM 2017/2019 model not found at '{path}'")):
            registry.load_model(name, None)
