"""Prompt sharing (rlvr/prefix_sharing.py): each distinct prompt runs once, its K/V indexed out to its samples'
rows. Log-probs, entropies and every parameter gradient equal the packed layout's; the token rule picks the
layout; train_rl.forward_logprobs returns the same flat values whichever layout runs."""
import random

import pytest
import torch

import train_rl
from rlvr import model as M
from rlvr import prefix_sharing as PS

# Float32 tolerance. The two layouts run the same products but sum them in another order: attention over
# [prompt K/V ++ response K/V] through a padding mask (sdpa's masked kernel) instead of one causal sdpa per
# packed sequence (the rows' own kernel, other blocking of the softmax sums), the linear layers on [U, P] and
# [B, R] batches instead of one [1, T] row (other GEMM blocking), and a prompt's gradient summed over its rows
# by the index backward instead of accumulated along the packed row. Each reorders float32 sums of ~128 terms
# (rel. error ~1e-7 each); over 4 layers and the LM head that stays well under 1e-5 in a log-prob of magnitude
# ~7 (vocab 640) and, relative to the largest entry, in each gradient. Measured on this batch: log-probs 9.5e-7,
# entropies 2.9e-6, gradients 1.3e-6 of their largest entry; the tolerance is ~10x that.
ATOL_LOGP = 2e-5
RTOL_GRAD = 2e-5


def _groups(vocab: int, seed: int = 0):
    """4 groups of 3 samples: prompts of different lengths (one of a single token), uneven responses (one of
    a single token), shuffled so a micro-batch holds parts of groups, as plan_update's order gives."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for n in (5, 11, 1, 8):
        p = [rng.randrange(3, vocab) for _ in range(n)]
        for m in (rng.randrange(2, 15), 1, rng.randrange(2, 15)):
            prompts.append(p)
            responses.append([rng.randrange(3, vocab) for _ in range(m)])
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [responses[i] for i in order]


def _load(path):
    m = M.load_model(path, dtype=torch.float32)
    m.train()
    return m


def _packed(model, prompts, responses, with_entropy=True):
    seqs = [p + r for p, r in zip(prompts, responses)]
    masks = [[False] * len(p) + [True] * len(r) for p, r in zip(prompts, responses)]
    ids, pos, att, tmask = M.rows(seqs, masks, True, pad_id=0, device="cpu")
    lp, ent = M.token_logprobs(model, ids, pos, tmask, att, chunk_size=5, with_entropy=with_entropy)
    return lp[tmask], (ent[tmask] if with_entropy else None)


def _shared(model, prompts, responses, with_entropy=True):
    return PS.logprobs(model, prompts, responses, 1.0, 5, with_entropy, True, "cpu")


def _run(model, fn, prompts, responses, micro):
    """Log-probs, entropies and gradients of a loss over micro-batches of `micro` rows (groups split across them)."""
    lps, ents = [], []
    for s in range(0, len(prompts), micro):
        lp, ent = fn(model, prompts[s:s + micro], responses[s:s + micro])
        # weights: a gradient that differs per token, so a mixed-up row or position shows
        (lp * torch.linspace(0.5, 1.5, len(lp))).sum().backward()
        lps.append(lp.detach())
        ents.append(ent)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return torch.cat(lps), torch.cat(ents), grads


def _assert_same(a, b):
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = a, b
    assert lp_a.shape == lp_b.shape
    torch.testing.assert_close(lp_a, lp_b, atol=ATOL_LOGP, rtol=0)
    torch.testing.assert_close(ent_a, ent_b, atol=ATOL_LOGP, rtol=0)
    for name, g in g_a.items():
        scale = g.abs().max().item()
        assert scale > 0, name  # every parameter gets a gradient (prompt rows' K/V included)
        torch.testing.assert_close(g_b[name], g, atol=RTOL_GRAD * scale, rtol=0, msg=name)


@pytest.mark.parametrize("micro", [12, 5])
def test_shared_layout_equals_packed_logprobs_entropies_and_gradients(tiny_model_dir, micro):
    model = _load(tiny_model_dir)
    prompts, responses = _groups(model.config.vocab_size)
    _assert_same(_run(model, _packed, prompts, responses, micro), _run(model, _shared, prompts, responses, micro))


def test_shared_layout_under_activation_checkpointing(tiny_model_dir):
    """Checkpointed layers keep the prompt cache (transformers drops a cache there unless the layer says its
    replay reads the same states) and replay it in backward without appending twice."""
    model = _load(tiny_model_dir)
    prompts, responses = _groups(model.config.vocab_size, seed=1)
    packed = _run(model, _packed, prompts, responses, 12)
    M.shard_model(model, mixed_precision=False, activation_checkpointing=True)  # no process group: no shards
    assert PS.supported(model)
    _assert_same(packed, _run(model, _shared, prompts, responses, 12))
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in model.modules())  # restored


def test_bf16_model_with_the_fp32_head(tiny_model_dir):
    """A bf16 model: the same head (fp32) as the packed layout; bf16 rounding differs with the summation order
    (2^-8 relative per op), so only a loose agreement."""
    model = M.load_model(tiny_model_dir, dtype=torch.bfloat16)
    prompts, responses = _groups(model.config.vocab_size, seed=2)
    with torch.no_grad():
        a, b = _packed(model, prompts, responses)[0], _shared(model, prompts, responses)[0]
    assert a.dtype == b.dtype == torch.float32
    assert (a - b).abs().mean() < 0.05


def test_token_rule():
    p, q = [1] * 40, [2] * 40
    # 8 samples of each of 2 prompts, equal responses: 2 x 40 + 16 x 100 shared vs 16 x 140 packed
    assert PS.token_counts([p] * 8 + [q] * 8, [[3] * 100] * 16) == (2 * 40 + 16 * 100, 16 * 140)
    # all prompts distinct: nothing to share, padding only adds
    shared, packed = PS.token_counts([[i] * 40 for i in range(4)], [[3] * 100] * 4)
    assert shared >= packed
    # one long response pads every row to its length
    shared, packed = PS.token_counts([p] * 8, [[3] * 5] * 7 + [[3] * 300])
    assert shared > PS.MAX_TOKEN_FRACTION * packed


def test_forward_logprobs_takes_the_shared_layout_where_it_saves(tiny_model_dir, monkeypatch):
    """train_rl.forward_logprobs: the shared layout for groups of samples, the packed one for distinct prompts
    and for --pack false; the same flat values either way."""
    model = _load(tiny_model_dir)
    rng, vocab = random.Random(0), model.config.vocab_size
    p1, p2 = [rng.randrange(3, vocab) for _ in range(30)], [rng.randrange(3, vocab) for _ in range(25)]
    prompts = [p1] * 4 + [p2] * 4
    responses = [[rng.randrange(3, vocab) for _ in range(40)] for _ in prompts]
    idx = [5, 0, 7, 2, 1]
    calls = []
    real = PS.logprobs
    monkeypatch.setattr(PS, "logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = train_rl.Config()
    with torch.no_grad():
        shared = train_rl.forward_logprobs(model, prompts, responses, idx, cfg, "cpu", with_entropy=True)
        assert calls == [1]
        padded = train_rl.forward_logprobs(model, prompts, responses, idx, train_rl.Config(pack=False), "cpu", True)
        distinct = train_rl.forward_logprobs(model, [p1, p2], responses[:2], [1, 0], cfg, "cpu", True)
    assert calls == [1]
    torch.testing.assert_close(shared[0], padded[0], atol=ATOL_LOGP, rtol=0)
    torch.testing.assert_close(shared[1], padded[1], atol=ATOL_LOGP, rtol=0)
    assert distinct[0].shape == (80,)


def _shareable(vocab: int, seed: int):
    """2 groups of 6 samples, prompts of 20 and 14 tokens, responses of 6-10: the rule shares (~0.55 of the
    packed tokens)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (20, 14)] * 6
    return prompts, [[rng.randrange(3, vocab) for _ in range(rng.randrange(6, 11))] for _ in prompts]


def fsdp_batches(vocab: int):
    """Per rank, two micro-batches: groups of samples on both ranks (shared), then rank 1's prompts all distinct
    (its rule says packed, so both ranks run packed)."""
    rank0 = [_shareable(vocab, seed=4), _shareable(vocab, seed=5)]
    prompts, responses = _shareable(vocab, seed=6)
    rng = random.Random(7)
    distinct = [[rng.randrange(3, vocab) for _ in range(len(p))] for p in prompts]
    return [rank0, [_shareable(vocab, seed=8), (distinct, responses)]]


@pytest.mark.parametrize("checkpointing", ["0", "1"])
def test_two_fsdp_ranks_share_prompts_as_one_process_packs(tiny_model_dir, tmp_path, checkpointing):
    """FSDP2 (2 gloo ranks, float32, each layer and the root sharded; with and without activation checkpointing):
    the shared layout runs inside the registered forward method, both ranks take the same layout per micro-batch,
    and the log-probs and the ranks' averaged gradients equal the packed layout's in one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "tests" / "prefix_sharing_worker.py"), str(tmp_path), tiny_model_dir, checkpointing]
    env = {k: v for k, v in os.environ.items() if k != "RLVR_GPU_PATH"} | {"OMP_NUM_THREADS": "1"}  # float32
    # ~15 s; 300: a layout that differs between the ranks hangs in FSDP's gathers
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["taken"] for r in ranks] == [["shared", "packed"]] * 2
    model = _load(tiny_model_dir)
    for r, batches in enumerate(fsdp_batches(model.config.vocab_size)):
        for k, (prompts, responses) in enumerate(batches):
            lp, _ = _packed(model, prompts, responses, with_entropy=False)
            torch.testing.assert_close(ranks[r]["lps"][k], lp.detach(), atol=ATOL_LOGP, rtol=0)
            ((lp * torch.linspace(0.5, 1.5, len(lp))).sum() / 2).backward()
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, atol=RTOL_GRAD * scale, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ["qwen3", "llama", "mistral", "gpt2", "gemma2", "gemma3"])
def test_every_architecture_shares_exactly_or_keeps_packing(arch, tmp_path):
    """The other architectures the recipe trains: the shared layout equals the packed one (GPT-2: absolute
    positions, continued after the prompt as rotary ones are); Gemma2/3 have sliding-window layers and keep
    the packed layout."""
    from test_architectures import build

    model = _load(build(arch, tmp_path / arch))
    if arch.startswith("gemma"):
        assert not PS.supported(model)
        return
    assert PS.supported(model)
    prompts, responses = _groups(model.config.vocab_size)
    _assert_same(_run(model, _packed, prompts, responses, 12), _run(model, _shared, prompts, responses, 12))
