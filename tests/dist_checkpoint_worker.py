"""Per-rank worker for tests/test_checkpoint.py, launched by torchrun on the gloo backend:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_checkpoint_worker.py OUT

FSDP2-shards a tiny Qwen2, trains a step, saves, trains on (perturbing), loads, and asserts that
parameters, optimizer state, scheduler and the next training step match the run that never
stopped. Then exports to Hugging Face format and leaves in OUT what the parent test compares:
logits.pt (the sharded model's logits) and full_step1.pt (gathered state at the checkpoint).
Then, in OUT/failures, refuses NaN weights and survives a full disk on rank 1 only, and falls back
past damaged checkpoints: every rank must reach the same outcome. Exits non-zero on any failure.
"""

import errno
import gc
import json
import os
import random
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                      tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config).float()


def tiny_tokenizer():
    """A word-level tokenizer built in memory: export_hf only needs something with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def train_step(model, optimizer, scheduler):
    """One update on data drawn from this rank's torch and python RNGs, so an RNG not restored on
    resume shows up as different parameters."""
    length = random.randint(5, 9)
    ids = torch.randint(0, 256, (2, length))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot(model, optimizer) -> dict:
    state = {("param", n): local(p).detach().clone() for n, p in model.named_parameters()}
    for i, (p, s) in enumerate(optimizer.state.items()):
        for k, v in s.items():
            state[("optim", i, k)] = local(v).detach().clone()
    return state


def assert_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: keys differ"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def save_fails(root: str, model, optimizer, scheduler, says: str):
    from rlvr import checkpoint

    try:
        checkpoint.save_checkpoint(root, 4, model, optimizer, scheduler)
    except checkpoint.CheckpointError as e:
        assert says in str(e), e
        return
    raise AssertionError(f"saved despite what should fail with {says!r}")


def check_failures(root: str, model, optimizer, scheduler):
    """What goes wrong on one rank goes wrong, in the same words, on every rank."""
    import torch.distributed as dist

    from rlvr import checkpoint

    rank = dist.get_rank()
    for step in (1, 2, 3):
        train_step(model, optimizer, scheduler)
        checkpoint.save_checkpoint(root, step, model, optimizer, scheduler, extra={"at": step}, keep=None)
        if step == 1:
            at_1 = snapshot(model, optimizer)

    first = next(model.parameters()).to_local()  # NaN in rank 1's shard only
    kept = first.detach().clone()
    if rank == 1:
        with torch.no_grad():
            first[0] = float("nan")
    save_fails(root, model, optimizer, scheduler, "model.embed_tokens.weight holds non-finite values")
    with torch.no_grad():
        first.copy_(kept)

    write = checkpoint._write_file

    def full_disk(path, data):  # rank 1's disk only
        if path.endswith("rank1.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        write(path, data)

    checkpoint._write_file = full_disk
    save_fails(root, model, optimizer, scheduler, "rank 1: OSError: [Errno 28] No space left on device")
    checkpoint._write_file = write
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002", "step_00000003"], os.listdir(root)

    if rank == 0:  # the filesystem is shared: damage the shards rank 1 reads
        shard = os.path.join(root, "step_00000002", "__1_0.distcp")
        os.truncate(shard, os.path.getsize(shard) // 2)  # seen in the sizes, by rank 0
        shard = os.path.join(root, "step_00000003", "__1_0.distcp")
        with open(shard, "r+b") as f:  # seen only when rank 1 reads it ...
            f.write(bytes(os.path.getsize(shard)))
        manifest = os.path.join(root, "step_00000003", checkpoint.MANIFEST_FILE)
        with open(manifest) as f:  # ... once its checksum is made to match (damage the checksums miss)
            digests = json.load(f)
        digests["__1_0.distcp"] = checkpoint._sha256(shard)
        with open(manifest, "w") as f:
            json.dump(digests, f)
    dist.barrier()
    extra = checkpoint.load_checkpoint(root, model, optimizer, scheduler)
    assert extra == {"at": 1, "step": 1}, extra
    assert_equal(snapshot(model, optimizer), at_1, f"rank {rank} after falling back")


def main():
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    from rlvr import checkpoint

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ckpt = os.path.join(out, "ckpt")

    model = tiny_model(0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    torch.manual_seed(100 + rank)  # ranks draw different data, as real data-parallel ranks do
    random.seed(100 + rank)

    train_step(model, optimizer, scheduler)
    checkpoint.save_checkpoint(ckpt, 1, model, optimizer, scheduler, extra={"sampler": {"epoch": 0, "index": 7}})
    at_save = snapshot(model, optimizer)
    train_step(model, optimizer, scheduler)
    uninterrupted = snapshot(model, optimizer)  # the step a resumed run must reproduce exactly
    train_step(model, optimizer, scheduler)     # perturb further
    changed = snapshot(model, optimizer)
    assert any(not torch.equal(changed[k], at_save[k]) for k in at_save), "training did not change the state"

    extra = checkpoint.load_checkpoint(ckpt, model, optimizer, scheduler)
    assert extra == {"sampler": {"epoch": 0, "index": 7}, "step": 1}, extra
    assert_equal(snapshot(model, optimizer), at_save, f"rank {rank} after load")
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == 1e-2 / 2, scheduler.state_dict()

    # Gathered state at the checkpoint, for the parent's single-process (resharded) load.
    full_model = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full_optim = get_optimizer_state_dict(model, optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # now: the optimizer's `step` entries are the live tensors, not copies
        torch.save({"model": full_model, "optim": full_optim}, os.path.join(out, "full_step1.pt"))
    train_step(model, optimizer, scheduler)
    assert_equal(snapshot(model, optimizer), uninterrupted, f"rank {rank} step after resume")

    hf_dir = checkpoint.export_hf(model, tiny_tokenizer(), os.path.join(out, "hf"))
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 40).view(1, -1)).logits
    if rank == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))
        assert os.path.isdir(hf_dir)

    # Pre-emption: a signal reaching only rank 1 stops both ranks.
    stop = checkpoint.StopSignal()
    assert stop.should_stop() is False
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop() is True, f"rank {rank} did not agree to stop"
    assert stop.received == signal.SIGTERM, f"rank {rank}: received {stop.received}"  # the exit status, everywhere
    stop.restore()

    check_failures(os.path.join(out, "failures"), model, optimizer, scheduler)

    # Free the FSDP model (its device mesh holds the process group) so destroy_process_group really
    # ends gloo's worker threads now; left to interpreter shutdown they can abort the process
    # ("terminate called without an active exception") while releasing tensors.
    del model, optimizer, scheduler, stop
    gc.collect()
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main()
