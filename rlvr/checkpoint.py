"""Sharded, atomic, exactly resumable checkpoints that fail loudly and fall back; export to Hugging
Face format.

Layout of a checkpoint root:

    root/step_00000040/          a complete checkpoint (the directory rename is the commit)
        .metadata, __R_0.distcp  model + optimizer, sharded by torch.distributed.checkpoint (DCP)
        trainer.pt               step, world size, scheduler state, `extra` (rank 0)
        rank0.pt, rank1.pt, ...  each rank's RNG states (torch CPU, CUDA, python `random`)
        sha256.json              the sha256 of every file above (each rank hashes what it wrote)
    root/step_00000050.tmp/      being written, or left by a crash: ignored, removed by the next save
    root/latest                  the name of the newest complete checkpoint, for people and tools

Every rank writes its own shard into `step_N.tmp`; once every rank has written, rank 0 renames the
directory to `step_N` (atomic on one filesystem) and only then updates `latest` and deletes old
checkpoints, so a crash at any point leaves the previous checkpoint complete and the new one
invisible. A save that fails (a full disk) removes its `.tmp` on every rank's behalf and raises
CheckpointError naming the cause. The root must be on a filesystem all ranks share. DCP reshards on
load: a checkpoint written by 8 ranks loads on 2, or in one process without a process group (RNG
states are then restored where a rank file exists).

Loading checks the newest checkpoint first (every file present, shards as long as .metadata says,
trainer and RNG files readable, every file's sha256 as sha256.json says, every loaded tensor finite)
and falls back, with a warning naming the damaged file, to the previous one. Rank 0 makes those
checks and every rank follows it; an error while any rank reads the files is shared by all of them (one collective), so every rank loads the same checkpoint.

Everything saved is loaded with `torch.load(weights_only=True)`, the DCP shards' non-tensor items (the
optimizer's param_groups) included: `extra` may hold only plain Python values (dict, list, tuple, str,
int, float, bool, None) and tensors; `save_checkpoint` checks this before writing. DCP's own index,
.metadata, is a pickle: it is read only once its sha256 matches sha256.json's, and then by an unpickler
that builds DCP's metadata classes and nothing else (checkpoint_metadata.py), never by torch's pickle.load.
"""

import copy
import glob
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from rlvr import checkpoint_metadata, config, distributed, rundir

_STEP_DIR = re.compile(r"step_(\d{8})")
_TMP_DIR = re.compile(r"step_\d{8}\.tmp")
TRAINER_FILE = "trainer.pt"
LATEST_FILE = "latest"
METADATA_FILE = checkpoint_metadata.METADATA_FILE  # DCP's index of the shards
MANIFEST_FILE = checkpoint_metadata.MANIFEST_FILE  # {file: sha256} of every other file of the checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, or no checkpoint under a root could be loaded."""


def _warn(message: str) -> None:
    if distributed.rank() == 0:  # every rank reaches the same decision; one of them says so
        print(f"[checkpoint] warning: {message}", file=sys.stderr, flush=True)


def _describe(e: BaseException) -> str:
    """One line. DCP's CheckpointException holds each failed rank's error and whole traceback."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {_describe(exc)}" for r, (exc, _) in e.failures.items())
    if isinstance(e, CheckpointError):  # ours: it names the file already
        return str(e)
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def _agree(fn):
    """Call fn() on every rank. Returns this rank's result (None if it raised) and what failed on any
    rank ("rank 0,1: OSError: ..."), the same list on every rank: a collective, so an error on one
    rank never leaves the others waiting in the next collective."""
    try:
        result, error = fn(), None
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        result, error = None, _describe(e)
    errors = distributed.gather_objects(error)
    ranks: dict[str, list[str]] = {}
    for r, e in enumerate(errors):
        if e is not None:
            ranks.setdefault(e, []).append(str(r))
    return result, [e if len(errors) == 1 else f"rank {','.join(rs)}: {e}" for e, rs in ranks.items()]


def _dcp(fn, state: dict, path: str, **kwargs) -> None:
    """dcp.save / dcp.load; without a process group, one process on purpose (no DCP warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=path, no_dist=not distributed.is_initialized(), **kwargs)


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner reads the non-tensor items of a checkpoint (the optimizer's param_groups:
    lr, betas, flags) with torch.load(weights_only=False), which runs whatever the pickle says. They
    are plain values: weights_only=True reads them and nothing else."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _sha256(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _own_files(path: str) -> list[str]:
    """The files of checkpoint `path` this rank wrote: its DCP shard(s) and RNG file; rank 0 also
    .metadata and trainer.pt."""
    r = distributed.rank()
    own = [n for n in os.listdir(path) if n.startswith(f"__{r}_") or n == f"rank{r}.pt"]
    return sorted(own + ([METADATA_FILE, TRAINER_FILE] if r == 0 else []))


def _checksum_problems(path: str) -> list[str]:
    """Every file whose bytes differ from sha256.json (or the manifest itself missing or unreadable):
    damage inside a shard that its size does not show."""
    manifest = os.path.join(path, MANIFEST_FILE)
    try:
        with open(manifest) as f:
            digests = json.load(f)
    except (OSError, ValueError) as e:
        return [f"{manifest} {'missing' if isinstance(e, FileNotFoundError) else 'unreadable'} ({_describe(e)})"]
    problems = []
    for name, digest in sorted(digests.items()):
        file = os.path.join(path, name)
        try:
            if _sha256(file) != digest:
                problems.append(f"{file} damaged (its sha256 differs from {MANIFEST_FILE}'s)")
        except OSError as e:
            problems.append(f"{file} unreadable ({_describe(e)})")
    return problems


def _tensors(obj):
    """Every tensor in a nested state dict (this rank's shard of a DTensor)."""
    if isinstance(obj, torch.Tensor):
        yield obj.to_local() if hasattr(obj, "to_local") else obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _disk_full(root: str) -> str | None:
    """What to say when the filesystem of root is full: torch's own writer reports a full disk as
    "unexpected pos 704 vs 598", never as ENOSPC."""
    free = _free_bytes(root)
    return f"No space left on device (ENOSPC): {free} bytes free on the filesystem of {root}" if free < 2**24 else None


def _fsync_dir(path: str) -> None:
    """Make a rename or a new file in `path` durable (a rename lives in the directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _to_bytes(obj, what: str) -> bytes:
    """torch.save into memory, refusing anything torch.load(weights_only=True) could not read back:
    better to fail at save time than to discover an unloadable checkpoint at resume."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint: {what} must hold only plain Python values (dict, list, tuple, str, "
                         f"int, float, bool, None) and tensors, to load with weights_only=True: {e}") from e
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# RNG: each rank's generators differ (seeded by rank, or advanced by different work), so each rank
# saves and restores its own.

def rng_state() -> dict:
    version, words, gauss = random.getstate()  # words: 625 ints < 2**32; as a tensor, weights_only loads it
    state = {"torch": torch.get_rng_state(), "python_version": version,
             "python_words": torch.tensor(words, dtype=torch.int64), "python_gauss": gauss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: one per rank
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python_words"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# what is on disk, and whether it is whole

def _step_dirs(root: str) -> list[str]:
    """Every committed checkpoint directory under root (complete or damaged), oldest first."""
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root)
                   if (m := _STEP_DIR.fullmatch(name)) and os.path.isdir(os.path.join(root, name)))
    return [os.path.join(root, name) for _, name in steps]


def _load_small(file: str):
    """torch.load(weights_only=True) of a trainer or RNG file, or CheckpointError naming the file."""
    try:
        return torch.load(file, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} missing") from None
    except Exception as e:
        raise CheckpointError(f"{file} unreadable ({_describe(e)})") from e


def _problems(path: str, world: int) -> list[str]:
    """What is missing or cut short in the checkpoint directory `path`, each naming its file; empty if
    it looks complete. Reads .metadata, the trainer and RNG files and the shards' sizes, not the shards:
    a missing or truncated shard shows here; bytes damaged inside a shard show only when loading."""
    try:
        saved_world = _load_small(os.path.join(path, TRAINER_FILE))["world_size"]
    except CheckpointError as e:
        return [str(e)]
    problems = []
    ends: dict[str, int] = {}  # shard file -> bytes .metadata says it holds
    try:
        for item in checkpoint_metadata.read(path).storage_data.values():  # verified, and no code run
            ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    except checkpoint_metadata.MetadataError as e:
        problems.append(str(e))
    except Exception as e:
        problems.append(f"{os.path.join(path, METADATA_FILE)} unreadable ({_describe(e)})")
    else:
        for name, end in sorted(ends.items()):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                problems.append(f"{file} missing")
            elif os.path.getsize(file) < end:
                problems.append(f"{file} truncated ({os.path.getsize(file)} of {end} bytes)")
    if saved_world == world:  # the same ranks: each one's RNG must be there for an exact resume
        for r in range(world):
            try:
                _load_small(os.path.join(path, f"rank{r}.pt"))
            except CheckpointError as e:
                problems.append(str(e))
    return problems


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint directory under root, or None. Newer damaged ones are reported."""
    for path in reversed(_step_dirs(root)):
        problems = _problems(path, distributed.world_size())
        if not problems:
            return path
        _warn(f"skipping damaged checkpoint {path}: {'; '.join(problems)}")
    return None


def check_resume(cfg) -> None:
    """A bare --resume needs a checkpoint in out_dir/checkpoints (--resume auto starts fresh without one)."""
    ckpts = os.path.join(cfg.out_dir, "checkpoints")
    config.require(cfg.resume != "yes" or latest_checkpoint(ckpts) is not None, "resume", cfg.resume,
                   f"every checkpoint in {ckpts} is damaged (each named above); repair one, or start over with "
                   "--overwrite" if _step_dirs(ckpts) else f"no checkpoint in {ckpts}; --resume auto starts fresh when "
                   "there is none")


# ----------------------------------------------------------------------------------------------
# save

def _refuse_non_finite(model, what: str) -> None:
    """CheckpointError on every rank if any rank's shard of any parameter holds a NaN or inf: one
    all-reduce of one flag per parameter (same order on every rank), so all ranks decide alike."""
    names, flags = [], []
    for name, p in model.named_parameters():
        shard = p.to_local() if hasattr(p, "to_local") else p  # this rank's part; no gather needed
        names.append(name)
        flags.append(~torch.isfinite(shard.detach()).all())
    if not flags:
        return
    bad = distributed.all_max(torch.stack(flags).int()).tolist()
    if any(bad):
        raise CheckpointError(f"checkpoint: refusing to save {what}: parameter {names[bad.index(1)]} "
                              f"holds non-finite values (NaN or inf); {sum(bad)} of {len(bad)} parameters do")


def _prepare(root: str, final: str, tmp: str, world: int) -> bool:
    """Rank 0: clear what a crash left and make `tmp`. True if `final` is already a complete checkpoint
    (a trainer may save at step N and again at the end of a run that stopped at N)."""
    rundir.note(root)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # left by a crash (or an interrupted prune)
        if _TMP_DIR.fullmatch(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # if not, makedirs(tmp) says so
    if os.path.isdir(final):
        problems = _problems(final, world)
        if not problems:
            return True
        _warn(f"replacing damaged checkpoint {final}: {'; '.join(problems)}")
        os.rename(final, tmp)  # out of sight first (atomic), as _prune does
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return False


def _write(tmp: str, model, optimizer, trainer_bytes: bytes) -> dict:
    """Every rank: its DCP shard and RNG file; rank 0 also trainer.pt. Returns {file: sha256} of what
    this rank wrote (each rank hashes its own: no rank reads the whole checkpoint)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, tmp)  # returns once .metadata is written too
    _write_file(os.path.join(tmp, f"rank{distributed.rank()}.pt"), _to_bytes(rng_state(), "RNG state"))
    if distributed.rank() == 0:
        _write_file(os.path.join(tmp, TRAINER_FILE), trainer_bytes)
    return {name: _sha256(os.path.join(tmp, name)) for name in _own_files(tmp)}


def _commit(root: str, tmp: str, final: str) -> None:
    """Rank 0: publish a fully written checkpoint. The rename is the commit point."""
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = os.path.join(root, LATEST_FILE + ".part")
    _write_file(pointer, (os.path.basename(final) + "\n").encode())
    os.replace(pointer, os.path.join(root, LATEST_FILE))
    _fsync_dir(root)


def _publish(root: str, tmp: str, final: str, keep: int | None, digests: dict) -> None:
    """Rank 0: write the checksum manifest, commit, then delete all but the newest `keep` checkpoints
    (None: keep all)."""
    _write_file(os.path.join(tmp, MANIFEST_FILE), json.dumps(digests, indent=0, sort_keys=True).encode())
    _commit(root, tmp, final)
    if keep is not None:
        _prune(root, keep)


def _prune(root: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints. Each is first renamed to `.tmp` (atomic), so a
    crash mid-delete leaves an ignored directory, never a half-deleted one that looks complete."""
    for path in _step_dirs(root)[:-keep]:
        os.rename(path, path + ".tmp")
        shutil.rmtree(path + ".tmp", ignore_errors=True)


def save_checkpoint(root: str, step: int, model, optimizer, scheduler=None, extra: dict | None = None,
                    keep: int | None = 2) -> str:
    """Save model + optimizer (sharded), scheduler, `extra` and each rank's RNG as `root/step_{step:08d}`.

    Called by every rank (it holds collectives). `model` may be FSDP2-sharded or a plain module;
    `extra` is rank-independent state (sampler position, counters) saved by rank 0. Keeps the newest
    `keep` checkpoints (None: all). Saving a step that is already committed and complete does nothing;
    a damaged one is replaced. Returns the directory.

    Raises CheckpointError, on every rank, if a parameter holds NaN or inf (nothing is written) or if
    writing fails on any rank (e.g. a full disk): the `.tmp` directory is removed and the checkpoints
    already committed are untouched.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"checkpoint: keep must be at least 1 (or None for all), got {keep}")
    rank, world = distributed.rank(), distributed.world_size()
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    _refuse_non_finite(model, f"step {step}")
    # Check `extra` on every rank before anyone writes, so a bad value fails everywhere alike.
    trainer_bytes = _to_bytes({"step": step, "world_size": world, "extra": dict(extra or {}),
                               "scheduler": scheduler.state_dict() if scheduler is not None else None},
                              "extra / scheduler state")

    done, failures = _agree(lambda: _prepare(root, final, tmp, world) if rank == 0 else None)
    if not failures and distributed.broadcast_object(done):
        return final
    if not failures:  # every shard is on disk before the commit: _agree waits for all ranks
        digests, failures = _agree(lambda: _write(tmp, model, optimizer, trainer_bytes))
    if not failures:  # and nobody moves on (or loads) before the commit is visible
        digests = {k: v for part in distributed.gather_objects(digests) for k, v in part.items()}
        _, failures = _agree(lambda: _publish(root, tmp, final, keep, digests) if rank == 0 else None)
    if failures:
        full = _disk_full(root) if rank == 0 else None  # measured before removing the .tmp frees space
        failures += [full] if full else []
        failures += [limit.strip(" ()")] if (limit := config.file_size_limit()) else []  # EFBIG: torch says "pos"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.exists(os.path.join(root, LATEST_FILE + ".part")):
                os.remove(os.path.join(root, LATEST_FILE + ".part"))
        distributed.barrier()
        raise CheckpointError(f"checkpoint: saving step {step} to {final} failed: {'; '.join(failures)}. "
                              f"Removed {tmp}; the checkpoints already in {root} are untouched")
    return final


# ----------------------------------------------------------------------------------------------
# load

def _candidates(root: str) -> list[str]:
    """`root` itself if it is a checkpoint directory, else every checkpoint under it, newest first."""
    root = os.path.normpath(root)
    if _STEP_DIR.fullmatch(os.path.basename(root)) or os.path.isfile(os.path.join(root, TRAINER_FILE)):
        return [root]
    return _step_dirs(root)[::-1]


def _read_small(path: str) -> tuple[dict, dict | None]:
    """This rank's view of trainer.pt and its own RNG file (None where the world size changed)."""
    rng_file = os.path.join(path, f"rank{distributed.rank()}.pt")
    rng = _load_small(rng_file) if os.path.isfile(rng_file) else None
    return _load_small(os.path.join(path, TRAINER_FILE)), rng


def _read_shards(path: str, model, optimizer) -> dict:
    """Model and optimizer state from the DCP shards. get_state_dict gives tensors of the right shapes
    and shardings (it initialises an empty optimizer state with a zero-lr step); DCP fills them in
    place, resharding if the world changed, and every key or it raises (on every rank)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    shards = sorted(glob.glob(os.path.join(path, "*.distcp")))
    names = ", ".join(shards) if len(shards) <= 8 else f"{path}/*.distcp ({len(shards)} files)"
    try:
        _dcp(dcp.load, state, path, planner=_WeightsOnlyLoadPlanner(), storage_reader=checkpoint_metadata.Reader(path))
    except CheckpointException as e:  # it cannot say which file: name them all
        raise CheckpointError(f"reading {names} failed: {_describe(e)}") from None
    # save refuses non-finite weights: here they mean damage the checksums did not catch
    if not all(bool(torch.isfinite(t).all()) for t in _tensors(state) if t.is_floating_point()):
        raise CheckpointError(f"{names} hold non-finite values (NaN or inf): refusing to load them")
    return state


def load_checkpoint(root: str, model, optimizer, scheduler=None) -> dict | None:
    """Restore the newest complete checkpoint under `root` (or `root` itself if it is a checkpoint
    directory) into model, optimizer and scheduler, and this rank's RNG states.

    Called by every rank. A damaged checkpoint (a file missing, truncated or unreadable) is reported,
    naming the file, and the next older one is tried; every rank tries the same ones in the same order
    and agrees on each outcome. A checkpoint that fails while its shards are being read may have
    overwritten part of the state; the one loaded after it overwrites every tensor. Returns `extra`
    with "step" added, or None when there is no checkpoint; CheckpointError, naming each damaged file,
    when there are checkpoints but none loads.
    """
    world = distributed.world_size()
    paths = distributed.broadcast_object(_candidates(root) if distributed.rank() == 0 else None)
    damaged = []
    for path in paths:
        problems = distributed.broadcast_object((_problems(path, world) or _checksum_problems(path))
                                                if distributed.rank() == 0 else None)
        if not problems:
            small, problems = _agree(lambda: _read_small(path))
        if not problems:
            state, problems = _agree(lambda: _read_shards(path, model, optimizer))
        if not problems:
            break
        damaged.append(f"{path}: {'; '.join(problems)}")
        _warn(f"skipping damaged checkpoint {damaged[-1]}")
    else:
        if damaged:
            raise CheckpointError(f"checkpoint: no loadable checkpoint in {root}: {' | '.join(damaged)}. "
                                  "Repair or move them away to start from scratch")
        return None
    if damaged:
        _warn(f"resuming from {path}, the newest complete checkpoint")

    trainer, rng = small
    if scheduler is not None and trainer["scheduler"] is None:
        raise ValueError(f"checkpoint {path}: no scheduler state saved, but a scheduler was given to load")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    if rng is not None:
        set_rng_state(rng)
    else:  # only when the world size changed: _problems requires every rank file otherwise
        print(f"[checkpoint] warning: {path}/rank{distributed.rank()}.pt missing (saved with "
              f"{trainer['world_size']} ranks): this rank's RNG is not restored, so the run is not bit-exact "
              "from here", file=sys.stderr)
    return {**trainer["extra"], "step": trainer["step"]}


# ----------------------------------------------------------------------------------------------
# Hugging Face export

def _tied_output_key(model) -> str | None:
    """The output embedding's state-dict key if it shares its weight with the input embedding."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    return next(name for name, m in model.named_modules() if m is out) + ".weight"


def export_hf(model, tokenizer, out_dir: str, dtype: torch.dtype | None = None) -> str:
    """Write `model` (FSDP2-sharded or plain) and `tokenizer` as a Hugging Face model directory that
    `AutoModelForCausalLM.from_pretrained` and vLLM load: config.json, generation_config.json,
    safetensors weights, tokenizer files.

    Called by every rank (gathering the full weights is a collective); rank 0 gathers them onto the
    CPU and writes. Weights are saved in the dtype the model holds them in (float32 master weights
    stay float32, and config.json says so); pass `dtype` (e.g. torch.bfloat16) to cast for serving.
    Written to `out_dir.tmp`, then renamed over `out_dir`. Weights holding NaN or inf are refused
    (CheckpointError, on every rank) before anything is written.
    """
    _refuse_non_finite(model, f"the export to {out_dir}")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if distributed.rank() == 0:
        out_dir = os.path.normpath(out_dir)
        tmp, old = out_dir + ".tmp", out_dir + ".old"
        for path in (out_dir, tmp, old):
            rundir.note(path)
        shutil.rmtree(tmp, ignore_errors=True)
        if dtype is not None:
            full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
        # Gathering un-ties shared weights (two separate full tensors); safetensors refuses aliases
        # anyway, and from_pretrained ties them again from config.tie_word_embeddings.
        tied = _tied_output_key(model)
        if tied is not None:
            full.pop(tied, None)
        # save_pretrained writes config + generation config and names the architecture without
        # FSDP2's dynamic "FSDP" class prefix; the weights are ours, it gathers nothing.
        model.save_pretrained(tmp, state_dict=full)
        if dtype is not None:  # save_pretrained recorded the parameters' dtype; the live config keeps it
            config = copy.deepcopy(model.config)
            config.dtype = str(dtype).removeprefix("torch.")
            config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return out_dir


# ----------------------------------------------------------------------------------------------
# pre-emption

class StopSignal:
    """Turn SIGTERM / SIGINT into a request to checkpoint and stop at the end of the current step.

    The first signal only sets a flag (and puts the previous handler back, so a second Ctrl-C
    interrupts at once). `should_stop()` is a collective: every rank calls it once per step, and all
    agree to stop if any rank was signalled (a scheduler may signal only some of them). Once it says
    stop, `received` is the signal's number on every rank, so each can exit with 128 + signum, the
    status a shell gives a process the signal killed, which a scheduler tells from success. Under
    torchrun, Ctrl-C reaches torchrun too, which terminates the workers after its own grace period.
    A torchrun agent killed outright (kill -9) signals nobody: its ranks would train on, unsupervised,
    to the end. Each rank (TORCHELASTIC_RUN_ID set) notices that its parent changed and stops as if it
    got SIGHUP (exit 129).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous[signum])
        print(f"[checkpoint] {signal.Signals(signum).name}: saving and stopping after this step "
              "(send it again to stop now)", file=sys.stderr, flush=True)

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled (the highest signal number wins)."""
        if self._launcher is not None and self.received is None and os.getppid() != self._launcher:
            self.received = signal.SIGHUP
            print(f"[checkpoint] the launcher (pid {self._launcher}) is gone: saving and stopping after this step",
                  file=sys.stderr, flush=True)
        signum = int(distributed.all_max(torch.tensor([self.received or 0])).item())
        if signum and self.received is None:
            self.received = signum  # another rank was signalled: exit as it does
        return bool(signum)

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
