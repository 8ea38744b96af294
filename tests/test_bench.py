"""bench.py runs from a clean checkout (its quickest form, three arms), so its table cannot rot unseen."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_quickest_bench_runs_three_arms_on_the_same_samples(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench.py", "--sections", "rl", "--arms", "sync,sync+stream,sync+ckpt", "--rl_lengths", "equal",
         "--repeats", "1", "--steps", "3", "--prompts_per_step", "2", "--samples_per_prompt", "2",
         "--max_new_tokens", "8", "--micro_batch_size", "4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ, WANDB_MODE="disabled"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["sections"]["rl"]["equal"]
    assert set(runs) == {"sync", "sync+stream", "sync+ckpt"} and all(len(r) == 1 for r in runs.values())
    sync, stream, ckpt = runs["sync"][0], runs["sync+stream"][0], runs["sync+ckpt"][0]
    # equal lengths: every response exactly --max_new_tokens long, 2 prompts x 2 samples per step
    assert sync["tokens_per_step"] == stream["tokens_per_step"] == 2 * 2 * 8
    # judging each group as it ends changes when, not what: the same samples get the same rewards
    assert sync["rewards"] == stream["rewards"] and len(sync["rewards"]) == 3
    # recomputing activations in backward (TRL's default) changes memory, not the update: the same weights sample
    # the same responses, which get the same rewards at every step
    assert ckpt["rewards"] == sync["rewards"]
    assert sync["step_s"] > 0 and "| RL step, equal lengths (32 tokens/step), sync+stream: steps/s vs sync |" in proc.stdout


def test_bad_bench_arms_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "bench.py", "--sections", "rl", "--arms", "async", "--out",
                           str(tmp_path / "b.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--arms async: sync (the baseline)" in proc.stderr
