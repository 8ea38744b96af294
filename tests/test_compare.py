"""compare.py's own logic (its runs are train_rl.py's, tested there): the flags each run gets, the
spread and the tables by hand, the agreement table, the claims' verdicts, and the SFT baseline's
budget and data."""
import json

import pytest

import compare
import train_rl
from rlvr import config, metrics


def test_every_default_source_and_judge_is_accepted_and_a_typo_is_not():
    cfg = compare.CompareConfig()
    compare.check_config(cfg)
    assert cfg.sources.split(",") == [s for s in compare.SOURCES if s != "teacher_soft"] and cfg.judges.split(",") == list(compare.JUDGES)
    with pytest.raises(config.ConfigError, match="--sources .*unknown \\['student_sofr'\\]"):
        compare.check_config(compare.CompareConfig(sources="teacher_binary,student_sofr"))
    with pytest.raises(config.ConfigError, match="--judges .*unknown \\['rule:jacard'\\]"):
        compare.check_config(compare.CompareConfig(judges="teacher,rule:jacard"))
    with pytest.raises(config.ConfigError, match="--seeds"):
        compare.check_config(compare.CompareConfig(seeds="0,one"))
    with pytest.raises(config.ConfigError, match="--seeds '0,1,0': has a seed twice"):
        compare.check_config(compare.CompareConfig(seeds="0,1,0"))
    with pytest.raises(config.ConfigError, match="--recipe 'recipes/nope.yaml': no such file"):
        compare.check_config(compare.CompareConfig(recipe="recipes/nope.yaml"))
    compare.check_config(compare.CompareConfig(judges=""))  # no agreement table


@pytest.mark.parametrize("source", [s for s, (_, flags) in compare.SOURCES.items() if flags is not None])
def test_each_run_is_the_recipe_with_its_reward_graded_by_the_teacher(source, tmp_path):
    """The command compare.py runs parses as train_rl.py's flags, and only the reward differs."""
    cfg = compare.CompareConfig(steps=7, eval_every=3, eval_samples=2)
    rl = compare.recipe_config(cfg)
    cmd = compare.train_rl_command(cfg, rl, compare.SOURCES[source][1], 5, tmp_path / "run")
    assert cmd[1].endswith("train_rl.py")
    run, vopts = train_rl.parse_config(cmd[2:])
    assert (run.steps, run.eval_every, run.eval_samples, run.seed) == (7, 3, 2, 5)
    teacher = compare.world_spec(compare.TEACHER, rl.data)  # the recipe's world's teacher
    assert run.eval_verifier == teacher and run.audit_verifier == teacher
    assert run.out_dir == str(tmp_path / "run") and run.wandb_mode == "disabled"
    expected = {"rule_substring": ("rule:substring", "binary"), "rule_exact": ("rule:exact", "binary"),
                "rule_jaccard": ("rule:jaccard", "soft"), "teacher_binary": (teacher, "binary"),
                "teacher_soft": (teacher, "soft"), "student_binary": ("tiny", "binary"),
                "student_soft": ("tiny", "soft"), "rlpr": ("policy:rlpr", "soft"),
                "verifree": ("policy:verifree", "soft"), "hybrid": ("hybrid:tiny", "soft")}[source]
    assert (run.verifier, run.reward_type) == expected
    # the paper samples c (Eq. 3 as written; Eq. 4 reads the same c): the student's runs do too
    assert vopts.verifier_sample == (source.startswith("student") or source == "hybrid")
    # everything else is the recipe's
    recipe, _ = train_rl.parse_config(["--config", str(compare.ROOT / cfg.recipe)])
    for f in ("policy", "data", "lr", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "reward_norm",
              "advantage", "kl_mode", "temperature", "heldout_fraction"):
        assert getattr(run, f) == getattr(recipe, f), f


def test_recipe_budget_is_the_recipes_unless_given():
    recipe, _ = train_rl.parse_config(["--config", str(compare.ROOT / "recipes/cpu_demo.yaml")])
    rl = compare.recipe_config(compare.CompareConfig())
    assert rl.steps == recipe.steps and rl.eval_samples == recipe.eval_samples and rl.eval_every == 10
    rl = compare.recipe_config(compare.CompareConfig(steps=4, eval_samples=0))
    assert rl.steps == 4 and rl.eval_samples == 0


def test_spread_by_hand():
    s = compare.spread([0.5, 0.7, 0.6])
    # mean 0.6; sample std sqrt(((-0.1)^2 + 0.1^2 + 0) / 2) = 0.1; 1e-12: a few float64 roundings
    assert s["mean"] == pytest.approx(0.6, abs=1e-12) and s["std"] == pytest.approx(0.1, abs=1e-12)
    assert (s["min"], s["max"], s["n"]) == (0.5, 0.7, 3)
    assert compare.spread([0.25])["std"] is None
    assert compare.fmt_spread(s) == "0.600 ± 0.100 (0.500 to 0.700)"
    assert compare.fmt_spread(compare.spread([0.25, -0.25]), signed=True) == "+0.000 ± 0.354 (-0.250 to +0.250)"
    assert compare.fmt_spread(compare.spread([0.25])) == "0.250"


def _eval(step, acc, **subjects):
    return {"step": step, "accuracy": acc, "subjects": subjects}


RESULTS = {  # two seeds each; per-subject accuracies average to the overall one (equal subject sizes)
    "teacher_binary": [[_eval(0, 0.5, chem=0.5, law=0.5), _eval(10, 0.75, chem=1.0, law=0.5)],
                       [_eval(0, 0.25, chem=0.0, law=0.5), _eval(10, 0.5, chem=0.5, law=0.5)]],
    "rule_substring": [[_eval(0, 0.5, chem=0.5, law=0.5), _eval(10, 0.0, chem=0.0, law=0.0)],
                       [_eval(0, 0.25, chem=0.0, law=0.5), _eval(10, 0.25, chem=0.5, law=0.0)]],
}


def test_table_by_hand():
    summary = compare.summarize(RESULTS)
    rows = compare.table(summary).splitlines()[2:]
    # teacher: end 0.75, 0.5: mean 0.625, std |0.75 - 0.5| / sqrt 2 = 0.177; change +0.25 both seeds
    assert rows == ["| teacher, binary (= soft: a 0/1 judge) | 0.375 | 0.625 ± 0.177 (0.500 to 0.750) | +0.250 ± 0.000 (+0.250 to +0.250) | "
                    "0.500 -> 0.750, 0.250 -> 0.500 |",
                    "| rule substring, binary | 0.375 | 0.125 ± 0.177 (0.000 to 0.250) | -0.250 ± 0.354 (-0.500 to +0.000) | "
                    "0.500 -> 0.000, 0.250 -> 0.250 |"]
    subj = compare.subject_table(summary).splitlines()
    assert subj[0] == "| reward source | chem | law |"
    # teacher chem: end 1.0, 0.5 -> 0.750 ± 0.354, change +0.5 both; law: 0.5, 0.5, change 0
    assert subj[2] == "| teacher, binary (= soft: a 0/1 judge) | 0.750 ± 0.354 (+0.500) | 0.500 ± 0.000 (+0.000) |"
    assert subj[3] == "| rule substring, binary | 0.250 ± 0.354 (+0.000) | 0.000 ± 0.000 (-0.500) |"


def test_evals_of_reads_overall_and_subject_accuracy(tmp_path):
    metrics.append_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 0, "eval/accuracy": 0.5, "eval/accuracy/chem": 0.25, "eval/prompts": 4, "verifier/master_key_fpr": 0},
        {"step": 1, "reward/mean": 0.1},
        {"step": 2, "eval/accuracy": 0.75, "eval/accuracy/chem": 1.0}])
    assert compare.evals_of(tmp_path) == [_eval(0, 0.5, chem=0.25), _eval(2, 0.75, chem=1.0)]


def _questions(*per_seed):
    """{question: share right} per seed, from lists of shares for questions q0, q1, ..."""
    return [{f"q{i}": v for i, v in enumerate(shares)} for shares in per_seed]


def test_questions_of_reads_the_last_eval_per_question(tmp_path):
    metrics.append_jsonl(tmp_path / "eval_questions.jsonl", [
        {"step": 0, "question": "a", "subject": "x", "correct": 1.0, "answers": 4},
        {"step": 10, "question": "a", "subject": "x", "correct": 3.0, "answers": 4},
        {"step": 10, "question": "b", "subject": "x", "correct": 0.0, "answers": 4}])
    assert compare.questions_of(tmp_path) == {"a": 0.75, "b": 0.0}
    with pytest.raises(FileNotFoundError, match="no per-question evals"):
        compare.questions_of(tmp_path / "old_run")


def test_ordering_by_hand_and_a_tie_is_never_a_win():
    questions = {"a": _questions([1.0, 0.5], [0.5, 0.5], [1.0, 0.0]), "b": _questions([0.5, 0.5], [0.5, 0.5], [0.0, 0.0])}
    o = compare.ordering(questions, "a", "b")
    # per seed: mean of (0.5, 0), (0, 0), (1, 0) = 0.25, 0 (a tie), 0.5: a strictly above b in 2 of 3 seeds
    assert o["per_seed"] == pytest.approx([0.25, 0.0, 0.5]) and o["wins"] == 2 and o["mean"] == pytest.approx(0.25)
    # t: sd 0.25, se 0.25 / sqrt 3, 95% with df 2: 4.3027 se = 0.621: the interval holds 0
    assert o["lo"] == pytest.approx(0.25 - 4.3027 * 0.25 / 3 ** 0.5, abs=1e-4) and o["verdict"] == "inconclusive"
    tie = compare.ordering({"a": _questions([0.5], [0.25], [1.0]), "b": _questions([0.5], [0.25], [1.0])}, "a", "b")
    assert tie["wins"] == 0 and tie["verdict"] == "inconclusive"  # equal in every seed: no win, no verdict
    assert compare.fmt_test(tie) == "a - b = +0.000 [+0.000, +0.000], p 1, a > b in 0/3 seeds"
    one = compare.ordering({"a": _questions([1.0]), "b": _questions([0.0])}, "a", "b")
    assert one["verdict"] == "inconclusive" and "no interval (one seed)" in compare.fmt_test(one)
    with pytest.raises(ValueError, match="seed #0: a and b were graded on different held-out questions"):
        compare.ordering({"a": [{"q0": 1.0}], "b": [{"q1": 1.0}]}, "a", "b")


def test_claims_by_hand():
    def runs(*ends):  # two questions, both at the seed's end accuracy
        return _questions(*[[e, e] for e in ends])
    q = {"rule_substring": runs(0.30, 0.35, 0.30), "rule_exact": runs(0.70, 0.12, 0.40),
         "rule_jaccard": runs(0.40, 0.40, 0.40), "teacher_binary": runs(0.70, 0.80, 0.75),
         "student_binary": runs(0.50, 0.50, 0.50), "student_soft": runs(0.65, 0.70, 0.60), "sft": runs(0.60, 0.75, 0.70)}
    kappas = {"teacher vs noisy teacher": 0.9, "teacher vs student": 0.7, "teacher vs rule:exact": 0.1}
    fleiss = {"kappa": 0.7, "lo": 0.65, "hi": 0.75, "rows": 100, "judges": ["teacher", "student"]}
    got = {c["claim"][:2]: c for c in compare.claims(q, kappas, fleiss, min_effect=0.02)}
    assert list(got) == ["1.", "2.", "3.", "4.", "5.", "6."]
    # 1: student_soft - rule_exact = -0.05, +0.58, +0.20: wide; every pair must be reproduced
    assert got["1."]["verdict"] == "inconclusive"
    assert "student_soft - rule_exact = +0.243" in got["1."]["evidence"] and "a > b in 2/3 seeds" in got["1."]["evidence"]
    # 2: substring - Jaccard = -0.10, -0.05, -0.10: mean -0.0833, sd 0.0289, se 0.0167; simultaneous over 2 pairs
    # (97.5%, df 2: t 6.205): -0.0833 +- 0.1034 holds 0 -> inconclusive, not contradicted
    assert got["2."]["verdict"] == "inconclusive"
    # 3: student soft - binary = 0.15, 0.20, 0.10: mean 0.15, se 0.0289, 95% +- 0.124: above 0 -> reproduced
    assert got["3."]["verdict"] == "reproduced" and "[+0.026, +0.274]" in got["3."]["evidence"]
    # 4: student - teacher = -0.05, -0.10, -0.15: mean -0.10, se 0.0289: -0.10 +- 0.124 = [-0.224, +0.024]
    assert got["4."]["verdict"] == "inconclusive" and "[-0.224, +0.024]" in got["4."]["evidence"]
    assert got["5."]["verdict"] == "inconclusive"
    # 6: the interval [0.65, 0.75] lies below the bar 0.8: contradicted; only the independent judges shown
    assert got["6."]["verdict"] == "contradicted" and "teacher, student 0.700 [0.650, 0.750]" in got["6."]["evidence"]
    assert "noisy" not in got["6."]["evidence"] and "rule:exact" not in got["6."]["evidence"]
    assert compare.claims(q, kappas, fleiss | {"lo": 0.82, "hi": 0.9})[-1]["verdict"] == "reproduced"
    assert compare.claims(q, kappas, fleiss | {"lo": 0.75, "hi": 0.85})[-1]["verdict"] == "inconclusive"
    # a claim whose sources did not run is left out, not judged on nothing
    partial = compare.claims({k: q[k] for k in ("student_soft", "student_binary")}, {}, None)
    assert [c["claim"][:2] for c in partial] == ["3."]
    # one seed: every claim inconclusive, however far apart
    one = {k: v[:1] for k, v in q.items()}
    assert {c["verdict"] for c in compare.claims(one, {}, None)} == {"inconclusive"}


def test_claims_on_simulated_runs_that_do_not_differ_are_inconclusive():
    """compare.claims end to end on simulated per-question evals (claim_stats.simulate) of ten sources
    with one true accuracy: every "a beats b" claim is inconclusive in at least 90% of draws."""
    import numpy as np

    from rlvr import claim_stats

    rng, undecided, draws = np.random.default_rng(0), {}, 150
    for _ in range(draws):
        sim = claim_stats.simulate({s: 0.0 for s in compare.SOURCES}, 3, rng, questions=20)
        for c in compare.claims(sim, {}, None):
            undecided[c["claim"][:2]] = undecided.get(c["claim"][:2], 0) + (c["verdict"] == "inconclusive")
    assert set(undecided) == {"1.", "2.", "3.", "4.", "5."}
    assert all(undecided[k] / draws >= 0.9 for k in ("1.", "2.", "3.", "5.")), undecided


def test_agreement_table_by_hand():
    verdicts = {"teacher": [1, 1, 0, 0], "student": [1, 0, 0, 0], "rule:exact": [1, 1, 0, 0]}
    text, kappas, fleiss = compare.agreement_table(verdicts)
    # teacher vs student: po 3/4, pe 2/4*1/4 + 2/4*3/4 = 1/2, kappa 1/2; teacher vs rule:exact identical: 1
    assert kappas == {"teacher vs student": pytest.approx(0.5), "teacher vs rule:exact": pytest.approx(1.0),
                      "student vs rule:exact": pytest.approx(0.5)}
    lines = text.splitlines()
    assert lines[0] == "| Cohen's kappa | teacher | student | rule:exact |"
    assert lines[2] == "| teacher (YES 0.50) | 1.000 | 0.500 | 1.000 |"
    assert lines[3] == "| student (YES 0.25) | 0.500 | 1.000 | 0.500 |"
    # Fleiss over the model judges present (teacher, student): Scott's pi, pooled YES 3/8:
    # pe = 9/64 + 25/64 = 34/64, po 3/4 -> (48/64 - 34/64) / (30/64) = 14/30
    assert fleiss["kappa"] == pytest.approx(14 / 30) and fleiss["judges"] == ["teacher", "student"]
    assert fleiss["rows"] == 4 and fleiss["lo"] <= fleiss["kappa"] <= fleiss["hi"]
    assert compare.agreement_table({"teacher": [1, 0], "rule:exact": [1, 0]})[2] is None  # one model judge
    # the noisy teacher (the teacher with labels flipped) is shown, never counted as an independent judge
    noisy = compare.agreement_table(verdicts | {"noisy teacher": [1, 1, 0, 1]})
    assert "| noisy teacher (YES 0.75) |" in noisy[0] and noisy[2]["judges"] == ["teacher", "student"]
    assert noisy[2]["kappa"] == pytest.approx(14 / 30)


def test_fleiss_interval_is_the_bootstrap_of_fleiss_kappa_over_the_rows():
    from rlvr import audit
    from rlvr import claim_stats

    verdicts = {"teacher": [1, 1, 0, 0, 1, 0, 1, 1], "student": [1, 0, 0, 0, 1, 0, 1, 1]}
    got = compare.fleiss_interval(verdicts, seed=3)
    kappa = lambda idx: audit.fleiss_kappa(audit.binary_counts({k: [v[i] for i in idx] for k, v in verdicts.items()}))  # noqa: E731
    assert (got["lo"], got["hi"]) == claim_stats.bootstrap_interval(8, kappa, compare.BOOTSTRAP, 3)
    assert got["kappa"] == pytest.approx(kappa(range(8))) and got["lo"] < got["kappa"] < got["hi"]


def test_judge_all_thresholds_jaccard_and_reads_binary_otherwise():
    rows = [{"question": "q", "reference": "red fox", "response": "Therefore, the answer is red fox."},
            {"question": "q", "reference": "red fox", "response": "Therefore, the answer is a red fox."},
            {"question": "q", "reference": "red fox", "response": "Therefore, the answer is a big red dog."}]
    verdicts = compare.judge_all({"rule:substring": ("rule:substring", None), "j": ("rule:jaccard", 0.5),
                                  "jb": ("rule:jaccard", None)}, rows, student=None)
    # Jaccard: {red, fox} vs itself 1; vs {a, red, fox} 2/3; vs {a, big, red, dog} 1/5
    assert verdicts == {"rule:substring": [1, 1, 0], "j": [1, 1, 0], "jb": [1, 0, 0]}


def test_sample_rollouts_is_seeded_and_draws_without_replacement(tmp_path):
    for i in range(2):
        metrics.append_jsonl(tmp_path / f"r{i}.jsonl", [{"response": f"{i}-{k}"} for k in range(10)])
    paths = [tmp_path / "r0.jsonl", tmp_path / "r1.jsonl"]
    a = compare.sample_rollouts(paths, 5, seed=3)
    assert len({r["response"] for r in a}) == 5 and a == compare.sample_rollouts(paths, 5, seed=3)
    assert a != compare.sample_rollouts(paths, 5, seed=4)
    assert len(compare.sample_rollouts(paths, 0)) == 20 and len(compare.sample_rollouts(paths, 50)) == 20


def test_sft_baseline_gets_the_rl_runs_budget_and_the_start_and_end_evals(tmp_path, monkeypatch):
    """run_sft: as many optimizer steps x sequences as the RL run, from the policy the warm-start eval
    resolved, on sft_pairs; its table rows are that eval and the SFT model's, graded the same way."""
    from rlvr import model
    from worlds import toy

    cfg = compare.CompareConfig(steps=6, out_dir=str(tmp_path))
    rl = compare.recipe_config(cfg)
    commands, trained = [], {}

    def fake_run(cmd, what):  # stands in for the train_rl.py --eval_only processes
        commands.append(cmd)
        run_dir = compare.Path(cmd[cmd.index("--out_dir") + 1])
        out = run_dir / "eval_only"  # where train_rl.py --eval_only writes (never the run's own files)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"policy_path": "WARM"}))
        acc = 0.5 if run_dir.name == "start" else 0.625
        metrics.append_jsonl(out / "metrics.jsonl", [{"step": 0, "eval/accuracy": acc, "eval/accuracy/x": acc}])

    class Saved:
        def save_pretrained(self, path, **kw):
            compare.Path(path).mkdir(parents=True, exist_ok=True)
            (compare.Path(path) / "config.json").write_text("{}")

    monkeypatch.setattr(compare, "run", fake_run)
    monkeypatch.setattr(compare, "sft_pairs", lambda rl: [("m", "r")])
    monkeypatch.setattr(model, "source_problem", lambda *a, **k: None)  # the fake saved model is no model
    monkeypatch.setattr(model, "load_model", lambda path: trained.setdefault("policy", path) and Saved())
    monkeypatch.setattr(model, "load_tokenizer", lambda path: Saved())
    monkeypatch.setattr(toy, "supervised_warm_start", lambda lm, tok, pairs, steps, seed, batch_size, lr:
                        trained.update(pairs=pairs, steps=steps, batch=batch_size, lr=lr) or [1.0, 0.5])
    evals = compare.run_sft(cfg, rl, seed=2)
    assert trained == {"policy": "WARM", "pairs": [("m", "r")], "steps": 6,
                       "batch": rl.prompts_per_step * rl.samples_per_prompt, "lr": rl.lr}
    assert evals == [_eval(0, 0.5, x=0.5), _eval(6, 0.625, x=0.625)]
    start, end = (train_rl.parse_config(c[2:])[0] for c in commands)
    assert start.eval_only and end.eval_only and end.policy == str(tmp_path / "sft" / "seed2" / "final")
    assert start.eval_verifier == end.eval_verifier == compare.world_spec(compare.TEACHER, rl.data) and start.seed == end.seed == 2
    assert start.eval_samples == end.eval_samples == rl.eval_samples


def test_sft_baseline_trains_on_every_training_question_and_no_held_out_one():
    """sft_pairs: the training questions of train_rl.py's own split, each with its expert reference."""
    import train_rl

    rl, _ = train_rl.parse_config(["--config", str(compare.ROOT / "recipes/cpu_demo.yaml"), "--data", "freeform"])
    pairs = compare.sft_pairs(rl)
    train, heldout = train_rl.load_data(rl)
    asked = [messages[-1]["content"] for messages, _ in pairs]
    assert heldout and set(asked) == {r.question for r in train} and len(asked) == len(train)
    assert not set(asked) & {r.question for r in heldout}
    reference = {r.question: r.reference for r in train}
    assert all(answer == reference[q] for q, (_, answer) in zip(asked, pairs))
    rl.data = "toy"
    with pytest.raises(config.ConfigError, match="--recipe 'toy': the SFT baseline knows the free-form world's split only \\(--data freeform or pretrained"):
        compare.sft_pairs(rl)


def test_a_verifier_free_source_runs_and_has_its_row(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # one train_rl.py process of 1 step, greedy evals: the source runs end to end and its row is printed and saved.
    # The recipe's policy is the session's tiny model: the world's warm-started one is a 45 s build in a cold cache.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((compare.ROOT / "recipes" / "cpu_demo.yaml").read_text().replace(
        "\npolicy: tiny\n", f"\npolicy: {tiny_model_dir}\n"))
    assert f"policy: {tiny_model_dir}" in recipe.read_text()
    monkeypatch.setattr("sys.argv", ["compare.py", "--recipe", str(recipe), "--sources", "verifree", "--seeds", "0",
                                     "--steps", "1", "--eval_every", "1", "--eval_samples", "0", "--judges", "",
                                     "--out_dir", str(tmp_path / "out")])
    compare.main()
    printed = capsys.readouterr().out
    assert f"| {compare.SOURCES['verifree'][0]} |" in printed
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [e["step"] for e in report["results"]["verifree"][0]] == [0, 1]
    run_config = json.loads((tmp_path / "out" / "verifree" / "seed0" / "config.json").read_text())
    assert run_config["verifier"] == "policy:verifree"
    # the eval writes each held-out question's graded answers; their mean is the logged accuracy, eval by eval
    rows = metrics.read_jsonl(tmp_path / "out" / "verifree" / "seed0" / "eval_questions.jsonl")
    for e in report["results"]["verifree"][0]:
        mine = [r for r in rows if r["step"] == e["step"]]
        assert len(mine) == len({r["question"] for r in mine}) > 0 and all(r["answers"] == 1 for r in mine)
        assert sum(r["correct"] for r in mine) / len(mine) == pytest.approx(e["accuracy"], abs=1e-12)
    assert compare.questions_of(tmp_path / "out" / "verifree" / "seed0") == {r["question"]: r["correct"] for r in mine}


def test_help_says_how_a_claim_is_decided():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(compare.ROOT / "compare.py"), "--help"], capture_output=True, text=True,
                         cwd=compare.ROOT, timeout=300)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0, out.stderr[-2000:]
    for phrase in ("paired t-test over the seeds", "reproduced: the interval above 0 and the mean difference >= "
                   "min_effect", "one seed always", "a tie is never a win", "independent judges", "(default: 0.02)"):
        assert phrase in text, phrase
    with pytest.raises(config.ConfigError, match="--min_effect 1.5: must be in"):
        compare.check_config(compare.CompareConfig(min_effect=1.5))
