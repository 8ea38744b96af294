"""The weights read once: under a process group model.load_sharded builds every model on the meta device,
shards it with FSDP2, and rank 0 alone reads the checkpoint and broadcasts it into the shards, so no
rank holds the whole model (a 7B float32 policy: 28 GB per GPU before). Two gloo ranks on the GPU path
(RLVR_GPU_PATH=1: bf16 compute), workers in tests/load_once_worker.py."""
import json
from pathlib import Path

import pytest
from test_architectures import ARCHITECTURES, build
from test_gpu_path import TORCHRUN, rl_flags, run, two_ranks

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "load_once_worker.py"
pytestmark = two_ranks


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The architectures of tests/test_architectures.py (tied embeddings), Qwen2 untied and with a
    generation_config.json that stops at one more token than its config says (a state dict leaves it
    out). Their buffers: rotary inv_freq (GPT-2: none, absolute positions), Gemma's embed_scale."""
    from transformers import GenerationConfig

    root = tmp_path_factory.mktemp("load_once")
    qwen = build("qwen2", root / "qwen2_untied", tie_word_embeddings=False)
    GenerationConfig(eos_token_id=[2, 5]).save_pretrained(qwen)
    return [qwen] + [build(arch, root / arch) for arch in ARCHITECTURES if arch != "qwen2"]


def test_shards_hold_exactly_the_checkpoint_and_only_rank_0_reads_it(model_dirs, tmp_path):
    run(TORCHRUN + [str(WORKER), "weights", str(tmp_path), *model_dirs])
    ranks = [json.loads((tmp_path / f"weights_rank{r}.json").read_text()) for r in (0, 1)]
    names = ["qwen2_untied"] + [arch for arch in ARCHITECTURES if arch != "qwen2"]
    assert set(ranks[0]) == {f"{name}/{role}" for name in names for role in ("policy", "frozen")}
    for key, f in ranks[0].items():
        # Loading is a copy (a broadcast, then each rank's slice), no arithmetic: the gathered weights and
        # the buffers equal from_pretrained's bit for bit, in float32 (policy) and in bf16 (reference, verifier).
        assert f["keys_differ"] == [] and f["params_differ"] == [], key
        assert f["from_pretrained"] == 1 and f["safe_open"] >= 1, key  # rank 0 reads (the counting works)
    for rank, facts in enumerate(ranks):
        for key, f in facts.items():
            # rank 1's buffers came from rank 0: rotary inv_freq and Gemma's embed_scale are not in a state dict
            assert f["buffers_differ"] == [], (rank, key)
            assert f["tied"] == f["config_tied"] == ("untied" not in key), (rank, key)
            assert f["eos"] == f["ref_eos"], (rank, key)
            assert f["trainable"] == [key.endswith("/policy")] and f["training"] is False, (rank, key)
            # each rank holds its torch.chunk slice of every parameter along dim 0: about half the bytes
            assert f["local_bytes"] == f["expected_local_bytes"], (rank, key)
            assert 0.45 * f["total_bytes"] < f["local_bytes"] < 0.55 * f["total_bytes"], (rank, key)
    assert ranks[0]["qwen2_untied/policy"]["ref_eos"] == [2, 5]  # the generation config's, not the model config's
    for name in names:  # what the broadcast had to carry
        assert any("inv_freq" in b for b in ranks[0][f"{name}/policy"]["buffers"]) == (name != "gpt2"), name
    for name in ("gemma2", "gemma3"):
        assert "model.embed_tokens.embed_scale" in ranks[0][f"{name}/policy"]["buffers"]
    for key, f in ranks[1].items():  # rank 1 never reads the checkpoint: it never holds the whole model
        assert f["from_pretrained"] == 0 and f["safe_open"] == 0, key


def test_rl_steps_load_once_as_they_loaded_before(tiny_model_dir, tmp_path):
    """Two RL steps (a frozen KL reference; a judge graded by length, so the update is not zero) with the old
    path (every rank loads the whole model, then shards it), then with load_sharded."""
    flags = rl_flags(tiny_model_dir, tmp_path, verifier="py:load_once_worker:length_score", steps=2)
    run(TORCHRUN + [str(WORKER), "rl", str(tmp_path), *[f for f in flags if not f.startswith("--out_dir=")]])
    for rank in (0, 1):
        runs = json.loads((tmp_path / f"rl_rank{rank}.json").read_text())
        assert len(runs["old"]) == len(runs["new"]) == 2
        assert runs["old"][0]["grad_norm"] > 0 and runs["old"][1]["kl/k3"] > 0  # it trained, the reference counts
        for step, (old, new) in enumerate(zip(runs["old"], runs["new"])):
            assert old.keys() == new.keys()
            for key in [k for k in old if not k.startswith(("time/", "memory/", "throughput/"))]:
                # The same weights bit for bit (the test above), seeds, batch and kernels: equal to the last bit
                # (as measured). 1e-6 relative (8 float32 ulps) leaves room only for a float32 summation order;
                # a wrong weight or buffer moves bf16 log-probs, and so loss, KL, entropy, by far more (2^-8).
                assert new[key] == pytest.approx(old[key], rel=1e-6, abs=1e-9), (rank, step, key)
