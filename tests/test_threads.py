"""core.threads: other programs' CPU load from /proc/stat, and the thread count that follows it."""
import os
import subprocess
import sys
import time

import pytest
import torch

from core import threads as T


def _stat(rows):
    """A /proc/stat text: rows of (user, nice, system, idle, iowait, irq, softirq, steal) per cpu."""
    total = [sum(c) for c in zip(*rows)]
    lines = ["cpu  " + " ".join(map(str, total))]
    lines += [f"cpu{i} " + " ".join(map(str, r)) + " 0 0" for i, r in enumerate(rows)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 5"]) + "\n"


class FakeLoad(T.CpuLoad):
    """CpuLoad over a stat file we write, with our own CPU time and the clock faked."""

    def __init__(self, path, cpus=None):
        self.clock, self.own = 0.0, 0.0
        super().__init__(str(path), cpus=cpus)
        self._hz = 100.0
        self._last = self._sample()

    def _sample(self):
        return self.clock, self._busy_seconds(), self.own


def test_others_subtracts_our_own_cpu_time_and_counts_only_our_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(_stat([(0,) * 8, (0,) * 8, (0,) * 8]))
    load = FakeLoad(stat, cpus=[0, 1])
    # 2 s later: cpu0 busy 150 ticks of user+system, cpu1 60 ticks of irq+steal, cpu2 (not ours) 200.
    stat.write_text(_stat([(100, 0, 50, 50, 0, 0, 0, 0), (0, 0, 0, 140, 0, 30, 0, 30), (200, 0, 0, 0, 0, 0, 0, 0)]))
    load.clock, load.own = 2.0, 0.5          # we used 0.5 s of CPU ourselves
    # busy 210 ticks = 2.1 s, minus our 0.5 s = 1.6 s over 2 s = 0.8 cores
    assert load.others() == pytest.approx(0.8)
    # idle and iowait are not busy; no time passed -> None
    assert load.others() is None
    stat.write_text(_stat([(100, 0, 50, 250, 90, 0, 0, 0), (0, 0, 0, 340, 0, 30, 0, 30), (200, 0, 0, 0, 0, 0, 0, 0)]))
    load.clock = 4.0
    assert load.others() == pytest.approx(0.0)


def test_others_is_none_without_proc_stat(tmp_path):
    assert T.CpuLoad(str(tmp_path / "missing")).others() is None


@pytest.mark.parametrize("free,max_threads,want", [(2.0, 2, 2), (1.85, 2, 2), (1.7, 2, 1), (1.0, 2, 1),
                                                   (0.1, 2, 1), (15.9, 16, 16), (12.6, 16, 12), (3.0, 2, 2)])
def test_threads_for_free_cores(free, max_threads, want):
    assert T.threads_for(free, max_threads) == want


@pytest.fixture
def idle_stat(tmp_path):
    """A faked /proc/stat of 2 idle cores and its FakeLoad; torch's thread count is restored
    afterwards."""
    stat = tmp_path / "stat"
    stat.write_text(_stat([(0,) * 8, (0,) * 8]))
    before = torch.get_num_threads()
    try:
        yield stat, FakeLoad(stat, cpus=[0, 1])
    finally:
        torch.set_num_threads(before)


def test_governor_follows_the_load_and_tick_is_rate_limited(idle_stat):
    stat, load = idle_stat
    gov = T.ThreadGovernor(max_threads=2, cores=2, interval_s=3600, load=load)
    assert gov.threads == 2 and torch.get_num_threads() == 2
    # another program kept one core busy for 1 s
    stat.write_text(_stat([(100, 0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 100, 0, 0, 0, 0)]))
    load.clock = 1.0
    assert gov.update() == 2                     # not due yet (interval 1 h)
    assert gov.update(force=True) == 1 and torch.get_num_threads() == 1 and gov.changes == 1
    # the program ended: both cores idle for 1 s
    stat.write_text(_stat([(100, 0, 0, 100, 0, 0, 0, 0), (0, 0, 0, 200, 0, 0, 0, 0)]))
    load.clock = 2.0
    assert gov.update(force=True) == 2 and torch.get_num_threads() == 2 and gov.changes == 2


def test_governor_undoes_a_count_other_code_set(idle_stat):
    """Code that sets torch's thread count behind the governor's back (as a finished video
    run restoring its start count did: two ranks then ran 2 threads each on 2 cores, the
    second video's identity fit 9x slower) is corrected at the next sample."""
    stat, load = idle_stat
    gov = T.ThreadGovernor(max_threads=2, cores=2, interval_s=3600, load=load)
    stat.write_text(_stat([(100, 0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 100, 0, 0, 0, 0)]))  # one core busy
    load.clock = 1.0
    assert gov.update(force=True) == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    stat.write_text(_stat([(200, 0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 200, 0, 0, 0, 0)]))  # still busy
    load.clock = 2.0
    assert gov.update(force=True) == 1 and torch.get_num_threads() == 1 and gov.changes == 1


def test_install_fixed_count_has_no_governor_and_tick_is_a_no_op():
    before = torch.get_num_threads()
    try:
        assert T.install(threads=1) is None and T.current() is None and torch.get_num_threads() == 1
        T.tick()
        assert torch.get_num_threads() == 1
        gov = T.install()
        assert T.current() is gov and gov.max_threads == T.cpu_cores()
        T.uninstall()
        assert T.current() is None
    finally:
        T.uninstall()
        torch.set_num_threads(before)


@pytest.mark.skipif(not os.path.exists("/proc/stat") or T.cpu_cores() < 2, reason="needs Linux /proc/stat and 2+ cores")
def test_a_real_busy_process_is_measured():
    load = T.CpuLoad()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        load.others()
        time.sleep(1.0)
        others = load.others()
    finally:
        busy.kill()
        busy.wait()
    # At least the busy core's worth; at most every core (other programs on this shared
    # machine may hold the rest), give or take the sampling of /proc/stat.
    assert 0.7 < others < T.cpu_cores() + 0.1, others
