"""The student written by `train_verifier.py sft` scores the same through reward.py's local verifier
and through `vllm serve` (test_reward_vllm's server fixture, here serving the student), each reading
the settings saved beside the weights. Skipped without the vLLM interpreter ($RLVR_VLLM_PYTHON,
default .venv-vllm/bin/python)."""
import json

import pytest
import torch

from rlvr import verifiers
from worlds import toy
import train_verifier as TV
from test_reward_vllm import pytestmark, server  # noqa: F401  (fixture and skip condition reused)


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_model_dir, tmp_path_factory):
    """Overrides the conftest fixture for this module, so `server` serves the trained student, distilled
    with a non-default system prompt: both sides must read it from verifier_settings.json."""
    tmp = tmp_path_factory.mktemp("student")
    (tmp / "labels.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in toy.judge_rows("near:64", seed=7)))
    result = TV.run(["sft", "--student", tiny_model_dir, "--data", str(tmp / "labels.jsonl"), "--out_dir",
                     str(tmp / "run"), "--pack", "false", "--batch_size", "8", "--micro_batch_size", "8",
                     "--epochs", "3", "--lr", "1e-3", "--verifier_system_prompt", "Judge.", "--wandb_mode", "disabled"])
    return result["final"]


def test_student_scores_the_same_locally_and_through_vllm(server, tiny_model_dir):  # noqa: F811
    _, url = server
    rows = toy.judge_rows("near:24", seed=8)
    qs, refs, resp = ([getattr(r, k) for r in rows] for k in ("question", "reference", "response"))
    # a few steps on YES/NO: the first token need not be a judgement token yet, so coverage is not checked
    local = verifiers.build_verifier(tiny_model_dir, verifiers.VerifierOptions(verifier_batch_size=5, verifier_max_unjudged=1,
                                                                         verifier_paper_defaults=True))
    remote = verifiers.build_verifier(url, verifiers.VerifierOptions(verifier_concurrency=4, verifier_timeout=60,
                                                               verifier_paper_defaults=True,
                                                               verifier_max_unjudged=1))
    assert remote.client.model_id == tiny_model_dir
    assert local.prompt.settings.system_prompt == remote.prompt.settings.system_prompt == "Judge."
    jl, jr = local(qs, refs, resp), remote(qs, refs, resp)
    for name in ("binary", "soft", "p_yes"):
        torch.testing.assert_close(getattr(jr, name), getattr(jl, name), atol=1e-3, rtol=0, msg=name)
    # the student says YES somewhere, with p(YES) well above a flat 1/vocab
    assert jl.binary.sum() >= 1 and jl.p_yes.min() > 3 / len(local.prompt.tokenizer)
