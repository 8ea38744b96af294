"""Issue 34: a TRL or verl user's first hour, each trap written as the user's command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import config
import rl_config

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
    assert rl_config.parse_config(["--kl_mode", "reward"])[0].kl_coef == 0.01
    assert rl_config.parse_config(["--kl_mode", "loss", "--kl_coef", "0.04"])[0].kl_coef == 0.04
    assert rl_config.parse_config([])[0].kl_coef == 0.0
