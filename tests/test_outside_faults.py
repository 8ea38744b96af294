"""The faults found from outside (issue 35), each as the user's command or the attacker's file: a clear
one-line error naming the file, row or flag, nothing of the user's removed, no secret shown, no code run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(script, *args, timeout=600, **env):  # hang detector only
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", **env)
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def last_line(out):
    return out.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# 11: a YAML syntax error in --config


def test_a_yaml_syntax_error_in_the_config_file_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("steps: 3\nlr: [1e-3, 2e-3\nseed: 4\n")
    out = cli("train_rl.py", "--config", path, "--out_dir", tmp_path / "run")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert last_line(out).startswith(f"train_rl.py: error: --config {path}: not valid YAML: line 3, column ")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# 10: a lone surrogate in a question or a label


@pytest.mark.parametrize("row, field", [
    ('{"query": "what is 2+2? \\ud800", "label": "4"}', "field 'query'"),
    ('{"query": [{"role": "user", "content": "2+2? \\udfff"}], "label": "4"}', "field 'query', message 1"),
    ('{"query": "what is 2+2?", "label": "4 \\ud83d"}', "field 'label'"),
])
def test_a_lone_surrogate_in_a_question_or_label_names_the_row(tmp_path, row, field):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"query": "what is 1+1?", "label": "2"}\n' + row + "\n")
    out = cli("train_rl.py", "--data", data, "--out_dir", tmp_path / "run", "--policy", "tiny", "--verifier", "rule:math")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert last_line(out).startswith(f"train_rl.py: error: {data}, row 2: {field} holds a lone surrogate ("), \
        last_line(out)


def test_a_lone_surrogate_in_a_judged_row_names_the_row(tmp_path):
    import data

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "reference": "7", "response": "7"}\n'
                    '{"question": "q", "reference": "7", "response": "the answer \\udc80 7"}\n')
    with pytest.raises(data.DataError, match=r"rows.jsonl, row 2: field 'response' holds a lone surrogate"):
        data.read_judged_rows(str(rows))


# ----------------------------------------------------------------------------------------------
# 3, 4: no API key or URL password shown


@pytest.mark.parametrize("url, secret", [("http://alice:p@ssw0rd@127.0.0.1:9", "ssw0rd"),
                                         ("http://alice:pa/ss@127.0.0.1:9", "pa/ss"),
                                         ("http://127.0.0.1:8,http://bob:se,cret@127.0.0.1:9", "cret")])
def test_a_url_password_with_at_slash_or_comma_is_refused_and_never_shown(tmp_path, url, secret):
    out = cli("train_rl.py", "--verifier", url, "--out_dir", tmp_path / "run")
    assert out.returncode == 2 and "credentials in a URL are refused" in last_line(out), out.stderr[-2000:]
    assert secret not in out.stdout + out.stderr and "***@127.0.0.1:9" in last_line(out), last_line(out)
    assert not (tmp_path / "run").exists()


class EchoingServer:
    """A server that echoes what it was sent, as careless ones do: 401 "invalid key: Bearer <the key>",
    500 with every request header in its body, or with the bare key where a long body is cut short."""

    def __init__(self, mode):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                if mode == "401":
                    body = f"invalid key: {auth}".encode()
                elif mode == "500":
                    body = json.dumps({"error": "internal", "headers": dict(self.headers)}).encode()
                else:  # the key alone, across the 500th character, where an error line is cut
                    body = ("x" * 481 + " echo " + auth.removeprefix("Bearer ")).encode()
                self.send_response(401 if mode == "401" else 500)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["401", "500", "500_cut"])
def test_a_server_that_echoes_the_api_key_never_gets_it_shown(mode, monkeypatch):
    from rlvr import remote

    key = "sk-live-0123456789abcdef"
    monkeypatch.setenv(remote.API_KEY_ENV, key)
    server = EchoingServer(mode)
    try:
        with pytest.raises(remote.VerifierError) as e:
            remote.CompletionsClient([server.url], timeout=10, retries=1, concurrency=1, backoff=0.0)
    finally:
        server.close()
    message = str(e.value)
    assert ("HTTP 401" if mode == "401" else "HTTP 500") in message and server.url in message, message
    assert key not in message and key[:12] not in message, message
    assert ("Bearer ***" if mode == "401" else "***") in message


# ----------------------------------------------------------------------------------------------
# 2: a checkpoint directory is data, not code


class _Payload:
    """What an attacker puts in .metadata: unpickling it writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("manifest", ["as saved", "matching the payload"])
def test_a_malicious_metadata_pickle_never_runs_with_or_without_a_matching_manifest(tmp_path, manifest):
    import hashlib
    import pickle

    import torch

    from rlvr import checkpoint

    def fresh():
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-3)

    root, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    net, opt = fresh()
    checkpoint.save_checkpoint(str(root), 1, net, opt)
    step2 = checkpoint.save_checkpoint(str(root), 2, net, opt)
    meta = Path(step2) / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload(str(marker))))
    if manifest == "matching the payload":  # the attacker rewrote sha256.json too
        digests = json.loads((Path(step2) / "sha256.json").read_text())
        digests[".metadata"] = hashlib.sha256(meta.read_bytes()).hexdigest()
        (Path(step2) / "sha256.json").write_text(json.dumps(digests))
    # every way a run looks at a checkpoint: the --resume check, the out_dir claim, the load
    assert checkpoint.latest_checkpoint(str(root)) == str(root / "step_00000001")
    net2, opt2 = fresh()
    state = checkpoint.load_checkpoint(str(root), net2, opt2)
    assert state["step"] == 1 and not marker.exists()
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_checkpoint(step2, net2, opt2)  # that checkpoint alone: no fallback
    assert not marker.exists()
    assert str(meta) in str(e.value) and ("damaged or replaced" in str(e.value) if manifest == "as saved" else
                                          "asks for builtins.exec, which a DCP index never holds" in str(e.value))
    # and DCP's own loader, were anything to reach it, reads through the same gate
    from rlvr import checkpoint_metadata
    with pytest.raises(checkpoint_metadata.MetadataError):
        checkpoint_metadata.Reader(step2).read_metadata()
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# 1: --overwrite removes what runs wrote, as they listed it, and nothing of the user's


def test_overwrite_removes_the_runs_files_and_keeps_the_users_notes_and_data(tiny_model_dir, tmp_path):
    from test_train_rl import flags, run, step_rows

    out = tmp_path / "R"
    out.mkdir()
    prompts = out / "my_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"query": f"What is {i} + 1?", "label": str(i + 1)}) + "\n" for i in range(40)))
    args = flags(tiny_model_dir, out, 1, data=prompts, wandb_mode="offline", audit_verifier="")
    run(args)  # a run that used wandb (offline): out/wandb, out/wandb_run_id
    assert (out / "wandb_run_id").exists() and (out / "wandb").is_dir()
    (out / "NOTES.txt").write_text("lr 1e-3 looked fine\n")
    data_before = prompts.read_bytes()
    again = run(args, check=False)
    assert again.returncode == 2 and "holds an earlier run's files" in last_line(again)
    over = run(args + ["--overwrite"])
    said = next(line for line in over.stdout.splitlines() if line.startswith("--overwrite: removing"))
    for name in ("metrics.jsonl", "config.json", "checkpoints", "final", "wandb", "wandb_run_id"):
        assert name in said.split("; keeping")[0], said
    assert said.endswith("; keeping NOTES.txt (no run wrote them)") and "my_prompts" not in said, said
    assert (out / "NOTES.txt").read_text() == "lr 1e-3 looked fine\n" and prompts.read_bytes() == data_before
    assert [r["step"] for r in step_rows(out)] == [1]  # one run's rows: nothing appended to the old file
    assert (out / "final" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# 6-9 and metrics.jsonl deleted: --resume checks the flags and the run's files before anything loads


def corrupt_line(path, n):
    lines = path.read_text().splitlines(keepends=True)
    lines[n - 1] = lines[n - 1][: len(lines[n - 1]) // 2] + "\n"  # a middle line cut in half
    path.write_text("".join(lines))


def delete(path):
    path.unlink()


@pytest.mark.parametrize("change, damage, code, says", [
    (["--lr=5e-3"], None, 2, "--resume: --lr 0.005 (the run's: 0.001): a resumed run keeps the flags it started with"),
    (["--seed=4"], None, 2, "--resume: --seed 4 (the run's: 3): a resumed run keeps the flags it started with"),
    (["--seed=4", "--kl_coef=0.1"], None, 2, "--resume: --kl_coef 0.1 (the run's: 0.05), --seed 4 (the run's: 3)"),
    ([], ("metrics.jsonl", corrupt_line, 2), 1, "metrics.jsonl: line 2 is not a JSON row with a step"),
    ([], ("rollouts.jsonl", corrupt_line, 20), 1, "rollouts.jsonl: line 20 is not a JSON row with a step"),
    ([], ("metrics.jsonl", delete), 1, "metrics.jsonl is missing while"),
])
def test_resume_checks_the_flags_and_the_files_before_anything_loads(tiny_model_dir, straight, tmp_path, change,
                                                                      damage, code, says):
    import shutil

    from test_faults import snapshot
    from test_train_rl import STRAIGHT, flags, run

    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)  # a finished 4-step run, a checkpoint at each step
    config_before = (tmp_path / "config.json").read_text()
    if damage:
        name, hurt, *where = damage
        hurt(tmp_path / name, *where)
    before = snapshot(tmp_path)
    out = run(flags(tiny_model_dir, tmp_path, 6, **STRAIGHT) + change + ["--resume"], check=False)
    assert out.returncode == code and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert says in last_line(out) and last_line(out).startswith("train_rl.py: error: "), last_line(out)
    assert "resumed from" not in out.stdout and snapshot(tmp_path) == before  # nothing loaded, nothing written
    assert (tmp_path / "config.json").read_text() == config_before
    if damage and hurt is corrupt_line:  # the last good step, and how to keep the good lines
        good = [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()[: where[0] - 1]]
        assert f"the last good step before it is {good[-1]}: keep the lines before it (head -n {where[0] - 1} " \
               f"{tmp_path / name} > " in last_line(out), last_line(out)


# ----------------------------------------------------------------------------------------------
# 5: one label file, one teacher, one label run at a time; sft says what it dropped


def test_label_into_an_existing_out_with_another_teacher_is_refused(tmp_path):
    from test_train_verifier import labelled_rows, write_jsonl

    src = write_jsonl(tmp_path / "rows.jsonl", labelled_rows(12, seed=1))
    out = tmp_path / "labels.jsonl"
    first = cli("train_verifier.py", "label", "--data", src, "--teacher", "rule:math", "--out", out)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["teacher"] for r in rows} == {"rule:math"}
    before = out.read_bytes()
    second = cli("train_verifier.py", "label", "--data", src, "--teacher", "rule:substring", "--out", out)
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr[-2000:]
    assert last_line(second) == (f"train_verifier.py label: error: {out}, row 1: labelled by rule:math, not by this "
                                 "run's rule:substring; label into another --out (a file holds one teacher's labels)")
    assert out.read_bytes() == before


def test_two_label_runs_into_one_file_are_locked_out(tmp_path):
    from rlvr import rundir
    from test_train_verifier import labelled_rows, write_jsonl

    src = write_jsonl(tmp_path / "rows.jsonl", labelled_rows(12, seed=1))
    out = tmp_path / "labels.jsonl"
    fd = rundir.lock_output(out, "out")  # a label run into it, still going: this process
    try:
        second = cli("train_verifier.py", "label", "--data", src, "--teacher", "rule:math", "--out", out)
    finally:
        rundir.release(fd)
    assert second.returncode == 2 and not out.exists(), second.stderr[-2000:]
    assert last_line(second) == (f"train_verifier.py label: error: --out {out}: in use by another run (pid "
                                 f"{os.getpid()}); wait for it to end or choose another --out")


def test_sft_drops_duplicate_rows_saying_so_and_refuses_contradicting_ones(tmp_path, tiny_model_dir, capsys):
    import train_verifier as TV
    from test_train_verifier import labelled_rows, write_jsonl

    rows = labelled_rows(40, seed=5)
    args = ["--student", tiny_model_dir, "--batch_size", "8", "--micro_batch_size", "8", "--epochs", "0.2",
            "--pack", "false", "--wandb_mode", "disabled"]
    twice = write_jsonl(tmp_path / "twice.jsonl", rows + rows[:10])  # two label runs' rows in one file
    TV.run(["sft", "--data", str(twice), "--out_dir", str(tmp_path / "a"), *args])
    said = capsys.readouterr().out
    assert f"[sft] {twice}: dropped 10 duplicate rows (the same question, reference and response again); 40 " \
           "distinct rows" in said, said
    flipped = write_jsonl(tmp_path / "flipped.jsonl", rows + [{**rows[3], "label": 1 - rows[3]["label"]}])
    out = cli("train_verifier.py", "sft", "--data", flipped, "--out_dir", tmp_path / "b", *args)
    assert out.returncode == 1, out.stderr[-2000:]
    assert last_line(out).startswith(f"train_verifier.py sft: error: {flipped}, rows 4 and 41: the same question, "
                                     "reference and response labelled "), last_line(out)


# ----------------------------------------------------------------------------------------------
# weak: infinities, an --out_dir that is a file, both checkpoints damaged


@pytest.mark.parametrize("flag", [["--temperature", "inf"], ["--kl_mode", "reward", "--kl_coef", "inf"],
                                  ["--lr", "nan"], ["--verifier_timeout", "inf"]])
def test_an_infinite_or_nan_number_is_refused_naming_its_flag(tmp_path, flag):
    out = cli("train_rl.py", *flag, "--out_dir", tmp_path / "run")
    value = flag[-1]
    assert out.returncode == 2 and last_line(out) == f"train_rl.py: error: --{flag[-2][2:]} {float(value)!r}: must " \
                                                      "be a finite number", out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_an_out_dir_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    out = cli("train_rl.py", "--out_dir", tmp_path / "run", "--policy", "tiny")
    assert out.returncode == 2 and last_line(out) == f"train_rl.py: error: --out_dir {tmp_path / 'run'}: is a file, " \
                                                      "not a directory; choose another --out_dir", out.stderr[-2000:]


def test_every_checkpoint_damaged_sends_the_user_to_overwrite_not_in_a_circle(tiny_model_dir, straight, tmp_path):
    import shutil

    from test_train_rl import STRAIGHT, flags, run

    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    for shard in (tmp_path / "checkpoints").glob("step_*/*.distcp"):  # both checkpoints kept: truncated
        shard.write_bytes(shard.read_bytes()[:100])
    args = flags(tiny_model_dir, tmp_path, 6, **STRAIGHT)
    yes, auto = run(args + ["--resume"], check=False), run(args + ["--resume=auto"], check=False)
    assert yes.returncode == auto.returncode == 2
    assert "every checkpoint in" in last_line(yes) and "start over with --overwrite" in last_line(yes), last_line(yes)
    assert "no complete checkpoint to resume from" in last_line(auto) and "--overwrite" in last_line(auto)
    for out in (yes, auto):  # neither sends the user to the other
        assert "--resume auto" not in last_line(out) and "continue it with --resume" not in last_line(out)
        assert "truncated" in out.stderr  # the damage is named


# ----------------------------------------------------------------------------------------------
# weak: a py: judge that raises or hangs


JUDGE = '''
import time


def judge(questions, references, responses):
    if questions == ["What is 1 + 1?"]:  # the check when the verifier is built passes
        return [1.0]
    if responses[0] == "raise RuntimeError":
        raise RuntimeError("the judge's model is not loaded")
    if responses[0] == "raise KeyError":
        return [{"a": 1}["b"]]
    if responses[0] == "raise ZeroDivisionError":
        return [1 / 0]
    time.sleep(60)  # hangs
'''


@pytest.mark.parametrize("response, says", [
    ("raise RuntimeError", "raised RuntimeError: the judge's model is not loaded"),
    ("raise KeyError", "raised KeyError: 'b'"),
    ("raise ZeroDivisionError", "raised ZeroDivisionError: division by zero"),
    ("hang", "no answer within 0.5s for 1 responses (--verifier_timeout)"),
])
def test_a_py_judge_that_raises_or_hangs_is_one_line_naming_it(tmp_path, monkeypatch, response, says):
    from rlvr import remote, verifiers

    (tmp_path / "my_judge_35.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    verifier = verifiers.build_verifier("py:my_judge_35:judge", verifiers.VerifierOptions(verifier_timeout=0.5))
    with pytest.raises(remote.VerifierError) as e:
        verifier(["q"], ["7"], [response])
    assert str(e.value) == f"verifier 'py:my_judge_35:judge' {says}" or \
        str(e.value) == f"verifier 'py:my_judge_35:judge': {says}; is it stuck?", str(e.value)


# ----------------------------------------------------------------------------------------------
# weak: a BERT masked LM is no causal verifier


def test_a_bert_masked_lm_is_refused_as_a_verifier(tmp_path):
    from transformers import BertConfig

    bert = tmp_path / "bert-mlm"
    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertForMaskedLM"]).save_pretrained(bert)
    out = cli("train_rl.py", "--verifier", bert, "--verifier_paper_defaults", "--out_dir", tmp_path / "run")
    assert out.returncode == 2 and last_line(out).startswith(
        f"train_rl.py: error: --verifier '{bert}': architecture ['BertForMaskedLM'] (model_type 'bert') is a masked LM"
    ), out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# weak: a file size limit (ulimit -f: EFBIG, which Python gets instead of SIGXFSZ)


def test_a_file_size_limit_is_named_when_a_checkpoint_passes_it(tiny_model_dir, tmp_path):
    import resource

    from test_train_rl import flags

    limit = 64 * 1024  # the tiny model's shards are larger; config.json and the step rows are smaller
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, str(ROOT / "train_rl.py"), *flags(tiny_model_dir, tmp_path, 1)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert last_line(out).startswith(f"train_rl.py: error: checkpoint: saving step 1 to {tmp_path / 'checkpoints'}")
    assert f"files may hold at most {limit} bytes here: ulimit -f" in last_line(out), last_line(out)


def test_a_file_size_limit_passed_by_an_append_is_one_line_naming_the_file(tmp_path, capsys):
    import resource

    from rlvr import config
    from rlvr import metrics

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(SystemExit) as e, config.one_line_errors("train_rl.py", ()):
            metrics.append_jsonl(tmp_path / "rollouts.jsonl", [{"step": 1, "response": "x" * 5000}])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert e.value.code == 1
    assert capsys.readouterr().err == (f"train_rl.py: error: [Errno 27] File too large (appending 1 rows): "
                                       f"'{tmp_path / 'rollouts.jsonl'}' (files may hold at most 4096 bytes here: "
                                       "ulimit -f)\n")


# ----------------------------------------------------------------------------------------------
# weak: a 20,000-word held-out question is counted where it is dropped


def test_a_long_heldout_question_is_dropped_and_counted(tiny_model_dir, tmp_path, capsys):
    from rlvr import model
    import train_rl

    rows = [{"query": f"What is {i} + 1?", "label": str(i + 1)} for i in range(8)]
    write = lambda path, rs: path.write_text("".join(json.dumps(r) + "\n" for r in rs))  # noqa: E731
    write(tmp_path / "train.jsonl", rows)
    write(tmp_path / "eval.jsonl", rows[:2] + [{"query": "Why? " + "word " * 20000, "label": "7"}])
    cfg, _ = train_rl.parse_config(["--data", str(tmp_path / "train.jsonl"), "--eval_data", str(tmp_path / "eval.jsonl"),
                                     "--policy", tiny_model_dir, "--verifier", "rule:math", "--out_dir",
                                     str(tmp_path / "run")])
    train_set, heldout = train_rl.load_data(cfg)
    capsys.readouterr()
    train_set, heldout = train_rl.drop_long_prompts(cfg, model.load_tokenizer(tiny_model_dir), train_set, heldout)
    assert len(heldout) == 2
    assert f"data: {len(train_set)} train / 2 held-out prompts, 1 held-out ones longer than --max_prompt_len " \
           "dropped (the eval is over the rest)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# weak: a 20,000-word reference loses its middle, not the template; it is not reported as a cut answer


def test_a_20000_word_reference_loses_its_middle_and_is_named_not_the_answer(tiny_model_dir, capsys):
    from rlvr import model
    from rlvr import verifier_prompt

    tok = model.load_tokenizer(tiny_model_dir)
    settings = verifier_prompt.VerifierSettings(full_response=True)
    short = verifier_prompt.VerifierPrompt(tok, settings).prompt_ids("q", "7", "so 7")
    n = len(short) + 200
    p = verifier_prompt.VerifierPrompt(tok, settings, "v", max_len=n)
    reference = "REFSTART " + "word " * 20000 + "REFEND"
    ids = p.batch_ids(["What is the answer?", "q"], [reference, "7"], ["so the answer is 7", "so 7"])
    assert len(ids[0]) < n and ids[1] == short
    text, template = tok.decode(ids[0]), tok.decode(short)
    assert text.startswith(template[:40]) and text.endswith(template[-30:])  # the template's start and end
    assert "What is the answer?" in text and "so the answer is 7" in text  # the question and the answer whole
    assert "REFSTART" in text and "REFEND" in text and " … " in text  # the reference's start and end
    assert p.cut == 0 and p.last_cut == [False, False] and p.cut_middle == {"reference": 1}  # no answer cut
    err = capsys.readouterr().err
    assert f"[verifier] v: 1 of 2 references were longer than its {n} positions allow and lost their middles" in err
    assert "answers were longer" not in err


def test_sft_resume_with_a_changed_lr_is_refused_naming_it(tmp_path, tiny_model_dir):
    from rlvr import config
    import train_verifier as TV
    from test_train_verifier import labelled_rows, write_jsonl

    labels = write_jsonl(tmp_path / "labels.jsonl", labelled_rows(40, seed=5))
    args = ["sft", "--student", tiny_model_dir, "--data", str(labels), "--out_dir", str(tmp_path / "run"),
            "--batch_size", "8", "--micro_batch_size", "8", "--epochs", "0.2", "--pack", "false", "--lr", "1e-5",
            "--wandb_mode", "disabled"]
    TV.run(args)
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(config.ConfigError, match=r"^--resume: --lr 0\.001 \(the run's: 1e-05\): a resumed run keeps"):
        TV.run(args + ["--lr", "1e-3", "--resume"])
    assert (tmp_path / "run" / "config.json").read_text() == before
    assert TV.run(args + ["--resume", "--save_every", "5"])["steps"] == 1  # a flag it applies: resumed
