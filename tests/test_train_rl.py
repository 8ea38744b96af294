"""train_rl.py end to end: 2 ranks == 1 rank, exact resume, config checks, the rollout dump."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_rl
from rlvr import config, judging, rl_config

ROOT = Path(__file__).resolve().parents[1]


def flags(policy, out_dir, steps, **extra):
    # a random tiny policy judged by the tiny model itself (p(yes) / (p(yes) + p(no)), --soft_mode ratio: a
    # random model's first token is never YES or NO, and renorm gives an unjudged c 0): rewards differ per
    # response, so advantages and losses are non-trivial; the verifier also runs sharded on 2 ranks.
    # A random model's first token is rarely YES or NO, hence --verifier_max_unjudged 1.
    # The tiny model has no verifier_settings.json: --verifier_paper_defaults asks it with the paper's template.
    f = dict(data="toy", policy=policy, verifier=policy, verifier_paper_defaults=True, soft_mode="ratio", verifier_max_unjudged=1.0,
             prompts_per_step=4,
             samples_per_prompt=4, max_new_tokens=6, micro_batch_size=5, steps=steps, lr=1e-3, warmup_ratio=0.0,
             eval_every=0, eval_prompts=8, eval_verifier="rule:substring", audit_verifier="rule:substring",
             audit_every=2, audit_samples=6, out_dir=str(out_dir), wandb_mode="disabled", log_samples=2, seed=3,
             master_key_prompts=2)  # the probe's 64 x 17 judgements were 17 s of a 30 s run
    f.update(extra)
    return [f"--{k}={v}" for k, v in f.items()]


# The undisturbed 4-step run (conftest's `straight`) that the resume and fault tests must reproduce: old
# log-probs (2 epochs x 2 minibatches), the reference model (KL in the reward), Adam state, a checkpoint
# every step, a log-only verifier whose math-verify workers must survive a kill.
STRAIGHT = dict(ppo_epochs=2, minibatches=2, kl_mode="reward", kl_coef=0.05, save_every=1, log_verifiers="rule:math")


def run(args, nproc=None, timeout=1200, check=True):  # hang detector: a loaded machine is slow
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    out = subprocess.run(launcher + [str(ROOT / "train_rl.py")] + args, capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=ROOT)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def step_rows(out_dir):
    """metrics.jsonl rows of training steps; time fields and evals (a shorter run evaluates at its end) dropped."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time", "elapsed", "throughput", "memory", "eval/"))}
            for r in rows if "loss" in r]


def weights(out_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


def test_two_ranks_compute_what_one_rank_computes(tiny_model_dir, tmp_path):
    # per-token REINFORCE++ with the KL in the reward: whitening runs over the tokens of both ranks
    extra = dict(advantage="reinforce_pp", reward_norm="batch", kl_mode="reward", kl_coef=0.05)
    run(flags(tiny_model_dir, tmp_path / "one", 3, **extra))
    run(flags(tiny_model_dir, tmp_path / "two", 3, **extra), nproc=2)
    one, two = step_rows(tmp_path / "one"), step_rows(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-5)  # same rollouts, same judgements
        assert a["response/length_mean"] == b["response/length_mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["kl/k1"] == pytest.approx(b["kl/k1"], abs=1e-5)
        assert a["advantage/max"] == pytest.approx(b["advantage/max"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert all(a["grad_norm"] > 1e-3 for a in one) and one[-1]["reward/mean"] != one[0]["reward/mean"]
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert wa.keys() == wb.keys()
    # Adam divides by sqrt(v): where a gradient is ~0, float reduction-order noise decides the sign of
    # an lr-sized step, so a handful of weights may differ by up to lr; all the others agree
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert (diff > 1e-4).float().mean() < 1e-3 and diff.max() < 3 * 1e-3 * 3
    # every judged response once, from all ranks, in the same order
    dumps = [[json.loads(line) for line in (tmp_path / d / "rollouts.jsonl").read_text().splitlines()]
             for d in ("one", "two")]
    assert len(dumps[1]) == 3 * 4 * 4
    assert [r["response"] for r in dumps[0]] == [r["response"] for r in dumps[1]]
    assert {"question", "reference", "response", "reward", "p_yes", "step"} <= set(dumps[1][0])


def test_resume_continues_exactly_and_rewrites_no_output_twice(tiny_model_dir, straight, tmp_path):
    run(flags(tiny_model_dir, tmp_path / "split", 2, **STRAIGHT))
    # as if killed after step 3's outputs were written but before its checkpoint: outputs run ahead
    for name in ("metrics.jsonl", "rollouts.jsonl", "samples.jsonl"):
        with open(tmp_path / "split" / name, "a") as f:
            f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n" + '{"step": 3, "torn')
    run(flags(tiny_model_dir, tmp_path / "split", 4, resume="yes", **STRAIGHT))
    a, b = step_rows(straight), step_rows(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-6)
    for name in ("rollouts.jsonl", "samples.jsonl"):
        assert (straight / name).read_text() == (tmp_path / "split" / name).read_text(), name
    wa, wb = weights(straight), weights(tmp_path / "split")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("argv, message", [
    (["--reward_type", "sofr"], "invalid choice: 'sofr' (choose from 'binary', 'soft')"),
    (["--kl_mode", "klreward"], "(choose from 'none', 'reward', 'loss')"),
    (["--reward_norm", "grp"], "(choose from 'auto', 'batch', 'group', 'none')"),
    (["--lr_schedule", "cosin"], "(choose from 'constant', 'cosine')"),
    (["--advantage", "foo"], "argument --advantage: invalid choice: 'foo'"),
    (["--soft_mode", "renrom"], "argument --soft_mode/--soft-mode: invalid choice: 'renrom'"),
    (["--resume", "maybe"], "argument --resume: invalid choice: 'maybe'"),
    (["--stepz", "3"], "unrecognised arguments: --stepz 3"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--steps", "-3"], "--steps -3: must be >= 1"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--minibatches", "3", "--prompts_per_step", "1", "--samples_per_prompt", "4"], "--minibatches 3: must divide"),
    (["--samples_per_prompt", "1", "--advantage", "rloo"], "--advantage 'rloo': needs --samples_per_prompt >= 2"),
    (["--kl_mode", "reward", "--kl_coef", "0"], "--kl_coef 0.0: must be > 0 with --kl_mode reward"),
    (["--verifier_timeout", "0"], "--verifier_timeout 0.0: must be > 0"),
])
def test_bad_flags_are_refused_before_anything_loads(argv, message):
    with pytest.raises(config.ConfigError) as e:
        train_rl.parse_config(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("field, value, choices", [("reward_type", "sofr", "binary, soft"),
                                                   ("advantage", "ppo", "reinforce, grpo, dr_grpo, rloo")])
def test_a_choice_typo_in_a_config_file_is_refused_too(field, value, choices, tmp_path):
    (tmp_path / "c.yaml").write_text(f"{field}: {value}\n")  # argparse never checks defaults against choices
    with pytest.raises(config.ConfigError, match=f"--{field} '{value}': invalid choice; choose from {choices}"):
        train_rl.parse_config(["--config", str(tmp_path / "c.yaml")])


def test_a_bad_flag_is_one_line_and_exit_status_2(tmp_path):
    out = run(["--steps", "0", f"--out_dir={tmp_path}"], check=False, timeout=600)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "train_rl.py: error: --steps 0: must be >= 1"
    assert "Traceback" not in out.stderr and not (tmp_path / "metrics.jsonl").exists()


def test_resume_without_a_checkpoint(tiny_model_dir, tmp_path):
    out = run(flags(tiny_model_dir, tmp_path / "r", 1, resume="yes"), check=False)
    assert out.returncode == 2 and "--resume 'yes': no checkpoint in" in out.stderr.splitlines()[-1]
    run(flags(tiny_model_dir, tmp_path / "r", 1, resume="auto"))  # job scripts: start fresh when there is none
    assert len(step_rows(tmp_path / "r")) == 1


def test_config_file_sets_fields_and_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3.0e-6\nadvantage: rloo\nsteps: 7\n")
    cfg, _ = train_rl.parse_config(["--config", str(path), "--steps", "9"])
    assert cfg.lr == 3e-6 and cfg.advantage == "rloo" and cfg.steps == 9
    path.write_text("learning_rate: 1\n")
    with pytest.raises(config.ConfigError, match="learning_rate"):
        train_rl.parse_config(["--config", str(path)])
    import train_verifier as TV

    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):  # every shipped recipe parses and passes the checks
        if recipe.name.startswith("verifier_"):  # stage 2's --student is stage 1's output, not here yet
            TV.parse_config("sft", ["--config", str(recipe), "--student", "tiny"])
        else:
            train_rl.parse_config(["--config", str(recipe)])


def test_help_lists_every_flag_with_its_default():
    out = subprocess.run([sys.executable, str(ROOT / "train_rl.py"), "--help"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0
    for name in list(rl_config.Config.__dataclass_fields__) + ["verifier_system_prompt", "verifier_timeout"]:
        assert f"--{name}" in out.stdout
    text = " ".join(out.stdout.split())  # argparse wraps help lines
    assert "{reinforce,grpo,dr_grpo,rloo,reinforce_pp,rloo_seq,reinforce_pp_seq}" in text and "(default: 0.28)" in text


def test_the_policy_learns_what_a_stronger_judge_grades(tmp_path):
    # the numeric toy's main job loop (tiny warm-started policy, batch z-norm, REINFORCE) on a weaker verifier's
    # reward (rule:jaccard, word overlap) for 20 steps: accuracy on held-out questions graded by rule:math, 8
    # sampled answers a question, must rise, and the console's closing lines say so. Measured: 0.441 -> 0.551;
    # with the policy-gradient sign flipped it falls.
    out = run(["--config", str(ROOT / "recipes" / "cpu_numeric_toy.yaml"), "--verifier", "rule:jaccard",
               "--reward_type", "binary", "--audit_verifier", "", "--steps", "20",
               "--eval_every", "20", "--eval_samples", "8", "--out_dir", str(tmp_path), "--wandb_mode", "disabled"])
    evals = [(r["step"], r["eval/accuracy"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "eval/accuracy" in r]
    assert [s for s, _ in evals] == [0, 20]
    assert evals[1][1] - evals[0][1] >= 0.05, evals
    assert f"held-out accuracy graded by rule:math: {evals[0][1]:.3f} (step 0) -> {evals[1][1]:.3f} (step 20)" in out.stdout


def test_the_master_key_probe_asks_n_pairs_with_every_key():
    from rlvr import audit
    import data
    import reward
    import train_rl

    asked = []

    def says_yes_to_colons(questions, references, responses, seeds=None):
        asked.append(list(zip(questions, references, responses)))
        yes = torch.tensor([float(r.endswith(":")) for r in responses])
        return reward.Judgement(yes, yes, yes, torch.ones(len(yes), dtype=torch.bool))

    rows = [data.Record(f"id{i}", [], f"q{i}", f"r{i}", {}) for i in range(10)]
    cfg = train_rl.Config(master_key_prompts=3)
    m = judging.probe_master_keys(says_yes_to_colons, rows, cfg)
    assert len(asked) == 1 and len(asked[0]) == 3 * len(audit.MASTER_KEYS)
    assert {(q, r) for q, r, _ in asked[0]} <= {(f"q{i}", f"r{i}") for i in range(3)}  # the first n rows only
    colons = sum(k.endswith(":") for k in audit.MASTER_KEYS)
    assert m == {"verifier/master_key_fpr": pytest.approx(colons / len(audit.MASTER_KEYS))}


def test_the_cpu_demo_recipe_is_the_main_job_written_out():
    # `python train_rl.py` with no flags and `--config recipes/cpu_demo.yaml` must be the same run
    cfg, _ = train_rl.parse_config(["--config", str(ROOT / "recipes" / "cpu_demo.yaml")])
    default, _ = train_rl.parse_config([])
    assert dataclasses.replace(cfg, config="") == default


@pytest.mark.parametrize("correction, staleness, epochs, kl, want", [
    ("none", 0, 1, "none", "update"), ("none", 0, 2, "none", "trainer"), ("none", 0, 1, "reward", "trainer"),
    ("none", 1, 1, "none", "sampler"), ("none", 1, 2, "reward", "sampler"),
    ("tis", 1, 1, "none", "trainer"), ("mask", 1, 1, "none", "trainer"), ("tis", 0, 1, "none", "update")])
def test_old_logprobs_source_is_what_each_mode_promises(correction, staleness, epochs, kl, want):
    from rlvr import rollout
    import train_rl

    cfg = train_rl.Config(rollout_correction=correction, ppo_epochs=epochs, kl_mode=kl, async_steps=1)
    ro = rollout.Rollout([], [], [], [], [], [], None, staleness)
    assert train_rl.old_logprobs_source(cfg, ro) == want


@pytest.mark.parametrize("correction", ["none", "tis", "mask"])
def test_async_one_step_off_policy_uses_the_promised_pi_old(correction, tiny_model_dir, tmp_path):
    """--async_steps 1 end to end: batch t >= 1 was sampled with the weights before update t-1.
    none: pi_old is the sampler's own log-probs (the trainer no longer has those weights), so the
    logged gap between pi_old and the sampler is 0 at every step. tis / mask: pi_old is a fresh pass of
    the trainer's current weights, which moved since sampling: the gap is > 0 from the first stale batch
    on, while the first update's ratio pi_theta / pi_old is 1 (same weights, same tokens). A pi_old taken
    from the wrong weights in either mode fails here."""
    run(flags(tiny_model_dir, tmp_path, 4, async_steps=1, rollout_correction=correction, audit_verifier="",
              lr=3e-3))
    rows = step_rows(tmp_path)
    assert len(rows) == 4
    # both sides of the gap are float32 log-softmax values of the same tokens: equal weights give a gap of
    # reduction-order noise (< 1e-4: a few hundred ulps); one update at lr 3e-3 moves them by > 1e-3
    for r in rows[1:]:
        gap = r.get("rollout/engine_logprob_gap_mean", 0.0)  # logged only where some gap is not 0
        if correction == "none":
            assert gap < 1e-4, (r["step"], gap)
        else:
            assert gap > 1e-3, (r["step"], gap)
            assert r["ratio/mean"] == pytest.approx(1.0, abs=1e-4), (r["step"], r["ratio/mean"])
            assert r["rollout/is_ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    if correction == "none":  # pi_theta moved away from the sampler's weights: the ratio is not 1 everywhere
        assert max(abs(r["ratio/mean"] - 1) for r in rows[1:]) > 1e-4


SHARED_SAMPLE = ROOT / "tests" / "data" / "multi_subject_rlvr_sample.jsonl"


def _free_form_file(tmp_path):
    rows = [{"query": [{"role": "user", "content": f"Which test confirms case {i}?"}], "label": label}
            for i, label in enumerate(["Western blot", "Muscles", "Concept Assimilation", "the liver", "12"] * 8)]
    path = tmp_path / "free.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_graders_are_chosen_from_the_data_and_never_a_math_rule_on_prose(tmp_path):
    import train_rl

    free = str(_free_form_file(tmp_path))
    cfg = rl_config.Config(data=free, verifier="rule:substring")
    refs = [r.reference for part in train_rl.load_data(cfg) for r in part]
    with pytest.raises(config.ConfigError, match=r"--eval_verifier 'auto': 20% of --data .* are numbers or math: "
                                                 r"free-form answers need a judge"):
        judging.choose_graders(cfg, refs)
    for flag in ("eval_verifier", "audit_verifier", "verifier"):
        bad = dataclasses.replace(cfg, **{"eval_verifier": "self", flag: "rule:math"})
        with pytest.raises(config.ConfigError, match=f"--{flag} 'rule:math': 20% of"):
            judging.choose_graders(bad, refs)
    with pytest.raises(config.ConfigError, match="--log_verifiers 'rule:substring,rule:math'"):
        judging.choose_graders(dataclasses.replace(cfg, eval_verifier="self",
                                                    log_verifiers="rule:substring,rule:math"), refs)
    chosen = judging.choose_graders(dataclasses.replace(cfg, eval_verifier="rule:substring"), refs)
    assert (chosen.eval_verifier, chosen.audit_verifier) == ("rule:substring", "")  # audit auto: off, said
    toy_cfg = rl_config.Config(data="toy")
    toy_refs = [r.reference for part in train_rl.load_data(toy_cfg) for r in part]
    chosen = judging.choose_graders(toy_cfg, toy_refs)
    assert (chosen.eval_verifier, chosen.audit_verifier) == ("rule:math", "rule:math")


def test_references_a_math_rule_can_grade():
    from rlvr import rules

    for ref in ("7", "14/2", "\\frac{14}{3}", "x^2+1", "3.5 cm", "(C)", "B", "$36", "263,800 yuan"):
        assert rules.looks_mathematical(ref), ref
    for ref in ("Western blot", "Muscles", "Concept Assimilation", "The 3rd Amendment of the Constitution", "x"):
        assert not rules.looks_mathematical(ref), ref
    if SHARED_SAMPLE.exists():  # the paper's multi-subject data: mostly words
        refs = [json.loads(line)["label"] for line in SHARED_SAMPLE.read_text(encoding="utf-8").splitlines()]
        assert rules.math_reference_share(refs) < 0.3


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason=f"{SHARED_SAMPLE} is not here")
def test_the_papers_data_without_a_judge_is_refused_in_one_line_before_any_model_loads(tmp_path):
    # (the default policy, 'tiny', would be built after the graders are chosen: the refusal comes first)
    out = run(["--data", str(SHARED_SAMPLE), "--verifier", "rule:substring", "--out_dir", str(tmp_path / "r")],
              check=False, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train_rl.py: error: --eval_verifier 'auto': ") and "need a judge" in last
    assert "Traceback" not in out.stderr


def test_the_closing_lines_are_runnable_commands_and_the_run_has_a_picture(tiny_model_dir, tmp_path, monkeypatch):
    # the demo's round 1 (its verifier stood in for by the tiny model: distilling the real one takes minutes),
    # then the two commands its closing lines print, run as printed with small settings added to the first
    import shlex

    from rlvr import metrics
    import train_rl
    import worlds

    monkeypatch.setitem(worlds.WORLDS, "toy", dataclasses.replace(worlds.WORLDS["toy"], tiny_verifier=lambda: tiny_model_dir))
    monkeypatch.chdir(ROOT)
    plots = []
    monkeypatch.setattr(metrics.Metrics, "plot", lambda self, draw=metrics.Metrics.plot: plots.append(draw(self)))
    # short verifier prompts (the start's master-key probe judges 64 x 10 of them), the same in both rounds
    (tmp_path / "template.txt").write_text("{reference} {response}")
    short = {"verifier_template": str(tmp_path / "template.txt"), "verifier_system_prompt": ""}
    argv = flags(tiny_model_dir, tmp_path / "demo", 2, verifier="tiny", eval_every=1, eval_samples=0, audit_every=1,
                 **short)
    cfg, vopts = train_rl.parse_config(argv)
    lines = train_rl.closing_lines(cfg, train_rl.train(cfg, vopts) | {"argv": argv})
    picture = tmp_path / "demo" / "curves.png"
    assert plots == [str(picture)] * 2  # after the eval of step 1 and at the end (step 2's eval)
    assert f"picture of the run: {picture}" in lines
    import matplotlib.image
    assert matplotlib.image.imread(picture).shape[:2] == (700, 1200)
    commands = [line.strip() for line in lines if line.startswith("  python ")]
    assert len(commands) == 2, lines
    before = (tmp_path / "demo" / "metrics.jsonl").read_bytes()
    small = ["--toy_mix", "digit:40", "--policy", tiny_model_dir, "--policy_samples", "1", "--epochs", "1",
             "--batch_size", "16", "--micro_batch_size", "16", "--master_key_prompts", "4", "--wandb_mode", "disabled",
             *[f"--{k}={v}" for k, v in short.items()]]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for command, extra in zip(commands, [small, []]):
        words = shlex.split(command)
        assert words[0] == "python" and words[words.index("--out_dir") + 1].startswith(str(tmp_path / "demo_round2"))
        out = subprocess.run([sys.executable, *words[1:], *extra], capture_output=True, text=True, timeout=600,
                             env=env, cwd=ROOT)
        assert out.returncode == 0, command + "\n" + out.stdout[-3000:] + out.stderr[-3000:]
        assert "\r" not in out.stdout + out.stderr  # redirected: no progress-bar redraws
    assert (tmp_path / "demo_round2_verifier" / "final" / "config.json").exists()
    assert [r["step"] for r in map(json.loads, (tmp_path / "demo_round2" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2]
    assert (tmp_path / "demo" / "metrics.jsonl").read_bytes() == before  # round 1's run is left as it was
    assert (tmp_path / "demo_round2" / "curves.png").exists()
