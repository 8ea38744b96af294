"""Hybrid routing (verifiers.HybridVerifier, --verifier hybrid:<spec>): rule:math where both the reference and
the answer parse as mathematics, the model verifier elsewhere, per row."""
import pytest
import torch

import reward
from rlvr import config, rules, verifiers

ROWS = [  # (reference, response, routed to rule:math?)
    ("7 kg", "7000 g", False),                    # another unit: rule:math ignores units, the model judges
    ("7 kg", "7 kg", True),                       # the reference's own unit: the numbers decide
    ("7 kg", "seven kilograms", False),            # the answer is words: the model judges
    ("Birch Limited", "Birch Ltd", False),          # the reference is prose
    ("\\frac{1}{2}", "Let me see.\nTherefore, the answer is 0.5", True),
    ("7", "Thought process:", False),               # master keys carry no mathematics
    ("12", ":", False),
    ("3", "Let's solve this step by step.", False),
    ("(C)", "C", True),
    ("Western blot", "7", False),
]


def test_routing_is_decided_per_row():
    assert [rules.routes_to_math(ref, resp) for ref, resp, _ in ROWS] == [m for _, _, m in ROWS]


class Fake:
    """A verifier that scores row i of each call by a value of its own, and records what it read."""

    def __init__(self, name, value):
        self.name, self.value, self.calls = name, value, []

    def __call__(self, questions, references, responses, seeds=None):
        self.calls.append((list(references), list(responses), seeds))
        s = torch.tensor([self.value + 0.01 * i for i in range(len(responses))])
        return reward.Judgement((s >= 0.5).float(), s, s.clone(), torch.full((len(s),), self.value > 0.5))


def test_the_judgement_is_assembled_in_the_rows_order_and_master_keys_never_reach_the_rule():
    math, judge = Fake("rule:math", 0.9), Fake("model", 0.2)
    h = verifiers.HybridVerifier(math, judge)
    refs, resps = [r for r, _, _ in ROWS], [a for _, a, _ in ROWS]
    j = h(["q"] * len(ROWS), refs, resps, seeds=list(range(100, 100 + len(ROWS))))
    # math rows 1, 4, 8 get 0.90, 0.91, 0.92; model rows 0, 2, 3, 5, 6, 7, 9 get 0.20 ... 0.26
    want = [0.20, 0.90, 0.21, 0.22, 0.91, 0.23, 0.24, 0.25, 0.92, 0.26]
    assert j.soft.tolist() == pytest.approx(want, abs=1e-6)  # float32 of two-decimal values
    assert j.binary.tolist() == [float(w >= 0.5) for w in want]
    assert j.judged.tolist() == [w > 0.5 for w in want]
    assert math.calls == [(["7 kg", "\\frac{1}{2}", "(C)"], [resps[1], resps[4], resps[8]], [101, 104, 108])]
    assert judge.calls[0][2] == [100, 102, 103, 105, 106, 107, 109]  # each row's own seed
    # the route travels with the judgement (the step's verifier/routed_math_share sums it)
    assert j.routed.tolist() == [routed for _, _, routed in ROWS] and j.select([1, 0]).routed.tolist() == [True, False]
    assert not any(key in math.calls[0][1] for key in ("Thought process:", ":", "Let's solve this step by step."))
    # no row for the model: it is still called (a sharded verifier holds collectives in every call)
    j = h(["q"], ["7 kg"], ["7 kg"])
    assert judge.calls[-1][:2] == ([], []) and j.soft.tolist() == pytest.approx([0.9], abs=1e-6)


def test_a_built_hybrid_grades_math_rows_with_the_rule_and_the_rest_with_the_judge(monkeypatch):
    seen = []
    rule = rules.RuleVerifier.__call__
    monkeypatch.setattr(rules.RuleVerifier, "__call__",
                        lambda self, q, r, a, seeds=None: seen.extend(a) or rule(self, q, r, a, seeds))
    h = verifiers.build_verifier("hybrid:py:worlds.freeform:teacher")
    try:
        refs = ["7 kg", "7 kg", "7", "Birch Limited", "1/2"]
        resps = ["7 kg", "seven kilograms", "Thought process:", "Birch Ltd", "0.5"]
        j = h(["q"] * 5, refs, resps)
    finally:
        h.math.math.close()
    assert seen == ["7 kg", "0.5"]  # only the mathematical rows reached rule:math
    # rule:math: 7 kg = 7 kg, 1/2 = 0.5; the teacher: seven kilograms = 7 kg, Birch Ltd = Birch Limited,
    # "Thought process:" is no answer
    assert j.binary.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert h.name == "hybrid:py:worlds.freeform:teacher"


# issue 32: rule:math ignores units and reads a hedge's numbers; each of these reached it and was accepted
WRONG_FOR_7_KG = ["7 g", "7 mL", "7 apples", "3 kg, 7 kg", "3 kg; 7 kg", "x = 3 or 7", "Thought process: 7"]


def test_the_rule_never_judges_an_answer_in_another_unit_or_with_more_than_one_candidate(monkeypatch):
    """The rows of issue 32 go to the model (here the teacher, the truth): the hybrid accepts none of the
    wrong answers and does not reject the right "7000 g"; the rule reads only answers in the reference's terms."""
    rows = [("7 kg", a, 0.0) for a in WRONG_FOR_7_KG] + [("7 h", "7 min", 0.0), ("7 kg", "7000 g", 1.0),
                                                          ("7", "3, 7", 0.0), ("7", "3 \\vee 7", 0.0)]
    assert not any(rules.routes_to_math(ref, a) for ref, a, _ in rows)
    seen = []
    rule = rules.RuleVerifier.__call__
    monkeypatch.setattr(rules.RuleVerifier, "__call__",
                        lambda self, q, r, a, seeds=None: seen.extend(a) or rule(self, q, r, a, seeds))
    h = verifiers.build_verifier("hybrid:py:worlds.freeform:teacher")
    teacher = verifiers.build_verifier("py:worlds.freeform:teacher")
    try:
        refs, answers = [r for r, _, _ in rows], [f"Therefore, the answer is {a}" for _, a, _ in rows]
        j = h(["q"] * len(rows), refs, answers)
        assert j.binary.tolist() == [want for _, _, want in rows]
        assert j.binary.tolist() == teacher(["q"] * len(rows), refs, answers).binary.tolist()
        assert seen == []
        # what the rule does read it gets right: the reference's own unit, a bare number, an option
        ok = [("7 kg", "7 kg", 1.0), ("7 kg", "3 kg", 0.0), ("7", "7.0", 1.0), ("7", "8", 0.0), ("(C)", "C", 1.0)]
        assert all(rules.routes_to_math(ref, a) for ref, a, _ in ok)
        j = h(["q"] * len(ok), [r for r, _, _ in ok], [a for _, a, _ in ok])
        assert j.binary.tolist() == [want for _, _, want in ok] and len(seen) == len(ok)
    finally:
        h.math.math.close()


@pytest.mark.parametrize("spec", ["hybrid:", "hybrid:rule:math", "hybrid:policy:rlpr", "hybrid:hybrid:tiny",
                                  "hybrid:py:nomodule:f"])
def test_a_hybrid_without_a_model_verifier_is_refused_in_one_line(spec):
    with pytest.raises(config.ConfigError) as e:
        verifiers.check_spec(spec, "verifier")
    assert str(e.value).startswith(f"--verifier {spec!r}") and "\n" not in str(e.value)
