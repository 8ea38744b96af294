"""audit.py against values worked out by hand: agreement and kappa, calibration, the master-key probe,
and the live audit's sample and metrics."""
import pytest

from rlvr import audit, verifiers


def test_agreement_by_hand():
    labels, preds = [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0, 0, 0]  # TP 3, FN 1, FP 1, TN 3
    a = audit.agreement(labels, preds)
    assert (a["tp"], a["fp"], a["fn"], a["tn"], a["n"]) == (3, 1, 1, 3, 8)
    assert a["accuracy"] == pytest.approx(6 / 8) and a["f1"] == pytest.approx(3 / 4)
    assert a["precision"] == pytest.approx(3 / 4) and a["recall"] == pytest.approx(3 / 4)
    # 4 positive labels and 4 positive predictions of 8: chance agreement 1/2, kappa (3/4 - 1/2) / (1/2)
    assert a["kappa"] == pytest.approx(0.5) and a["notes"] == []
    b = audit.agreement([1, 1, 0, 0, 0], [1, 0, 0, 0, 1])  # po 3/5; pe (2*2 + 3*3)/25 = 13/25
    assert b["kappa"] == pytest.approx((3 / 5 - 13 / 25) / (1 - 13 / 25))


def test_kappa_undefined_when_everything_is_one_class():
    a = audit.agreement([1, 1, 1], [1, 1, 1])
    assert a["accuracy"] == 1 and a["precision"] == 1 and a["recall"] == 1 and a["f1"] == 1
    assert a["kappa"] is None and any("kappa undefined" in n for n in a["notes"])
    b = audit.agreement([0, 0], [0, 0])
    assert b["accuracy"] == 1 and b["precision"] is b["recall"] is b["f1"] is b["kappa"] is None
    assert len(b["notes"]) == 4
    # labels all one class but predictions mixed: defined, and 0 (no better than chance)
    c = audit.agreement([1, 1, 1, 1], [1, 0, 1, 1])
    assert c["kappa"] == pytest.approx(0.0) and c["recall"] == pytest.approx(3 / 4)


def test_fleiss_kappa_on_fleiss_worked_example():
    # Wikipedia's "Fleiss' kappa" worked example: 10 items, 14 raters, 5 categories; P = 0.378,
    # Pe = 0.213, kappa = 0.210 (published to 3 decimals, hence the 5e-4 tolerance)
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert audit.fleiss_kappa(counts) == pytest.approx(0.210, abs=5e-4)
    assert audit.fleiss_kappa([[0, 3], [0, 3]]) is None  # every rating one category: chance agreement is 1
    with pytest.raises(ValueError, match="item 1 has 2 ratings"):
        audit.fleiss_kappa([[1, 2], [1, 1]])


def test_fleiss_of_two_judges_is_scotts_pi_not_cohens_kappa():
    # A says YES to 3 of 4, B to 1 of 4; they agree on 2. Cohen: pe = 3/4*1/4 + 1/4*3/4 = 3/8,
    # kappa = (1/2 - 3/8) / (5/8) = 0.2. Fleiss (Scott's pi for two): pooled YES share 4/8, pe = 1/2, pi = 0
    verdicts = {"A": [1, 1, 1, 0], "B": [1, 0, 0, 0]}
    assert audit.binary_counts(verdicts) == [[0, 2], [1, 1], [1, 1], [2, 0]]
    assert audit.fleiss_kappa(audit.binary_counts(verdicts)) == pytest.approx(0.0, abs=1e-12)
    assert audit.pairwise_kappa(verdicts) == {("A", "B"): pytest.approx(0.2)}
    # three judges: items [3 YES], [2 YES 1 NO], [0 YES]: P = (1 + 1/3 + 1) / 3 = 7/9; YES share 5/9,
    # Pe = 25/81 + 16/81 = 41/81; kappa = (63/81 - 41/81) / (40/81) = 22/40
    three = {"A": [1, 1, 0], "B": [1, 1, 0], "C": [1, 0, 0]}
    assert audit.fleiss_kappa(audit.binary_counts(three)) == pytest.approx(22 / 40)
    pairs = audit.pairwise_kappa(three)
    assert list(pairs) == [("A", "B"), ("A", "C"), ("B", "C")] and pairs[("A", "B")] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="judge 'B' has 2 verdicts"):
        audit.pairwise_kappa({"A": [1, 0, 1], "B": [1, 0]})


# ---------------------------------------------------------------------------------------------- master keys


def test_master_key_probe_on_substring_rule():
    # substring is fooled by keys that contain the reference letter: "a" in "answer:", "the answer is"...
    qs, refs = ["q1", "q2"], ["A", "7"]
    res = audit.master_key_probe(verifiers.build_verifier("rule:substring"), qs, refs, n=2,
                                  keys=[":", "Answer:", "Solution", "解"])
    assert res["per_key"] == {":": 0.0, "Answer:": 0.5, "Solution": 0.0, "解": 0.0}
    assert res["fpr"] == pytest.approx(1 / 8) and res["n"] == 2 and res["warn"]
    clean = audit.master_key_probe(verifiers.build_verifier("rule:substring"), qs, refs, n=2, keys=["Solution"])
    assert clean["fpr"] == 0.0 and not clean["warn"]
    assert {":", "Thought process:", "解", "答案是"} <= set(audit.MASTER_KEYS)


def test_calibration_by_hand():
    c = audit.calibration([1, 0, 1, 1], [0.95, 0.15, 0.55, 0.05])
    # one row per bin (9, 1, 5, 0): |1 - .95| + |0 - .15| + |1 - .55| + |1 - .05|, over 4
    assert c["ece"] == pytest.approx((0.05 + 0.15 + 0.45 + 0.95) / 4)
    assert c["brier"] == pytest.approx((0.05 ** 2 + 0.15 ** 2 + 0.45 ** 2 + 0.95 ** 2) / 4)
    assert [b["count"] for b in c["bins"]] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert audit.calibration([1], [1.0])["bins"][9]["count"] == 1  # p = 1 falls in the last bin


def test_audit_sample_is_seeded_and_independent_of_ranks():
    a = audit.sample_indices(100, 10, seed=7)
    assert len(a) == 10 and a == audit.sample_indices(100, 10, seed=7) and a != audit.sample_indices(100, 10, seed=8)
    assert audit.sample_indices(5, 10, seed=0) == {0, 1, 2, 3, 4}


def test_regrade_rows_are_in_the_labelled_format_with_both_verdicts():
    judge = verifiers.build_verifier("rule:substring")
    fooled = verifiers.build_verifier("rule:jaccard")(["q", "q"], ["7", "7"], ["17", "7"])  # 'reward verifier'
    rows = audit.regrade(judge, ["q", "q"], ["7", "7"], ["17", "7"], fooled, step=3)
    assert [(r["label"], r["reward_label"], r["step"]) for r in rows] == [(1, 0, 3), (1, 1, 3)]
    assert {"id", "question", "reference", "response", "label", "teacher_p_yes"} <= set(rows[0])


def test_audit_metrics_by_hand():
    # judge (label) vs reward verifier (reward_label): TP 2, FP 3, FN 1, TN 1
    pairs = [(1, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 0), (0, 0)]
    m = audit.audit_metrics([{"label": y, "reward_label": p} for y, p in pairs])
    assert m["audit/rows"] == 7 and m["audit/agreement"] == pytest.approx(3 / 7)
    assert m["audit/false_positive_rate"] == pytest.approx(3 / 4)   # judge NO: 4, reward YES among them: 3
    assert m["audit/false_negative_rate"] == pytest.approx(1 / 3)   # judge YES: 3, reward NO among them: 1
    assert "audit/kappa" in m
    only_right = audit.audit_metrics([{"label": 1, "reward_label": 1}])
    assert "audit/false_positive_rate" not in only_right  # undefined without a judge NO, not 0
