"""audit.py against values worked out by hand: agreement and kappa, calibration, the master-key probe,
and the live audit's sample and metrics."""
import pytest

import audit
import reward


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


# ---------------------------------------------------------------------------------------------- master keys


def test_master_key_probe_on_substring_rule():
    # substring is fooled by keys that contain the reference letter: "a" in "answer:", "the answer is"...
    qs, refs = ["q1", "q2"], ["A", "7"]
    res = audit.master_key_probe(reward.build_verifier("rule:substring"), qs, refs, n=2,
                                  keys=[":", "Answer:", "Solution", "解"])
    assert res["per_key"] == {":": 0.0, "Answer:": 0.5, "Solution": 0.0, "解": 0.0}
    assert res["fpr"] == pytest.approx(1 / 8) and res["n"] == 2 and res["warn"]
    clean = audit.master_key_probe(reward.build_verifier("rule:substring"), qs, refs, n=2, keys=["Solution"])
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
    judge = reward.build_verifier("rule:substring")
    fooled = reward.build_verifier("rule:jaccard")(["q", "q"], ["7", "7"], ["17", "7"])  # 'reward verifier'
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
