"""Per-rank worker for tests/test_load_once.py: model.load_sharded, the weights read once by rank 0 and
broadcast into FSDP2 shards built on the meta device, against the old path (every rank loads the whole
model, then shards it). Run under torchrun with RLVR_GPU_PATH=1 (gloo, bf16 compute):

    python tests/load_once_worker.py weights OUT MODEL_DIR [MODEL_DIR ...]
    python tests/load_once_worker.py rl OUT MODEL_DIR [train_rl.py flags]
    python tests/load_once_worker.py rss OUT MODEL_DIR old|new

weights: each model loaded as the policy (float32 master weights) and as a frozen reference / verifier
(bf16), recording in OUT/weights_rank{R}.json whether the gathered weights and the buffers equal
from_pretrained's, whether tied embeddings stayed tied, how often this rank read a checkpoint, and its
bytes of parameters. rl: train_rl.train() with the old path, then the same with load_sharded.
rss: the peak resident memory of a rank that loads MODEL_DIR as the policy, and on a GPU its peak GPU
memory (the README's figures; never asserted in a test: RSS depends on the allocator and the machine).
"""
import json
import os
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlvr import distributed, model  # noqa: E402


def old_load(name_or_path, device, dtype, trust_remote_code=False, compute_dtype=None, *, mixed_precision,
             frozen=False, activation_checkpointing=False):
    """The path load_sharded replaced: every rank loads the whole model, then FSDP2 shards it."""
    lm = model.load_model(name_or_path, device, dtype, trust_remote_code, compute_dtype)
    return model.shard_model(lm.eval().requires_grad_(False) if frozen else lm, mixed_precision, activation_checkpointing)


def count_checkpoint_reads() -> dict:
    """Count, from now on, from_pretrained calls and safetensors files opened (how from_pretrained reads
    weights), in the dict returned."""
    import transformers
    import transformers.modeling_utils as mu

    counts = {"from_pretrained": 0, "safe_open": 0}
    auto, safe_open = transformers.AutoModelForCausalLM.from_pretrained.__func__, mu.safe_open

    def counted_from_pretrained(cls, *args, **kwargs):
        counts["from_pretrained"] += 1
        return auto(cls, *args, **kwargs)

    def counted_safe_open(*args, **kwargs):
        counts["safe_open"] += 1
        return safe_open(*args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = classmethod(counted_from_pretrained)
    mu.safe_open = counted_safe_open
    return counts


def local_bytes(lm) -> tuple[int, int, int]:
    """(this rank's parameter bytes, the bytes torch.chunk's split along dim 0 gives rank r, the whole
    model's bytes): FSDP2 shards every parameter along dim 0 as torch.chunk does."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = expected = total = 0
    for p in lm.parameters():
        size = p.element_size()
        mine += p.to_local().numel() * size
        chunks = torch.empty(p.shape, device="meta").chunk(world)
        expected += (chunks[rank].numel() if rank < len(chunks) else 0) * size
        total += p.numel() * size
    return mine, expected, total


def weights(out: Path, model_dirs: list[str]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, _, device = distributed.init()
    facts, counts = {}, count_checkpoint_reads()
    for path in model_dirs:
        for role, dtype, kwargs in (("policy", torch.float32, dict(compute_dtype=model.compute_dtype(),
                                                                   mixed_precision=True)),
                                    ("frozen", model.compute_dtype(), dict(mixed_precision=False, frozen=True))):
            counts.update(from_pretrained=0, safe_open=0)
            lm = model.load_sharded(path, device, dtype, **kwargs)
            f = dict(counts)
            f["local_bytes"], f["expected_local_bytes"], f["total_bytes"] = local_bytes(lm)
            f["tied"] = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
            f["config_tied"] = bool(getattr(lm.config.get_text_config(), "tie_word_embeddings", False))
            f["trainable"] = sorted({p.requires_grad for p in lm.parameters()})
            f["training"] = lm.training
            f["eos"] = lm.generation_config.eos_token_id
            gathered = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            ref = model.load_model(path, "cpu", dtype)  # the plain from_pretrained, after the counting
            want = ref.state_dict()
            f["keys_differ"] = sorted(set(want) ^ set(gathered)) if rank == 0 else []  # rank 0 receives the full dict
            f["params_differ"] = [k for k in want if k in gathered and not torch.equal(gathered[k], want[k])]
            buffers = dict(lm.named_buffers())
            f["buffers"] = sorted(name for name, _ in ref.named_non_persistent_buffers())
            f["buffers_differ"] = [n for n, b in ref.named_buffers() if not torch.equal(buffers[n].cpu(), b)]
            f["ref_eos"] = ref.generation_config.eos_token_id
            facts[f"{Path(path).name}/{role}"] = f
            del lm, gathered
    distributed.shutdown()
    (out / f"weights_rank{rank}.json").write_text(json.dumps(facts))


def length_score(questions, references, responses) -> list[float]:
    """A judge for the rl mode (py:load_once_worker:length_score): graded by the response's length, so the
    advantages are not zero and the update moves the policy, without a verifier model's probe."""
    return [len(r) % 5 / 4 for r in responses]


def rl(out: Path, argv: list[str]) -> None:
    import train_rl

    results, new_load = {}, model.load_sharded
    for path, load in (("old", old_load), ("new", new_load)):
        model.load_sharded = load
        cfg, vopts = train_rl.parse_config(argv + [f"--out_dir={out / path}"])
        history = train_rl.train(cfg, vopts)["history"]
        results[path] = [{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in history]
    rank = distributed.rank()
    distributed.shutdown()
    (out / f"rl_rank{rank}.json").write_text(json.dumps(results))


def rss(out: Path, model_dir: str, path: str) -> None:
    rank, world, device = distributed.init()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load = {"old": old_load, "new": model.load_sharded}[path]
    lm = load(model_dir, device, torch.float32, compute_dtype=model.compute_dtype(), mixed_precision=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    mine, _, total = local_bytes(lm)
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    distributed.shutdown()
    line = (f"rank {rank}/{world} {path}: peak RSS {peak / 2**20:.2f} GiB ({before / 2**20:.2f} GiB before the load)"
            f"{gpu}, model {total / 2**30:.2f} GiB float32, this rank's shard {mine / 2**30:.2f} GiB")
    print(line, flush=True)
    (out / f"rss_{path}_rank{rank}.txt").write_text(line + "\n")


if __name__ == "__main__":
    assert os.environ.get(distributed.GPU_PATH_ENV) == "1", f"run with {distributed.GPU_PATH_ENV}=1"
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"weights": lambda: weights(out_dir, sys.argv[3:]), "rl": lambda: rl(out_dir, sys.argv[3:]),
     "rss": lambda: rss(out_dir, sys.argv[3], sys.argv[4])}[mode]()
