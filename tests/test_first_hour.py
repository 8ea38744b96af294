"""Issue 34: a TRL or verl user's first hour, each trap written as the user's command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_rl
from rlvr import config, rl_config, verifier_prompt, verifiers

ROOT = Path(__file__).resolve().parents[1]


def cli(script, *args, cwd=ROOT, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def one_line_error(out, prog="train_rl.py"):
    lines = out.stderr.strip().splitlines()
    assert out.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), \
        out.stdout[-2000:] + out.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# 2. --kl_coef with --kl_mode none


def test_kl_coef_without_kl_mode_is_refused_naming_the_modes(tmp_path):
    line = one_line_error(cli("train_rl.py", "--kl_coef", "0.04", "--out_dir", str(tmp_path / "run")))
    assert "--kl_coef 0.04: does nothing with --kl_mode none" in line and "--kl_mode loss" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_kl_coef_defaults_to_0_01_only_when_kl_is_on():
    assert train_rl.parse_config(["--kl_mode", "reward"])[0].kl_coef == 0.01
    assert train_rl.parse_config(["--kl_mode", "loss", "--kl_coef", "0.04"])[0].kl_coef == 0.04
    assert train_rl.parse_config([])[0].kl_coef == 0.0


# ----------------------------------------------------------------------------------------------
# 3. --resume auto before the first checkpoint; eval repeated, with a summary line


def test_resume_auto_on_a_run_killed_before_its_first_checkpoint_starts_fresh(tmp_path):
    from test_train_rl import flags, run

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    # what a run killed during step 1 leaves: its config, the step-0 row and a rollout row, no checkpoint, and
    # the list of what it wrote (a run lists each entry before creating it: rundir.note)
    (out_dir / ".run_files").write_text("config.json\nmetrics.jsonl\nrollouts.jsonl\n")
    (out_dir / "config.json").write_text("{}")
    (out_dir / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.1}\n')
    (out_dir / "rollouts.jsonl").write_text('{"step": 1, "question": "q"}\n')
    args = ["--policy", "tiny", "--data", "toy", "--verifier", "rule:substring", "--eval_verifier", "rule:substring",
            "--audit_verifier", "", "--log_verifiers", "", "--steps", "1", "--prompts_per_step", "2",
            "--samples_per_prompt", "2", "--max_new_tokens", "4", "--eval_every", "0", "--eval_prompts", "2",
            "--master_key_prompts", "0", "--out_dir", str(out_dir), "--wandb_mode", "disabled"]
    out = cli("train_rl.py", *args, "--resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--resume auto: no checkpoint in" in out.stdout and "starting fresh" in out.stdout
    rows = [json.loads(x) for x in (out_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["step"] == 1 and r["question"] != "q" for r in rows)  # this run's rows alone
    assert (out_dir / "checkpoints").is_dir()
    # a directory holding something no run writes is still refused, nothing removed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    line = one_line_error(cli("train_rl.py", "--resume", "auto", "--out_dir", str(tmp_path / "mine")))
    assert "notes.md, which no run writes" in line and (tmp_path / "mine" / "notes.md").read_text() == "mine"


def test_eval_repeated_into_its_out_dir_ends_with_one_summary_line(tmp_path):
    from test_train_verifier import EVAL_ROWS, write_jsonl

    path = write_jsonl(tmp_path / "labelled.jsonl", EVAL_ROWS)
    args = ["eval", "--verifier", "rule:substring", "--data", str(path), "--out_dir", str(tmp_path / "ev"),
            "--wandb_mode", "disabled"]
    for _ in range(2):
        out = cli("train_verifier.py", *args)
        assert out.returncode == 0, out.stderr[-2000:]
        last = out.stdout.strip().splitlines()[-1]
        # the hand-computed figures of test_eval_figures_equal_hand_computed: accuracy 6/8, kappa 0.5, F1 3/4
        assert last.startswith("rule:substring on 8 rows of ") and "accuracy 0.750, kappa 0.500, F1 0.750" in last, last
        assert f"report {tmp_path / 'ev' / 'eval.json'}" in last
    assert len((tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()) == 1


def test_label_a_base_model_names_labels_own_flag_and_samples_it_plain(tmp_path, tiny_model_dir):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in base.glob("chat_template.*"):
        f.unlink()
    args = ["label", "--policy", str(base), "--policy_samples", "1", "--data", "toy", "--teacher", "rule:substring",
            "--out", str(tmp_path / "labels.jsonl"), "--policy_max_new_tokens", "4"]
    line = one_line_error(cli("train_verifier.py", *args), "train_verifier.py label")
    assert "--policy_prompt_format plain prompts it with plain text" in line and "--prompt_format" not in \
        line.replace("--policy_prompt_format", ""), line
    out = cli("train_verifier.py", *args, "--policy_prompt_format", "plain")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) > 0


def test_label_refuses_rule_math_on_prose_references_as_train_rl_does(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"Which method detects protein {i}?", "reference": "Western blot",
                                        "response": "Western blot"}) + "\n" for i in range(5)))
    line = one_line_error(cli("train_verifier.py", "label", "--data", str(rows), "--teacher", "rule:math", "--out",
                              str(tmp_path / "labels.jsonl")), "train_verifier.py label")
    assert "--teacher 'rule:math': 0% of --data" in line and "rule:substring" in line
    assert not (tmp_path / "labels.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# 4. one-line errors before loading; a cold cache's build lock


def test_a_file_data_set_with_the_tiny_verifier_is_refused_in_one_line(tmp_path):
    rows = tmp_path / "d.jsonl"
    rows.write_text(json.dumps({"query": "What is 2 + 2?", "label": "4"}) + "\n")
    line = one_line_error(cli("train_rl.py", "--data", str(rows), "--out_dir", str(tmp_path / "run")))
    assert "--verifier 'tiny': is the tiny verifier distilled from a demo world's teacher" in line
    assert f"nothing of --data {rows}" in line


def test_a_finished_run_directory_as_policy_trains_its_final_model(tmp_path, tiny_model_dir):
    import shutil

    run_dir = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_model_dir, run_dir / "final")
    (run_dir / "config.json").write_text(json.dumps({"steps": 60, "policy": "tiny"}))  # the run's own config
    cfg, _ = train_rl.parse_config(["--policy", str(run_dir), "--verifier", "rule:substring", "--data", "toy"])
    assert cfg.policy == str(run_dir / "final")
    from rlvr import model
    assert model.source_problem(str(run_dir)) == f"is a run directory, not a model; its final model is {run_dir / 'final'}"


def test_a_judgement_token_of_several_tokens_names_the_flag_in_one_line(tmp_path, tiny_model_dir):

    with pytest.raises(config.ConfigError, match="must be exactly one: choose a one-token spelling with "
                                                 "--verifier_positive / --verifier_negative"):
        verifiers.build_verifier(tiny_model_dir, verifiers.VerifierOptions(verifier_paper_defaults=True,
                                                                     verifier_positive="Definitely correct"))


def test_a_second_build_on_a_cold_cache_waits_for_the_first(tmp_path):
    from worlds import toy

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from worlds import toy; from pathlib import Path\n"
        "with toy.build_lock(Path(%r)):\n    print('held', flush=True); sys.stdin.readline()\n"
        "    Path(%r).write_text('built')") % (str(ROOT), str(tmp_path / "v"), str(tmp_path / "v" / "done"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    import threading

    got = []

    def second():
        with toy.build_lock(tmp_path / "v"):
            got.append((tmp_path / "v" / "done").exists())  # the first build's result is there when it gets in
    t = threading.Thread(target=second)
    t.start()
    t.join(timeout=2)
    assert t.is_alive() and not got  # waiting, not failing
    holder.stdin.write("\n")
    holder.stdin.flush()
    t.join(timeout=120)
    assert got == [True] and holder.wait(timeout=60) == 0


# ----------------------------------------------------------------------------------------------
# 5. warnings


def test_sft_summary_warns_of_a_student_that_never_answers_and_of_one_class_labels(tmp_path, tiny_model_dir):
    rows = [{"question": f"What is {i} + 1?", "reference": str(i + 1), "response": str(i + 1 + (i > 0)),
             "label": int(i == 0)} for i in range(60)]  # 1 YES in 60
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = cli("train_verifier.py", "sft", "--student", str(tiny_model_dir), "--data", str(path), "--out_dir",
              str(tmp_path / "run"), "--batch_size", "8", "--micro_batch_size", "8", "--epochs", "0.1", "--pack",
              "false", "--heldout_fraction", "0.3", "--master_key_prompts", "1", "--wandb_mode", "disabled")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics_rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    unjudged = [m["eval/unjudged"] for m in metrics_rows if "eval/unjudged" in m][-1]
    assert unjudged > 0.1  # a random tiny model's first token is rarely YES or NO
    assert f"WARNING: {unjudged:.0%} of the student's held-out first tokens were neither 'YES' nor 'NO'" in out.stdout
    yes = sum(m.get("data/train_yes", 0) for m in metrics_rows[:1])
    n = metrics_rows[0]["data/train_rows"]
    assert f"WARNING: {yes} YES in {n} training labels" in out.stdout and "--balance" in out.stdout


def test_frac_zero_std_by_hand():
    import torch
    import train_rl

    # groups of 3: [1,1,1] alike, [0,1,0] not, [0.5,0.5,0.5] alike, [0,0,1] not -> 2 of 4
    r = torch.tensor([1, 1, 1, 0, 1, 0, .5, .5, .5, 0, 0, 1.])
    assert train_rl.frac_zero_std(r, 3) == 0.5 and train_rl.frac_zero_std(r, 12) == 0.0


def test_torchrun_no_signal_and_an_audit_that_never_runs_are_said(tmp_path, tiny_model_dir):
    (tmp_path / "const.py").write_text("def zero(prompts, completions, **kwargs):\n"
                                       "    return [0.0] * len(completions)\n")
    args = ["--policy", str(tiny_model_dir), "--data", "toy", "--verifier", "py:const.py:zero", "--eval_verifier",
            "rule:substring", "--audit_verifier", "rule:substring", "--audit_every", "5", "--log_verifiers", "",
            "--steps", "2", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--max_new_tokens", "4",
            "--eval_every", "0", "--eval_prompts", "2", "--master_key_prompts", "0", "--out_dir", str(tmp_path / "run"),
            "--wandb_mode", "disabled"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(ROOT / "train_rl.py"), *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distributed: 1 rank(s), backend gloo, device cpu, compute dtype float32" in out.stdout
    assert "WARNING: audit: rule:substring never runs: it re-grades every --audit_every 5 steps and the run has " \
           "--steps 2" in out.stdout
    warned = [x for x in out.stderr.splitlines() if "no reward signal" in x]
    assert len(warned) == 1 and warned[0].startswith("WARNING: step 1: no reward signal: every response got the same "
                                                     "soft reward (0)")  # once per streak: step 2 is alike too
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/frac_zero_std"] for r in rows if "loss" in r] == [1.0, 1.0]


def test_printed_next_round_commands_keep_the_launcher(monkeypatch):
    import train_rl

    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert train_rl.launcher() == ["python"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train_rl.launcher() == ["torchrun", "--nproc_per_node", "8"]
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert train_rl.launcher() == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8"]


# ----------------------------------------------------------------------------------------------
# 6. TRL and verl names: the exact flags, or one line saying what to do instead


@pytest.mark.parametrize("argv, hint", [
    (["--loss_type", "dapo"], "(did you mean --loss_agg token_mean? that is its name here)"),
    (["--loss_type=grpo"], "(did you mean --loss_agg seq_mean? that is its name here)"),
    (["--loss_type", "dr_grpo"], "(did you mean --loss_agg seq_sum_norm (and --advantage dr_grpo)?"),
    (["--loss_agg_mode", "seq-mean-token-sum-norm"], "(did you mean --loss_agg seq_sum_norm?"),
    (["--beta", "0.04"], "(did you mean --kl_mode loss --kl_coef 0.04 (TRL's beta is k3 in the loss)?"),
    (["--num_iterations", "2"], "(did you mean --ppo_epochs? that is its name here)"),
    (["--total_training_steps", "100"], "(did you mean --steps? that is its name here)"),
    (["--use_vllm", "true"], "(did you mean --rollout_engine vllm? that is its name here)"),
    (["--gradient_accumulation_steps", "4"], "gradient accumulation is automatic here"),
    (["--logging_steps", "1"], "every step is logged"),
    (["--ppo_mini_batch_size", "64"], "verl's mini-batch (in prompts) is --minibatches here"),
    (["--entropy_coeff", "0.001"], "no entropy bonus here"),
])
def test_trl_and_verl_names_get_the_exact_flags(argv, hint):
    with pytest.raises(config.ConfigError) as e:  # the argv of `python train_rl.py ...`
        train_rl.parse_config(argv)
    assert hint in str(e.value), str(e.value)


def test_loss_type_dapo_is_one_line_naming_the_value():
    line = one_line_error(cli("train_rl.py", "--loss_type", "dapo"))
    assert line == ("train_rl.py: error: unrecognised arguments: --loss_type dapo (did you mean --loss_agg token_mean? "
                    "that is its name here) (see --help for the flags)")


def test_a_config_files_trl_value_gets_the_exact_flag_too(tmp_path):
    (tmp_path / "c.yaml").write_text("loss_type: dapo\n")
    with pytest.raises(config.ConfigError, match=r"unknown field 'loss_type' \(did you mean --loss_agg token_mean\?"):
        train_rl.parse_config(["--config", str(tmp_path / "c.yaml")])


# ----------------------------------------------------------------------------------------------
# 7. --help: grouped, one name per flag, every flag with its help and default


def test_help_is_grouped_and_every_flag_has_help_and_a_default():
    out = cli("train_rl.py", "--help")
    assert out.returncode == 0
    text = out.stdout
    headings = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["options", "models and verifiers", "data", "rollout", "advantages, KL and loss (rl_math.py)",
                        "optimisation", "eval, checkpoints, logging",
                        "how the reward verifier is asked, read and reached (verifiers.VerifierOptions)"]
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  --"):
            current = line.split()[0]
            blocks[current] = line[len(current) + 2:]
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None

    for name in list(rl_config.Config.__dataclass_fields__) + list(verifiers.VerifierOptions.__dataclass_fields__):
        block = " ".join(blocks[f"--{name}"].split())  # no --dashed-twin: one name per flag
        help_text = block.split(" ", 1)[1] if " " in block else ""
        assert "(default:" in block and not help_text.startswith("(default:"), (name, block)
    assert "--no_pack" not in text and "--kl-mode" not in text
    assert len(text.splitlines()) < 300  # was 427 lines with a 90-line usage


def test_a_two_token_judgement_of_an_eval_judge_is_one_line_before_the_policy_loads(tmp_path, tiny_model_dir):
    import shutil


    judge = tmp_path / "judge"
    shutil.copytree(tiny_model_dir, judge)
    verifier_prompt.save_settings(judge, verifier_prompt.VerifierSettings(positive="Definitely correct"))
    line = one_line_error(cli("train_rl.py", "--policy", "no/such-model-is-loaded", "--data", "toy", "--verifier",
                              "rule:substring", "--eval_verifier", f"rm:{judge}", "--out_dir", str(tmp_path / "run")))
    assert line.startswith(f"train_rl.py: error: --eval_verifier 'rm:{judge}': judgement token 'Definitely correct' is")
    assert "--verifier_positive / --verifier_negative" in line and not (tmp_path / "run").exists()


def test_the_tiny_policy_on_a_file_data_set_says_what_it_is(tmp_path):
    rows = tmp_path / "d.jsonl"
    rows.write_text("".join(json.dumps({"query": f"What is {i} + {i}?", "label": str(2 * i)}) + "\n" for i in range(8)))
    out = cli("train_rl.py", "--data", str(rows), "--verifier", "rule:substring", "--eval_verifier", "rule:substring",
              "--audit_verifier", "", "--log_verifiers", "", "--steps", "1", "--prompts_per_step", "2",
              "--samples_per_prompt", "2", "--max_new_tokens", "4", "--eval_every", "0", "--eval_prompts", "2",
              "--master_key_prompts", "0", "--out_dir", str(tmp_path / "run"), "--wandb_mode", "disabled")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"--policy tiny: the numeric toy's tiny policy (worlds.py), warm-started on the toy's questions, not on " \
           f"--data {rows}'s" in out.stdout
