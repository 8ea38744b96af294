"""One run, one directory. train_rl.py and train_verifier.py (sft, eval) claim their --out_dir for the
run's whole life: an exclusive lock (flock) on out_dir/.lock, which the kernel drops when the process
ends, however it ends, so a crashed run never leaves a stale lock. A second run into a claimed
directory is refused naming the holder's pid. A directory that already holds files (another run's) is
refused too, unless the run continues it (--resume, with a checkpoint there) or starts over
(--overwrite, which says what it removes). Imports config only.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

from rlvr import config

LOCK_FILE = ".lock"
# what a run writes into its out_dir: --overwrite removes these and refuses to touch anything else, so
# a mistyped --out_dir (the home directory, the repository) is never emptied
_RUN_ENTRY = re.compile(r"[\w.-]+\.(jsonl|json|txt|png|tmp|part)|checkpoints|final|final\.(tmp|old)|wandb|eval_only|"
                        + re.escape(LOCK_FILE))


def entries(out_dir: str | os.PathLike) -> list[str]:
    """What out_dir holds besides the lock file, sorted ([] for a missing or empty directory)."""
    d = Path(out_dir)
    return sorted(p.name for p in d.iterdir() if p.name != LOCK_FILE) if d.is_dir() else []


def _listing(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def check(out_dir: str, resume: str, overwrite: bool, has_checkpoint) -> None:
    """ConfigError unless out_dir is empty, or continued (--resume yes/auto with a checkpoint there:
    `has_checkpoint()` says), or started over (--overwrite)."""
    found = entries(out_dir)
    if not found or overwrite or resume == "auto" or (resume != "no" and has_checkpoint()):
        return  # --resume auto without a checkpoint starts fresh: _check_and_clear removes the run's files
    why = "holds an earlier run's files" if resume == "no" else "holds files but no checkpoint to resume from"
    raise config.ConfigError(f"--out_dir {out_dir}: {why} ({_listing(found)}); continue it with --resume, start over "
                             "with --overwrite (removes them), or choose another --out_dir")


def lock(out_dir: str | os.PathLike) -> int:
    """Take out_dir's lock (the directory is created if missing) and return its file descriptor: the
    lock is held until `release` or the end of the process. ConfigError naming the pid of the run that
    holds it (another process, or another claim in this one)."""
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a file in the way, no permission, a read-only filesystem
        raise config.ConfigError(f"--out_dir {out_dir}: cannot create {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise config.ConfigError(f"--out_dir {out_dir}: in use by another run (pid {holder}); wait for it to end "
                                 "or choose another --out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    os.close(fd)  # closing the last descriptor of the open file drops the lock


def claim(out_dir: str, resume: str = "no", overwrite: bool = False, has_checkpoint=lambda: False) -> int:
    """Lock out_dir for this run (returns the lock's descriptor), then check it (under the lock: no
    other run can write meanwhile) and, with --overwrite, empty it, saying what goes."""
    fd = lock(out_dir)
    try:
        _check_and_clear(out_dir, resume, overwrite, has_checkpoint)
    except BaseException:
        release(fd)
        raise
    return fd


def _check_and_clear(out_dir: str, resume: str, overwrite: bool, has_checkpoint) -> None:
    check(out_dir, resume, overwrite, has_checkpoint)
    found = entries(out_dir)
    # a run killed before its first checkpoint, restarted by a job script: --resume auto starts it fresh
    fresh = resume == "auto" and not overwrite and bool(found) and not has_checkpoint()
    if not ((overwrite or fresh) and found):
        return
    flag = "--resume auto" if fresh else "--overwrite"
    foreign = [name for name in found if not _RUN_ENTRY.fullmatch(name)]
    if foreign:
        raise config.ConfigError(f"{flag}: {out_dir} holds {_listing(foreign)}, which no run writes; "
                                 "not removing anything (is --out_dir right?)")
    print(f"--resume auto: no checkpoint in {out_dir} (a run stopped before its first), starting fresh; "
          if fresh else "--overwrite: ", end="")
    print(f"removing {len(found)} entries of {out_dir}: {', '.join(found)}", flush=True)
    for name in found:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
