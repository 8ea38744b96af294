"""Per-rank worker for tests/test_prefix_sharing.py: the shared layout inside FSDP2 (2 gloo ranks, float32).

    python -m torch.distributed.run --nproc_per_node=2 tests/prefix_sharing_worker.py OUT MODEL_DIR CHECKPOINTING

Each rank shards the tiny model (fully_shard per layer and the root, optionally with activation checkpointing)
and runs train_rl.forward_logprobs + backward on its own micro-batches: first both ranks' in the shared layout,
then one where rank 1's prompts are all distinct (its rule says packed: both ranks must take the packed layout,
or FSDP's per-layer gathers would not pair up). Writes OUT/rank{R}.pt: the layouts taken, the log-probs and
the full (gathered) gradient of every parameter.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_rl  # noqa: E402
from rlvr import distributed, model, prefix_sharing  # noqa: E402
from test_prefix_sharing import fsdp_batches  # noqa: E402


def main(out: str, model_dir: str, checkpointing: str) -> None:
    rank, world, _ = distributed.init()
    torch.set_num_threads(1)
    lm = model.load_model(model_dir, dtype=torch.float32)
    lm.train()
    lm = model.shard_model(lm, mixed_precision=False, activation_checkpointing=checkpointing == "1")
    taken, real = [], prefix_sharing.logprobs
    prefix_sharing.logprobs = lambda *a, **k: taken.append("shared") or real(*a, **k)
    cfg = train_rl.Config()
    lps = []
    for prompts, responses in fsdp_batches(lm.config.vocab_size)[rank]:
        before = len(taken)
        lp, _ = train_rl.forward_logprobs(lm, prompts, responses, list(range(len(prompts))), cfg, "cpu")
        if len(taken) == before:
            taken.append("packed")
        (lp * torch.linspace(0.5, 1.5, len(lp))).sum().backward()  # FSDP averages the ranks' gradients
        lps.append(lp.detach())
    grads = {n: distributed.full_tensor(p.grad).detach().clone() for n, p in lm.named_parameters()}
    torch.save({"taken": taken, "lps": lps, "grads": grads}, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
