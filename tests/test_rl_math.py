"""rl_math.py against values worked out by hand on small tensors. Each test names the deliberate bug
it is there to catch (issue 12: the KL sign, KL as a mean, per-token returns, whitening, clipping)."""
import math

import pytest
import torch

from rlvr import rl_math as R


def close(a, b):
    torch.testing.assert_close(a, torch.tensor(b, dtype=a.dtype), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- znorm


def test_znorm_batch_by_hand():
    z = R.znorm(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    mean, std = 0.6, math.sqrt(0.24)  # population std
    close(z, [(x - mean) / std for x in [1, 0, 0, 1, 1]])
    assert z.dtype == torch.float32


def test_znorm_degenerate_sets_give_zero():
    assert R.znorm(torch.ones(8)).tolist() == [0.0] * 8                 # std 0
    assert R.znorm(torch.tensor([0.3])).tolist() == [0.0]               # single sample
    assert R.znorm(torch.tensor([0.5, 0.5 + 1e-8])).tolist() == [0.0, 0.0]  # std below 1e-6
    assert R.znorm(torch.zeros(0)).numel() == 0


def test_znorm_groups_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.2, 0.4, 0.0, 0.0])
    close(R.znorm(r, group_size=2), [1.0, -1.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0])
    # [3, 1, 5, 3]: mean 3, population std sqrt(2)
    close(R.znorm(torch.tensor([3.0, 1.0, 5.0, 3.0]), group_size=4), [0.0, -2 / math.sqrt(2), 2 / math.sqrt(2), 0.0])
    with pytest.raises(ValueError, match="groups of 3"):
        R.znorm(torch.ones(8), group_size=3)


def test_znorm_large_values_stay_finite():
    for big in (1e30, 3e38, -3e38):
        z = R.znorm(torch.tensor([big, big / 2, 0.0, -big]))
        assert torch.isfinite(z).all()
        assert z.mean().abs().item() < 1e-6 and z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_znorm_rejects_nan_and_inf_naming_index():
    with pytest.raises(ValueError, match="index 2"):
        R.znorm(torch.tensor([0.0, 1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="index 0"):
        R.znorm(torch.tensor([float("inf"), 1.0]))


def test_one_normalisation_switch():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    close(R.normalize_rewards(r, "none", 2), [1.0, 0.0, 0.5, 0.5])
    close(R.normalize_rewards(r, "group", 2), [1.0, -1.0, 0.0, 0.0])
    close(R.normalize_rewards(r, "batch", 2), [(x - 0.5) / math.sqrt(0.125) for x in [1.0, 0.0, 0.5, 0.5]])
    with pytest.raises(ValueError, match="--reward_norm"):
        R.normalize_rewards(r, "grp", 2)


# ---------------------------------------------------------------------------------------------- helpers


def test_returns_are_suffix_sums_within_each_sequence():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0, 5.0])
    close(R.token_returns(x, [3, 1, 2]), [6.0, 5.0, 3.0, 10.0, 9.0, 5.0])


def test_outcome_token_rewards_put_the_reward_on_the_last_token():
    kl = torch.tensor([0.1, 0.2, 0.3])
    # seq 0 (2 tokens): [-0.5*0.1, -0.5*0.2 + 1]; seq 1 (1 token): [-0.5*0.3 + 0]
    close(R.outcome_token_rewards(torch.tensor([1.0, 0.0]), kl, 0.5, [2, 1]), [-0.05, 0.9, -0.15])
    close(R.outcome_token_rewards(torch.tensor([1.0, 2.0]), None, 0.5, [2, 1]), [0.0, 1.0, 2.0])


def test_whiten_population_std():
    close(R.whiten(torch.tensor([1.0, 3.0])), [-1.0, 1.0])
    close(R.whiten(torch.tensor([2.0, 2.0])), [0.0, 0.0])  # var clamped at 1e-8: 0 * 1e4


def test_leave_one_out_by_hand():
    # group [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    close(R.leave_one_out(torch.tensor([1.0, 2.0, 6.0]), 3), [-3.0, -1.5, 4.5])
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        R.leave_one_out(torch.tensor([1.0]), 1)


# ---------------------------------------------------------------------------------------------- shaping

# a batch of 2 prompts x 2 samples, lengths 2, 1, 1, 2; k1 per token; kl_coef 0.5
LENGTHS = [2, 1, 1, 2]
KL = torch.tensor([0.2, 0.4, -0.2, 0.6, 0.0, 1.0])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0])


def shape(estimator, norm="none", kl=KL, coef=0.5, clip=0.0, rewards=REWARDS):
    return R.shape_advantages(rewards, LENGTHS, 2, norm=norm, estimator=estimator, kl=kl, kl_coef=coef,
                              reward_clip=clip)


def test_reinforce_is_the_reward_minus_the_summed_kl_on_every_token():
    # sequence KL sums: 0.6, -0.2, 0.6, 1.0 -> r - 0.5 * sum: 0.7, 0.1, -0.3, -0.5
    # (a flipped sign gives 1.3, ...; a mean instead of a sum gives 0.85, ...)
    close(shape("reinforce"), [0.7, 0.7, 0.1, -0.3, -0.5, -0.5])
    close(shape("reinforce", kl=None), [1.0, 1.0, 0.0, 0.0, 0.0, 0.0])


def test_the_paper_batch_zscore_comes_before_the_kl():
    # z of [1, 0, 0, 0]: mean .25, std sqrt(3)/4 -> [sqrt 3, -1/sqrt 3, ...]
    a, b = math.sqrt(3), -1 / math.sqrt(3)
    close(shape("reinforce", norm="batch"), [a - 0.3, a - 0.3, b + 0.1, b - 0.3, b - 0.5, b - 0.5])


def test_rloo_seq_by_hand():
    # per-sequence r - 0.5 KL = [0.7, 0.1 | -0.3, -0.5] -> leave-one-out: [0.6, -0.6 | 0.2, -0.2]
    close(shape("rloo_seq"), [0.6, 0.6, -0.6, 0.2, -0.2, -0.2])


def test_reinforce_pp_seq_whitens_sequences():
    seq = torch.tensor([0.7, 0.1, -0.3, -0.5])
    w = (seq - seq.mean()) / seq.std(unbiased=False)
    close(shape("reinforce_pp_seq"), [w[0], w[0], w[1], w[2], w[3], w[3]])


def _whitened(values):
    t = torch.tensor(values, dtype=torch.float64)
    return ((t - t.mean()) / t.std(unbiased=False)).tolist()


def test_reinforce_pp_per_token_returns_then_token_whitening():
    # token rewards: seq0 [-.1, -.2 + 1], seq1 [.1 + 0], seq2 [-.3 + 0], seq3 [0, -.5 + 0]
    # returns:       seq0 [.7, .8],       seq1 [.1],       seq2 [-.3],      seq3 [-.5, -.5]
    close(shape("reinforce_pp"), _whitened([0.7, 0.8, 0.1, -0.3, -0.5, -0.5]))


def test_rloo_per_token_baseline_then_kl_returns_and_whitening():
    # leave-one-out of [1, 0 | 0, 0] = [1, -1 | 0, 0]; returns: seq0 [.7, .8], seq1 [.1 - 1], seq2 [-.3], seq3 [-.5, -.5]
    close(shape("rloo"), _whitened([0.7, 0.8, -0.9, -0.3, -0.5, -0.5]))


def test_rewards_are_clipped_after_the_baseline_and_before_the_kl():
    # 1 right answer in 512: its batch z-score is sqrt(511) = 22.6; OpenRLHF clips to +-10
    r = torch.zeros(512)
    r[0] = 1.0
    z = R.normalize_rewards(r, "batch", 4)
    assert z[0].item() == pytest.approx(math.sqrt(511), rel=1e-5)
    adv = R.shape_advantages(r, [1] * 512, 4, norm="batch", estimator="reinforce", reward_clip=10.0)
    assert adv[0].item() == pytest.approx(10.0) and adv[1].item() == pytest.approx(z[1].item())
    # clipped before the KL: 10 - 0.5 * 2, not clip(10 - 1)
    kl = torch.full((512,), 2.0)
    adv = R.shape_advantages(r, [1] * 512, 4, norm="batch", estimator="reinforce", kl=kl, kl_coef=0.5, reward_clip=10.0)
    assert adv[0].item() == pytest.approx(9.0)


def test_shaping_rejects_bad_input():
    with pytest.raises(ValueError, match="--advantage"):
        shape("grpo")
    with pytest.raises(ValueError, match="3 rewards for 4"):
        R.shape_advantages(torch.zeros(3), LENGTHS, 2, norm="none", estimator="reinforce")
    with pytest.raises(ValueError, match="non-finite"):
        R.shape_advantages(torch.tensor([1.0, float("nan"), 0, 0]), LENGTHS, 2, norm="none", estimator="reinforce")
    with pytest.raises(ValueError, match="non-finite"):
        shape("reinforce_pp", kl=torch.tensor([0.0, float("inf"), 0, 0, 0, 0]))


# ---------------------------------------------------------------------------------------------- KL and loss


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    close(R.kl_k1(logp, ref), [0.5, -1.0])
    # k3 = exp(ref - logp) - (ref - logp) - 1: d = -0.5 -> e^-.5 + .5 - 1; d = 1 -> e - 2
    close(R.kl_k3(logp, ref), [math.exp(-0.5) - 0.5, math.e - 2])
    assert R.kl_k3(logp, logp).abs().max() == 0


def test_clipped_loss_by_hand():
    # ratios e^0.5 = 1.6487 (A > 0: clipped at 1.28), e^-0.5 = .6065 (A > 0: not clipped), 1.1 inside
    logp = torch.tensor([0.5, -0.5, math.log(1.1)])
    old = torch.zeros(3)
    loss, ratio, cl, ch = R.clipped_pg_loss(logp, old, torch.full((3,), 2.0), 0.2, 0.28)
    close(loss, [-2 * 1.28, -2 * math.exp(-0.5), -2 * 1.1])
    assert ch.tolist() == [True, False, False] and cl.tolist() == [False, False, False]
    loss, _, cl, ch = R.clipped_pg_loss(logp, old, torch.full((3,), -1.0), 0.2, 0.28)
    # A < 0: -min(r A, clip(r) A) = max(r, clip(r)) -> [e^.5, .8, 1.1]
    close(loss, [math.exp(0.5), 0.8, 1.1])
    assert cl.tolist() == [False, True, False] and not ch.any()


def test_clipped_loss_gradient_is_zero_when_clipped():
    logp = torch.tensor([0.5, 0.0], requires_grad=True)
    loss, *_ = R.clipped_pg_loss(logp, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.2, 0.2)
    loss.sum().backward()
    close(logp.grad, [0.0, -1.0])


def test_aggregations_by_hand():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0])  # sequences [1, 2, 3] and [4]
    seq_len = torch.tensor([3.0, 3.0, 3.0, 1.0])
    # token mean: 10/4; seq mean: (2 + 4)/2; Dr. GRPO: 10 / (2 * 5)
    assert R.aggregate(per_token, seq_len, "token_mean", 4, 2, 5).item() == pytest.approx(2.5)
    assert R.aggregate(per_token, seq_len, "seq_mean", 4, 2, 5).item() == pytest.approx(3.0)
    assert R.aggregate(per_token, seq_len, "seq_sum_norm", 4, 2, 5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="--loss_agg"):
        R.aggregate(per_token, seq_len, "sum", 4, 2, 5)


def test_aggregation_over_micro_batches_equals_the_whole_batch():
    torch.manual_seed(0)
    lengths = [3, 1, 4, 2]
    per_token = torch.randn(sum(lengths))
    seq_len = torch.tensor([float(n) for n in lengths for _ in range(n)])
    for mode in R.AGGREGATIONS:
        whole = R.aggregate(per_token, seq_len, mode, 10, 4, 5)
        parts = R.aggregate(per_token[:4], seq_len[:4], mode, 10, 4, 5) + \
            R.aggregate(per_token[4:], seq_len[4:], mode, 10, 4, 5)
        torch.testing.assert_close(whole, parts)


def test_grpo_and_dr_grpo_by_hand_and_their_norms():
    # GRPO: the group z-score on every token. Groups [1, 0] and [0, 0]: z = [1, -1] and [0, 0]
    close(R.shape_advantages(REWARDS, LENGTHS, 2, norm="auto", estimator="grpo"), [1, 1, -1, 0, 0, 0])
    # Dr. GRPO: raw rewards minus the group mean, no std: [0.5, -0.5] and [0, 0]; the KL as in reinforce
    close(R.shape_advantages(torch.tensor([3.0, 2.0, 5.0, 5.0]), LENGTHS, 2, norm="auto", estimator="dr_grpo"),
          [0.5, 0.5, -0.5, 0, 0, 0])
    assert R.estimator_norm("grpo", "auto") == "group" and R.estimator_norm("reinforce", "auto") == "batch"
    assert R.estimator_norm("dr_grpo", "auto") == "none" and R.estimator_norm("rloo", "group") == "group"
    with pytest.raises(ValueError, match="--reward_norm batch contradicts --advantage grpo"):
        R.estimator_norm("grpo", "batch")
    # every estimator in the table is a function of that name (a grep for the algorithm lands on it)
    assert all(fn.__name__ == name for name, (fn, _) in R.ESTIMATORS.items())


def test_policy_loss_by_hand():
    # two tokens of one sequence (length 2) and one of another (length 1); token_mean over 3 tokens
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    old = torch.tensor([-1.0, -2.5, -0.5])
    adv = torch.tensor([1.0, 1.0, -2.0])
    seq_len = torch.tensor([2.0, 2.0, 1.0])
    kw = dict(clip_low=0.2, clip_high=0.28, loss_agg="token_mean", n_tokens=3.0, n_seqs=2.0, max_new_tokens=4)
    loss, sums = R.policy_loss(logp, old, adv, seq_len, **kw)
    # ratios 1, e^0.5 = 1.6487 (clipped at 1.28 for A > 0), 1: per-token -[1, 1.28, -2] -> sum 0.28 -> mean -0.76
    assert loss.item() == pytest.approx(-(1 + 1.28 - 2) / 3, abs=1e-6)
    assert sums["clip_high"] == 1 and sums["clip_low"] == 0 and sums["tokens"] == 3
    # tis with behaviour log-probs: weights min(exp(old - behaviour), 2) = [e^1 -> 2, 1, e^-0.5]
    behaviour = torch.tensor([-2.0, -2.5, 0.0])
    loss, sums = R.policy_loss(logp, old, adv, seq_len, **kw, behaviour_logp=behaviour, correction="tis",
                               correction_threshold=2.0)
    want = -(2 * 1 + 1 * 1.28 + math.exp(-0.5) * -2) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6) and sums["is_corrected"] == 1
    assert sums["engine_gap"] == pytest.approx(1.0 + 0.0 + 0.5, abs=1e-6)
    # k3 to the reference, times kl_coef, added per token: ref = logp gives k3 = 0, the loss unchanged
    loss_ref, sums = R.policy_loss(logp, old, adv, seq_len, **kw, ref_logp=logp.detach(), kl_coef=0.5)
    assert loss_ref.item() == pytest.approx(-(1 + 1.28 - 2) / 3, abs=1e-6) and sums["kl_k3"] == pytest.approx(0.0)
    ref = logp.detach() - 1.0  # d = ref - logp = -1: k3 = e^-1 + 1 - 1 = 0.3679 per token
    loss_ref, _ = R.policy_loss(logp, old, adv, seq_len, **kw, ref_logp=ref, kl_coef=0.5)
    assert loss_ref.item() == pytest.approx(-(1 + 1.28 - 2) / 3 + 0.5 * math.exp(-1), abs=1e-6)
