"""The GPU path, executed on a CPU: RLVR_GPU_PATH=1 gives a process group even at one rank (as
distributed.init() does on every GPU run), FSDP2 on every model, bf16 compute (CPU bf16 works), gloo.

Two crashes only this path showed: a sharded local verifier under torch.inference_mode (train_rl's
master-key probe at one rank), and sft's held-out eval under inference_mode followed by a training
step. Also: the attention kernel's choice, the root's reshard flag after generate(), the fp32 LM head,
log-prob chunking, the collective timeout.
"""
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rlvr import distributed, model, verifier_prompt, verifiers
from worlds import toy

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "gpu_path_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# On a GPU machine the workers run the real thing (nccl, CUDA): two ranks need two GPUs
two_ranks = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                               reason="two ranks on a GPU machine need two GPUs")


def run(cmd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", **{distributed.GPU_PATH_ENV: "1"})
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def rl_flags(policy, out_dir, **extra):
    # the tiny random model is policy and local verifier (judging, renormalised, what it samples), the
    # KL term loads a frozen reference too: every kind of model a GPU run shards
    f = dict(data="toy", policy=policy, verifier=policy, verifier_paper_defaults=True, soft_mode="ratio",
             verifier_max_unjudged=1.0, prompts_per_step=2,
             samples_per_prompt=2, max_new_tokens=4, micro_batch_size=2, steps=1, lr=1e-3, warmup_ratio=0.0,
             kl_mode="loss", kl_coef=0.01, eval_every=0, eval_prompts=2, eval_verifier="rule:substring",
             out_dir=str(out_dir), wandb_mode="disabled", seed=3,
             master_key_prompts=2) | extra  # the probe is still the verifier's first call, in 34 judgements, not 1088
    return [f"--{k}={v}" for k, v in f.items()]


def check_rl_facts(facts: dict, world: int) -> None:
    assert facts["group"] and facts["world"] == world
    # FSDP2 everywhere, float32 master weights computing in bf16; the verifier loaded in bf16
    assert facts["policy_fsdp"] and facts["policy_master"] == "torch.float32"
    assert facts["policy_compute"] == ["torch.bfloat16"]
    assert facts["verifier_sharded"] and facts["verifier_dtype"] == "torch.bfloat16"
    assert facts["verifier_compute"] == ["torch.bfloat16"]
    for m in facts["history"]:
        assert math.isfinite(m["loss"]) and 0 < m["grad_norm"] < math.inf and m["update/skipped"] == 0


def test_local_verifier_rl_step_in_a_one_rank_group(tiny_model_dir, tmp_path):
    """Plain python on a GPU: a one-rank group. The master-key probe (the sharded verifier's first call)
    crashed here under inference_mode; then rollouts, rewards and an update."""
    run([sys.executable, str(WORKER), "rl", str(tmp_path), *rl_flags(tiny_model_dir, tmp_path)])
    check_rl_facts(json.loads((tmp_path / "facts_rank0.json").read_text()), world=1)
    probe = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert probe["step"] == 0 and 0 <= probe["verifier/master_key_fpr"] <= 1


@two_ranks
def test_local_verifier_rl_steps_on_two_ranks_async(tiny_model_dir, tmp_path):
    """Two ranks, the rollouts sampled one step ahead by a worker process per rank (in bf16, as the
    trainer computes): the second step trains on the batch sampled during the first."""
    run(TORCHRUN + [str(WORKER), "rl", str(tmp_path), *rl_flags(tiny_model_dir, tmp_path, steps=2, async_steps=1)])
    facts = [json.loads((tmp_path / f"facts_rank{r}.json").read_text()) for r in (0, 1)]
    for f in facts:
        check_rl_facts(f, world=2)
        assert [m["rollout/staleness"] for m in f["history"]] == [0, 1]
    # the step's figures are reduced over ranks: both ranks log the same ones
    for a, b in zip(*(f["history"] for f in facts)):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=two_ranks)])
def test_sft_heldout_eval_then_training_steps(tiny_model_dir, tmp_path, nproc):
    """sft's first FSDP2 forward is the held-out eval (the untrained baseline); training steps follow,
    each followed by an eval. With inference_mode the eval failed at one rank, the first step at two."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r.to_json()) + "\n" for r in toy.judge_rows("near:40", 0)))
    (tmp_path / "template.txt").write_text("{response}\n{reference}")
    launcher = TORCHRUN if nproc == 2 else [sys.executable]
    run(launcher + ["train_verifier.py", "sft", "--student", tiny_model_dir, "--data", str(labels), "--out_dir",
                    str(tmp_path / "run"), "--verifier_template", str(tmp_path / "template.txt"),
                    "--verifier_system_prompt", "", "--pack", "false", "--wandb_mode", "disabled", "--batch_size", "8",
                    "--micro_batch_size", "2", "--epochs", "0.5", "--heldout_fraction", "0.3", "--lr", "1e-3",
                    "--eval_every", "1", "--master_key_prompts", "2"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["data/heldout_rows"] > 0
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows[1:])
    # each eval reads the weights as trained so far: the Brier score moves with every step
    briers = [r["eval/brier"] for r in rows]
    assert briers[0] != briers[1] != briers[2]
    assert (tmp_path / "run" / "final" / verifier_prompt.SETTINGS_FILE).exists()


def test_root_keeps_its_parameters_from_forward_to_backward_after_generate(tiny_model_dir, tmp_path):
    """After generate(), one forward + backward gathers the root unit (embeddings, final norm, lm_head)
    once, as FSDP2 does by default, and each decoder layer twice (resharded after forward)."""
    run([sys.executable, str(WORKER), "reshard", str(tmp_path), tiny_model_dir])
    gathers = json.loads((tmp_path / "gathers_rank0.json").read_text())
    assert gathers.pop("root") == 1
    assert gathers == {f"model.layers.{i}": 2 for i in range(4)}


# ----------------------------------------------------------------------------------------------
# in-process: dtypes, the attention kernel, the collective timeout


def test_local_verifiers_load_in_the_compute_dtype(tiny_model_dir, monkeypatch):
    """label, eval and the sft teacher build verifiers with no dtype: the GPU path's is bf16 (what
    flash-attention needs), the CPU path's float32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU machine
    lm = verifiers.build_verifier(tiny_model_dir, verifiers.VerifierOptions(verifier_paper_defaults=True)).model
    assert next(lm.parameters()).dtype == torch.float32
    monkeypatch.setenv(distributed.GPU_PATH_ENV, "1")
    lm = verifiers.build_verifier(tiny_model_dir, verifiers.VerifierOptions(verifier_paper_defaults=True)).model
    assert next(lm.parameters()).dtype == torch.bfloat16 and lm.config._attn_implementation == "sdpa"


def test_eval_with_a_local_verifier_on_the_gpu_path(tiny_model_dir, tmp_path, monkeypatch):
    """train_verifier.py eval (no process group: one process judges) with the verifier in bf16 gives the
    float32 run's figures: the same judgements, a Brier score within the bf16 forward's error. That
    moves a logit by ~1e-2 (4 layers of width 128), p(YES) by ~1% of itself, and this untrained model's
    p(YES) is < 1e-3: the Brier score (mean (p - label)^2) moves by < 2 * 1e-2 * 1e-3."""
    import train_verifier

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r.to_json()) + "\n" for r in toy.judge_rows("near:24", 1)))
    reports = {}
    for path in ("0", "1"):
        monkeypatch.setenv(distributed.GPU_PATH_ENV, path)
        reports[path] = train_verifier.run(["eval", "--verifier", tiny_model_dir, "--data", str(rows), "--out_dir",
                                            str(tmp_path / path), "--wandb_mode", "disabled", "--master_key_prompts",
                                            "4", "--verifier_max_unjudged", "1", "--verifier_paper_defaults"])
    cpu, gpu = reports["0"], reports["1"]
    assert (gpu["tp"], gpu["fp"], gpu["fn"], gpu["tn"], gpu["n"]) == (cpu["tp"], cpu["fp"], cpu["fn"], cpu["tn"], 24)
    assert gpu["brier"] == pytest.approx(cpu["brier"], abs=2e-5) and gpu["brier"] != cpu["brier"]  # bf16 did run


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a given compute capability and an importable flash_attn, as far as
    model.attn_implementation can tell."""
    model._say_once.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    yield capability
    model._say_once.cache_clear()


def test_flash_attention_where_it_can_run(fake_gpu, capsys):
    assert model.attn_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert model.attn_implementation("cuda", torch.float16) == "flash_attention_2"
    assert model.attn_implementation("cpu", torch.bfloat16) == "sdpa"
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("case, reason", [
    ("float32", "it needs fp16 or bf16, the model computes in float32"),
    ("turing", "it needs compute capability >= 8.0 (Ampere), this GPU has 7.5"),
    ("no import", "flash_attn does not import: ModuleNotFoundError"),
    ("bad build", "flash_attn does not import: OSError: undefined symbol: _ZN3c10"),
])
def test_sdpa_and_one_line_when_flash_attention_cannot_run(fake_gpu, monkeypatch, capsys, case, reason):
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    if case == "turing":
        fake_gpu["value"] = (7, 5)
    if case == "no import":
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # None in sys.modules: import raises ImportError
    if case == "bad build":  # a wheel built against another torch fails as it loads its extension
        monkeypatch.delitem(sys.modules, "flash_attn")
        monkeypatch.setattr(sys, "meta_path", [FailingFinder("undefined symbol: _ZN3c10")] + sys.meta_path)
    for _ in range(3):  # every model loaded: sdpa; the reason: said once
        assert model.attn_implementation("cuda", dtype) == "sdpa"
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"attention: sdpa, not flash-attention 2: {reason}")


class FailingFinder:
    """Finds flash_attn and fails to load it, as a build with a mismatched C++ ABI does."""
    def __init__(self, message):
        self.message = message

    def find_spec(self, name, path=None, target=None):
        if name != "flash_attn":
            return None
        import importlib.machinery
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        raise OSError(self.message)

    def exec_module(self, module):
        pass


def test_process_group_waits_out_rank_zero_phases(monkeypatch):
    """A one-rank group on the GPU path, created with a collective timeout longer than NCCL's 10
    minutes (rank 0 alone samples, labels, exports while the others wait)."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # gloo, also on a GPU machine
    monkeypatch.setenv(distributed.GPU_PATH_ENV, "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    assert distributed.init() == (0, 1, torch.device("cpu"))
    (args, kwargs), = calls
    assert args == ("gloo",) and kwargs["world_size"] == 1
    assert kwargs["timeout"] == distributed.COLLECTIVE_TIMEOUT and distributed.COLLECTIVE_TIMEOUT.total_seconds() > 3600


# ----------------------------------------------------------------------------------------------
# log-probs: the fp32 LM head, chunking


def test_fp32_head_gives_a_bf16_model_its_exact_logprobs(tiny_model_dir):
    """The reference: log_softmax in float64 of the bf16 model's own hidden states and output weights
    (what the bf16 model computes, without rounding). With the fp32 head only float32 rounding is left:
    a dot product of H terms errs by at most gamma_H * sum|h_i w_i| (gamma_H = H u / (1 - H u), u = 2^-24;
    products of bf16 numbers are exact in float32), log_softmax passes twice a logit's error on (the
    target's and logsumexp's, which is 1-Lipschitz), plus float32 rounding of its own few operations on
    values up to max|z| + log V. Rounding logits to bf16 (u = 2^-9) errs far more."""
    torch.manual_seed(0)
    lm = model.load_model(tiny_model_dir, dtype=torch.bfloat16)
    seqs = [torch.randint(3, lm.config.vocab_size, (40,)).tolist() for _ in range(4)]
    ids, pos, att, tmask = model.rows(seqs, [[False] * 5 + [True] * 35] * 4, False, 0)
    with torch.no_grad():
        fp32, _ = model.token_logprobs(lm, ids, pos, tmask, att, fp32_head=True)
        bf16, _ = model.token_logprobs(lm, ids, pos, tmask, att, fp32_head=False)
        h = lm.model(input_ids=ids, position_ids=pos, attention_mask=att).last_hidden_state[:, :-1].double()
    w = lm.get_output_embeddings().weight.detach().double()
    z = h @ w.t()
    sel = tmask[:, 1:]
    ref = z.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)[sel]
    u, n = 2.0 ** -24, h.shape[-1]
    s = (h.abs() @ w.abs().t()).max().item()
    tol = 2 * (n * u / (1 - n * u)) * s + 16 * u * (z.abs().max().item() + math.log(z.shape[-1]))
    err_fp32 = (fp32[:, 1:][sel].double() - ref).abs().max().item()
    err_bf16 = (bf16[:, 1:][sel].double() - ref).abs().max().item()
    assert err_fp32 <= tol
    assert err_bf16 > 10 * tol  # measured: ~1.6e-3 against tol ~3e-5 (this random model's logits are < 1.3)


def test_logprob_chunk_is_honoured_at_a_large_vocabulary(monkeypatch):
    """--logprob_chunk rows per vocabulary block, whatever the vocabulary (a 2^24-element cap once
    made it ~110 rows at Qwen's 151,936). The values do not depend on the chunking."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=1 << 16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    lm = transformers.Qwen2ForCausalLM(cfg).eval()
    ids, pos, att, tmask = model.rows([list(range(3, 303))] * 2, [[False] + [True] * 299] * 2, False, 0)
    calls, chunk = [], model._chunk_logprobs
    monkeypatch.setattr(model, "_chunk_logprobs", lambda h, *a: calls.append(len(h)) or chunk(h, *a))
    with torch.no_grad():
        whole, _ = model.token_logprobs(lm, ids, pos, tmask, att, chunk_size=1000)
        assert calls == [598]  # 2 x 299 targets, under 1000: one block (a cap at 2^24 / 2^16 = 256 rows: three)
        calls.clear()
        split, _ = model.token_logprobs(lm, ids, pos, tmask, att, chunk_size=250)
    assert calls == [250, 250, 98]
    assert torch.allclose(whole, split, atol=1e-5)  # float32 log-probs of O(1): only the matmul's blocking may differ


def test_peak_memory_reports_allocated_reserved_and_the_whole_device(monkeypatch):
    from rlvr import metrics

    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 36 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))  # (free, total)
    assert metrics.peak_memory("cuda") == {"memory/peak_gb": 30.0, "memory/peak_reserved_gb": 36.0,
                                           "memory/device_used_gb": 60.0}
    assert list(metrics.peak_memory("cpu")) == ["memory/peak_gb"]  # the peak resident set: all of it


def test_bench_runs_every_arm_on_the_cpu_path(monkeypatch):
    """TRL's arm is configured for the CPU: ours must not take a GPU (or the GPU path) where one exists."""
    import bench

    monkeypatch.setenv(distributed.GPU_PATH_ENV, "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    env = bench.worker_env(1)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and distributed.GPU_PATH_ENV not in env and env["OMP_NUM_THREADS"] == "1"
