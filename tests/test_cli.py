"""core.pipelines.cli: one-line errors for every bad flag, the streams (progress on stdout, errors
on stderr), and every other failure turned into one line."""
import logging

import pytest

import fit_single_img
from core.pipelines import cli
from core.errors import UserError


def _run(main, args, capsys):
    rc = cli.run_main(main, args)
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


@pytest.mark.parametrize("args,words", [
    ([], "required"),
    (["--img_path", "x.jpg"], "--res_folder"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--padding_ratio", "-1"], "--padding_ratio"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--padding_ratio", "nan"], "finite"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--padding_ratio", "inf"], "finite"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--lm_loss_w", "inf"], "finite"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--rgb_loss_w", "-2"], ">= 0"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--nrf_lr", "0"], "> 0"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--batch_size", "0"], "--batch_size"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--tar_size", "16"], "between 32 and 4096"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--threads", "two"], "integer"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--recon_model", "bfm"], "invalid choice"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--bogus"], "unrecognized"),
    (["--img_path", "x.jpg", "--res_folder", "o", "--lm_robust_px", "-1"], ">= 0"),
])
def test_bad_flags_give_one_line_and_exit_2(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        fit_single_img.build_parser().parse_args(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0] and "--help" in err[0], err


def test_all_zero_landmark_weights_are_a_user_error():
    args = fit_single_img.build_parser().parse_args(["--img_path", "x.jpg", "--res_folder", "o", "--lm_jaw_w", "0",
                                                     "--lm_heavy_w", "0", "--lm_inner_w", "0"])
    with pytest.raises(UserError, match="cannot all be 0"):
        cli.fit_config_from_args(args)
    args.lm_inner_w = 1.0
    assert cli.fit_config_from_args(args).lm_inner_w == 1.0


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_streams_info_on_stdout_warnings_on_stderr(capsys, restore_logging):
    args = fit_single_img.build_parser().parse_args(["--img_path", "x", "--res_folder", "o"])
    cli.setup_logging(args)
    log = logging.getLogger("core.test")
    log.info("progress message")
    log.warning("a warning")
    out, err = capsys.readouterr()
    assert out == "progress message\n" and err == "a warning\n"
    args.quiet = True
    cli.setup_logging(args)
    log.info("hidden")
    log.warning("shown")
    out, err = capsys.readouterr()
    assert out == "" and err == "shown\n"


def test_failures_become_one_line(capsys):
    def user(argv):
        raise UserError("bad thing")

    def full_disk(argv):
        raise OSError(28, "No space left on device", "/out/x.obj")

    def bug(argv):
        raise RuntimeError("boom\nsecond line")

    def oom(argv):
        raise MemoryError()

    assert _run(user, [], capsys)[0::2] == (2, ["error: bad thing"])
    rc, _, err = _run(full_disk, [], capsys)
    assert rc == 2 and err == ["error: cannot write or read '/out/x.obj': No space left on device"]
    rc, _, err = _run(bug, [], capsys)
    assert rc == 1 and len(err) == 1 and "RuntimeError: boom" in err[0] and "--verbose" in err[0]
    rc, _, err = _run(oom, [], capsys)
    assert rc == 2 and len(err) == 1 and "out of memory" in err[0]

    def cpu_allocator(argv):  # what torch raises on a CPU (ulimit -v, a cgroup's memory limit)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 15034824 bytes. Error code 12 (Cannot allocate memory)")

    def gpu(argv):
        import torch
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def opencv(argv):  # what OpenCV raises (a frame decoded under ulimit -v)
        import cv2
        import numpy as np
        cv2.resize(np.zeros((4, 4), np.uint8), (1 << 20, 1 << 20))

    for fails in (cpu_allocator, gpu, opencv):
        rc, _, err = _run(fails, [], capsys)
        assert rc == 2 and err == [cli.OUT_OF_MEMORY], fails.__name__
    with pytest.raises(RuntimeError):
        cli.run_main(bug, ["--verbose"])


def test_exit_process_ends_as_the_interpreter_would(tmp_path):
    """The scripts' last call: the exit status given, after the non-daemon threads and the
    atexit handlers (logging's among them) have run, with buffered output written."""
    import os
    import subprocess
    import sys
    import textwrap
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(f"""
        import atexit, logging, sys, threading, time
        sys.path.insert(0, {root!r})
        from core.pipelines import cli
        logging.basicConfig(filename={str(tmp_path / 'log.txt')!r})
        logging.getLogger().warning("logged")
        atexit.register(lambda: open({str(tmp_path / 'atexit.txt')!r}, "w").write("ran"))
        def late():
            time.sleep(0.5)
            open({str(tmp_path / 'thread.txt')!r}, "w").write("done")
        threading.Thread(target=late).start()
        sys.stdout.write("buffered, no newline")
        cli.exit_process(3)
        print("never")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "done"
    assert "logged" in (tmp_path / "log.txt").read_text()
    # a status of None is 0, as sys.exit(None)
    none = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); "
                           "from core.pipelines import cli; cli.exit_process(None)"], timeout=120)
    assert none.returncode == 0


def test_a_closed_stdout_does_not_stop_or_clutter_the_run(tmp_path):
    """``fit_single_img.py ... | head -1``: once the reader has gone, the info lines stop
    (no logging traceback on stderr for each) and the run still writes its files, exit 0."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(root, "fit_single_img.py"), "--img_path",
                             os.path.join(root, "data", "astronaut.jpg"), "--res_folder", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path))
    proc.stdout.close()  # the reader goes before the first line (the imports take a second)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Logging error" not in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path / "out")) == ["astronaut_coeffs.npz", "astronaut_composed_img.jpg",
                                                    "astronaut_info.json", "astronaut_mesh.obj"]


def test_a_second_interrupt_while_ending_prints_no_traceback(tmp_path):
    """Ctrl-C twice (or ``timeout -s INT``, which signals the command and then its process
    group): once the run is ending with "error: interrupted", a second SIGINT no longer
    breaks into the atexit handlers with a traceback; the exit status stays 130 and the
    handlers run to the end."""
    import os
    import subprocess
    import sys
    import textwrap
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(f"""
        import atexit, os, signal, sys, time
        sys.path.insert(0, {root!r})
        from core.pipelines import cli
        def handler():  # a second Ctrl-C arrives while the atexit handlers run
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            open({str(tmp_path / 'atexit.txt')!r}, "w").write("ran")
        atexit.register(handler)
        def main(argv):
            raise KeyboardInterrupt
        cli.exit_process(cli.run_main(main, []))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: interrupted"]
    assert (tmp_path / "atexit.txt").read_text() == "ran"
