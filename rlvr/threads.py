"""The CPU thread budget of a run: how many torch threads, chosen at start-up from the cores that are free
and said on one line. torch's default (one thread per core, OpenMP threads that spin while they wait)
is fastest on an idle machine and slows down beside other busy processes: each op's threads wait at a
barrier for a thread that has no core. Measured with `bench.py --sections threads` (the README's table,
2 cores): the cores free at start-up, with OpenMP's own (spinning) wait, stayed within 1% of the best
idle and 1.5x of it beside one busy process; every core was 2.8x there, one thread was 1.4x slower idle,
and OpenMP's passive wait cost 1.7x idle. Imports nothing of the project.
"""
from __future__ import annotations

import os
import time


def cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, *rest = (float(x) for x in f.readline().split()[1:])
    return user + nice + system + sum(rest[:3]), user + nice + system + idle + iowait + sum(rest[:3])


def busy_cores(window: float = 0.1, samples: int = 3) -> float:
    """Cores other processes keep busy now: the machine's busy share while this process sleeps, the least
    of `samples` windows of `window` seconds (a competitor is busy in every window; a blip, such as a
    process that is just ending, in one: a single 0.3 s window once read an idle machine as a core busy),
    times the cores (/proc/stat; where there is none, the 1-minute load average, which lags a new
    competitor by a minute)."""
    try:
        shares = []
        for _ in range(samples):
            b0, t0 = _cpu_times()
            time.sleep(window)
            b1, t1 = _cpu_times()
            shares.append((b1 - b0) / (t1 - t0) if t1 > t0 else 0.0)
        return min(shares) * (os.cpu_count() or 1)
    except (OSError, ValueError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


def choose(requested: int = 0, ranks_here: int = 1) -> tuple[int, str]:
    """(torch threads, why). `requested` > 0 (--threads) wins, then OMP_NUM_THREADS; else the cores free
    at start-up, shared by the `ranks_here` processes of this machine (torchrun's LOCAL_WORLD_SIZE), at
    least 1."""
    if requested > 0:
        return requested, f"--threads {requested}"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    n, busy = cores(), busy_cores()
    free = max(1, (n - int(busy + 0.5)) // max(1, ranks_here))
    return free, f"{n} cores, {busy:.1f} busy" + (f", {ranks_here} ranks here" if ranks_here > 1 else "")


def apply(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def start_up_line(n: int, why: str) -> str:
    wait = os.environ.get("OMP_WAIT_POLICY")
    return (f"threads: {n} torch thread{'s' if n != 1 else ''} ({why}{f'; OMP_WAIT_POLICY={wait}' if wait else ''}); "
            "--threads N or OMP_NUM_THREADS=N sets it")
