"""train_verifier.py: eval figures against hand-computed ones, the labeller's crash safety and coverage
check, one-line flag errors, the added negatives, the distillation of a rule teacher into the tiny
student, sft resume and signals, and the saved settings that make a student judged as it learned."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
from rlvr import audit, config, remote, verifier_data, verifier_prompt, verifiers
from worlds import toy
import train_verifier as TV

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_rows(n: int, seed: int) -> list[dict]:
    return [r.to_json() for r in toy.judge_rows(f"near:{n}", seed)]


# ----------------------------------------------------------------------------------------------
# eval: figures by hand

# rule:substring judges "reference occurs in the answer". Hand-derived predictions in the comments.
EVAL_ROWS = [
    {"question": "q1", "reference": "7", "response": "work\nTherefore, the answer is 7.", "label": 1},  # pred 1: TP
    {"question": "q2", "reference": "7", "response": "Therefore, the answer is 17.", "label": 0},       # pred 1: FP
    {"question": "q3", "reference": "Paris", "response": "paris", "label": True},                       # pred 1: TP
    {"question": "q4", "reference": "4", "response": "8/2", "label": "1"},                              # pred 0: FN
    {"question": "q5", "reference": "5", "response": "6", "label": 0},                                  # pred 0: TN
    {"question": "q6", "reference": "A", "response": "B", "label": "false"},                            # pred 0: TN
    {"question": "q7", "reference": 9, "response": "9.0", "label": 1.0},                                # pred 1: TP
    {"question": "q8", "reference": "3", "response": "", "label": 0},                                   # pred 0: TN
]


def test_eval_figures_equal_hand_computed(tmp_path):
    path = write_jsonl(tmp_path / "labelled.jsonl", EVAL_ROWS)
    report = TV.run(["eval", "--verifier", "rule:substring", "--data", str(path), "--out_dir", str(tmp_path / "ev"),
                     "--out", str(tmp_path / "report.json"), "--wandb_mode", "disabled"])
    # TP 3, FP 1, FN 1, TN 3
    assert (report["tp"], report["fp"], report["fn"], report["tn"]) == (3, 1, 1, 3)
    assert report["accuracy"] == pytest.approx(6 / 8)
    assert report["precision"] == pytest.approx(3 / 4) and report["recall"] == pytest.approx(3 / 4)
    assert report["f1"] == pytest.approx(3 / 4)
    # 4 positive labels and 4 positive predictions of 8: chance agreement 1/2, kappa (3/4 - 1/2) / (1/2)
    assert report["kappa"] == pytest.approx(0.5)
    # p_yes of a rule is its binary: bin 0 holds 4 rows with 1 positive, bin 9 holds 4 rows with 3 positives
    assert report["ece"] == pytest.approx(4 / 8 * 0.25 + 4 / 8 * 0.25)
    assert report["brier"] == pytest.approx(2 / 8)
    # of the master keys only "Answer:" contains a reference ("A", casefolded), for 1 of the 8 pairs
    assert report["master_key_per_key"]["Answer:"] == pytest.approx(1 / 8)
    assert report["master_key_fpr"] == pytest.approx(1 / (8 * len(audit.MASTER_KEYS)))
    assert report["judgements_per_s"] > 0 and report["notes"] == [] and report["unjudged"] == 0
    assert json.loads((tmp_path / "report.json").read_text())["kappa"] == pytest.approx(0.5)
    png = (tmp_path / "ev" / "reliability.png").read_bytes()  # metrics.reliability_plot: 500 x 500
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (500).to_bytes(4, "big") * 2


def test_eval_cli_prints_json(tmp_path):
    path = write_jsonl(tmp_path / "labelled.jsonl", EVAL_ROWS)
    out = subprocess.run([sys.executable, "train_verifier.py", "eval", "--verifier", "rule:substring", "--data",
                          str(path), "--out_dir", str(tmp_path / "ev"), "--wandb_mode", "disabled"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1])
    assert report["kappa"] == pytest.approx(0.5) and report["n"] == 8


def test_eval_all_labels_equal_reports_null_kappa(tmp_path):
    rows = [{"question": f"q{i}", "reference": "7", "response": "7", "label": 1} for i in range(3)]
    report = TV.run(["eval", "--verifier", "rule:substring", "--data", str(write_jsonl(tmp_path / "l.jsonl", rows)),
                     "--out_dir", str(tmp_path / "ev"), "--wandb_mode", "disabled"])
    assert report["kappa"] is None and report["accuracy"] == 1.0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["kappa"] is None


@pytest.mark.parametrize("command", ["eval", "label"])
def test_eval_and_label_reject_an_empty_question_or_reference(tmp_path, command):
    for field, value in (("question", " "), ("reference", "")):
        path = write_jsonl(tmp_path / "bad.jsonl", [EVAL_ROWS[0], {**EVAL_ROWS[1], field: value}])
        flags = ["--out_dir", str(tmp_path / "ev"), "--wandb_mode", "disabled"] if command == "eval" \
            else ["--out", str(tmp_path / "l.jsonl")]
        with pytest.raises(data.DataError, match=rf"bad\.jsonl, row 2: field '{field}' is empty"):
            TV.run([command, "--data", str(path), *flags])
        assert not (tmp_path / "l.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# label: crash safety, and a teacher that does not answer is an error, not all-NO labels


def test_label_killed_half_way_and_rerun_gives_one_label_per_row(tmp_path, tiny_model_dir):
    rows = toy.judge_rows("near:120", seed=3)
    src = write_jsonl(tmp_path / "rollouts.jsonl", [{"step": 1, **r.to_json(), "reward": 0.0} for r in rows])
    ids = {r.id for r in rows}
    out = tmp_path / "labels.jsonl"
    # a local-model teacher (random weights: its first token is anything, so --verifier_max_unjudged 1),
    # one row per write: slow enough to be killed half way
    args = ["label", "--data", str(src), "--teacher", tiny_model_dir, "--verifier_paper_defaults",
            "--verifier_max_unjudged", "1",
            "--rows_per_write", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "train_verifier.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 10):
        assert proc.poll() is None and time.monotonic() < deadline, "labeller ended before it was killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.read_bytes().count(b"\n") < len(ids)
    with open(out, "ab") as f:  # as if the kill had landed mid-write: a torn last line
        f.write(b'{"id": "0123456789abcdef", "question": "What is')
    TV.run([*args[:-3], "16", "--out", str(out)])
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in labelled) == sorted(ids)  # exactly one label per distinct row
    clean = tmp_path / "clean.jsonl"
    TV.run([*args[:-3], "16", "--out", str(clean)])
    reference = {r["id"]: r for r in map(json.loads, clean.read_text().splitlines())}
    for r in labelled:
        assert r["label"] == reference[r["id"]]["label"]
        assert r["teacher_p_yes"] == pytest.approx(reference[r["id"]]["teacher_p_yes"], abs=1e-5)
    hashes = data.read_hashes(out.with_suffix(".hashes.txt"))
    assert hashes == {data.question_hash(r.question) for r in rows}


def test_teacher_answering_neither_judgement_token_stops_the_labeller(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", labelled_rows(8, seed=1))
    out = tmp_path / "labels.jsonl"
    with pytest.raises(remote.VerifierError, match="neither 'YES' nor 'NO'"):
        TV.run(["label", "--data", str(src), "--teacher", tiny_model_dir, "--verifier_paper_defaults", "--out",
                str(out)])
    assert not out.exists() or out.read_text() == ""  # no all-NO labels written


def test_damaged_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "labels.jsonl"
    out.write_text('{"id": "a", "label": 1}\nnot json\n{"id": "b", "label": 0}\n')
    with pytest.raises(ValueError, match=r"labels\.jsonl: row 2"):
        verifier_data.label_rows(None, [], out, 1, "rule:math")
    out.write_text('{"id": "a", "label": 1, "teacher": "rule:math"}\n{"question": "q"}\n')
    with pytest.raises(data.DataError, match=r"labels\.jsonl, row 2: not a labelled row"):
        verifier_data.label_rows(None, [], out, 1, "rule:math")


# ----------------------------------------------------------------------------------------------
# validation: one pass before any model loads, one line naming the flag


@pytest.mark.parametrize("argv,message", [
    (["sft", "--batch_size", "6", "--micro_batch_size", "4"], "--batch_size 6: must split into 1 ranks x whole"),
    (["sft", "--lr", "0"], "--lr 0.0: must be > 0"),
    (["sft", "--epochs", "-1"], "--epochs -1.0: must be > 0"),
    (["sft", "--heldout_fraction", "1"], "--heldout_fraction 1.0: must be in [0, 1)"),
    (["sft", "--policy_samples", "2"], "--policy_samples 2: needs --policy"),
    (["sft", "--policy", "tiny"], "--policy_samples 0: must be >= 1 with --policy"),
    (["sft", "--master_key_negatives", "-0.1"], "--master_key_negatives -0.1: must be >= 0"),
    (["sft", "--policy_rollouts", "nowhere.jsonl"], "--policy_rollouts 'nowhere.jsonl': no such file"),
    (["eval"], "--data '': is required"),
    (["label", "--rows_per_write", "0"], "--rows_per_write 0: must be >= 1"),
    (["label", "--verifier_timeout", "0"], "--verifier_timeout 0.0: must be > 0"),
])
def test_bad_values_are_refused_before_any_model_loads(argv, message):
    with pytest.raises(config.ConfigError) as e:
        TV.parse_config(argv[0], argv[1:])
    assert str(e.value).startswith(message), str(e.value)


def test_choices_from_a_config_file_and_unknown_commands_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("balance: oversampel\n")
    with pytest.raises(config.ConfigError, match="--balance 'oversampel': invalid choice; choose from none, oversample"):
        TV.parse_config("sft", ["--config", str(tmp_path / "c.yaml")])
    with pytest.raises(config.ConfigError, match="unknown command 'train'"):
        TV.run(["train"])
    cfg, _ = TV.parse_config("sft", ["--resume"])
    assert cfg.resume == "yes" and TV.parse_config("sft", ["--resume", "auto"])[0].resume == "auto"
    assert TV.parse_config("sft", [])[0].resume == "no"


def test_a_bad_flag_is_one_line_and_exit_status_2(tmp_path):
    out = subprocess.run([sys.executable, "train_verifier.py", "sft", "--batch_size", "6", "--micro_batch_size", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "train_verifier.py sft: error: --batch_size 6: must split into 1 ranks x whole micro-batches of "
        "--micro_batch_size 4"]


def test_resume_without_a_checkpoint_is_an_error_and_auto_starts_fresh(tmp_path, tiny_model_dir):
    labels = write_jsonl(tmp_path / "labels.jsonl", labelled_rows(40, seed=5))
    flags = ["sft", "--student", tiny_model_dir, "--data", str(labels), "--out_dir", str(tmp_path / "run"),
             "--batch_size", "8", "--micro_batch_size", "8", "--epochs", "0.2", "--pack", "false",
             "--wandb_mode", "disabled"]
    with pytest.raises(config.ConfigError, match="--resume: no checkpoint in .*run/checkpoints; --resume auto"):
        TV.run([*flags, "--resume"])
    assert TV.run([*flags, "--resume", "auto"])["steps"] == 1


# ----------------------------------------------------------------------------------------------
# the added negatives (Master-RM): labelled NO, from training questions only


def test_opening_cuts_a_response_before_its_answer():
    import random

    rng = random.Random(0)
    # several lines: the first sentence of the first line (the reasoning opener)
    assert verifier_data.opening("Let's think. 3 < 7 so\nthe larger is 7\nTherefore, the answer is 7.", rng) == "Let's think."
    assert verifier_data.opening("First line without end\n7", rng) == "First line without end"
    # one line: a prefix of its words that never reaches the last one
    cuts = {verifier_data.opening("Therefore, the answer is 7.", rng) for _ in range(200)}
    assert cuts == {"Therefore,", "Therefore, the", "Therefore, the answer", "Therefore, the answer is"}
    assert verifier_data.opening("7", rng) is None and verifier_data.opening(" \n", rng) is None


def test_master_key_and_truncated_rows_are_labelled_no_and_reproducible():
    train = [data.JudgedRow(f"Q{i}?", str(i), f"Therefore, the answer is {i}.", label=i % 2) for i in range(50)]
    keys = verifier_data.master_key_rows(train, 0.2, seed=3)
    assert len(keys) == 10 and keys == verifier_data.master_key_rows(train, 0.2, seed=3) != verifier_data.master_key_rows(train, 0.2, seed=4)
    assert all(r.label == 0 and r.response in audit.TRAINING_KEYS for r in keys)
    assert not set(audit.TRAINING_KEYS) & set(audit.MASTER_KEYS)  # the probe's keys stay unseen
    by_question = {r.question: r for r in train}
    assert all(by_question[r.question].reference == r.reference for r in keys)
    cut = verifier_data.truncated_rows(train, 0.5, seed=3)
    assert len(cut) == 25 and all(r.label == 0 for r in cut)
    for r in cut:  # a prefix of the row's own response, without its answer
        full = by_question[r.question].response
        assert full.startswith(r.response) and r.response != full and r.reference not in r.response
    assert verifier_data.master_key_rows(train, 0.0, seed=3) == [] == verifier_data.truncated_rows(train, 0.0, seed=3)


def test_sft_settings_travel_with_the_student_and_negatives_join_training_only(tmp_path, tiny_model_dir):
    """One small run carries three checks: (1) the student, distilled with a non-default system prompt and
    template, is judged by `eval` with no prompt flags exactly as by verifiers.build_verifier(dir), and a
    contradicting flag is refused unless forced; (2) the added negatives are counted, labelled as intended
    and drawn from training questions only; (3) the master-key rate is reported beside held-out agreement."""
    rows = labelled_rows(200, seed=5)
    labels = write_jsonl(tmp_path / "labels.jsonl", rows)
    # the toy's rows repeat some (question, reference, response): sft trains on each once (issue 35)
    distinct = verifier_data.drop_duplicates(data.read_judged_rows(str(labels), labelled=True), str(labels))
    train, heldout = data.split_heldout(distinct, 0.2)
    heldout_questions = {r.question for r in heldout}
    rollouts = write_jsonl(tmp_path / "rollouts.jsonl", [{"step": 1, "question": r.question, "reference": r.reference,
                                                          "response": f"The answer is {r.reference}", "reward": 0.0}
                                                         for r in train[:6] + heldout[:4]])
    (tmp_path / "template.txt").write_text("Ref: {reference}\nAns: {response}\nMatch?")
    result = TV.run(["sft", "--student", tiny_model_dir, "--data", str(labels), "--out_dir", str(tmp_path / "run"),
                     "--verifier_template", str(tmp_path / "template.txt"), "--verifier_system_prompt", "Judge.",
                     "--heldout_fraction", "0.2", "--master_key_negatives", "0.1", "--truncated_negatives", "0.1",
                     "--policy", tiny_model_dir, "--policy_samples", "1", "--policy_max_new_tokens", "4",
                     "--policy_rollouts", str(rollouts), "--batch_size", "16", "--micro_batch_size", "16",
                     "--epochs", "2", "--lr", "3e-3", "--pack", "false", "--wandb_mode", "disabled"])
    final = result["final"]
    saved = verifier_prompt.load_settings(final)
    assert saved == verifier_prompt.VerifierSettings(template=(tmp_path / "template.txt").read_text(), system_prompt="Judge.")

    # (2) negatives: counted, labelled NO (master keys, truncations) or by the teacher (policy), training only
    n_train = result["rows"]["data/train_rows"]
    assert n_train == len(train) and result["rows"]["data/heldout_rows"] == len(heldout)
    assert result["rows"]["data/master_key_rows"] == round(0.1 * n_train)
    assert 0 < result["rows"]["data/truncated_rows"] <= round(0.1 * n_train)
    policy = [json.loads(line) for line in (tmp_path / "run" / "policy_labels.jsonl").read_text().splitlines()]
    distinct_train_questions = len({r.question for r in train})
    assert result["rows"]["data/policy_rows"] == len(policy) <= distinct_train_questions + 6
    assert not {r["question"] for r in policy} & heldout_questions  # held-out rollouts were left out
    assert sum(r["response"].startswith("The answer is") for r in policy) == 6
    rule = verifiers.build_verifier("rule:math")
    j = rule([r["question"] for r in policy], [r["reference"] for r in policy], [r["response"] for r in policy])
    assert [r["label"] for r in policy] == [int(b) for b in j.binary.tolist()]  # the teacher's labels
    assert result["rows"]["data/policy_yes"] == sum(r["label"] for r in policy) >= 6

    # (3) the master-key probe after training, in the result and in metrics.jsonl
    after = result["after"]
    assert 0 <= after["master_key/fpr"] <= 1 and after["master_key/questions"] == len(heldout_questions)
    assert set(result["master_key_per_key"]) == set(audit.MASTER_KEYS)
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["master_key/fpr"] == after["master_key/fpr"] and last["eval/kappa"] == after["eval/kappa"]

    # (1) eval with no prompt flags asks the student as it learned: the same judgements as build_verifier(dir)
    held = write_jsonl(tmp_path / "heldout.jsonl", [r.to_json() for r in heldout])
    report = TV.run(["eval", "--verifier", final, "--data", str(held), "--out_dir", str(tmp_path / "ev"),
                     "--verifier_max_unjudged", "1", "--wandb_mode", "disabled"])
    student = verifiers.build_verifier(final, verifiers.VerifierOptions(verifier_max_unjudged=1.0))
    j = student([r.question for r in heldout], [r.reference for r in heldout], [r.response for r in heldout])
    labels_ = [r.label for r in heldout]
    mine = audit.agreement(labels_, [int(b) for b in j.binary.tolist()])
    assert (report["tp"], report["fp"], report["fn"], report["tn"]) == (mine["tp"], mine["fp"], mine["fn"], mine["tn"])
    assert report["brier"] == pytest.approx(audit.calibration(labels_, j.p_yes.tolist())["brier"], abs=1e-6)
    assert report["kappa"] == pytest.approx(after["eval/kappa"], abs=1e-9)  # as sft's own held-out eval
    # asked another way, it judges otherwise (the settings matter), and only when forced
    with pytest.raises(config.ConfigError, match="--verifier_system_prompt 'You are a helpful assistant.'.*'Judge.'"):
        TV.run(["eval", "--verifier", final, "--data", str(held), "--verifier_system_prompt",
                "You are a helpful assistant.", "--out_dir", str(tmp_path / "ev2")])
    forced = TV.run(["eval", "--verifier", final, "--data", str(held), "--out_dir", str(tmp_path / "ev2"),
                     "--verifier_system_prompt", "You are a helpful assistant.", "--verifier_force_settings",
                     "--verifier_max_unjudged", "1", "--wandb_mode", "disabled"])
    assert forced["brier"] != pytest.approx(report["brier"], abs=1e-6)
    # fine-tuning the student again keeps its settings: a contradicting flag is refused before training
    with pytest.raises(config.ConfigError, match="--verifier_template"):
        TV.run(["sft", "--student", final, "--data", str(labels), "--out_dir", str(tmp_path / "round2"),
                "--verifier_template", str(ROOT / "recipes" / "toy_verifier_template.txt")])
    # train_rl.py asks it the same way with no prompt flags: each rollout's p_yes is build_verifier(dir)'s
    from test_train_rl import flags, run as run_rl
    rl = run_rl(flags(tiny_model_dir, tmp_path / "rl", 1, verifier=final, audit_verifier="", log_samples=0))
    rolled = [json.loads(line) for line in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    again = student([r["question"] for r in rolled], [r["reference"] for r in rolled], [r["response"] for r in rolled])
    assert [r["p_yes"] for r in rolled] == pytest.approx(again.p_yes.tolist(), abs=1e-5), rl.stdout[-2000:]
    refused = run_rl(flags(tiny_model_dir, tmp_path / "rl2", 1, verifier=final, verifier_system_prompt="Other."),
                     check=False)
    assert refused.returncode == 2 and "'Other.'" in refused.stderr and "'Judge.'" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# sft: balance, resume, signals, the distillation demo


def test_balanced_pool():
    labels = [1, 0, 0, 0]
    pool, w = TV.balanced_pool(labels, "oversample", seed=0)
    assert pool[:4] == [0, 1, 2, 3] and pool[4:] == [0, 0] and w == [1.0] * 4
    pool, w = TV.balanced_pool(labels, "weight", seed=0)
    assert pool == [0, 1, 2, 3] and w == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3])  # n / (2 n_class)
    with pytest.raises(ValueError, match="--balance"):
        TV.balanced_pool([1, 1], "weight", seed=0)


@pytest.mark.parametrize("pack", [True, False])
def test_micro_loss_is_the_weighted_nll_of_judgement_and_end_of_turn(tiny_model_dir, pack):
    from rlvr import model

    lm = model.load_model(tiny_model_dir)
    seqs = [([5, 6, 7, 8, 9, 10], 4), ([11, 12, 13, 14], 2)]  # (ids, prompt length): targets are the last two

    def nll(ids, plen):  # by hand: -log p of each target token given what precedes it
        logits = lm(torch.tensor([ids])).logits[0].log_softmax(-1)
        return -sum(logits[t - 1, ids[t]] for t in range(plen, len(ids)))
    loss, p_sum, right = TV.micro_loss(lm, seqs, [2.0, 0.5], n_targets=8, pack=pack, pad_id=0, device="cpu")
    assert loss.item() == pytest.approx(((2.0 * nll(*seqs[0]) + 0.5 * nll(*seqs[1])) / 8).item(), rel=1e-4)
    p_judgement = [lm(torch.tensor([ids])).logits[0, plen - 1].softmax(-1)[ids[plen]].item() for ids, plen in seqs]
    assert p_sum == pytest.approx(sum(p_judgement), rel=1e-4) and right == sum(p > 0.5 for p in p_judgement)


def test_a_non_finite_loss_stops_sft_before_the_update(tmp_path, tiny_model_dir, monkeypatch):
    labels = write_jsonl(tmp_path / "labels.jsonl", labelled_rows(40, seed=5))
    real = TV.micro_loss

    def nan_loss(*args, **kwargs):
        loss, p_sum, right = real(*args, **kwargs)
        return loss * float("nan"), p_sum, right
    monkeypatch.setattr(TV, "micro_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="sft step 1: loss nan.*the update was not applied"):
        TV.run(sft_args(tmp_path, tiny_model_dir, labels, tmp_path / "run", "--batch_size", "8",
                        "--micro_batch_size", "8"))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()


SHORT_TEMPLATE = "{response}\n{reference}"  # the paper's template works too; short rows keep the tests fast


def sft_args(tmp_path, model_dir, labels, out_dir, *extra):
    (tmp_path / "template.txt").write_text(SHORT_TEMPLATE)
    return ["sft", "--student", model_dir, "--data", str(labels), "--out_dir", str(out_dir),
            "--verifier_template", str(tmp_path / "template.txt"), "--verifier_system_prompt", "", "--pack", "false",
            "--wandb_mode", "disabled", *extra]


class StopAfter:
    """Stands in for checkpoint.StopSignal: asks the loop to stop after `n` steps, as a SIGTERM would."""
    n = 2

    def __init__(self):
        self.calls, self.received = 0, None

    def should_stop(self):
        self.calls += 1
        if self.calls >= self.n:
            self.received = signal.SIGTERM
        return self.received is not None

    def restore(self):
        pass


def test_sft_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    labels = write_jsonl(tmp_path / "labels.jsonl", labelled_rows(80, seed=5))
    flags = ["--batch_size", "8", "--micro_batch_size", "4", "--epochs", "0.5", "--lr", "1e-3", "--eval_every", "2"]
    full = TV.run(sft_args(tmp_path, tiny_model_dir, labels, tmp_path / "a", *flags))
    train, _ = data.split_heldout(data.read_judged_rows(str(labels), labelled=True), 0.1)
    assert full["steps"] == -(-len(train) // 16)  # half an epoch at 8 rows per step
    with monkeypatch.context() as m:
        m.setattr(TV.checkpoint, "StopSignal", StopAfter)
        stopped = TV.run(sft_args(tmp_path, tiny_model_dir, labels, tmp_path / "b", *flags))
    assert stopped["stopped"] == signal.SIGTERM and stopped["step"] == 2 and not (tmp_path / "b" / "final").exists()
    resumed = TV.run(sft_args(tmp_path, tiny_model_dir, labels, tmp_path / "b", *flags, "--resume"))
    assert resumed["before"] == full["before"] and resumed["after"] == full["after"]
    wa, wb = load_file(tmp_path / "a" / "final" / "model.safetensors"), load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w0 = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)  # it did train
    # the metrics of the interrupted and resumed run equal the uninterrupted run's (times aside)
    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "elapsed") and not k.startswith("time/")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "b") == rows(tmp_path / "a")


def test_sigterm_checkpoints_and_exits_with_128_plus_signum(tmp_path, tiny_model_dir):
    labels = write_jsonl(tmp_path / "labels.jsonl", labelled_rows(40, seed=5))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_verifier.py", *sft_args(tmp_path, tiny_model_dir, labels, run,
                             "--batch_size", "4", "--micro_batch_size", "4", "--epochs", "1000")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and b'"step": 1,' in (run / "metrics.jsonl").read_bytes()):
        assert proc.poll() is None and time.monotonic() < deadline, "sft ended before the signal"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "--resume" in err
    assert list((run / "checkpoints").glob("step_*")) and not (run / "final").exists()


def test_distilled_student_agrees_with_the_teacher_on_heldout_questions(tmp_path):
    """Stage 1 of the main job's distillation, shortened: a rule labels toy rows, the tiny student (warm-
    started on the toy task) learns YES/NO, and on questions it never saw its agreement with the teacher
    (Cohen's kappa) rises clearly above the untrained student's (measured: 0.00 -> 0.63 in 153 steps). The
    teacher is rule:substring here: the student imitates it in far fewer steps than rule:math, whose
    equivalences (7 = 14/2 = 7.0) it learns late (kappa 0.16 after these 153 steps, 0.64 after the recipe's 357)."""
    result = TV.run(["sft", "--config", str(ROOT / "recipes" / "verifier_toy_digits.yaml"), "--epochs", "6",
                     "--teacher", "rule:substring", "--out_dir", str(tmp_path / "run"), "--wandb_mode", "disabled"])
    before, after = result["before"]["eval/kappa"] or 0.0, result["after"]["eval/kappa"]
    assert abs(before) < 0.1 and after > before + 0.25, (before, after)
    # the exported directory is a verifier for reward.py directly, with no flags: it carries its settings
    labels = data.read_judged_rows(str(tmp_path / "run" / "labels.jsonl"), labelled=True)
    rows = data.split_heldout(labels, 0.1)[1]
    student = verifiers.build_verifier(result["final"])
    j = student([r.question for r in rows], [r.reference for r in rows], [r.response for r in rows])
    assert audit.agreement([r.label for r in rows], [int(b) for b in j.binary.tolist()])["kappa"] == \
        pytest.approx(after, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# one run, one directory; data errors in one line (issue 21)


def test_sft_and_eval_claim_their_out_dir(tmp_path, tiny_model_dir):
    from rlvr import rundir

    labels = write_jsonl(tmp_path / "labels.jsonl", labelled_rows(40, seed=5))
    args = ["sft", "--student", tiny_model_dir, "--data", str(labels), "--out_dir", str(tmp_path / "run"),
            "--batch_size", "8", "--micro_batch_size", "8", "--epochs", "0.2", "--pack", "false",
            "--wandb_mode", "disabled"]
    TV.run(args)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(config.ConfigError, match="run: holds an earlier run's files .*--overwrite"):
        TV.run(args)
    fd = rundir.lock(tmp_path / "run")  # a run that holds it: this process
    try:
        with pytest.raises(config.ConfigError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            TV.run(args + ["--resume"])
    finally:
        rundir.release(fd)
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"}
    assert TV.run(args + ["--resume", "auto"])["steps"] == 1  # resumes after the last step
    ev = ["eval", "--verifier", "rule:substring", "--data", str(labels), "--out_dir", str(tmp_path / "ev"),
          "--wandb_mode", "disabled"]
    TV.run(ev)
    TV.run(ev)  # an eval is repeated into its out_dir without --overwrite (issue 34): its files are replaced
    TV.run(ev + ["--overwrite"])
    assert len((tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(config.ConfigError, match="run: holds an earlier run's files"):  # not into sft's directory
        TV.run(ev[:5] + ["--out_dir", str(tmp_path / "run"), "--wandb_mode", "disabled"])


def test_a_data_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "reference": "r", "response": "a", "label": 1}\n{"question": 3}\n')
    out = subprocess.run([sys.executable, "train_verifier.py", "eval", "--data", str(bad), "--out_dir",
                          str(tmp_path / "ev"), "--wandb_mode", "disabled"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("train_verifier.py eval: error: ") and "row 2" in out.stderr


# the released data's format (query: chat messages, label: the reference) through label, sft and eval

SAMPLE = ROOT / "tests" / "data" / "multi_subject_rlvr_sample.jsonl"


def test_the_released_format_goes_through_label_sft_and_eval(tmp_path, tiny_model_dir):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:12]]
    sample = write_jsonl(tmp_path / "sample.jsonl", rows)  # the first rows, as released (a slice, not a new format)
    paper = ["--data", str(sample), "--question_field", "query", "--reference_field", "label"]
    out = tmp_path / "labels.jsonl"
    # without responses, label says how to get them; sft refuses `label` as a judgement, naming the flag
    with pytest.raises(data.DataError, match="row 1: field 'response' is missing: to judge a policy's answers to "
                                             "these questions, add --policy DIR --policy_samples N"):
        TV.run(["label", *paper, "--out", str(out)])
    with pytest.raises(config.ConfigError, match="--reference_field 'label': is also --label_field; the released "
                                                 "sets' 'label' is the reference answer"):
        TV.run(["sft", *paper, "--student", tiny_model_dir])
    # a policy's sampled answers, judged; then the references themselves as answers (the teacher's YES), appended
    TV.run(["label", *paper, "--policy", tiny_model_dir, "--policy_samples", "2", "--policy_max_new_tokens", "6",
            "--teacher", "rule:substring", "--out", str(out)])
    TV.run(["label", *paper, "--response_field", "label", "--teacher", "rule:substring", "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    questions = {r["query"][-1]["content"]: r["label"] for r in rows}  # the user message is the question
    assert len(written) == len({(r["question"], r["response"]) for r in written}) > len(rows)
    assert all(questions[r["question"]] == r["reference"] for r in written)
    oracle = [r for r in written if r["response"] == r["reference"]]
    assert len(oracle) == len(rows) and all(r["label"] == 1 for r in oracle)
    rule = verifiers.build_verifier("rule:substring")
    j = rule([r["question"] for r in written], [r["reference"] for r in written], [r["response"] for r in written])
    assert [r["label"] for r in written] == [int(b) for b in j.binary.tolist()]
    # sft and eval read label's rows with no field flags
    result = TV.run(["sft", "--data", str(out), "--student", tiny_model_dir, "--out_dir", str(tmp_path / "v"),
                     "--heldout_fraction", "0.3", "--batch_size", "8", "--micro_batch_size", "8", "--pack", "false",
                     "--master_key_prompts", "4", "--wandb_mode", "disabled"])
    train, heldout = data.split_heldout(data.read_judged_rows(str(out), labelled=True), 0.3)
    assert (result["rows"]["data/train_rows"], result["rows"]["data/heldout_rows"]) == (len(train), len(heldout))
    assert result["rows"]["data/train_yes"] == sum(r.label for r in train)
    report = TV.run(["eval", "--verifier", result["final"], "--data", str(out), "--out_dir", str(tmp_path / "ev"),
                     "--verifier_max_unjudged", "1", "--master_key_prompts", "4", "--wandb_mode", "disabled"])
    assert report["tp"] + report["fn"] == len(oracle) and report["fp"] + report["tn"] == len(written) - len(oracle)


def test_sft_warns_when_training_did_not_move_the_student():
    settings = verifier_prompt.VerifierSettings()
    before = {"eval/brier": 0.2500001, "eval/ece": 0.1, "eval/accuracy": 0.7, "eval/unjudged": 0.0}
    counts = {"data/train_rows": 100, "data/train_yes": 40}
    moved = dict(before, **{"eval/brier": 0.2490})
    assert TV.summary_warnings(moved, counts, 0.1, settings, before, 20, 5e-6) == ""
    text = TV.summary_warnings(dict(before), counts, 0.1, settings, before, 20, 1e-12)
    assert "20 steps did not move the student" in text and "--lr 1e-12 is too small" in text
    assert TV.summary_warnings(dict(before), counts, 0.1, settings, before, 0, 1e-12) == ""  # resumed at its end
