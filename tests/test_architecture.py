"""The shape of core/ (docs/architecture.md): wings, no import circle, small modules, the
loss weights applied in one module only."""
import os
import re

from bench.import_map import summary

CORE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "core")


def test_wings_no_circles_small_modules():
    s = summary(CORE)
    assert s["circles"] == [] and s["wing_circles"] == []
    assert {"models", "render", "fit", "landmarks", "io", "pipelines"} <= set(s["wings"])
    # The ground floor imports no wing; the lower wings import neither fit nor pipelines.
    assert s["wing_edges"]["ground"] == []
    assert all("pipelines" not in s["wing_edges"][w] for w in s["wing_edges"] if w != "pipelines")
    assert all("fit" not in s["wing_edges"][w] for w in ("models", "render", "landmarks", "io"))
    assert [(n, lines) for lines, n in s["largest"] if lines > 500] == []
    # The ground floor stays small: everything else lives in a wing.
    assert len(s["top_level"]) <= 8, s["top_level"]


def test_import_map_sees_circles_and_floors(tmp_path):
    """The figures above can fail: a made-up package with a circle and a chain."""
    pkg = tmp_path / "core"
    (pkg / "w").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "w" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from core.w import b\n")
    (pkg / "w" / "b.py").write_text("from . import c\n")
    (pkg / "w" / "c.py").write_text("def f():\n    from core import a\n")
    s = summary(str(pkg))
    assert s["circles"] == [["core.a", "core.w.b", "core.w.c"]]
    assert s["wing_circles"] == [["ground", "w"]]
    (pkg / "w" / "c.py").write_text("x = 1\n")
    s = summary(str(pkg))
    assert s["circles"] == [] and s["floors"] == 3 and s["wings"] == ["w"]
    assert s["wing_circles"] == [] and s["wing_edges"] == {"ground": ["w"], "w": []}


def test_loss_weights_are_applied_only_by_the_objective():
    """Every weight of SPEC §4 is read (``cfg.<weight>``) in fit/objective.py only (and
    defined in fit/config.py); no solver or pipeline writes its own weighted sum."""
    weight = re.compile(r"\.(lm_loss_w|rgb_loss_w|id_reg_w|exp_reg_w|tex_reg_w|tex_w|rot_reg_w|trans_reg_w)\b")
    offenders = []
    for folder, _, files in os.walk(CORE):
        for f in files:
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, CORE)
            if not f.endswith(".py") or rel in (os.path.join("fit", "objective.py"), os.path.join("fit", "config.py")):
                continue
            with open(path, encoding="utf-8") as fh:
                code = "\n".join(line.split("#")[0] for line in fh)
            offenders += [f"{rel}: {m.group(1)}" for m in weight.finditer(code)]
    assert offenders == []
