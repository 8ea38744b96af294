"""The process group and the few collectives the trainers use: one place for them, so model.py,
checkpoint.py and the trainers never write them again. Imports none of the project's files.

Without torchrun on a CPU there is no process group and every helper is the one-process identity,
unless RLVR_GPU_PATH=1 asks for the GPU path on the CPU (gpu_path()).
"""
from __future__ import annotations

import datetime
import gc
import os
import socket

import torch
import torch.distributed as dist


GPU_PATH_ENV = "RLVR_GPU_PATH"
# How long a collective may wait for the slowest rank. Rank-0-only phases (sft --policy sampling and
# labelling, the teacher labelling toy rows, the fp32 Hugging Face export) keep the other ranks in a
# barrier or broadcast meanwhile; NCCL's default watchdog (10 minutes) would kill the job there.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def gpu_path() -> bool:
    """Does this process run the GPU path: a process group even at one rank (so FSDP2 shards every
    model) and bf16 compute? Always on a GPU; on a CPU only with RLVR_GPU_PATH=1 (gloo), which is how
    the tests execute, on a CPU, the code a GPU run executes (tests/test_gpu_path.py)."""
    return torch.cuda.is_available() or os.environ.get(GPU_PATH_ENV) == "1"


def init() -> tuple[int, int, torch.device]:
    """Returns (rank, world_size, device).

    Under torchrun a process group is created (nccl on GPU, gloo on CPU). A plain `python` run on
    the GPU path (gpu_path()) also gets a one-process group, so the GPU path is always FSDP2 with
    bf16 parameters and float32 reduction. A plain CPU run stays a single process with no group:
    the simplest path.
    """
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ and not gpu_path():
        return 0, 1, torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "WORLD_SIZE" in os.environ:
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        else:
            with socket.socket() as s:  # a free port for the one-process group
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=COLLECTIVE_TIMEOUT)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def shutdown() -> None:
    """Tear the process group down. FSDP modules keep gloo's threads alive: free them first, or a
    finished CPU run can abort at exit ("terminate called without an active exception")."""
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo CPU ones."""
    if is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor, on x's device). Pack many numbers into one tensor: one call."""
    if not is_initialized():
        return x.clone()
    t = x.detach().to(_collective_device()).clone()
    dist.all_reduce(t)
    return t.to(x.device)


def all_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (a new tensor, on x's device)."""
    if not is_initialized():
        return x.clone()
    t = x.detach().to(_collective_device()).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(x.device)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized per-rank tensors in rank order (rank r holds the r-th slice)."""
    if not is_initialized() or world_size() == 1:
        return x
    t = x.detach().to(_collective_device()).contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).to(x.device)


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (on every rank)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (e.g. a path only rank 0 built)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP2 shard, or a grad norm over shards) as the whole tensor; others unchanged.
    With a DTensor this is a collective: every rank calls it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
