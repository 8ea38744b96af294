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
    out = cli("train_rl.py", "--data", data, "--out_dir", tmp_path / "run", "--policy", "tiny")
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
