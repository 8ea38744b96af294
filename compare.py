"""The paper's comparison in miniature: the same RL run (recipes/cpu_demo.yaml: same warm start, seeds
and budget) with each source of reward, and SFT on the references with as many optimizer steps x
sequences, every run graded by the same teacher on the same held-out questions; then how far the
judges agree on the runs' own responses.

    python compare.py --seeds 0,1,2         # 10 sources x 3 seeds: each run a train_rl.py process (about a
                                            # minute each at --steps 40, OMP_NUM_THREADS=1, 2 loaded cores)
    python compare.py --seeds 0,1,2 --sources rlpr,verifree,hybrid   # no verifier (verifier_free.py), hybrid routing

Writes to out_dir: one run directory per source and seed, compare.json (every eval of every run, the
spread over seeds, the agreement figures, the paper's six claims), compare.png (the eval curves, mean
over seeds), and prints the tables the README shows.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import train_rl
import worlds
from rlvr import audit, claim_stats, config, metrics, rl_config, verifiers

ROOT = Path(__file__).resolve().parent
TEACHER = "py:worlds.freeform:teacher"
SAMPLED_C = ["--verifier_sample", "true"]  # the paper samples the verifier's first token c (Eq. 3 and Eq. 4 read it)
# name -> (table label, train_rl.py flags on top of the recipe; None: the SFT baseline): the paper's Table 3 rows
SOURCES = {
    "rule_substring": ("rule substring, binary", ["--verifier", "rule:substring", "--reward_type", "binary"]),
    "rule_exact": ("rule exact match, binary", ["--verifier", "rule:exact", "--reward_type", "binary"]),
    "rule_jaccard": ("rule Jaccard, soft", ["--verifier", "rule:jaccard", "--reward_type", "soft"]),
    "teacher_binary": ("teacher, binary (= soft: a 0/1 judge)", ["--verifier", TEACHER, "--reward_type", "binary"]),
    # a 0/1 judge's Eq. 4 is its Eq. 3: the same rewards, so the same run (not in the default --sources)
    "teacher_soft": ("teacher, soft (= binary: a 0/1 judge)", ["--verifier", TEACHER, "--reward_type", "soft"]),
    "student_binary": ("distilled student, binary (Eq. 3, sampled c)",
                       ["--verifier", "tiny", "--reward_type", "binary", *SAMPLED_C]),
    "student_soft": ("distilled student, soft (Eq. 4, sampled c)",
                     ["--verifier", "tiny", "--reward_type", "soft", *SAMPLED_C]),
    # no verifier: the policy's own probability of the reference after its reasoning (verifier_free.py)
    "rlpr": ("RLPR: policy's mean token probability of the reference, debiased", ["--verifier", "policy:rlpr",
                                                                                   "--reward_type", "soft"]),
    "verifree": ("VeriFree: policy's likelihood of the reference", ["--verifier", "policy:verifree",
                                                                     "--reward_type", "soft"]),
    # rule:math where reference and answer are mathematics, the student elsewhere (verifiers.HybridVerifier)
    "hybrid": ("hybrid: rule:math on math rows, the student elsewhere, soft (sampled c)",
               ["--verifier", "hybrid:tiny", "--reward_type", "soft", *SAMPLED_C]),
    "sft": ("SFT on the references", None),
}
RULE_SOURCES = ("rule_substring", "rule_exact", "rule_jaccard")
# judges of the agreement table: name -> (verifier spec, threshold on its soft score; None: its binary)
JUDGES = {
    "teacher": (TEACHER, None),
    "noisy teacher": ("py:worlds.freeform:teacher_noisy10", None),  # 10% of the teacher's labels flipped
    "student": ("tiny", None),
    "rule:substring": ("rule:substring", None),
    "rule:exact": ("rule:exact", None),
    "rule:jaccard>=0.5": ("rule:jaccard", 0.5),
    "rule:math": ("rule:math", None),
}
# claim 6's judges: independent ones only. The noisy teacher is the teacher with 10% of its labels flipped, not
# a second judge: it agrees with the teacher by construction, so it is shown in the Cohen table, not counted here
MODEL_JUDGES = ("teacher", "student")
KAPPA_HIGH = 0.8  # "almost perfect" agreement (Landis & Koch 1977), fixed before any run: claim 6's bar
BOOTSTRAP = 1000  # resamples of the agreement rows for Fleiss' kappa's interval (seeded)


@dataclass
class CompareConfig:
    config: str = field(default="", metadata={"help": "YAML or JSON file of field values; flags override it"})
    recipe: str = field(default="recipes/cpu_demo.yaml", metadata={
        "help": "the train_rl.py recipe every run shares (relative to the repository, or absolute)"})
    seeds: str = field(default="0", metadata={"help": "comma-separated seeds; every source runs with each"})
    steps: int = field(default=0, metadata={"help": "RL steps of every run (0: the recipe's); SFT takes as many"})
    eval_every: int = field(default=10, metadata={"help": "steps between teacher-graded evals"})
    eval_samples: int = field(default=-1, metadata={
        "help": "answers sampled per held-out question at each eval (0: one greedy answer; -1: the recipe's)"})
    sources: str = field(default=",".join(s for s in SOURCES if s != "teacher_soft"), metadata={
        "help": "comma-separated subset of: " + ", ".join(SOURCES) + " (teacher_soft repeats teacher_binary: its "
                "0/1 judgements make Eq. 4 equal Eq. 3)"})
    judges: str = field(default=",".join(JUDGES), metadata={
        "help": "comma-separated judges of the agreement table ('': none), a subset of: " + ", ".join(JUDGES)})
    agreement_rows: int = field(default=2000, metadata={
        "help": "responses drawn (seeded) from the RL runs' rollouts.jsonl for the agreement table (0: all)"})
    sft_lr: float = field(default=0.0, metadata={"help": "AdamW learning rate of the SFT baseline (0: the recipe's --lr)"})
    min_effect: float = field(default=claim_stats.MIN_EFFECT, metadata={
        "help": "how a claim 'a beats b' is decided: per seed, a's teacher-graded end accuracy minus b's on the same "
                "held-out questions (eval_questions.jsonl); a paired t-test over the seeds gives an interval at level 0.95 "
                "(simultaneous over a claim's pairs, Bonferroni). reproduced: the interval above 0 and the mean "
                "difference >= min_effect; contradicted: below 0 and <= -min_effect; inconclusive otherwise (one seed "
                "always: no interval; a tie is never a win). Claim 4 (close): reproduced when the student-minus-"
                "teacher interval lies above -min_effect, contradicted when below it. Claim 6: Fleiss' kappa of the "
                "independent judges (teacher, student) with a bootstrap interval over the responses against 0.8"})
    out_dir: str = field(default="runs/compare", metadata={"help": "one run directory per source and seed, the tables"})


def check_config(cfg: CompareConfig) -> None:
    config.require(cfg.steps >= 0, "steps", cfg.steps, "must be >= 0 (0: the recipe's)")
    config.require(cfg.eval_every >= 1, "eval_every", cfg.eval_every, "must be >= 1")
    config.require(cfg.eval_samples >= -1, "eval_samples", cfg.eval_samples, "must be >= 0, or -1 for the recipe's")
    config.require(cfg.agreement_rows >= 0, "agreement_rows", cfg.agreement_rows, "must be >= 0 (0: all)")
    config.require(cfg.sft_lr >= 0, "sft_lr", cfg.sft_lr, "must be >= 0 (0: the recipe's --lr)")
    config.require(0 <= cfg.min_effect < 1, "min_effect", cfg.min_effect, "must be in [0, 1) (held-out accuracy)")
    unknown = [s for s in cfg.sources.split(",") if s not in SOURCES]
    config.require(not unknown, "sources", cfg.sources, f"unknown {unknown}; choose from {list(SOURCES)}")
    unknown = [j for j in filter(None, cfg.judges.split(",")) if j not in JUDGES]
    config.require(not unknown, "judges", cfg.judges, f"unknown {unknown}; choose from {list(JUDGES)}")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        seeds = None
    config.require(seeds is not None, "seeds", cfg.seeds, "must be comma-separated integers")
    config.require(len(set(seeds)) == len(seeds), "seeds", cfg.seeds, "has a seed twice")
    config.require((ROOT / cfg.recipe).is_file(), "recipe", cfg.recipe, f"no such file (in {ROOT})")


def recipe_config(cfg: CompareConfig) -> rl_config.Config:
    """The recipe as train_rl.py reads it, with compare's budget on top: what every run shares."""
    args = ["--config", str(ROOT / cfg.recipe)]
    if cfg.steps:
        args += ["--steps", str(cfg.steps)]
    if cfg.eval_samples >= 0:
        args += ["--eval_samples", str(cfg.eval_samples)]
    rl, _ = train_rl.parse_config(args + ["--eval_every", str(cfg.eval_every)])
    return rl


def world_spec(spec: str, data: str) -> str:
    """A spec of SOURCES or JUDGES as the recipe's world names it: the free-form teacher's (TEACHER,
    TEACHER + "_noisy10") become the world's own py: teacher's (py:worlds.pretrained:teacher for --data pretrained)."""
    teacher = worlds.WORLDS[data].teacher if data in worlds.WORLDS else TEACHER
    return teacher + spec[len(TEACHER):] if spec.startswith(TEACHER) and teacher.startswith("py:") else spec


def train_rl_command(cfg: CompareConfig, rl: rl_config.Config, flags: list[str], seed: int, out: Path) -> list[str]:
    """A train_rl.py run of the shared recipe: compare's budget, the teacher as grader, `flags` on top."""
    teacher = world_spec(TEACHER, rl.data)
    return [sys.executable, str(ROOT / "train_rl.py"), "--config", str(ROOT / cfg.recipe),
            *[world_spec(f, rl.data) for f in flags], "--seed", str(seed),
            "--steps", str(rl.steps), "--eval_every", str(rl.eval_every), "--eval_samples", str(rl.eval_samples),
            "--eval_verifier", teacher, "--audit_verifier", teacher,
            "--out_dir", str(out), "--wandb_mode", "disabled", "--resume", "auto"]


def evals_of(out: Path) -> list[dict]:
    """A run's evals: [{"step", "accuracy", "subjects": {subject: accuracy}}] from its metrics.jsonl."""
    prefix = "eval/accuracy/"
    return [{"step": r["step"], "accuracy": r["eval/accuracy"],
             "subjects": {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}}
            for r in metrics.read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r]


def questions_of(out: Path) -> dict[str, float]:
    """A run's last eval, question by question: {question: share of its answers graded right}, from its
    eval_questions.jsonl (train_rl.py writes it; the last rows of the last step win, as a rerun appends)."""
    path = out / "eval_questions.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no per-question evals (a run from before train_rl.py wrote them): remove "
                                f"{out} and rerun compare.py to run it again")
    rows = metrics.read_jsonl(path)
    last = rows[-1]["step"]
    return {r["question"]: r["correct"] / r["answers"] for r in rows if r["step"] == last}


def run(cmd: list[str], what: str) -> None:
    print(f"[compare] {what}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise RuntimeError(f"{what} failed (see above); command: {' '.join(cmd)}")


def run_rl(cfg: CompareConfig, rl: rl_config.Config, source: str, seed: int) -> list[dict]:
    """One train_rl.py run (its own process); its teacher-graded evals."""
    out = Path(cfg.out_dir).resolve() / source / f"seed{seed}"
    finished = (out / "final" / "config.json").exists() and evals_of(out) and evals_of(out)[-1]["step"] == rl.steps
    if not finished:  # a rerun of compare (more seeds, the tables again) skips the runs it has
        run(train_rl_command(cfg, rl, SOURCES[source][1], seed, out), f"{source}, seed {seed}")
    return evals_of(out)


# ----------------------------------------------------------------------------------------------
# the SFT baseline: the same warm start, supervised on the training questions' references


def sft_pairs(rl: rl_config.Config) -> list[tuple[list[dict], str]]:
    """(messages, reference) for every training question of the free-form world (or the pretrained
    world, the same questions), split as train_rl.py splits it (never a held-out question): the SFT
    baseline learns the expert's answers."""
    from worlds import freeform

    config.require(rl.data in ("freeform", "pretrained") and not rl.eval_data and not rl.exclude_hashes, "recipe",
                   rl.data, "the SFT baseline knows the free-form world's split only (--data freeform or pretrained, "
                   "no --eval_data or --exclude_hashes)")
    train, _ = freeform.split(worlds.WORLDS[rl.data].records(0), rl.heldout_fraction)
    return freeform.sft_pairs(train)


def run_sft(cfg: CompareConfig, rl: rl_config.Config, seed: int) -> list[dict]:
    """Evaluate the warm start (train_rl.py --eval_only, which also resolves the recipe's policy), train
    it for rl.steps optimizer steps of prompts_per_step x samples_per_prompt sequences (the RL run's
    steps x batch) on the references, save it, evaluate it the same way: [start eval, end eval]."""
    import torch

    from rlvr import model
    from worlds import toy

    out = Path(cfg.out_dir).resolve() / "sft" / f"seed{seed}"
    grader = ["--verifier", world_spec(TEACHER, rl.data)]  # --eval_only loads the reward verifier too: the teacher costs nothing
    # --eval_only writes into OUT/eval_only (it never touches a run's own files); a rerun of compare skips it
    done = lambda d: (d / "eval_only" / "metrics.jsonl").exists() and evals_of(d / "eval_only")  # noqa: E731
    if not (out / "final" / "config.json").exists():
        if not done(out / "start"):
            run(train_rl_command(cfg, rl, grader + ["--eval_only", "true"], seed, out / "start"),
                f"sft, seed {seed}: warm start")
        policy_path = json.loads((out / "start" / "eval_only" / "config.json").read_text())["policy_path"]
        torch.manual_seed(seed)
        lm = model.load_model(policy_path)
        tokenizer = model.load_tokenizer(policy_path)
        batch = rl.prompts_per_step * rl.samples_per_prompt
        print(f"[compare] sft, seed {seed}: {rl.steps} steps x {batch} sequences from {policy_path}", flush=True)
        losses = toy.supervised_warm_start(lm, tokenizer, sft_pairs(rl), rl.steps, seed, batch_size=batch,
                                           lr=cfg.sft_lr or rl.lr)
        print(f"[compare] sft, seed {seed}: loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
        lm.save_pretrained(out / "final", safe_serialization=True)
        tokenizer.save_pretrained(out / "final")
    if not done(out / "end"):
        run(train_rl_command(cfg, rl, grader + ["--eval_only", "true", "--policy", str(out / "final")], seed,
                             out / "end"), f"sft, seed {seed}: eval")
    start, end = evals_of(out / "start" / "eval_only")[-1], evals_of(out / "end" / "eval_only")[-1]
    return [start | {"step": 0}, end | {"step": rl.steps}]


# ----------------------------------------------------------------------------------------------
# the table: mean and spread over seeds, overall and per subject


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(results: dict[str, list[list[dict]]]) -> dict:
    """{source: {"start", "end", "change": spread over seeds, "per_seed": [(start, end)], "subjects":
    {subject: {"end", "change"}}}}; start and end are each run's first and last eval."""
    out = {}
    for source, runs in results.items():
        subjects = sorted({s for r in runs for s in r[-1]["subjects"]})
        out[source] = {
            "start": spread([r[0]["accuracy"] for r in runs]), "end": spread([r[-1]["accuracy"] for r in runs]),
            "change": spread([r[-1]["accuracy"] - r[0]["accuracy"] for r in runs]),
            "per_seed": [(r[0]["accuracy"], r[-1]["accuracy"]) for r in runs],
            "subjects": {s: {"end": spread([r[-1]["subjects"][s] for r in runs]),
                             "change": spread([r[-1]["subjects"][s] - r[0]["subjects"][s] for r in runs])}
                         for s in subjects}}
    return out


def fmt_spread(s: dict, signed: bool = False) -> str:
    """"0.512 ± 0.031 (0.480-0.540)"; one seed: the value alone."""
    f = "{:+.3f}" if signed else "{:.3f}"
    if s["std"] is None:
        return f.format(s["mean"])
    return f"{f.format(s['mean'])} ± {s['std']:.3f} ({f.format(s['min'])} to {f.format(s['max'])})"


def table(summary: dict) -> str:
    lines = ["| reward source | held-out accuracy, start | end: mean ± std (min to max) | change | per seed (start -> end) |",
             "|---|---|---|---|---|"]
    for source, s in summary.items():
        seeds = ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in s["per_seed"])
        lines.append(f"| {SOURCES[source][0]} | {s['start']['mean']:.3f} | {fmt_spread(s['end'])} | "
                     f"{fmt_spread(s['change'], signed=True)} | {seeds} |")
    return "\n".join(lines)


def subject_table(summary: dict) -> str:
    """End accuracy per subject, mean ± std over seeds, and its change from the start."""
    subjects = sorted({sub for s in summary.values() for sub in s["subjects"]})
    lines = ["| reward source | " + " | ".join(subjects) + " |", "|---|" + "---|" * len(subjects)]
    for source, s in summary.items():
        cells = []
        for sub in subjects:
            x = s["subjects"].get(sub)
            if x is None:
                cells.append("-")
                continue
            std = "" if x["end"]["std"] is None else f" ± {x['end']['std']:.3f}"
            cells.append(f"{x['end']['mean']:.3f}{std} ({x['change']['mean']:+.3f})")
        lines.append(f"| {SOURCES[source][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# agreement: every judge on the same responses (the RL runs' own rollouts)


def sample_rollouts(paths: list[Path], n: int, seed: int = 0) -> list[dict]:
    """`n` rows (all when n = 0 or fewer exist) drawn without replacement, seeded, from rollouts.jsonl files."""
    rows = [r for p in paths for r in metrics.read_jsonl(p)]
    return rows if not n or n >= len(rows) else random.Random(seed).sample(rows, n)


def judge_all(judges: dict[str, tuple], rows: list[dict], student: str) -> dict[str, list[int]]:
    """Each judge's 0/1 verdicts on `rows` (greedy c, the verifier's saved settings: as eval judges)."""
    qs, refs, texts = [r["question"] for r in rows], [r["reference"] for r in rows], [r["response"] for r in rows]
    out = {}
    for name, (spec, threshold) in judges.items():
        v = verifiers.build_verifier(student if spec == "tiny" else spec, settings_from_flags=False)
        j = v(qs, refs, texts)
        out[name] = [int(x) for x in ((j.soft >= threshold) if threshold is not None else j.binary.bool()).tolist()]
    return out


def fleiss_interval(verdicts: dict[str, list[int]], seed: int = 0) -> dict:
    """Fleiss' kappa of judges' 0/1 verdicts on the same rows and its percentile bootstrap interval
    (BOOTSTRAP resamples of the rows, seeded): {"kappa", "lo", "hi", "rows", "judges"}."""
    n = len(next(iter(verdicts.values())))
    kappa = lambda idx: audit.fleiss_kappa(audit.binary_counts({k: [v[i] for i in idx] for k, v in verdicts.items()}))  # noqa: E731
    lo, hi = claim_stats.bootstrap_interval(n, kappa, BOOTSTRAP, seed)
    return {"kappa": kappa(range(n)), "lo": lo, "hi": hi, "rows": n, "judges": list(verdicts)}


def agreement_table(verdicts: dict[str, list[int]]) -> tuple[str, dict, dict | None]:
    """The Cohen's kappa matrix (markdown), {"a vs b": kappa}, and fleiss_interval over the independent
    model judges present (MODEL_JUDGES; None with fewer than two, or when every verdict is the same)."""
    pairs = audit.pairwise_kappa(verdicts)
    names = list(verdicts)
    cell = lambda k: "-" if k is None else f"{k:.3f}"  # noqa: E731
    lines = ["| Cohen's kappa | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        row = []
        for b in names:
            k = 1.0 if a == b else pairs.get((a, b), pairs.get((b, a)))
            row.append(cell(k))
        lines.append(f"| {a} (YES {sum(verdicts[a]) / max(1, len(verdicts[a])):.2f}) | " + " | ".join(row) + " |")
    model = {n: verdicts[n] for n in MODEL_JUDGES if n in verdicts}
    fleiss = fleiss_interval(model) if len(model) >= 2 else None
    if fleiss is not None and fleiss["kappa"] is None:
        fleiss = None
    return "\n".join(lines), {f"{a} vs {b}": k for (a, b), k in pairs.items()}, fleiss


# ----------------------------------------------------------------------------------------------
# the paper's six claims, each as pairs (a, b) that claim a > b on end accuracy, seed by seed


def paired_diffs(questions: dict[str, list[dict]], a: str, b: str) -> list[float]:
    """Per seed: the mean over the held-out questions of a's share of answers graded right minus b's
    (= a's end accuracy minus b's); a seed's two runs must have been graded on the same questions."""
    diffs = []
    for i, (qa, qb) in enumerate(zip(questions[a], questions[b], strict=True)):
        if set(qa) != set(qb):
            raise ValueError(f"seed #{i}: {a} and {b} were graded on different held-out questions "
                             f"({len(set(qa) ^ set(qb))} not shared): the pairs of a claim need the same ones")
        diffs.append(statistics.fmean(qa[q] - qb[q] for q in qa))
    return diffs


def ordering(questions: dict[str, list[dict]], a: str, b: str, pairs: int = 1,
             min_effect: float = claim_stats.MIN_EFFECT) -> dict:
    """"a beats b", one of a claim's `pairs`: the paired t-test of the per-seed differences (its interval
    simultaneous over the claim's pairs), how many seeds have a strictly above b, and the verdict."""
    diffs = paired_diffs(questions, a, b)
    test = claim_stats.paired_t(diffs, claim_stats.simultaneous_level(pairs))
    return {"a": a, "b": b, "per_seed": diffs, "wins": sum(d > 0 for d in diffs), **test,
            "verdict": claim_stats.decide_beats(test, min_effect)}


def fmt_test(o: dict) -> str:
    """"a - b = +0.030 [-0.010, +0.070], p 0.12, a > b in 2/3 seeds"; one seed: no interval."""
    ci = "no interval (one seed)" if o["lo"] is None else f"[{o['lo']:+.3f}, {o['hi']:+.3f}], p {o['p']:.3g}"
    return f"{o['a']} - {o['b']} = {o['mean']:+.3f} {ci}, a > b in {o['wins']}/{len(o['per_seed'])} seeds"


CLAIMS = [
    ("1. model-based rewards beat rule-based ones on free-form answers",
     [(m, r) for m in ("teacher_binary", "student_soft") for r in RULE_SOURCES]),
    ("2. with rules, binary beats soft", [("rule_substring", "rule_jaccard"), ("rule_exact", "rule_jaccard")]),
    ("3. with a model verifier, soft beats binary", [("student_soft", "student_binary")]),
    ("5. RL beats SFT on the same data", [("student_soft", "sft"), ("teacher_binary", "sft")]),
]


def claims(questions: dict[str, list[dict]], kappas: dict, fleiss: dict | None,
           min_effect: float = claim_stats.MIN_EFFECT) -> list[dict]:
    """The paper's six claims against this run: [{"claim", "verdict", "evidence"}] from the per-seed,
    per-question end evals `questions` ({source: [{question: share right} per seed]}, seeds in the same
    order): claims 1-3 and 5 by `ordering` (all pairs reproduced, or any contradicted), claim 4 by the
    student's non-inferiority to its teacher within min_effect, claim 6 by Fleiss' kappa of the
    independent judges (`fleiss`: agreement_table's) against KAPPA_HIGH. A claim whose sources (or
    judges) did not run is left out."""
    out = []
    for text, pairs in CLAIMS:
        if all(a in questions and b in questions for a, b in pairs):
            orders = [ordering(questions, a, b, len(pairs), min_effect) for a, b in pairs]
            evidence = "; ".join(f"{fmt_test(o)}: {o['verdict']}" for o in orders) if len(orders) > 1 else fmt_test(orders[0])
            out.append({"claim": text, "verdict": claim_stats.combine([o["verdict"] for o in orders]),
                        "evidence": evidence})
    if "student_soft" in questions and "teacher_binary" in questions:
        diffs = paired_diffs(questions, "student_soft", "teacher_binary")
        test = claim_stats.paired_t(diffs)
        o = {"a": "student_soft", "b": "teacher_binary", "per_seed": diffs, "wins": sum(d > 0 for d in diffs), **test}
        out.append({"claim": "4. the distilled small verifier comes close to its large teacher",
                    "verdict": claim_stats.decide_close(test, min_effect),
                    "evidence": f"{fmt_test(o)}; close: the interval above -{min_effect:g}"})
    if fleiss is not None:
        shown = "; ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in kappas.items()
                          if k.split(" vs ")[0] in MODEL_JUDGES and k.split(" vs ")[1] in MODEL_JUDGES)
        lo, hi = fleiss["lo"], fleiss["hi"]
        verdict = (claim_stats.INCONCLUSIVE if lo is None else claim_stats.REPRODUCED if lo > KAPPA_HIGH
                   else claim_stats.CONTRADICTED if hi < KAPPA_HIGH else claim_stats.INCONCLUSIVE)
        ci = "no interval" if lo is None else f"[{lo:.3f}, {hi:.3f}]"
        out.append({"claim": "6. binary judgements agree across judges when an expert reference exists",
                    "verdict": verdict,
                    "evidence": f"Fleiss' kappa of the independent judges {', '.join(fleiss['judges'])} "
                                f"{fleiss['kappa']:.3f} {ci} (bootstrap over {fleiss['rows']} responses; bar "
                                f"{KAPPA_HIGH}); Cohen's: {shown}"})
    return sorted(out, key=lambda c: c["claim"])


def claims_table(rows: list[dict]) -> str:
    return "\n".join(["| claim | here | evidence (end accuracy, teacher-graded) |", "|---|---|---|"]
                     + [f"| {c['claim']} | {c['verdict']} | {c['evidence']} |" for c in rows])


def main() -> None:
    try:
        (cfg,) = config.parse_config((CompareConfig,), prog="compare.py")
        check_config(cfg)
        rl = recipe_config(cfg)
    except config.ConfigError as e:
        config.exit_on_error("compare.py", e)
    os.makedirs(cfg.out_dir, exist_ok=True)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    results = {source: [run_sft(cfg, rl, seed) if SOURCES[source][1] is None else run_rl(cfg, rl, source, seed)
                        for seed in seeds] for source in cfg.sources.split(",")}
    summary = summarize(results)
    out = Path(cfg.out_dir).resolve()  # each run's last eval per question: the RL run's own, SFT's end eval's
    questions = {source: [questions_of(out / source / f"seed{seed}" / ("end/eval_only" if SOURCES[source][1] is None
                                                                      else "")) for seed in seeds]
                 for source in results}
    curves = {}
    for source, runs in results.items():
        steps = [e["step"] for e in runs[0]]
        curves[SOURCES[source][0]] = (steps, [statistics.fmean(r[i]["accuracy"] for r in runs) for i in range(len(steps))])
    plot = metrics.plot_curves(Path(cfg.out_dir) / "compare.png", curves, "RL step (SFT: optimizer step)",
                               "held-out accuracy (graded by the teacher)",
                               f"the same run, each reward source (mean of seeds {cfg.seeds})")
    report = {"config": vars(cfg), "results": results, "summary": summary}
    print(table(summary) + "\n\n" + subject_table(summary))
    judges = {n: (world_spec(JUDGES[n][0], rl.data), JUDGES[n][1]) for n in filter(None, cfg.judges.split(","))}
    rl_runs = [Path(cfg.out_dir) / s / f"seed{seed}" for s in results if SOURCES[s][1] is not None for seed in seeds]
    kappas, fleiss = {}, None
    if judges and rl_runs:
        student = next((json.loads((p / "config.json").read_text())["verifier_path"] for p in rl_runs
                        if json.loads((p / "config.json").read_text())["verifier"] == "tiny"), None)
        if student is None and "student" in judges:
            print("[compare] no student run (--sources without student_*): the agreement table leaves the student out")
            judges.pop("student")
        rows = sample_rollouts([p / "rollouts.jsonl" for p in rl_runs], cfg.agreement_rows)
        verdicts = judge_all(judges, rows, student)
        text, kappas, fleiss = agreement_table(verdicts)
        print(f"\n{len(rows)} responses of the RL runs, every judge on each:\n{text}\n"
              f"Fleiss' kappa over {', '.join(n for n in MODEL_JUDGES if n in verdicts)}: "
              f"{'-' if fleiss is None else '{kappa:.3f} [{lo:.3f}, {hi:.3f}]'.format(**fleiss)}")
        report |= {"agreement": {"rows": len(rows), "kappa": kappas, "fleiss_model_judges": fleiss,
                                 "yes_rate": {n: sum(v) / len(v) for n, v in verdicts.items()}}}
    report["claims"] = claims(questions, kappas, fleiss, cfg.min_effect)
    print("\n" + claims_table(report["claims"]))
    (Path(cfg.out_dir) / "compare.json").write_text(json.dumps(report, indent=1))
    print(f"[compare] curves: {plot}; numbers: {Path(cfg.out_dir) / 'compare.json'}")


if __name__ == "__main__":
    main()
