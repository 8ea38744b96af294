import errno
import json
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

from rlvr import checkpoint
from dist_checkpoint_worker import tiny_model, tiny_tokenizer, train_step

HERE = os.path.dirname(os.path.abspath(__file__))


def make_run(seed: int = 0):
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def state(model, optimizer) -> dict:
    out = {f"p.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, s in enumerate(optimizer.state.values()):
        out.update({f"o.{i}.{k}": v.clone() for k, v in s.items()})
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


def checkpoint_at_step_1(root: str):
    """A run after one step, checkpointed with extra {"k": 1}: (model, optimizer, scheduler), its state."""
    model, optimizer, scheduler = make_run()
    train_step(model, optimizer, scheduler)
    checkpoint.save_checkpoint(root, 1, model, optimizer, scheduler, {"k": 1})
    return (model, optimizer, scheduler), state(model, optimizer)


def test_single_process_resume_is_exact(tmp_path):
    """Save after 2 steps, wreck everything, load into a fresh model: state, scheduler, extra, RNG
    and the next step equal those of the run that never stopped."""
    torch.manual_seed(1)
    random.seed(1)
    model, optimizer, scheduler = make_run(0)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    extra = {"sampler": {"epoch": 1, "order": [3, 1, 2], "cursor": 2}, "tokens": 123, "name": "toy"}
    path = checkpoint.save_checkpoint(str(tmp_path), 2, model, optimizer, scheduler, extra)
    assert path == str(tmp_path / "step_00000002")
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    saved, lr = state(model, optimizer), optimizer.param_groups[0]["lr"]
    train_step(model, optimizer, scheduler)
    uninterrupted = state(model, optimizer)
    draws = (torch.rand(3), random.random())

    torch.manual_seed(99)
    random.seed(99)
    model2, optimizer2, scheduler2 = make_run(seed=5)  # different weights, empty optimizer state
    got = checkpoint.load_checkpoint(str(tmp_path), model2, optimizer2, scheduler2)
    assert got == {**extra, "step": 2}
    assert_same(state(model2, optimizer2), saved)
    assert scheduler2.last_epoch == 2 and optimizer2.param_groups[0]["lr"] == lr == pytest.approx(1e-2 / 3)
    train_step(model2, optimizer2, scheduler2)
    assert_same(state(model2, optimizer2), uninterrupted)
    after = (torch.rand(3), random.random())
    assert torch.equal(after[0], draws[0]) and after[1] == draws[1]


def test_no_checkpoint_returns_none(tmp_path):
    model, optimizer, scheduler = make_run()
    assert checkpoint.load_checkpoint(str(tmp_path / "absent"), model, optimizer, scheduler) is None
    (tmp_path / "step_00000003.tmp").mkdir()  # an interrupted save is not a checkpoint
    assert checkpoint.load_checkpoint(str(tmp_path), model, optimizer, scheduler) is None


class Killed(BaseException):
    """A process killed mid-save (kill -9) runs no cleanup: not an Exception, so nothing catches it."""


def test_crash_before_commit_keeps_previous(tmp_path, monkeypatch):
    root = str(tmp_path)
    (model, optimizer, scheduler), at_1 = checkpoint_at_step_1(root)
    train_step(model, optimizer, scheduler)

    def crash(*args):
        raise Killed("simulated crash after the shards were written")

    monkeypatch.setattr(checkpoint, "_commit", crash)
    with pytest.raises(Killed, match="simulated crash"):
        checkpoint.save_checkpoint(root, 2, model, optimizer, scheduler, {"k": 2})
    monkeypatch.undo()
    assert os.path.isfile(tmp_path / "step_00000002.tmp" / ".metadata")  # the shards did land
    assert checkpoint.latest_checkpoint(root) == str(tmp_path / "step_00000001")
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"

    fresh, fresh_opt, fresh_sched = make_run(seed=3)
    assert checkpoint.load_checkpoint(root, fresh, fresh_opt, fresh_sched) == {"k": 1, "step": 1}
    assert_same(state(fresh, fresh_opt), at_1)

    train_step(fresh, fresh_opt, fresh_sched)
    checkpoint.save_checkpoint(root, 2, fresh, fresh_opt, fresh_sched, {"k": 2})
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]  # stale .tmp removed
    assert checkpoint.load_checkpoint(root, *make_run(seed=4)) == {"k": 2, "step": 2}


def test_keep_prunes_old_and_resaving_a_step_is_a_noop(tmp_path):
    root = str(tmp_path)
    model, optimizer, scheduler = make_run()
    for step in range(1, 5):
        train_step(model, optimizer, scheduler)
        checkpoint.save_checkpoint(root, step, model, optimizer, scheduler, {}, keep=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004"]
    mtime = os.path.getmtime(tmp_path / "step_00000004" / "trainer.pt")
    checkpoint.save_checkpoint(root, 4, model, optimizer, scheduler, {"other": 1}, keep=2)
    assert os.path.getmtime(tmp_path / "step_00000004" / "trainer.pt") == mtime
    # A specific checkpoint directory can be loaded too, not only the newest.
    assert checkpoint.load_checkpoint(str(tmp_path / "step_00000003"), *make_run())["step"] == 3


def test_extra_must_load_with_weights_only(tmp_path):
    model, optimizer, scheduler = make_run()
    with pytest.raises(ValueError, match="plain Python values"):
        checkpoint.save_checkpoint(str(tmp_path), 1, model, optimizer, scheduler, {"bad": object()})
    assert checkpoint.latest_checkpoint(str(tmp_path)) is None


def test_export_plain_model_in_bfloat16(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_model(0)
    out = checkpoint.export_hf(model, tiny_tokenizer(), str(tmp_path / "hf"), dtype=torch.bfloat16)
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    rounded = tiny_model(0)
    for p in rounded.parameters():  # what the export should hold: each weight rounded to bfloat16
        p.data = p.data.bfloat16().float()
    ids = torch.arange(3, 20).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, rounded(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w7") == 7
    # Exporting again (now in the parameters' float32) replaces the directory whole.
    checkpoint.export_hf(model, tiny_tokenizer(), out)
    assert json.loads(open(os.path.join(out, "config.json")).read())["dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_stop_signal_first_sets_flag_second_interrupts():
    # the handlers before: Python's own (whatever an earlier test in this process left), put back after
    before = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                   (signal.SIGTERM, signal.SIG_DFL))}
    stop = checkpoint.StopSignal()
    try:
        assert stop.should_stop() is False
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop() is True  # no KeyboardInterrupt: just a flag
        assert stop.received == signal.SIGINT  # the trainer exits with 128 + 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        for s, h in before.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# damaged checkpoints, failed saves

def two_checkpoints(root: str):
    """Checkpoints at steps 1 and 2 under root; returns the state saved at step 1."""
    run, at_1 = checkpoint_at_step_1(root)
    train_step(*run)
    checkpoint.save_checkpoint(root, 2, *run, {"k": 2})
    return at_1


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def zero_bytes(path):  # same size, so only reading the shard shows it
    with open(path, "r+b") as f:
        f.write(bytes(os.path.getsize(path)))


def overwrite_inside(path):  # 400 bytes in the middle of the tensor data: still a valid file, wrong weights
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 400)


DAMAGE = {  # what breaks, and the word the warning must say about that file
    "truncated shard": ("__0_0.distcp", truncate, "truncated"),
    "missing shard": ("__0_0.distcp", os.remove, "missing"),
    "shard bytes": ("__0_0.distcp", zero_bytes, "damaged .its sha256 differs"),
    "bytes inside a shard": ("__0_0.distcp", overwrite_inside, "damaged .its sha256 differs"),
    "missing manifest": ("sha256.json", os.remove, "missing"),
    "missing trainer state": ("trainer.pt", os.remove, "missing"),
    "missing rank RNG": ("rank0.pt", os.remove, "missing"),
    "bad metadata": (".metadata", truncate, "damaged or replaced .its sha256 differs"),  # checked before it is read
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_latest_falls_back_to_previous_with_a_warning_naming_the_file(tmp_path, capsys, case):
    name, damage, says = DAMAGE[case]
    at_1 = two_checkpoints(str(tmp_path))
    bad = tmp_path / "step_00000002" / name
    damage(bad)
    model, optimizer, scheduler = make_run(seed=9)
    assert checkpoint.load_checkpoint(str(tmp_path), model, optimizer, scheduler) == {"k": 1, "step": 1}
    assert_same(state(model, optimizer), at_1)
    assert scheduler.last_epoch == 1
    err = capsys.readouterr().err
    assert f"{bad}" in err and "resuming from " + str(tmp_path / "step_00000001") in err, err
    assert re.search(says, err.split(str(bad))[1]), err
    if "bytes" not in case and "manifest" not in case:  # metadata and sizes show the others without hashing
        assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000001")


def test_saving_over_a_damaged_step_replaces_it(tmp_path):
    root = str(tmp_path)
    two_checkpoints(root)
    os.remove(tmp_path / "step_00000002" / "trainer.pt")
    model, optimizer, scheduler = make_run(seed=9)
    assert checkpoint.load_checkpoint(root, model, optimizer, scheduler)["step"] == 1
    train_step(model, optimizer, scheduler)
    checkpoint.save_checkpoint(root, 2, model, optimizer, scheduler, {"k": "again"})
    assert checkpoint.load_checkpoint(root, *make_run(seed=4)) == {"k": "again", "step": 2}


def test_every_checkpoint_damaged_is_an_error_naming_each_file(tmp_path):
    two_checkpoints(str(tmp_path))
    truncate(tmp_path / "step_00000002" / "__0_0.distcp")
    os.remove(tmp_path / "step_00000001" / "trainer.pt")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_checkpoint(str(tmp_path), *make_run())
    assert str(tmp_path / "step_00000002" / "__0_0.distcp") in str(e.value)
    assert str(tmp_path / "step_00000001" / "trainer.pt") in str(e.value)
    # A checkpoint directory asked for by name does not fall back to another one.
    with pytest.raises(checkpoint.CheckpointError, match="__0_0.distcp truncated"):
        checkpoint.load_checkpoint(str(tmp_path / "step_00000002"), *make_run())


def test_full_disk_during_save_names_the_cause_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    root = str(tmp_path)
    two_checkpoints(root)
    model, optimizer, scheduler = make_run(seed=2)
    write = checkpoint._write_file

    def full_disk(path, data):
        if path.endswith("trainer.pt"):  # after the shards landed in .tmp
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device") as e:
        checkpoint.save_checkpoint(root, 3, model, optimizer, scheduler, {"k": 3})
    assert "step_00000003" in str(e.value)
    monkeypatch.undo()
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]  # no .tmp holds the space
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert checkpoint.load_checkpoint(root, *make_run(seed=4)) == {"k": 2, "step": 2}
    checkpoint.save_checkpoint(root, 3, model, optimizer, scheduler, {"k": 3})  # space again: it works
    assert checkpoint.load_checkpoint(root, *make_run(seed=4)) == {"k": 3, "step": 3}


def test_non_finite_weights_are_neither_saved_nor_exported(tmp_path):
    model, optimizer, scheduler = make_run()
    train_step(model, optimizer, scheduler)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(checkpoint.CheckpointError, match=r"save step 1: parameter model\.layers\.1\.mlp\.up_proj\."
                                                           r"weight holds non-finite values.*2 of"):
        checkpoint.save_checkpoint(str(tmp_path), 1, model, optimizer, scheduler)
    with pytest.raises(checkpoint.CheckpointError, match=r"save the export to .*hf: parameter model\.layers\.1"):
        checkpoint.export_hf(model, tiny_tokenizer(), str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []  # nothing written, not even a .tmp


def test_two_rank_fsdp_checkpoint_and_export(tmp_path):
    """torchrun, 2 ranks, gloo, FSDP2: the worker asserts the exact resume, that a failure on one rank
    (NaN weights, a full disk, a damaged shard only it reads) is the same error or the same fallback on
    both; here the 2-rank sharded checkpoint loads into one process (resharded) and the HF export gives
    the sharded model's logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_checkpoint_worker.py"), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:  # a rank waits in a collective the other never entered
        proc.terminate()  # torchrun passes SIGTERM on to the workers (each in a session of its own)
        pytest.fail(f"2-rank worker hung:\n{proc.communicate(timeout=60)[1][-6000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    assert "rank 0 ok" in out and "rank 1 ok" in out
    failures = tmp_path / "failures"
    assert f"skipping damaged checkpoint {failures / 'step_00000003'}: rank 0,1: reading " in err
    assert f"{failures / 'step_00000002' / '__1_0.distcp'} truncated" in err
    assert f"resuming from {failures / 'step_00000001'}" in err

    ckpt = tmp_path / "ckpt" / "step_00000001"
    assert {"rank0.pt", "rank1.pt", "trainer.pt", ".metadata"} <= set(os.listdir(ckpt))
    full = torch.load(tmp_path / "full_step1.pt", weights_only=True)
    model, optimizer, scheduler = make_run(seed=7)
    assert checkpoint.load_checkpoint(str(tmp_path / "ckpt"), model, optimizer, scheduler)["step"] == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full["model"][name]), name
    for name, p in model.named_parameters():
        for k, v in optimizer.state[p].items():
            assert torch.equal(v, full["optim"]["state"][name][k]), (name, k)

    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "float32"  # not FSDPQwen2...
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and len(f.keys()) == len(full["model"]) - 1
    loaded = AutoModelForCausalLM.from_pretrained(str(hf))
    with torch.no_grad():
        logits = loaded(input_ids=torch.arange(3, 40).view(1, -1)).logits
    torch.testing.assert_close(logits, torch.load(tmp_path / "logits.pt", weights_only=True), rtol=1e-5, atol=1e-5)


def test_non_finite_weights_at_load_are_refused_and_the_previous_checkpoint_loads(tmp_path, monkeypatch, capsys):
    # a checkpoint with NaN weights and matching checksums (what a bug or a bad write before hashing leaves):
    # written with the save-time check off
    at_1 = two_checkpoints(str(tmp_path))
    model, optimizer, scheduler = make_run()
    train_step(model, optimizer, scheduler)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    monkeypatch.setattr(checkpoint, "_refuse_non_finite", lambda model, what: None)
    checkpoint.save_checkpoint(str(tmp_path), 3, model, optimizer, scheduler, {"k": 3}, keep=None)
    monkeypatch.undo()
    model, optimizer, scheduler = make_run(seed=9)
    assert checkpoint.load_checkpoint(str(tmp_path), model, optimizer, scheduler) == {"k": 2, "step": 2}
    err = capsys.readouterr().err
    assert "step_00000003" in err and "non-finite values (NaN or inf)" in err, err
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert at_1  # step 1 is still there to fall back to


class Tripwire:
    """Unpickling it runs code (as a crafted checkpoint would); it only records that it ran."""
    ran = []

    def __reduce__(self):
        return (Tripwire.ran.append, ("unpickled",))


def test_optimizer_groups_load_weights_only(tmp_path):
    # DCP's default planner loads param_groups' values with weights_only=False: a crafted group value runs
    model, optimizer, scheduler = make_run()
    train_step(model, optimizer, scheduler)
    optimizer.param_groups[0]["note"] = Tripwire()
    checkpoint.save_checkpoint(str(tmp_path), 1, model, optimizer, scheduler)
    model, optimizer, scheduler = make_run()
    optimizer.param_groups[0]["note"] = None
    with pytest.raises(checkpoint.CheckpointError, match="Weights only load failed|weights_only"):
        checkpoint.load_checkpoint(str(tmp_path), model, optimizer, scheduler)
    assert Tripwire.ran == []


def test_torchs_full_disk_error_is_named_as_one(tmp_path, monkeypatch):
    # torch's zip writer says "unexpected pos 704 vs 598" when the disk fills; the free space says why
    root = str(tmp_path)
    model, optimizer, scheduler = make_run()
    checkpoint.save_checkpoint(root, 1, model, optimizer, scheduler)

    def torch_full(tmp, *args):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint, "_write", torch_full)
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 4096)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_checkpoint(root, 2, model, optimizer, scheduler)
    assert "unexpected pos 704 vs 598" in str(e.value)
    assert f"No space left on device (ENOSPC): 4096 bytes free on the filesystem of {root}" in str(e.value)
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 2**40)  # not full: not said
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_checkpoint(root, 2, model, optimizer, scheduler)
    assert "No space left" not in str(e.value)
