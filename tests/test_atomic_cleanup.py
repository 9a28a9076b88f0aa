"""core.io.atomic.atomic_path leaves no temporary file behind, whatever fails."""
import os

import pytest

from core.io import atomic
from core.io.atomic import atomic_path, write_text_atomic


def test_success_renames_and_keeps_usual_permissions(tmp_path):
    write_text_atomic(str(tmp_path / "a.txt"), "new")
    assert (tmp_path / "a.txt").read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(str(tmp_path / "a.txt")) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise OSError(28, "disk full")
    assert (tmp_path / "a.txt").read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_failing_rename_leaves_no_temporary(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")  # a non-empty folder cannot be replaced
    with pytest.raises(OSError):
        with atomic_path(str(tmp_path / "out")) as tmp:
            with open(tmp, "w") as f:
                f.write("data")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["keep"]


def test_failing_chmod_leaves_no_temporary(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "chmod", refuse)
    with pytest.raises(PermissionError):
        with atomic_path(str(tmp_path / "a.txt")):
            pass
    assert os.listdir(tmp_path) == []


def test_group_renames_all_or_none(tmp_path):
    """atomic_group: every file of the group appears, or (one writer failed) none does and
    no temporary file is left; old files under the final names stay as they were."""
    names = [str(tmp_path / n) for n in ("a.txt", "b.json", "c.jpg")]
    (tmp_path / "b.json").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic.atomic_group(names) as tmps:
            assert sorted(tmps) == sorted(names) and all(os.path.exists(t) for t in tmps.values())
            assert [os.path.splitext(t)[1] for t in tmps.values()] == [".txt", ".json", ".jpg"]
            for i, t in enumerate(tmps.values()):
                if i == 2:
                    raise OSError(28, "disk full")
                with open(t, "w") as f:
                    f.write("new")
    assert sorted(os.listdir(tmp_path)) == ["b.json"] and (tmp_path / "b.json").read_text() == "old"
    with atomic.atomic_group(names) as tmps:
        for t in tmps.values():
            with open(t, "w") as f:
                f.write("new")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.json", "c.jpg"]
    assert all(open(n).read() == "new" for n in names)
