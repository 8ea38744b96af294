"""freeform.py: the free-form world (its subjects, its teacher, its splits) and the py: verifier spec."""
from pathlib import Path

import pytest
import torch

import data
import train_rl
from rlvr import config, judging, remote, verifiers
from worlds import freeform

ROOT = Path(__file__).resolve().parents[1]


def judge(reference, *responses):
    return [freeform.judge(reference, r) for r in responses]


def test_teacher_by_hand_physics_numbers_units_and_conversions():
    right = ["7 kg", "7 kilograms", "seven kilograms", "7000 g", "7000 grams", "7kg", "The answer is 7 kg.",
             "Therefore, the answer is 7 kilogram", "7 KG"]
    wrong = ["3 kg", "7 g", "7 grams", "70 kg", "3000 g", "7", "7 m", "7 kg or 3 kg", "3 kg or 7 kg",
             "Which is heavier: 3 kg or 7 kg?", "seven", ""]
    assert judge("7 kg", *right) == [1] * len(right)
    assert judge("7 kg", *wrong) == [0] * len(wrong)
    assert judge("4 m", "4 metres", "four meters", "400 cm", "400 centimetres") == [1] * 4
    assert judge("4 m", "4 cm", "40 m", "4 km", "4 kg") == [0] * 4


# every conversion by hand (never from freeform.UNITS): 1 h = 60 min, 1 L = 1000 mL, 1 kg = 1000 g, 1 m = 100 cm
BY_HAND = {"7 h": ("420 min", "420 minutes", "7 hours", "seven hours", "7 hrs"),
           "2 h": ("120 min", "120 mins"),
           "3 L": ("3000 mL", "3000 millilitres", "3 litres", "3 liters", "3000 milliliters"),
           "7 kg": ("7000 g", "7000 grams"),
           "4 m": ("400 cm", "400 centimetres")}
WRONG_BY_HAND = {"7 h": ("700 min", "7 min", "70 min", "4200 min", "420 h"),  # 700: a factor of 100 for the hour
                 "2 h": ("200 min", "12 min"),
                 "3 L": ("300 mL", "30 mL", "3 mL", "3000 L"),
                 "7 kg": ("700 g", "70000 g", "7 g"),
                 "4 m": ("4000 cm", "40 cm", "4 cm")}


@pytest.mark.parametrize("reference", list(BY_HAND))
def test_teacher_converts_hours_litres_kilograms_and_metres_by_hand(reference):
    assert judge(reference, *BY_HAND[reference]) == [1] * len(BY_HAND[reference])
    assert judge(reference, *WRONG_BY_HAND[reference]) == [0] * len(WRONG_BY_HAND[reference])


def test_the_generators_converted_forms_equal_the_conversions_by_hand():
    """A physics problem's right answers in the smaller unit are the hand-converted value, and its
    near-misses in the smaller unit are not (the world's data, not only its judge)."""
    factor = {"h": (60, "min"), "L": (1000, "mL"), "kg": (1000, "g"), "m": (100, "cm")}
    seen = set()
    for p in freeform._problems(500, 0, "rl"):
        if p.subject != "physics":
            continue
        value, unit = p.reference.split()
        f, small = factor[unit]
        seen.add(unit)
        assert f"{int(value) * f} {small}" in p.right_forms, (p.reference, p.right_forms)
        assert f"{int(value)} {small}" in p.near and f"{int(value) * f} {small}" not in p.near
    assert seen == set(factor)


def test_teacher_by_hand_names_aliases_abbreviations_word_order_articles():
    # economics: legal form abbreviated or left out, case, article; another legal form is another firm
    assert judge("Birch Limited", "Birch Limited", "Birch Ltd", "Birch Ltd.", "birch limited", "Birch",
                 "the Birch Limited", "BIRCH LTD") == [1] * 7
    assert judge("Birch Limited", "Birch Corporation", "Birch Corp", "Alder Limited", "Birch Ltd or Alder Corp",
                 "Alder Corp or Birch Ltd", "Birch Limited or Alder Limited", "Birch Limit", "Birchwood") == [0] * 8
    # geography: abbreviation with or without a dot, the bare name, word order, article
    assert judge("River Varo", "River Varo", "R Varo", "R. Varo", "Varo", "the Varo River", "Varo River",
                 "river varo") == [1] * 7
    assert judge("Mount Kelo", "Mt Kelo", "Mt. Kelo", "Kelo", "mount kelo") == [1] * 4
    assert judge("Mount Kelo", "Lake Kelo", "River Kelo", "Mount Tarn", "Mt Kelo or Mt Tarn", "Kelo Tarn") == [0] * 5
    # chemistry: the symbol, the name with its symbol; a compound of it is another substance
    assert judge("Tarnium", "tarnium", "Tn", "Tarnium (Tn)", "element Tn", "TARNIUM") == [1] * 5
    assert judge("Tarnium", "tarnium oxide", "tarnium chloride", "Velium", "Vl", "Velium (Tn)", "Tarnium or Velium",
                 "Tr") == [0] * 7
    # biology: the genus abbreviated; the genus with the other epithet (or the reverse) is another species
    assert judge("Velka ardens", "Velka ardens", "V. ardens", "V ardens", "velka ardens") == [1] * 4
    assert judge("Velka ardens", "Velka minax", "Tora ardens", "V. minax", "ardens", "Velka", "V. ardens or T. minax",
                 "Which is longer-lived: V. ardens (6 years) or Tora minax (2 years)?") == [0] * 7


def test_teacher_spec_noise_and_check():
    t = verifiers.build_verifier("py:worlds.freeform:teacher")
    j = t(["q"] * 4, ["7 kg", "7 kg", "Birch Limited", "Tarnium"], ["7000 g", "7 g", "Birch", "tarnium oxide"])
    assert j.binary.tolist() == [1.0, 0.0, 1.0, 0.0] and torch.equal(j.soft, j.binary) and j.judged.all()
    # the noisy teacher flips ~10% of labels, the same ones every call (a hash of the row), none in common state
    rows = freeform.judge_rows("other:500,near:500", seed=3)
    args = ([r.question for r in rows], [r.reference for r in rows], [r.response for r in rows])
    clean = freeform.teacher(*args)
    noisy = freeform.teacher_noisy10(*args)
    flips = sum(a != b for a, b in zip(clean, noisy)) / len(rows)
    assert 0.07 < flips < 0.13, flips  # 1000 draws of p = 0.1: 3.2 standard deviations either side
    assert noisy == freeform.teacher_noisy10(*args) == freeform.teacher_noisy10(*[a[::-1] for a in args])[::-1]
    assert sum(a != b for a, b in zip(clean, freeform.teacher_noisy20(*args))) / len(rows) > 0.15


def test_each_subject_generator():
    problems = freeform._problems(500, 0, "rl")
    assert [p.subject for p in problems[:10]] == list(freeform.SUBJECTS) * 2
    assert len({p.question for p in problems}) == 500
    for p in problems:
        a, b = p.values
        assert a != b and 1 <= min(a, b) and max(a, b) <= 9
        assert p.values[p.win] == (max if p.larger else min)(a, b)  # the option with the larger (smaller) number
        # the reference is one of the right forms; every right form and the option as written are right
        assert p.reference in p.right_forms
        assert all(freeform.judge(p.reference, f) for f in p.right_forms + [p.options[p.win]]), p.question
        # near-misses, the other option, hedges and the question itself are wrong
        assert not any(freeform.judge(p.reference, f) for f in p.near + p.hedges() + [p.wrong_option, p.question])
        assert str(p.values[0]) in p.question and str(p.values[1]) in p.question
    by_subject = {s: [p for p in problems if p.subject == s] for s in freeform.SUBJECTS}
    assert {s: len(v) for s, v in by_subject.items()} == {s: 100 for s in freeform.SUBJECTS}
    assert {p.larger for p in problems} == {True, False}
    p = by_subject["physics"][0]
    assert p.question.startswith("Which is ") and p.reference.split()[1] in [u[0] for u in freeform.UNITS.values()]
    assert by_subject["economics"][0].reference.split()[1] in freeform.LEGAL
    assert by_subject["geography"][0].reference.split()[0] in freeform.FEATURES
    assert by_subject["chemistry"][0].reference.lower() in freeform.ELEMENTS
    assert by_subject["biology"][0].reference.split()[0] in freeform.GENERA


def test_records_and_held_out_questions_are_disjoint_from_training_and_verifier_rows():
    recs = freeform.records()
    assert len(recs) == freeform.RL_QUESTIONS == len({r.question for r in recs}) and recs == freeform.records()
    assert {r.meta["subject"] for r in recs} == set(freeform.SUBJECTS)
    assert recs[0].messages == [{"role": "user", "content": recs[0].question}]
    train, heldout = freeform.split(recs, 0.1)
    assert 30 <= len(heldout) <= 90 and {r.question for r in train}.isdisjoint({r.question for r in heldout})
    assert (train, heldout) == data.split_heldout(recs, 0.1)  # what train_rl.py holds out
    # the warm start sees training questions only
    warm = {m[-1]["content"] for m, _ in freeform.warm_start_pairs(0.1)}
    assert warm == {r.question for r in train}
    # the verifier's rows never ask an RL question, held out or not
    rows = freeform.judge_rows("other:300,near:300,hedge:200,copy:100,garbage:100,cut:200", seed=0)
    assert {r.question for r in rows}.isdisjoint({r.question for r in recs})
    assert all(r.label == freeform.judge(r.reference, r.response) for r in rows)
    assert 0.3 < sum(r.label for r in rows) / len(rows) < 0.7  # each kind half right answers


def test_warm_start_answers_come_in_a_mix_of_surface_forms():
    pairs = freeform.warm_start_pairs(0.1)
    probs = {p.question: p for p in freeform._problems(freeform.RL_QUESTIONS, 0, "rl")}
    kinds = {"reference": 0, "other right form": 0, "hedge": 0}
    for messages, answer in pairs:
        p = probs[messages[-1]["content"]]
        kinds["reference" if answer == p.reference else "hedge" if answer in p.hedges() else "other right form"] += 1
        assert answer in p.hedges() or freeform.judge(p.reference, answer)
    n = len(pairs)  # the option as the question writes it is often the reference itself (always in physics)
    assert kinds["other right form"] / n > 0.35 and 0.2 < kinds["reference"] / n < 0.6 and 0.04 < kinds["hedge"] / n < 0.16


def test_judge_rows_mix_errors():
    with pytest.raises(ValueError, match="kind one of other, near, hedge, copy, garbage, cut"):
        freeform.parse_mix("other:3,digit:3")


def test_py_spec_loads_and_its_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a user's module in the working directory
    (tmp_path / "myjudge.py").write_text(
        "def half(questions, references, responses):\n    return [0.5] * len(responses)\n"
        "def short(questions, references, responses):\n    return [1.0]\n"
        "def big(questions, references, responses):\n    return [2.0] * len(responses)\n"
        "def nan(questions, references, responses):\n    return [float('nan')] * len(responses)\n"
        "def text(questions, references, responses):\n    return ['yes'] * len(responses)\n"
        "def flip(questions, references, responses):\n    return [float(x != y) for x, y in zip(references, responses)]\n")
    v = verifiers.build_verifier("py:myjudge:half")
    j = v(["q", "q"], ["a", "b"], ["a", "c"])
    assert v.name == "py:myjudge:half" and j.soft.tolist() == [0.5, 0.5] and j.binary.tolist() == [1.0, 1.0]
    for spec, message in [("py:nomodule:f", "cannot import module 'nomodule'"),
                          ("py:myjudge:missing", "module 'myjudge' has no function 'missing'"),
                          ("py:myjudge", "expected py:module.path:function"),
                          ("py:myjudge:big", r"returned 2.0; scores must be in \[0, 1\]"),
                          ("py:myjudge:nan", r"scores must be in \[0, 1\]"),
                          ("py:myjudge:text", "not a list of numbers")]:
        with pytest.raises((ValueError, remote.VerifierError), match=message):
            verifiers.build_verifier(spec)
    short = verifiers.build_verifier("py:myjudge:short")  # right on the one-row check, wrong on a batch
    with pytest.raises(remote.VerifierError, match=r"returned shape \(1,\) for 3 responses"):
        short(["q"] * 3, ["a"] * 3, ["a"] * 3)
    # a flag naming a bad spec stops before any model loads, naming the flag
    for flag in ("verifier", "eval_verifier", "audit_verifier", "log_verifiers"):
        with pytest.raises(config.ConfigError, match=f"--{flag} 'py:myjudge:missing': .*no function 'missing'"):
            train_rl.parse_config([f"--{flag}", "py:myjudge:missing"])


def test_exact_rule_by_hand():
    v = verifiers.build_verifier("rule:exact")
    j = v(["q"] * 6, ["Birch Limited", "7 kg", "7 kg", "Paris", "", "B"],
          ["Therefore, the answer is birch  limited.", "7 kg or 3 kg", "7 kilograms", "paris!", "", "b"])
    assert j.binary.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0] and torch.equal(j.soft, j.binary) and j.judged.all()


def test_rules_fail_on_this_world_where_the_teacher_does_not():
    # the paper's problem by construction: on the world's judged rows, substring accepts hedges, copies and
    # compounds, exact match rejects most right answers; the numbers are the README's table
    rows = [(freeform.subject_of(r.question), r.question, r.reference, r.response)
            for r in freeform.judge_rows("other:200,near:200,hedge:200,copy:200", seed=0)]
    errors = freeform.rule_errors(rows, ("rule:substring", "rule:exact", "rule:jaccard"))
    assert errors["rule:substring"]["all"][0] > 0.2   # false positives: hedges, copies of the question
    assert errors["rule:exact"]["all"][1] > 0.5       # false negatives: other surface forms
    assert errors["rule:jaccard"]["all"][0] > 0.05 and errors["rule:jaccard"]["all"][1] > 0.2
    assert errors["rule:exact"]["all"][0] == 0.0      # exact match never accepts a wrong answer here


def test_this_worlds_recipe_runs_this_world_and_the_numeric_toy_is_a_recipe():
    import train_rl
    import worlds

    default, _ = train_rl.parse_config(["--config", str(ROOT / "recipes" / "cpu_freeform.yaml")])
    assert (default.data, default.policy, default.verifier, default.eval_verifier, default.audit_verifier) == \
        ("freeform", "tiny", "tiny", "auto", "auto")
    train, heldout = train_rl.load_data(default)
    graders = judging.choose_graders(default, [r.reference for r in train + heldout])  # auto: the world's teacher
    assert (graders.eval_verifier, graders.audit_verifier) == ("py:worlds.freeform:teacher", "py:worlds.freeform:teacher")
    assert worlds.of("freeform").tiny_policy is freeform.tiny_policy and worlds.of("freeform").teacher == graders.eval_verifier
    assert worlds.of("toy").tiny_verifier.__module__ == "worlds.toy" and worlds.of("some.jsonl") is worlds.WORLDS["toy"]
    assert (train, heldout) == freeform.split(freeform.records(), default.heldout_fraction)
    toy_cfg, _ = train_rl.parse_config(["--config", str(ROOT / "recipes" / "cpu_numeric_toy.yaml")])
    assert (toy_cfg.data, toy_cfg.eval_verifier) == ("toy", "rule:math")
