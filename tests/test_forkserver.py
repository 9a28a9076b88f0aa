"""core/pipelines/forkserver.py: when the video scripts start the workers' server early,
and that the pool then forks its workers from that server."""
import os
import subprocess
import sys

import pytest

from core.pipelines import forkserver


@pytest.fixture
def started(monkeypatch):
    calls = []
    monkeypatch.setattr(forkserver, "start_early", lambda: calls.append(1) or True)
    monkeypatch.setattr(forkserver, "gpu_likely", lambda: False)
    return calls


@pytest.mark.parametrize("argv, expected", [
    (["--v_path", "V", "--res_folder", "r", "--nworkers", "2"], True),
    (["--nworkers=3", "--device", "cpu", "--v_path", "V"], True),
    (["--nworkers", "2", "--device", "CPU", "--v_path=V"], True),
    (["--v_path", "V", "--res_folder", "r"], False),               # one worker: no pool
    (["--nworkers", "1", "--v_path", "V"], False),
    (["--nworkers", "2", "--device", "cuda", "--v_path", "V"], False),   # GPU workers are spawned
    (["--nworkers", "2", "--device", "cuda:1", "--v_path", "V"], False),
    (["--nworkers", "two", "--v_path", "V"], False),               # the script's parser says so
    (["--nworkers", "--v_path", "V"], False),
    (["--help", "--nworkers", "2", "--v_path", "V"], False),
    (["--nwork", "2", "--v_path", "V"], False),                    # abbreviations: not guessed
    (["--nworkers", "2", "--v_path", "missing.mp4"], False),       # the script fails at once
    (["--nworkers", "2"], False),
])
def test_the_server_starts_only_for_cpu_workers(started, capsys, tmp_path, argv, expected):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    argv = [str(video) if a == "V" else a.replace("=V", f"={video}") for a in argv]
    assert forkserver.start_for_argv(argv) is expected
    assert len(started) == int(expected)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # nothing printed: a bad line is the script parser's to report


def test_auto_device_with_a_gpu_in_sight_does_not_start_it(started, monkeypatch, tmp_path):
    monkeypatch.setattr(forkserver, "gpu_likely", lambda: True)
    assert not forkserver.start_for_argv(["--nworkers", "2", "--v_path", str(tmp_path)])
    assert forkserver.start_for_argv(["--nworkers", "2", "--device", "cpu", "--v_path", str(tmp_path)])
    assert len(started) == 1


def test_gpu_likely_respects_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not forkserver.gpu_likely()


def test_started_early_the_pool_forks_from_it_and_this_process_has_not_imported_torch():
    """In a fresh interpreter: start_for_argv starts the server without importing torch
    here; a WorkerPool started later forks its worker from that same server."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"""
import sys
sys.path.insert(0, {root!r})
from multiprocessing import forkserver as mp_forkserver
from core.pipelines import forkserver
assert forkserver.start_for_argv(["--nworkers", "2", "--device", "cpu", "--v_path", {root!r}])
server = mp_forkserver._forkserver._forkserver_pid
print("torch imported", "torch" in sys.modules)
from core.pipelines.video.workers import WorkerPool
pool = WorkerPool(1)
pool.wait_started()
pid = pool._procs[0].pid
with open(f"/proc/{{pid}}/stat") as f:
    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
print("same server", server is not None and ppid == server == mp_forkserver._forkserver._forkserver_pid)
pool.close()
print("worker", pool._procs[0].exitcode)
"""
    if not forkserver.available() or not os.path.isdir("/proc/self"):
        pytest.skip("no forkserver or no /proc here")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["torch imported False", "same server True", "worker 0"], proc.stdout
