"""train_rl.policy_update on a fixed batch of the tiny model: rollout correction against hand-computed
weights, token-budget micro-batches equal to row-count ones, log-probs at the sampling temperature
with the end-of-sequence token included. Plain SGD at lr 1 with no norm clipping makes each
parameter's change exactly minus its gradient."""
import math
import random

import pytest
import torch

import train_rl
from rlvr import model as M, rl_math

PROMPT_LENS, RESPONSE_LENS = [5, 9, 3, 14, 6, 2], [7, 1, 12, 4, 9, 3]


def _setup(path, seed=0):
    rng = random.Random(seed)
    lm = M.load_model(path, dtype=torch.float32)
    vocab = lm.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]
    responses = [[rng.randrange(3, vocab) for _ in range(n)] for n in RESPONSE_LENS]
    return lm, prompts, responses


def _gradient(lm, batch, cfg):
    """-(change of each parameter) after one policy_update with SGD(lr=1): the update's gradient."""
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)
    sgd = torch.optim.SGD(lm.parameters(), lr=1.0)
    loss, stats = train_rl.policy_update(lm, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda i: 1.0), batch, cfg,
                                         step=0, device="cpu")
    grads = {n: before[n] - p.detach() for n, p in lm.named_parameters()}
    with torch.no_grad():
        for n, p in lm.named_parameters():
            p.copy_(before[n])
    return loss, stats, grads


def _flat(values, lengths):
    return torch.cat([torch.full((n,), float(v)) for v, n in zip(values, lengths)])


def test_importance_weights_by_hand():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    behaviour = torch.tensor([math.log(0.25), math.log(2.0), math.log(1.0), math.log(0.6)])
    # ratio = pi_old / pi_behaviour = [4, 0.5, 1, 1/0.6]
    w, r, corrected = rl_math.importance_weights(old, behaviour, "tis", 2.0)
    torch.testing.assert_close(r, torch.tensor([4.0, 0.5, 1.0, 1 / 0.6]))
    torch.testing.assert_close(w, torch.tensor([2.0, 0.5, 1.0, 1 / 0.6]))      # capped at 2
    assert corrected.tolist() == [True, False, False, False]
    w, _, corrected = rl_math.importance_weights(old, behaviour, "mask", 2.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 1.0, 1.0]))          # 4 is outside [1/2, 2]
    assert corrected.tolist() == [True, False, False, False]
    w, _, _ = rl_math.importance_weights(old, behaviour, "mask", 1.5)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert rl_math.importance_weights(old, behaviour, "none", 2.0)[0].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="--rollout_correction"):
        rl_math.importance_weights(old, behaviour, "is", 2.0)


def test_micro_batches_by_row_count_and_by_token_budget():
    tokens = [10, 3, 8, 3, 12, 1]
    assert rl_math.micro_batches([0, 1, 2, 3, 4, 5], tokens, 4) == [[0, 1, 2, 3], [4, 5]]
    # longest first into budgets of 13: [12 (+1)], [10 (+3)], [8 (+3)]
    assert rl_math.micro_batches([0, 1, 2, 3, 4, 5], tokens, 4, max_tokens=13) == [[4, 5], [0, 1], [2, 3]]
    assert rl_math.micro_batches([0, 4], tokens, 4, max_tokens=5) == [[4], [0]]  # too long for the budget: alone


def test_rollout_correction_weights_each_tokens_gradient(tiny_model_dir):
    """A deliberately perturbed behaviour policy: the update's gradient equals that of
    sum_t w_t * (-ratio_t * A) / tokens with w_t the hand-computed truncated weights."""
    lm, prompts, responses = _setup(tiny_model_dir)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.3, 0.7])
    idx = list(range(len(responses)))
    with torch.no_grad():
        current = train_rl.forward_logprobs(lm, prompts, responses, idx, train_rl.Config(), "cpu")[0]
    behaviour = current + torch.randn(len(current), generator=torch.Generator().manual_seed(1)) * 0.8
    n_tok = float(sum(RESPONSE_LENS))
    for mode in ("tis", "mask"):
        cfg = train_rl.Config(micro_batch_size=4, max_grad_norm=1e9, rollout_correction=mode, correction_threshold=1.5)
        batch = train_rl.Batch(prompts, responses, _flat(adv, RESPONSE_LENS), None, None, behaviour, None)
        _, stats, grads = _gradient(lm, batch, cfg)
        ratio = torch.exp(current - behaviour)
        w = ratio.clamp(max=1.5) if mode == "tis" else ((ratio >= 1 / 1.5) & (ratio <= 1.5)).float()
        changed = (ratio > 1.5) if mode == "tis" else (w == 0)
        assert 0 < changed.sum() < len(w) and stats["is_corrected"] == changed.sum().item()
        lm.zero_grad(set_to_none=True)
        lp = train_rl.forward_logprobs(lm, prompts, responses, idx, train_rl.Config(), "cpu")[0]
        # on-policy single update: the ratio to the trainer's own log-probs is 1, its gradient d(logp)
        (-(w * torch.exp(lp - lp.detach()) * _flat(adv, RESPONSE_LENS)).sum() / n_tok).backward()
        for n, p in lm.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=f"{mode} {n}")


def test_token_budget_micro_batches_give_the_row_count_gradient(tiny_model_dir):
    lm, prompts, responses = _setup(tiny_model_dir, seed=2)
    adv = _flat([0.5, -1.0, 1.5, -0.2, 0.8, -0.6], RESPONSE_LENS)
    old = train_rl.forward_logprobs(lm, prompts, responses, list(range(6)), train_rl.Config(), "cpu")[0].detach()
    old = old + 0.1  # off-policy, so the clip acts on some tokens
    batch = train_rl.Batch(prompts, responses, adv, old, None, None, None)
    for agg in ("token_mean", "seq_mean"):
        by_rows = _gradient(lm, batch, train_rl.Config(micro_batch_size=2, max_grad_norm=1e9, loss_agg=agg))
        by_tokens = _gradient(lm, batch, train_rl.Config(micro_batch_size=2, max_tokens_per_micro_batch=20,
                                                         max_grad_norm=1e9, loss_agg=agg))
        assert by_rows[0] == pytest.approx(by_tokens[0], abs=1e-6)
        for n in by_rows[2]:
            # Other micro-batches sum the same float32 terms in another order: each element may differ by a
            # few ulps of the largest partial sum (measured 1.8e-7). 64 float32 eps of the tensor's largest
            # element bounds that; a wrong denominator (per micro-batch instead of global) moves whole
            # gradients by 10%+, far outside rtol 1e-4.
            atol = 64 * torch.finfo(torch.float32).eps * by_rows[2][n].abs().max().item()
            torch.testing.assert_close(by_rows[2][n], by_tokens[2][n], atol=atol, rtol=1e-4, msg=f"{agg} {n}")


def test_logprobs_are_at_the_sampling_temperature_and_include_the_end_of_sequence_token(tiny_model_dir):
    lm, prompts, responses = _setup(tiny_model_dir, seed=3)
    eos = lm.config.eos_token_id
    responses = [r + [eos] for r in responses]
    with torch.no_grad():
        for temperature in (1.0, 0.7):
            cfg = train_rl.Config(temperature=temperature)
            flat = train_rl.forward_logprobs(lm, prompts, responses, [0, 1], cfg, "cpu")[0]
            assert len(flat) == len(responses[0]) + len(responses[1])  # every response token, the EOS included
            for i, start in ((0, 0), (1, len(responses[0]))):
                ids = torch.tensor([prompts[i] + responses[i]])
                logits = lm(input_ids=ids).logits[0, len(prompts[i]) - 1:-1] / temperature
                want = logits.log_softmax(-1).gather(-1, torch.tensor(responses[i])[:, None]).squeeze(-1)
                torch.testing.assert_close(flat[start:start + len(responses[i])], want, atol=1e-5, rtol=0)
