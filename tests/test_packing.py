"""Padding-free packing: packed rows give the padded path's log-probs and gradients; the per-sequence
sdpa ("sdpa_varlen") equals a dense block-diagonal mask; and (when TRL is installed, as for bench.py)
our GRPO loss and gradients on a fixed rollout batch equal TRL GRPOTrainer's at the same settings."""
import random

import pytest
import torch

import train_rl
from rlvr import model as M

# uneven prompts and responses, one response of a single token
PROMPT_LENS, RESPONSE_LENS = [5, 9, 3, 14], [7, 1, 12, 4]


def _batch(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]
    responses = [[rng.randrange(3, vocab) for _ in range(n)] for n in RESPONSE_LENS]
    return prompts, responses


def _load(path):
    torch.manual_seed(0)
    m = M.load_model(path, dtype=torch.float32)
    m.train()
    return m


def _per_sequence_logprobs(model, prompts, responses, pack: bool):
    seqs = [p + r for p, r in zip(prompts, responses)]
    masks = [[False] * len(p) + [True] * len(r) for p, r in zip(prompts, responses)]
    ids, pos, att, tmask = M.rows(seqs, masks, pack, pad_id=0, device="cpu")
    lp, _ = M.token_logprobs(model, ids, pos, tmask, att, chunk_size=5)  # several chunks, a ragged last one
    return list(lp[tmask].split([len(r) for r in responses]))  # the flat target list, sequence by sequence


@pytest.mark.parametrize("with_grad", [False, True])
def test_packed_logprobs_and_gradients_equal_the_padded_path(tiny_model_dir, with_grad):
    model = _load(tiny_model_dir)
    prompts, responses = _batch(model.config.vocab_size)
    weights = [torch.randn(len(r), generator=torch.Generator().manual_seed(i)) for i, r in enumerate(responses)]
    out = {}
    for pack in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(with_grad):
            seqs = _per_sequence_logprobs(model, prompts, responses, pack)
        grads = None
        if with_grad:
            sum((w * s).sum() for w, s in zip(weights, seqs)).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[pack] = ([s.detach() for s in seqs], grads)
    (packed, g_packed), (padded, g_padded) = out[True], out[False]
    assert [len(s) for s in packed] == RESPONSE_LENS
    for a, b in zip(packed, padded):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
        assert (a < 0).all()  # real log-probs, not the zeros of masked positions
    if with_grad:
        assert g_packed.keys() == g_padded.keys() and len(g_packed) > 0
        for name in g_packed:
            scale = g_padded[name].abs().max().clamp_min(1e-6)
            assert (g_packed[name] - g_padded[name]).abs().max() <= 1e-4 * scale, name


def test_packed_logprobs_equal_one_sequence_at_a_time(tiny_model_dir):
    model = _load(tiny_model_dir).eval()
    prompts, responses = _batch(model.config.vocab_size, seed=1)
    with torch.no_grad():
        packed = _per_sequence_logprobs(model, prompts, responses, pack=True)
        for i in range(len(responses)):
            alone = _per_sequence_logprobs(model, [prompts[i]], [responses[i]], pack=False)[0]
            assert torch.allclose(packed[i], alone, atol=1e-5, rtol=0)


def test_activation_checkpointing_recomputes_packed_rows_as_their_forward(tiny_model_dir):
    """--activation_checkpointing on packed rows: each layer's recompute in backward runs the per-sequence
    attention its forward ran (recomputed with plain sdpa, the row would attend across its sequences and
    checkpoint refuses the mismatched shapes). The recompute repeats the forward's float32 ops, so the
    gradients are bitwise those without checkpointing."""
    model = _load(tiny_model_dir)
    prompts, responses = _batch(model.config.vocab_size, seed=3)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            M.shard_model(model, mixed_precision=False, activation_checkpointing=True)  # no process group: no shards
        sum(x.sum() for x in _per_sequence_logprobs(model, prompts, responses, pack=True)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    assert model.config._attn_implementation == "sdpa"  # restored after forward and backward
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name


def _block_causal_mask(lengths):
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    t = torch.arange(len(seg))
    return (seg[:, None] == seg[None, :]) & (t[:, None] >= t[None, :])


def test_varlen_sdpa_equals_a_dense_block_diagonal_mask():
    heads, kv_heads, dim = 4, 2, 16
    g = torch.Generator().manual_seed(0)
    lengths = [6, 1, 11, 4, 6]  # two of length 6: one batched call, whose output is split back per sequence
    q = torch.randn(1, heads, sum(lengths), dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, sum(lengths), dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, sum(lengths), dim, generator=g, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = M._varlen_sdpa(None, q, k, v, None, scaling=dim ** -0.5, position_ids=pos)  # [1, T, H, D]
    rep = heads // kv_heads
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=_block_causal_mask(lengths),
        scale=dim ** -0.5)
    assert torch.allclose(out, dense.transpose(1, 2), atol=1e-6, rtol=0)
    # the gradients too (the backward of the per-sequence calls and of putting their outputs back in place);
    # float32 sums of at most 11 unit-scale products: 1e-5
    w = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((dense.transpose(1, 2) * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_model_varlen_path_equals_transformers_dense_mask_path(tiny_model_dir):
    """The same packed row through the whole model: our per-sequence sdpa vs transformers' own sdpa with
    the block-diagonal mask it derives from restarting position ids."""
    model = _load(tiny_model_dir).eval()
    prompts, responses = _batch(model.config.vocab_size, seed=2)
    ids, pos = M.pack([p + r for p, r in zip(prompts, responses)])
    with torch.no_grad():
        dense = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        with M._packed_attention(model, packed=True):
            varlen = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        first = model.model(input_ids=ids[:, :len(prompts[0]) + len(responses[0])], use_cache=False).last_hidden_state
    assert model.config._attn_implementation == "sdpa"  # the context restores the kernel
    assert torch.allclose(varlen, dense, atol=1e-5, rtol=0), (varlen - dense).abs().max()
    assert torch.allclose(varlen[:, :first.shape[1]], first, atol=1e-5, rtol=0)
    # the dense path really masks across sequences: shuffling the first sequence changes nothing after it
    ids2 = ids.clone()
    ids2[0, :first.shape[1]] = ids2[0, :first.shape[1]].flip(0)
    with torch.no_grad(), M._packed_attention(model, packed=True):
        varlen2 = model.model(input_ids=ids2, position_ids=pos, use_cache=False).last_hidden_state
    assert torch.allclose(varlen2[:, first.shape[1]:], varlen[:, first.shape[1]:], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# our loss vs TRL's GRPOTrainer loss (TRL is a benchmark-only install: requirements-bench.txt)


def test_loss_and_gradients_equal_trl_grpo_trainer(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    clip_low, clip_high = 0.2, 0.28
    ours_model, trl_model = _load(tiny_model_dir), _load(tiny_model_dir)
    tok = M.load_tokenizer(tiny_model_dir)
    prompts, responses = _batch(ours_model.config.vocab_size, seed=3)
    n = len(responses)
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(n, generator=g)
    # a behaviour policy a little off the current one, so the ratio moves and both clips trigger
    with torch.no_grad():
        current = _per_sequence_logprobs(ours_model, prompts, responses, pack=True)
    old = [c + torch.randn(len(c), generator=g) * 0.3 for c in current]

    def zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=2,
        max_completion_length=max(RESPONSE_LENS), beta=0.0, num_iterations=1, epsilon=clip_low,
        epsilon_high=clip_high, loss_type="dapo", scale_rewards="group", temperature=1.0, use_cpu=True, bf16=False,
        activation_checkpointing=False, report_to="none", logging_strategy="no", save_strategy="no")
    trainer = GRPOTrainer(model=trl_model, reward_funcs=[zero_reward], args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * n))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch per step here
    pad = tok.pad_token_id
    pw, cw = max(PROMPT_LENS), max(RESPONSE_LENS)
    prompt_ids = torch.tensor([[pad] * (pw - len(p)) + p for p in prompts])  # TRL: prompts left-padded
    prompt_mask = torch.tensor([[0] * (pw - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([r + [pad] * (cw - len(r)) for r in responses])  # completions right-padded
    completion_mask = torch.tensor([[1] * len(r) + [0] * (cw - len(r)) for r in responses])
    old_pad = torch.stack([torch.cat([o, torch.zeros(cw - len(o))]) for o in old])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": adv, "old_per_token_logps": old_pad,
              "num_items_in_batch": completion_mask.sum()}
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    # ours: train_rl.policy_update itself (packed rows, clipped ratio loss, token_mean over the step, TRL's
    # "dapo") with plain SGD at lr 1 and no clipping of the norm: the weights move by exactly -gradient
    cfg = train_rl.Config(micro_batch_size=n, clip_low=clip_low, clip_high=clip_high, loss_agg="token_mean",
                          max_grad_norm=1e9, max_new_tokens=cw)
    batch = train_rl.Batch(prompts, responses, torch.cat([adv[i].repeat(len(r)) for i, r in enumerate(responses)]),
                           torch.cat(old), None, None, None)
    before = {name: p.detach().clone() for name, p in ours_model.named_parameters()}
    sgd = torch.optim.SGD(ours_model.parameters(), lr=1.0)
    loss, stats = train_rl.policy_update(ours_model, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda i: 1.0),
                                         batch, cfg, step=0, device="cpu")
    for name, p in ours_model.named_parameters():
        p.grad = before[name] - p.detach()

    assert stats["clip_low"] > 0 and stats["clip_high"] > 0  # the comparison covers both clipped branches
    assert abs(loss - trl_loss.item()) <= 1e-5 * max(1.0, abs(loss)), (loss, trl_loss.item())
    trl_params = dict(trainer.model.named_parameters())
    worst = 0.0
    for name, p in ours_model.named_parameters():
        q = trl_params[name]
        assert p.grad is not None and q.grad is not None, name
        worst = max(worst, ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-8)).item())
    print(f"ours loss {loss:.9f}, TRL loss {trl_loss.item():.9f}, worst relative gradient gap {worst:.2e}")
    assert worst <= 1e-4, worst
