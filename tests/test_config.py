"""config.py: typed config-file values, no abbreviated flags, "did you mean" for close and foreign names."""
import subprocess
import sys
from pathlib import Path

import pytest

import train_rl
from rlvr import config, rl_config
import train_verifier as TV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, message", [
    ("steps: 2.7", "--steps 2.7: expected an integer, got float"),
    ("steps: '2.7'", "--steps '2.7': expected an integer, got str"),
    ("steps: true", "--steps True: expected an integer, got bool"),  # bool is an int to Python, not to us
    ("steps: null", "--steps None: expected a value"),
    ("resume: maybe", "--resume 'maybe': invalid choice; choose from no, yes, auto"),
    ("pack: maybe", "--pack 'maybe': expected true or false, got str"),
    ("pack: 3", "--pack 3: expected true or false, got int"),
    ("verifier_full_response: 2", "--verifier_full_response 2: expected true or false"),  # Optional[bool]
    ("lr: [1, 2]", "--lr [1, 2]: expected a number, got list"),
    ("temperature: hot", "--temperature 'hot': expected a number, got str"),
    ("log_verifiers: [rule:math, rule:jaccard]", "expected a string (a comma-separated list is one string"),
    ("policy: 7", "--policy 7: expected a string (quote it), got int"),
    ("reward_type: sofr", "--reward_type 'sofr': invalid choice; choose from binary, soft"),
    ("learning_rate: 1.0e-5", "unknown field 'learning_rate' (did you mean --lr? that is its name here)"),
    ("stepz: 3", "unknown field 'stepz' (did you mean --steps?)"),
])
def test_a_config_file_value_of_the_wrong_type_is_refused(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text + "\n")
    with pytest.raises(config.ConfigError) as e:
        train_rl.parse_config(["--config", str(tmp_path / "c.yaml")])
    assert message in str(e.value) and str(e.value).count("\n") == 0


def test_config_file_values_are_converted_as_flags_are(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as text and `yes` as true: both mean what a flag would
    (tmp_path / "c.yaml").write_text("lr: 1e-5\nsteps: 7\ntemperature: 1\npack: 'false'\nresume: no\n"
                                     "verifier_system_prompt: null\nactivation_checkpointing: yes\n")
    cfg, vopts = train_rl.parse_config(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.lr, cfg.steps, cfg.temperature, cfg.pack, cfg.resume) == (1e-5, 7, 1.0, False, "no")
    assert type(cfg.temperature) is float and cfg.activation_checkpointing is True
    assert vopts.verifier_system_prompt is None
    (tmp_path / "c.json").write_text('{"resume": true, "out_dir": "%s"}' % (tmp_path / "none"))
    with pytest.raises(config.ConfigError, match="--resume 'yes': no checkpoint"):  # true -> "yes", then checked
        train_rl.parse_config(["--config", str(tmp_path / "c.json")])


@pytest.mark.parametrize("argv, message", [
    (["--step", "0"], "unrecognised arguments: --step 0 (did you mean --steps?)"),  # not a prefix of --steps
    (["--temp", "0.5"], "unrecognised arguments: --temp 0.5"),
    (["--learning_rate", "1e-5"], "--learning_rate 1e-5 (did you mean --lr? that is its name here)"),
    (["--num_generations", "4"], "(did you mean --samples_per_prompt? that is its name here)"),
    (["--output_dir", "x"], "(did you mean --out_dir? that is its name here)"),
    (["--max_completion_length=8"], "(did you mean --max_new_tokens? that is its name here)"),
    (["--beta", "0.1"], "(did you mean --kl_mode loss --kl_coef 0.1 (TRL's beta is k3 in the loss)? that is its name "
                        "here)"),  # --kl_coef alone does nothing with the default --kl_mode none
    (["--temprature", "1"], "(did you mean --temperature?)"),
])
def test_no_prefix_matching_and_did_you_mean(argv, message):
    with pytest.raises(config.ConfigError) as e:
        train_rl.parse_config(argv)
    assert message in str(e.value)


def test_foreign_names_map_to_the_scripts_own_flag():
    # OpenRLHF's max_epochs is the RL trainer's ppo_epochs and the SFT trainer's epochs
    with pytest.raises(config.ConfigError, match="did you mean --ppo_epochs"):
        train_rl.parse_config(["--max_epochs", "2"])
    with pytest.raises(config.ConfigError, match="did you mean --epochs"):
        TV.parse_config("sft", ["--max_epochs", "2"])
    with pytest.raises(config.ConfigError, match="did you mean --lr"):
        TV.parse_config("sft", ["--learning_rate", "2"])
    for ours in {v for vs in config.ALIASES.values() for v in ((vs,) if isinstance(vs, str) else vs)}:
        assert ours in rl_config.Config.__dataclass_fields__ or ours in TV.SftConfig.__dataclass_fields__, ours


def test_a_badly_typed_config_file_is_one_line_and_exit_2_before_anything_loads(tmp_path):
    (tmp_path / "c.yaml").write_text(f"steps: 2.7\nout_dir: {tmp_path / 'run'}\n")
    out = subprocess.run([sys.executable, str(ROOT / "train_rl.py"), "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and not (tmp_path / "run").exists()
    assert out.stderr.strip().splitlines() == [f"train_rl.py: error: --config {tmp_path / 'c.yaml'}: --steps 2.7: "
                                               "expected an integer, got float"]
