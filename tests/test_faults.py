"""Fault injection on train_rl.py, run as a user runs it: each case gives a clear error, or a result
equal to an undisturbed run (issue 13). The faults are injected by tests/fault_runner.py."""
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_remote import FakeVLLM
from test_train_rl import STRAIGHT, flags, run, step_rows, weights

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # the conftest's `straight` run: every recovered run must equal it


def faulted(fault, at, args, timeout=1200, **env):  # hang detector only
    """train_rl.py in a session of its own (its own process group) with FAULT injected at step `at`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", FAULT=fault, FAULT_STEP=str(at), **env)
    return subprocess.run([sys.executable, str(ROOT / "tests" / "fault_runner.py")] + args, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, start_new_session=True)


def outputs(out_dir):
    d = Path(out_dir)
    return step_rows(d), {name: (d / name).read_text() for name in ("rollouts.jsonl", "samples.jsonl", "audit.jsonl",
                                                                    "eval_questions.jsonl")
                          if (d / name).exists()}


def assert_same_run(a, b):
    (rows_a, files_a), (rows_b, files_b) = outputs(a), outputs(b)
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    for x, y in zip(rows_a, rows_b):
        assert x == pytest.approx(y, abs=1e-6)
    assert files_a == files_b
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)


def test_killed_in_an_update_then_resumed_equals_the_undisturbed_run(tiny_model_dir, straight, tmp_path):
    args = flags(tiny_model_dir, tmp_path, STEPS, **STRAIGHT)
    out = faulted("kill_in_update", 3, args)
    assert out.returncode == -signal.SIGKILL
    run(args + ["--resume"])
    assert_same_run(straight, tmp_path)


def test_killed_between_checkpoint_write_and_commit_falls_back(tiny_model_dir, straight, tmp_path):
    args = flags(tiny_model_dir, tmp_path, STEPS, **STRAIGHT)
    out = faulted("kill_in_checkpoint", 3, args)
    assert out.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step")) == \
        ["step_00000001", "step_00000002", "step_00000003.tmp"]
    resumed = run(args + ["--resume"])
    assert "resumed from step 2" in resumed.stdout
    assert_same_run(straight, tmp_path)


def test_damaged_latest_checkpoint_warns_names_the_file_and_falls_back(tiny_model_dir, straight, tmp_path):
    args = flags(tiny_model_dir, tmp_path, STEPS, **STRAIGHT)
    assert faulted("kill_in_update", 4, args).returncode == -signal.SIGKILL  # checkpoints 1..3 are on disk
    shard = next((tmp_path / "checkpoints" / "step_00000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    resumed = run(args + ["--resume"])
    assert shard.name in resumed.stderr and "step_00000003" in resumed.stderr
    assert "resumed from step 2" in resumed.stdout
    assert_same_run(straight, tmp_path)


def test_sigterm_to_the_process_group_in_the_reward_phase(tiny_model_dir, straight, tmp_path):
    """torchrun forwards SIGTERM to the whole group: the math-verify workers (in their own session)
    keep judging, the step finishes, a checkpoint is saved, and the exit status says 'stopped'."""
    args = flags(tiny_model_dir, tmp_path, STEPS, **STRAIGHT)
    out = faulted("sigterm_group_in_reward", 2, args)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert "--resume" in out.stderr.splitlines()[-1]
    assert (tmp_path / "checkpoints" / "step_00000002" / "trainer.pt").exists()
    run(args + ["--resume"])
    assert_same_run(straight, tmp_path)


@pytest.mark.parametrize("mode, message", [("omit", "no valid log-probability for judgement token"),
                                           ("hang", "timed out"), ("cut", "IncompleteRead")])
def test_a_failing_verifier_server_stops_the_run_with_a_clear_error(mode, message, tiny_model_dir, tmp_path):
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in ("YES", "NO"))
    server = FakeVLLM(tiny_model_dir, yes, no)
    server.table = collections.defaultdict(lambda: "yes")
    server.mode, server.bad = mode, 10 ** 6
    try:
        out = run(flags(tiny_model_dir, tmp_path, 2, verifier=server.url, verifier_tokenizer=tiny_model_dir,
                        # a short timeout only where the server hangs: a loaded machine may take seconds to
                        # answer a cut or tokenless reply, which must not read as a timeout
                        verifier_timeout=0.5 if mode == "hang" else 60, verifier_retries=1), check=False)
    finally:
        server.close()
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train_rl.py: error: ") and message in last and server.url in last or mode == "omit", last
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "final").exists()


def test_nan_updates_are_never_applied_and_stop_the_run(tiny_model_dir, tmp_path):
    out = run(flags(tiny_model_dir, tmp_path, 8, lr=1e30, save_every=1, max_nonfinite_steps=2), check=False)
    assert out.returncode == 1
    assert "NaN/inf in 2 steps in a row" in out.stderr.strip().splitlines()[-1]
    rows = step_rows(tmp_path)
    assert rows[-1]["update/skipped"] == 1 and len(rows) < 8
    for ckpt in (tmp_path / "checkpoints").glob("step_*"):  # whatever was saved is finite
        assert ckpt.name < f"step_{rows[-1]['step']:08d}"
    assert not (tmp_path / "final").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["update/skipped"] == 1


def test_a_fooled_verifier_shows_in_the_audit_and_stops_the_run(tiny_model_dir, tmp_path):
    # a reward verifier that says YES to everything (the worst hack: every answer passes); the rule:math
    # judge re-grades 8 rollouts a step. Each audit must find every answer it judges wrong judged YES,
    # write those rows to audit.jsonl, and two such audits in a row must stop the run after a checkpoint.
    from rlvr import model
    from rlvr import verifiers

    tok = model.load_tokenizer(tiny_model_dir)
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in ("YES", "NO"))
    server = FakeVLLM(tiny_model_dir, yes, no)
    server.table = collections.defaultdict(lambda: "yes")
    try:
        out = run(flags(tiny_model_dir, tmp_path, 6, verifier=server.url, verifier_tokenizer=tiny_model_dir,
                        soft_mode="eq4", audit_verifier="rule:math", audit_every=1, audit_samples=8,
                        audit_max_fpr=0.5, audit_patience=2), check=False)
    finally:
        server.close()
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train_rl.py: error: step 2: the audit judge rule:math") and "audit.jsonl" in last, last
    rows = step_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    audited = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    judge = verifiers.build_verifier("rule:math")
    truth = judge([r["question"] for r in audited], [r["reference"] for r in audited],
                  [r["response"] for r in audited]).binary.tolist()
    assert audited and truth == [0.0] * len(audited)  # the judge's NO, recomputed independently
    assert all(r["label"] == 0 and r["reward_label"] == 1 for r in audited)
    for r in rows:  # every disagreement is in audit.jsonl: the agreement is the rest
        assert r["audit/false_positive_rate"] == 1.0 and r["audit/rows"] == 8
        assert r["audit/agreement"] == 1 - sum(a["step"] == r["step"] for a in audited) / 8
    assert (tmp_path / "checkpoints" / "step_00000002").exists() and not (tmp_path / "final").exists()


# ----------------------------------------------------------------------------------------------
# one run, one directory (issue 21)


def snapshot(out_dir):
    """Every file under out_dir and its bytes (the lock file aside: it only names the last claimant; and the
    list of the entries runs wrote, which --eval_only adds eval_only/ to)."""
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(Path(out_dir).rglob("*"))
            if p.is_file() and p.name not in (".lock", ".run_files")}


def test_a_second_run_into_a_running_runs_directory_is_refused_naming_its_pid(tiny_model_dir, straight, tmp_path):
    args = flags(tiny_model_dir, tmp_path / "run", STEPS, **STRAIGHT)
    first = faulted("second_run_in_update", 2, args, FAULT_OUT=str(tmp_path / "second.txt"))
    assert first.returncode == 0, first.stderr[-3000:]
    pid, code, stderr = (tmp_path / "second.txt").read_text().split("\n", 2)
    last = stderr.strip().splitlines()[-1]
    assert code == "2" and last.startswith("train_rl.py: error: --out_dir ")
    assert f"in use by another run (pid {pid})" in last, last
    assert_same_run(straight, tmp_path / "run")  # the first run, undisturbed: every step once


def test_a_second_run_into_a_finished_directory_is_refused_or_overwritten(tiny_model_dir, straight, tmp_path):
    args = flags(tiny_model_dir, tmp_path, STEPS, **STRAIGHT)
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)  # a finished run of these flags
    before = snapshot(tmp_path)
    out = run(args + ["--seed=4"], check=False)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "holds an earlier run's files" in last and "--overwrite" in last, last
    assert snapshot(tmp_path) == before
    # files but no checkpoint (a run killed before its first one): --resume refuses, --resume auto starts fresh
    (tmp_path / "checkpoints").rename(tmp_path.parent / f"{tmp_path.name}-ckpts")
    out = run(args + ["--resume"], check=False)
    assert out.returncode == 2 and "no checkpoint in" in out.stderr.splitlines()[-1]
    out = run(args + ["--resume=auto"])
    assert "--resume auto: no checkpoint in" in out.stdout and "starting fresh" in out.stdout
    assert_same_run(straight, tmp_path)  # the killed run's files removed: nothing appended to them
    out = run(args + ["--overwrite"])
    assert "--overwrite: removing" in out.stdout and "metrics.jsonl" in out.stdout and "rollouts.jsonl" in out.stdout
    assert_same_run(straight, tmp_path)  # one run's files only: nothing appended to the old ones


def test_overwrite_refuses_a_directory_no_run_wrote(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    out = run(["--out_dir", str(tmp_path), "--overwrite", "--wandb_mode", "disabled"], check=False, timeout=120)
    assert out.returncode == 2 and "notes.md, which no run writes" in out.stderr.splitlines()[-1]
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_eval_only_writes_its_own_file_and_truncates_nothing(tiny_model_dir, tmp_path):
    args = flags(tiny_model_dir, tmp_path, STEPS, save_every=1)
    assert faulted("kill_in_update", 4, args).returncode == -signal.SIGKILL  # checkpoints 1..3
    shard = next((tmp_path / "checkpoints" / "step_00000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # damaged: eval_only falls back to step 2
    before = snapshot(tmp_path)
    out = run(args + ["--eval_only", "--resume"])
    assert "resumed from step 2" in out.stdout
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("eval_only/")} == before
    rows = [json.loads(line) for line in (tmp_path / "eval_only" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and 0 <= rows[0]["eval/accuracy"] <= 1


def test_no_heldout_prompts_skips_the_eval_and_finishes(tiny_model_dir, tmp_path):
    out = run(flags(tiny_model_dir, tmp_path, 2, heldout_fraction=0, eval_every=1))
    assert "no eval (no held-out prompts" in out.stdout
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "checkpoints" / "step_00000002").exists()
    assert not any(k.startswith("eval/") for r in step_rows(tmp_path) for k in r)


# ----------------------------------------------------------------------------------------------
# nothing trusted by accident: credentials, settings, a reward that teaches nothing (issue 21)


def yes_server(tiny_model_dir):
    """A fake vLLM verifier that says YES (p 0.7) to everything: every response gets the same reward."""
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)
    server = FakeVLLM(tiny_model_dir, *(tok.encode(w, add_special_tokens=False)[0] for w in ("YES", "NO")))
    server.table = collections.defaultdict(lambda: "yes")
    return server


def test_filter_groups_keeping_nothing_stops_the_run_with_the_reason(tiny_model_dir, tmp_path):
    server = yes_server(tiny_model_dir)
    try:
        out = run(flags(tiny_model_dir, tmp_path, 6, verifier=server.url, verifier_tokenizer=tiny_model_dir,
                        filter_groups=True, max_filter_rounds=1, filter_patience=2, audit_verifier=""), check=False)
    finally:
        server.close()
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train_rl.py: error: step 2: --filter_groups kept no group in 2 steps in a row"), last
    assert "in all 2 rounds" in last and "Checkpoint: " in last
    rows = step_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(r["rollout/groups_kept_frac"] == 0 for r in rows)
    # identical float32 rewards: their std is rounding only
    assert all(r["reward/std"] < 1e-6 and r["rollout/filter_rounds"] == 1 for r in rows), rows
    assert (tmp_path / "checkpoints" / "step_00000002").exists() and not (tmp_path / "final").exists()


def test_a_verifier_without_settings_is_refused_unless_named(tiny_model_dir, tmp_path):
    out = run(flags(tiny_model_dir, tmp_path, 1, verifier_paper_defaults=False), check=False)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train_rl.py: error: verifier {tiny_model_dir}: no verifier_settings.json") and \
        "--verifier_template FILE or a family (--verifier_family, or <family>:<model> for a judge), or pass " \
        "--verifier_paper_defaults" in last, last
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_the_api_key_comes_from_the_environment_and_no_credential_reaches_any_output(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    from rlvr import remote

    key, password = "sk-e2e-key-0123456789", "hunter2pass"
    server = yes_server(tiny_model_dir)
    server.api_key = key
    args = dict(verifier_tokenizer=tiny_model_dir, audit_verifier="", log_samples=0)
    try:
        monkeypatch.delenv(remote.API_KEY_ENV, raising=False)
        no_key = run(flags(tiny_model_dir, tmp_path / "none", 1, verifier=server.url, **args), check=False)
        with_url = run(flags(tiny_model_dir, tmp_path / "url", 1, eval_verifier=f"http://u:{password}@{server.url[7:]}",
                             verifier=server.url, **args), check=False)
        monkeypatch.setenv(remote.API_KEY_ENV, key)
        keyed = run(flags(tiny_model_dir, tmp_path / "key", 1, verifier=server.url, **args))
    finally:
        server.close()
    last = no_key.stderr.strip().splitlines()[-1]
    assert no_key.returncode == 1 and "HTTP 401" in last and f"${remote.API_KEY_ENV}: unset" in last, last
    last = with_url.stderr.strip().splitlines()[-1]
    assert with_url.returncode == 2 and last.startswith("train_rl.py: error: --eval_verifier 'http://***@") and \
        "credentials in a URL are refused" in last, last
    assert not (tmp_path / "url").exists()  # refused before anything was written
    assert set(server.auth_seen[-3:]) == {f"Bearer {key}"} and step_rows(tmp_path / "key")[0]["reward/mean"] > 0
    for out in (no_key, with_url, keyed):
        assert key not in out.stdout + out.stderr and password not in out.stdout + out.stderr
    for f in (tmp_path / "key").rglob("*"):
        assert not f.is_file() or (key.encode() not in f.read_bytes() and password.encode() not in f.read_bytes()), f


# ----------------------------------------------------------------------------------------------
# faults named (issue 21)


def test_a_full_disk_is_named_with_the_file(tiny_model_dir, tmp_path):
    out = faulted("disk_full_in_update", 2, flags(tiny_model_dir, tmp_path, STEPS, save_every=1))
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (f"train_rl.py: error: [Errno 28] No space left on device (appending 16 rows): "
                    f"'{tmp_path / 'rollouts.jsonl'}'"), last


def test_the_launchers_death_stops_the_run_after_a_checkpoint(tiny_model_dir, straight, tmp_path):
    args = flags(tiny_model_dir, tmp_path, STEPS, **STRAIGHT)
    out = faulted("launcher_dies", 2, args)  # returns once the orphaned trainer closed its output too
    assert out.returncode == -signal.SIGKILL  # the "launcher"
    assert "[checkpoint] the launcher (pid " in out.stderr and "is gone: saving and stopping" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("stopped by signal 1 after a checkpoint")
    assert (tmp_path / "checkpoints" / "step_00000002").exists() and not (tmp_path / "final").exists()
    assert [r["step"] for r in step_rows(tmp_path)] == [1, 2]
    run(args + ["--resume"])
    assert_same_run(straight, tmp_path)
