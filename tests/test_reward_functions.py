"""reward_functions.py: a TRL user's reward functions run unchanged (keyword arguments with the data set's
columns, several with weights, any finite float, a file path), told apart from the project's judges by
their parameter names, and checked on real rows before any model loads. Written as the user's commands."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import train_rl
from rlvr import config, remote, reward_functions, verifiers

ROOT = Path(__file__).resolve().parents[1]

REWARDS = '''
import json, os

def accuracy(prompts, completions, solution, **kwargs):
    with open(os.environ["CALLS"], "a") as f:  # what TRL's contract promises, seen from inside
        f.write(json.dumps({"prompts": prompts[:1], "completions": completions[:1], "solution": solution[:1],
                            "kwargs": sorted(kwargs), "subject": kwargs.get("subject", [None])[:1]}) + "\\n")
    return [1.0 if s in c else 0.0 for c, s in zip(completions, solution)]

def brevity(completions, **kwargs):  # outside [0, 1]: negative
    return [-len(c) / 10 for c in completions]

def chat_accuracy(prompts, completions, solution, **kwargs):  # TRL's conversational form
    return [1.0 if s in c[0]["content"] else 0.0 for c, s in zip(completions, solution)]

def positional(prompt, completion, answer):  # neither convention: would get the reference as the completion
    return [0.0] * len(completion)

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def wants_answer(prompts, completions, answer):  # a column the data set does not have
    return [0.0] * len(completions)

def questions_judge(questions, references, responses):  # the project's own form: still a judge
    return [float(r == a) for r, a in zip(references, responses)]
'''


def write_data(path, conversational=False, n=12):
    with open(path, "w") as f:
        for i in range(n):
            q = f"What is {i} + {i}?"
            prompt = [{"role": "user", "content": q}] if conversational else q
            f.write(json.dumps({"prompt": prompt, "solution": str(2 * i), "subject": "sums"}) + "\n")
    return path


def rl(tiny_model_dir, tmp_path, *extra, data=None):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    data = data or write_data(tmp_path / "data.jsonl")
    args = ["--data", str(data), "--prompt_field", "prompt", "--answer_field", "solution", "--policy",
            str(tiny_model_dir), "--eval_verifier", "rule:substring", "--audit_verifier", "", "--log_verifiers", "",
            "--steps", "1", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--max_new_tokens", "4",
            "--micro_batch_size", "4", "--eval_every", "0", "--eval_prompts", "2", "--eval_samples", "0",
            "--master_key_prompts", "0", "--heldout_fraction", "0.2", "--wandb_mode", "disabled",
            "--out_dir", str(tmp_path / "run"), *extra]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CALLS": str(tmp_path / "calls"),
           "HOME": str(tmp_path), **{k: v for k, v in __import__("os").environ.items() if k.startswith("RLVR_")}}
    return subprocess.run([sys.executable, str(ROOT / "train_rl.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=900)


def test_trl_functions_from_a_file_are_summed_with_their_weights(tiny_model_dir, tmp_path):
    out = rl(tiny_model_dir, tmp_path, "--verifier", "py:my_rewards.py:accuracy,py:my_rewards.py:brevity",
             "--reward_weights", "1,0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:  # the reward is 1 * accuracy + 0.5 * brevity, computed here by hand from the response
        by_hand = float(r["reference"] in r["response"]) + 0.5 * (-len(r["response"]) / 10)
        assert r["reward"] == pytest.approx(by_hand, abs=1e-6)
    assert any(r["reward"] < 0 for r in rows) or all(r["response"] == "" for r in rows)
    # each function logged on its own, unweighted (TRL's rewards/<function>/mean), without a second call
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]
    acc = sum(float(r["reference"] in r["response"]) for r in rows) / 4
    assert m["reward/py:my_rewards.py:accuracy/soft_mean"] == pytest.approx(acc, abs=1e-6)
    assert m["reward/py:my_rewards.py:brevity/soft_mean"] == pytest.approx(
        sum(-len(r["response"]) / 10 for r in rows) / 4, abs=1e-6)
    calls = [json.loads(x) for x in (tmp_path / "calls").read_text().splitlines()]
    assert len(calls) == 2  # the check on real rows, then the one step's batch
    first = calls[0]  # the check on real rows, before any model loaded: the data set's columns by name
    assert first["prompts"][0].startswith("What is ") and first["solution"][0].isdigit()
    assert isinstance(first["completions"][0], str) and first["subject"] == ["sums"]
    assert sorted(first["kwargs"]) == ["subject"]  # the data set's columns only: not where the row came from


def test_conversational_data_gets_messages_as_trl_passes_them(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "chat.jsonl", conversational=True)
    out = rl(tiny_model_dir, tmp_path, "--verifier", "py:my_rewards.py:chat_accuracy", data=data)
    assert out.returncode == 0, out.stderr[-3000:]
    # the same function on string completions: one line naming the expected form, before any model loads
    out = rl(tiny_model_dir, tmp_path, "--verifier", "py:my_rewards.py:chat_accuracy", "--overwrite")
    last = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(last) == 1 and "raised TypeError" in last[0] and \
        "completions as strings" in last[0] and "fn(prompts, completions, **kwargs)" in last[0], out.stderr


@pytest.mark.parametrize("fn, message", [
    ("positional", "are neither fn(prompts, completions, **kwargs)"),
    ("nan", "returned nan for completion 0"),
    ("wants_answer", "missing 1 required positional argument: 'answer'"),
])
def test_a_function_that_cannot_run_is_one_line_before_any_model_loads(tiny_model_dir, tmp_path, fn, message):
    out = rl(tiny_model_dir, tmp_path, "--verifier", f"py:my_rewards.py:{fn}")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0] and f"my_rewards.py:{fn}" in lines[0], \
        out.stderr
    assert lines[0].startswith("train_rl.py: error: --verifier")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_weights_must_match_the_functions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS)

    with pytest.raises(config.ConfigError, match=r"--reward_weights '1': 1 weights for 2 reward function"):
        train_rl.parse_config(["--verifier", "py:my_rewards:accuracy,py:my_rewards:brevity", "--reward_weights", "1"])
    with pytest.raises(config.ConfigError, match="--reward_weights '1,2': weighs the py: reward functions"):
        train_rl.parse_config(["--verifier", "rule:exact", "--reward_weights", "1,2"])


def test_the_projects_judges_keep_their_form_and_nothing_is_swapped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    judge = verifiers.build_verifier("py:my_rewards:questions_judge")
    assert isinstance(judge, verifiers.PyVerifier)
    assert judge(["q", "q"], ["7", "7"], ["7", "8"]).binary.tolist() == [1.0, 0.0]
    trl = verifiers.build_verifier("py:my_rewards.py:brevity,py:my_rewards:brevity")  # a file and a module
    assert isinstance(trl, reward_functions.RewardFunctions)
    j = trl(["What is 3 + 4?"] * 2, ["7", "7"], ["it is 7", "8"])
    assert j.soft.tolist() == pytest.approx([-1.4, -0.2]) and j.binary.tolist() == [0.0, 0.0]  # weights 1 each
    # without the data set's rows (train_verifier.py's judged rows) the reference is the column `reference`
    with pytest.raises(remote.VerifierError, match="missing 1 required positional argument: 'solution'.* the "
                                                   "columns reference$"):
        verifiers.build_verifier("py:my_rewards:accuracy")(["q"], ["7"], ["7"])
    with pytest.raises(ValueError, match="fn\\(questions, references, responses\\)"):
        verifiers.build_verifier("py:my_rewards:positional")
    with pytest.raises(ValueError, match="no such file"):
        verifiers.build_verifier("py:missing.py:f")
