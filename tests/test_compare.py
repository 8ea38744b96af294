"""compare.py's own logic (its runs are train_rl.py's, tested there): the flags each run gets, the
spread and the tables by hand, the agreement table, the claims' verdicts, and the SFT baseline's
budget and data."""
import json

import pytest

import compare
import config
import metrics
import rl_config


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
    run, vopts = rl_config.parse_config(cmd[2:])
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
    recipe, _ = rl_config.parse_config(["--config", str(compare.ROOT / cfg.recipe)])
    for f in ("policy", "data", "lr", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "reward_norm",
              "advantage", "kl_mode", "temperature", "heldout_fraction"):
        assert getattr(run, f) == getattr(recipe, f), f


def test_recipe_budget_is_the_recipes_unless_given():
    recipe, _ = rl_config.parse_config(["--config", str(compare.ROOT / "recipes/cpu_demo.yaml")])
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


def test_ordering_and_verdicts_by_hand():
    summary = compare.summarize(RESULTS)
    o = compare.ordering(summary, "teacher_binary", "rule_substring")
    assert o["per_seed"] == pytest.approx([0.75, 0.25]) and o["diff"] == pytest.approx(0.5) and o["wins"] == 2
    assert compare.verdict([o]) == "reproduced"
    back = compare.ordering(summary, "rule_substring", "teacher_binary")
    assert compare.verdict([back]) == "not reproduced" and compare.verdict([o, back]) == "partly"
    tie = {"per_seed": [0.1, -0.1], "diff": 0.0, "wins": 1}
    assert compare.verdict([tie]) == "not reproduced"  # no better on average: not a reproduction
    assert compare.verdict([{"per_seed": [0.3, -0.1], "diff": 0.1, "wins": 1}]) == "partly"


def test_claims_from_a_summary_by_hand():
    def runs(*ends):  # start 0.5 for every seed
        return [[_eval(0, 0.5, chem=0.5), _eval(10, e, chem=e)] for e in ends]
    results = {"rule_substring": runs(0.3, 0.35), "rule_exact": runs(0.7, 0.12), "rule_jaccard": runs(0.4, 0.4),
               "teacher_binary": runs(0.7, 0.8), "teacher_soft": runs(0.7, 0.8), "student_binary": runs(0.5, 0.5),
               "student_soft": runs(0.65, 0.7), "sft": runs(0.6, 0.75)}
    kappas = {"teacher vs noisy teacher": 0.9, "teacher vs student": 0.7, "noisy teacher vs student": 0.6,
              "teacher vs rule:exact": 0.1}
    got = {c["claim"][:2]: c for c in compare.claims(compare.summarize(results), kappas, fleiss=0.7)}
    assert list(got) == ["1.", "2.", "3.", "4.", "5.", "6."]
    # every pair holds on average; student_soft - rule_exact: 0.65 - 0.7, 0.7 - 0.12: one seed of two
    assert got["1."]["verdict"] == "partly"
    assert "student_soft - rule_exact = +0.265 (a > b in 1/2 seeds)" in got["1."]["evidence"]
    assert "teacher_binary - rule_jaccard = +0.350 (a > b in 2/2 seeds)" in got["1."]["evidence"]
    # substring - Jaccard: -0.1, -0.05; exact - Jaccard: +0.3, -0.28 (+0.01 on average)
    assert got["2."]["verdict"] == "partly"
    assert got["3."]["verdict"] == "reproduced"      # 0.65, 0.7 against 0.5, 0.5
    # 4: teacher 0.75 ± 0.0707, student 0.675 ± 0.0354: gap 0.075 > 0.0707
    assert got["4."]["verdict"] == "not reproduced" and "gap +0.075" in got["4."]["evidence"]
    assert got["5."]["verdict"] == "partly"          # student - sft: +0.05, -0.05; teacher - sft: +0.1, +0.05
    assert got["6."]["verdict"] == "not reproduced" and "0.700 (bar 0.8)" in got["6."]["evidence"]
    assert "teacher vs rule:exact" not in got["6."]["evidence"]  # only the model judges
    assert compare.claims(compare.summarize(results), kappas, fleiss=0.85)[-1]["verdict"] == "reproduced"
    # a claim whose sources did not run is left out, not judged on nothing
    partial = compare.claims(compare.summarize({k: results[k] for k in ("student_soft", "student_binary")}), {}, None)
    assert [c["claim"][:2] for c in partial] == ["3."]


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
    assert fleiss == pytest.approx(14 / 30)
    assert compare.agreement_table({"teacher": [1, 0], "rule:exact": [1, 0]})[2] is None  # one model judge


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
    import model
    import toy

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
    start, end = (rl_config.parse_config(c[2:])[0] for c in commands)
    assert start.eval_only and end.eval_only and end.policy == str(tmp_path / "sft" / "seed2" / "final")
    assert start.eval_verifier == end.eval_verifier == compare.world_spec(compare.TEACHER, rl.data) and start.seed == end.seed == 2
    assert start.eval_samples == end.eval_samples == rl.eval_samples


def test_sft_baseline_trains_on_every_training_question_and_no_held_out_one():
    """sft_pairs: the training questions of train_rl.py's own split, each with its expert reference."""
    import train_rl

    rl, _ = rl_config.parse_config(["--config", str(compare.ROOT / "recipes/cpu_demo.yaml"), "--data", "freeform"])
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
