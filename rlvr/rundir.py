"""One run, one directory. train_rl.py and train_verifier.py (sft, eval) claim their --out_dir for the
run's whole life: an exclusive lock (flock) on out_dir/.lock, which the kernel drops when the process
ends, however it ends, so a crashed run never leaves a stale lock. A second run into a claimed
directory is refused naming the holder's pid. A directory that already holds files (another run's) is
refused too, unless the run continues it (--resume, with a checkpoint there) or starts over
(--overwrite, which says what it removes).

A run lists what it writes: before it creates an entry of out_dir (a file, or a folder such as
checkpoints/), `note` appends the entry's name to out_dir/.run_files. --overwrite removes exactly the
entries listed there and keeps everything else (the user's NOTES.txt, the data file the run reads); a
directory with files but no such list (no run of this code wrote it) is refused, never emptied.
Imports config only.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from rlvr import config

LOCK_FILE = ".lock"
RUN_FILES = ".run_files"  # the names of the entries the runs in this directory wrote, one a line
_claimed: dict[str, set[str]] = {}  # out_dir (real path) claimed by this process -> the names listed


def entries(out_dir: str | os.PathLike, inputs=()) -> list[str]:
    """What out_dir holds besides the lock file, its list and the files the run reads (`inputs`: its --data,
    never an earlier run's output, never removed), sorted ([] for a missing or empty directory)."""
    d, read = Path(out_dir), {os.path.realpath(i) for i in inputs if i}
    return sorted(p.name for p in d.iterdir() if p.name not in (LOCK_FILE, RUN_FILES)
                  and os.path.realpath(p) not in read) if d.is_dir() else []


def listed(out_dir: str | os.PathLike) -> set[str] | None:
    """The names out_dir/.run_files lists (what runs wrote there), or None when there is no such list."""
    try:
        with open(os.path.join(out_dir, RUN_FILES)) as f:
            return {line.strip() for line in f if line.strip()}
    except FileNotFoundError:
        return None


def _append_listed(out_dir: str, names: list[str]) -> None:
    with open(os.path.join(out_dir, RUN_FILES), "a") as f:
        f.write("".join(name + "\n" for name in names))
        f.flush()
        os.fsync(f.fileno())


def add_listed(out_dir: str | os.PathLike, name: str) -> None:
    """List entry `name` of out_dir, a directory this process did not claim (--eval_only's out_dir/eval_only,
    which a later --overwrite of the run removes too). Nothing where out_dir has no list."""
    names = listed(out_dir)
    if names is not None and name not in names:
        _append_listed(os.fspath(out_dir), [name])


def note(path: str | os.PathLike) -> None:
    """Before creating `path`: if it lies in an out_dir this process claimed, list the entry of out_dir
    it belongs to (out_dir/checkpoints for out_dir/checkpoints/step_1/...) in out_dir/.run_files, once.
    Anywhere else (rank > 0, a library call without a claim) it does nothing."""
    path = os.path.abspath(path)  # the entry itself may be a link out of out_dir (tests: to /dev/full)
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    for out_dir, names in _claimed.items():
        rel = os.path.relpath(real, out_dir)
        name = rel.split(os.sep)[0]
        if rel != "." and name != ".." and name not in names:
            _append_listed(out_dir, [name])
            names.add(name)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def run_entries(out_dir: str | os.PathLike, inputs=()) -> list[str]:
    """What out_dir holds of earlier runs: the entries .run_files lists; every entry if there is no list."""
    found, names = entries(out_dir, inputs), listed(out_dir)
    return found if names is None else [name for name in found if name in names]


def _checkpoint_dirs(out_dir: str | os.PathLike) -> list[str]:
    """The step directories of out_dir/checkpoints, complete or damaged (not a save's .tmp)."""
    d = Path(out_dir) / "checkpoints"
    return [p.name for p in d.iterdir() if p.name.startswith("step_") and not p.name.endswith(".tmp")] \
        if d.is_dir() else []


def check(out_dir: str, resume: str, overwrite: bool, has_checkpoint, inputs=()) -> None:
    """ConfigError unless out_dir holds nothing of an earlier run (files .run_files does not list are the
    user's), or is continued (--resume yes/auto with a checkpoint there: `has_checkpoint()` says), or
    started over (--overwrite), or is a run killed before its first checkpoint restarted with --resume
    auto (it starts fresh: _check_and_clear removes the run's files)."""
    found = run_entries(out_dir, inputs)
    if not found or overwrite or (resume != "no" and has_checkpoint()):
        return
    if resume == "auto" and not _checkpoint_dirs(out_dir):
        return
    if resume != "no":  # --resume again would not help: the damaged checkpoints were named above
        raise config.ConfigError(f"--out_dir {out_dir}: holds files but no complete checkpoint to resume from "
                                 f"({_listing(found)}); start over with --overwrite (removes them), or choose another "
                                 "--out_dir")
    raise config.ConfigError(f"--out_dir {out_dir}: holds an earlier run's files ({_listing(found)}); continue it "
                             "with --resume, start over with --overwrite (removes them), or choose another --out_dir")


def lock(out_dir: str | os.PathLike) -> int:
    """Take out_dir's lock (the directory is created if missing) and return its file descriptor: the
    lock is held until `release` or the end of the process. ConfigError naming the pid of the run that
    holds it (another process, or another claim in this one)."""
    path = os.path.join(out_dir, LOCK_FILE)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # not a lock problem: say what it is
        raise config.ConfigError(f"--out_dir {out_dir}: is a file, not a directory; choose another --out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only filesystem
        raise config.ConfigError(f"--out_dir {out_dir}: cannot create {path} ({e.strerror})") from None
    return _flock(path, f"--out_dir {out_dir}")


def lock_output(path: str | os.PathLike, flag: str) -> int:
    """Take the lock of an output file that runs append to (train_verifier.py label --out): PATH.lock, held
    until `release` or the end of the process. ConfigError naming the pid of the run that holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _flock(os.fspath(path) + ".lock", f"--{flag} {path}")


def _flock(path: str, what: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise config.ConfigError(f"{what}: cannot create {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise config.ConfigError(f"{what}: in use by another run (pid {holder}); wait for it to end "
                                 f"or choose another {what.split()[0]}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    os.close(fd)  # closing the last descriptor of the open file drops the lock


def claim(out_dir: str, resume: str = "no", overwrite: bool = False, has_checkpoint=lambda: False, inputs=()) -> int:
    """Lock out_dir for this run (returns the lock's descriptor), then check it (under the lock: no
    other run can write meanwhile) and, with --overwrite, empty it, saying what goes."""
    fd = lock(out_dir)
    try:
        _check_and_clear(out_dir, resume, overwrite, has_checkpoint, inputs)
        names = listed(out_dir)
        if names is None:  # a new directory (or one of a run that listed nothing): the list starts here
            _append_listed(out_dir, [])
        _claimed[os.path.realpath(out_dir)] = names or set()
    except BaseException:
        release(fd)
        raise
    return fd


def _check_and_clear(out_dir: str, resume: str, overwrite: bool, has_checkpoint, inputs) -> None:
    check(out_dir, resume, overwrite, has_checkpoint, inputs)
    found, names = entries(out_dir, inputs), listed(out_dir)
    # a run killed before its first checkpoint, restarted by a job script: --resume auto starts it fresh
    fresh = resume == "auto" and not overwrite and bool(run_entries(out_dir, inputs)) and not has_checkpoint()
    if not ((overwrite or fresh) and found):
        return
    flag = "--resume auto" if fresh else "--overwrite"
    if names is None:
        raise config.ConfigError(f"{flag}: {out_dir} holds {_listing(found)}, which no run writes (there is no "
                                 f"{RUN_FILES}, the list of what runs wrote); not removing anything (is --out_dir "
                                 "right? if it holds an older run, remove its files yourself)")
    ours, kept = [n for n in found if n in names], [n for n in found if n not in names]
    print((f"--resume auto: no checkpoint in {out_dir} (a run stopped before its first), starting fresh; "
           if fresh else "--overwrite: ")
          + f"removing {len(ours)} entries of {out_dir} that runs wrote: {', '.join(ours) or 'none'}"
          + (f"; keeping {', '.join(kept)} (no run wrote them)" if kept else ""), flush=True)
    for name in ours:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.remove(os.path.join(out_dir, RUN_FILES))  # what it listed is gone; claim starts a new list
