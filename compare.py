"""The paper's comparison in miniature: the same toy RL run (recipes/cpu_demo.yaml: same seeds, same
budget) with each source of reward, every run graded by the same teacher (rule:math, standing in
for the paper's 72B judge) on the same held-out questions.

    python compare.py                       # 5 reward sources x 1 seed: about 10 minutes on 2 cores
    python compare.py --seeds 0,1,2 --steps 60

Prints a table of teacher-graded held-out accuracy (first eval, before any update, and last) and
writes out_dir/compare.png (the eval curves, mean over seeds) and out_dir/compare.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import config
import metrics

ROOT = Path(__file__).resolve().parent
# name -> (table label, train_rl.py flags on top of the recipe): the paper's Table 3 rows, in miniature
SOURCES = {
    "teacher_binary": ("teacher (rule:math), binary", ["--verifier", "rule:math", "--reward_type", "binary"]),
    "student_binary": ("distilled student, binary (Eq. 3)", ["--verifier", "tiny", "--reward_type", "binary"]),
    "student_soft": ("distilled student, soft (Eq. 4)", ["--verifier", "tiny", "--reward_type", "soft"]),
    "substring": ("rule substring, binary", ["--verifier", "rule:substring", "--reward_type", "binary"]),
    "jaccard": ("rule Jaccard, soft", ["--verifier", "rule:jaccard", "--reward_type", "soft"]),
}


@dataclass
class CompareConfig:
    config: str = field(default="", metadata={"help": "YAML or JSON file of field values; flags override it"})
    recipe: str = field(default="recipes/cpu_demo.yaml", metadata={"help": "the train_rl.py recipe every run shares"})
    seeds: str = field(default="0", metadata={"help": "comma-separated seeds; every source runs with each"})
    steps: int = field(default=60, metadata={"help": "RL steps of every run"})
    eval_every: int = field(default=10, metadata={"help": "steps between teacher-graded evals"})
    eval_samples: int = field(default=8, metadata={
        "help": "answers sampled per held-out question at each eval (0: one greedy answer): finer than 17 greedy ones"})
    sources: str = field(default=",".join(SOURCES), metadata={"help": "comma-separated subset of: " + ", ".join(SOURCES)})
    out_dir: str = field(default="runs/compare", metadata={"help": "one run directory per source and seed, the table"})


def check_config(cfg: CompareConfig) -> None:
    config.require(cfg.steps >= 1, "steps", cfg.steps, "must be >= 1")
    config.require(cfg.eval_every >= 1, "eval_every", cfg.eval_every, "must be >= 1")
    config.require(cfg.eval_samples >= 0, "eval_samples", cfg.eval_samples, "must be >= 0")
    unknown = [s for s in cfg.sources.split(",") if s not in SOURCES]
    config.require(not unknown, "sources", cfg.sources, f"unknown {unknown}; choose from {list(SOURCES)}")
    try:
        [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        config.require(False, "seeds", cfg.seeds, "must be comma-separated integers")


def run_one(cfg: CompareConfig, source: str, seed: int) -> list[tuple[int, float]]:
    """One train_rl.py run (its own process); returns its (step, teacher-graded accuracy) evals."""
    out = Path(cfg.out_dir).resolve() / source / f"seed{seed}"  # train_rl.py runs in the repo (the recipe is relative to it)
    cmd = [sys.executable, str(ROOT / "train_rl.py"), "--config", cfg.recipe, *SOURCES[source][1], "--seed", str(seed),
           "--steps", str(cfg.steps), "--eval_every", str(cfg.eval_every), "--eval_samples", str(cfg.eval_samples),
           "--eval_verifier", "rule:math",
           "--out_dir", str(out), "--wandb_mode", "disabled", "--resume", "auto"]
    print(f"[compare] {source}, seed {seed}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise RuntimeError(f"the run for {source!r}, seed {seed} failed (see above); command: {' '.join(cmd)}")
    return [(r["step"], r["eval/accuracy"]) for r in metrics.read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r]


def table(results: dict[str, list[list[tuple[int, float]]]]) -> str:
    lines = ["| reward source | held-out accuracy, first eval | last eval | change | per seed (first -> last) |",
             "|---|---|---|---|---|"]
    for source, runs in results.items():
        first = sum(r[0][1] for r in runs) / len(runs)
        last = sum(r[-1][1] for r in runs) / len(runs)
        seeds = ", ".join(f"{r[0][1]:.3f} -> {r[-1][1]:.3f}" for r in runs)
        lines.append(f"| {SOURCES[source][0]} | {first:.3f} | {last:.3f} | {last - first:+.3f} | {seeds} |")
    return "\n".join(lines)


def main() -> None:
    try:
        (cfg,) = config.parse_config((CompareConfig,), prog="compare.py")
        check_config(cfg)
    except config.ConfigError as e:
        config.exit_on_error("compare.py", e)
    os.makedirs(cfg.out_dir, exist_ok=True)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    results = {source: [run_one(cfg, source, seed) for seed in seeds] for source in cfg.sources.split(",")}
    curves = {}
    for source, runs in results.items():
        steps = [step for step, _ in runs[0]]
        curves[SOURCES[source][0]] = (steps, [sum(r[i][1] for r in runs) / len(runs) for i in range(len(steps))])
    plot = metrics.plot_curves(Path(cfg.out_dir) / "compare.png", curves, "RL step",
                               "held-out accuracy (graded by rule:math)",
                               f"the same toy run, each reward source (mean of seeds {cfg.seeds})")
    (Path(cfg.out_dir) / "compare.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"[compare] curves: {plot}; numbers: {Path(cfg.out_dir) / 'compare.json'}")


if __name__ == "__main__":
    main()
