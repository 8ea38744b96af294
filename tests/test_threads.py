"""rlvr/threads.py: the thread count a run chooses at start-up, and what wins over it."""
import pytest

from rlvr import threads


@pytest.fixture
def machine(monkeypatch):
    """A machine of `n` cores with `busy` of them kept busy by other processes."""
    def make(n, busy):
        monkeypatch.setattr(threads, "cores", lambda: n)
        monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return make


def test_the_free_cores_are_chosen_and_a_flag_or_omp_num_threads_wins(machine, monkeypatch):
    machine(2, 0.1)
    assert threads.choose() == (2, "2 cores, 0.1 busy")
    machine(2, 0.9)  # one other busy process on 2 cores: one thread, not two waiting on each other
    assert threads.choose()[0] == 1
    machine(2, 3.0)  # more busy than cores: still one thread
    assert threads.choose()[0] == 1
    machine(16, 3.4)  # 3 busy (rounded), 13 free, shared by 4 ranks of this machine
    assert threads.choose(0, ranks_here=4) == (3, "16 cores, 3.4 busy, 4 ranks here")
    assert threads.choose(5) == (5, "--threads 5")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose() == (3, "OMP_NUM_THREADS=3") and threads.choose(2)[0] == 2


def test_busy_cores_reads_the_machine_while_this_process_sleeps():
    import os

    busy = threads.busy_cores(0.05)  # the machine's busy share times its cores: between 0 and every core
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
    line = threads.start_up_line(1, "2 cores, 0.9 busy")
    assert line.startswith("threads: 1 torch thread (2 cores, 0.9 busy") and "--threads N" in line


def test_a_blip_in_one_window_is_not_a_busy_core(monkeypatch):
    """A competitor is busy in every window, a process that is just ending in one: the least share counts."""
    import os

    def readings(per_window):  # cumulative (busy, total) jiffies: each window 100 jiffies long
        out, busy, total = [], 0.0, 0.0
        for share in per_window:
            out.append((busy, total))
            busy, total = busy + 100 * share, total + 100
            out.append((busy, total))
        return iter(out)

    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    it = readings([0.5, 0.0, 0.0])  # one core busy in the first window only
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(it))
    assert threads.busy_cores() == 0.0
    it = readings([0.5, 0.5, 0.55])  # one core busy throughout
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(it))
    assert threads.busy_cores() == 1.0
