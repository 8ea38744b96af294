"""The RL formulas: small pure functions on flat tensors, each tested against values worked out by hand.

Layout: a batch of N responses is a flat, sequence-major vector of its response tokens (sequence 0's
tokens, then sequence 1's, ...) plus `lengths` (tokens per response). Per-sequence values (rewards)
are [N]; per-token values (log-probs, KL, advantages, losses) are [sum(lengths)].

    rewards [N] --shape_advantages (normalise, then reinforce | grpo | dr_grpo | rloo | reinforce_pp | ...)-->
    advantages per token --policy_loss (clipped ratio x correction weight + kl_coef x k3, aggregated)--> loss

Sources: Su et al. 2025 (docs/method.md) for the z-score and the KL in the reward; OpenRLHF 0.6.0
(the framework the paper ran; commit e13ba176, March 2025, openrlhf/models/utils.py compute_reward,
experience_maker.py, replay_buffer.py normalize, models/loss.py PolicyLoss) for the per-token
REINFORCE++ and RLOO, reward clipping and the per-sequence loss mean. Imports none of the project's files.
"""
from __future__ import annotations

import torch
from torch import Tensor

NORMS = ("auto", "batch", "group", "none")
AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_norm")


# ----------------------------------------------------------------------------------------------
# normalisation: the one place rewards are z-scored


def znorm(rewards: Tensor, group_size: int | None = None, eps: float = 1e-6) -> Tensor:
    """(r - mean) / std over the whole batch (group_size None: the paper) or over each run of
    `group_size` consecutive samples (GRPO: the samples of one prompt). A set whose std is below
    `eps` (all equal, or one sample) gets 0: no signal, rather than noise blown up.

    The std is the population std: it is defined for one sample, gives the set unit variance, and
    differs from the unbiased one (OpenRLHF's group_norm uses torch's default, unbiased) by
    sqrt((n-1)/n), a scale the learning rate absorbs. Computed in float64 after dividing by the
    largest |r|, so no finite input gives NaN or inf; NaN or inf input is an error naming its index.
    """
    r = rewards.detach().double().cpu().flatten()
    bad = (~torch.isfinite(r)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"znorm: reward at index {bad[0].item()} is {r[bad[0]].item()} "
                         f"({len(bad)} non-finite value(s)); a verifier or the KL term failed upstream")
    if r.numel() == 0:
        return rewards.new_zeros(rewards.shape, dtype=torch.float32)
    g = r.numel() if group_size is None else group_size
    if g <= 0 or r.numel() % g:
        raise ValueError(f"znorm: {r.numel()} rewards do not split into groups of {group_size}")
    scale = r.abs().max().clamp_min(1e-300)
    x = (r / scale).view(-1, g)
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, unbiased=False, keepdim=True)
    ok = (std * scale >= eps) & (g > 1)
    z = torch.where(ok, (x - mean) / torch.where(ok, std, torch.ones_like(std)), torch.zeros_like(x))
    return z.view(rewards.shape).float().to(rewards.device)


def normalize_rewards(rewards: Tensor, norm: str, group_size: int) -> Tensor:
    """The paper's z-score over the batch, GRPO's per prompt group, or none."""
    if norm == "batch":
        return znorm(rewards)
    if norm == "group":
        return znorm(rewards, group_size)
    if norm == "none":
        return rewards.float()
    raise ValueError(f"unknown --reward_norm {norm!r}: {', '.join(NORMS)}")


def whiten(x: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over every element (REINFORCE++: over all response tokens of the batch).
    As OpenRLHF's replay buffer: population variance, clamped at eps before the inverse sqrt."""
    x64 = x.double()
    mean = x64.mean()
    var = ((x64 - mean) ** 2).mean()
    return ((x64 - mean) * var.clamp_min(eps).rsqrt()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# KL estimators (Schulman's k1 and k3), per token


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log pi/pi_ref: unbiased for KL(pi || pi_ref) under samples of pi (the KL in the reward)."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """exp(ref - logp) - (ref - logp) - 1: non-negative, low variance (GRPO's KL in the loss)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ----------------------------------------------------------------------------------------------
# per-sequence and per-token helpers


def seq_index(lengths: list[int], device=None) -> Tensor:
    """For each token of the flat layout, the index of its sequence: [0, 0, 0, 1, 1, 2, ...]."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                   torch.tensor(lengths, device=device))


def per_sequence_sum(x: Tensor, lengths: list[int]) -> Tensor:
    """[N] sums of a flat per-token tensor within each sequence."""
    out = torch.zeros(len(lengths), dtype=x.dtype, device=x.device)
    return out.index_add_(0, seq_index(lengths, x.device), x)


def leave_one_out(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: r_i minus the mean of the other samples of the same prompt."""
    if group_size < 2:
        raise ValueError("rloo needs samples_per_prompt >= 2 (the baseline is the other samples' mean)")
    g = rewards.view(-1, group_size)
    return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).flatten()


def token_returns(token_rewards: Tensor, lengths: list[int]) -> Tensor:
    """Undiscounted return per token, within each sequence: G_t = sum of rewards from t to its end
    (OpenRLHF get_cumulative_returns with gamma = 1)."""
    x = token_rewards.double()
    total = x.cumsum(0)
    ends = torch.tensor(lengths, device=x.device).cumsum(0) - 1
    end_of_seq = total[ends][seq_index(lengths, x.device)]
    return (end_of_seq - total + x).to(token_rewards.dtype)


def outcome_token_rewards(seq_rewards: Tensor, kl: Tensor | None, kl_coef: float, lengths: list[int]) -> Tensor:
    """OpenRLHF compute_reward: -kl_coef * k1 at every token, plus the sequence's reward at its last
    token (the end-of-sequence token when the response finished)."""
    out = torch.zeros(sum(lengths), dtype=torch.float32, device=seq_rewards.device)
    if kl is not None:
        out = out - kl_coef * kl.float()
    last = torch.tensor(lengths, device=out.device).cumsum(0) - 1
    return out.index_add(0, last, seq_rewards.float())


# ----------------------------------------------------------------------------------------------
# advantage estimators: one function each, named as the field names them, chosen from ESTIMATORS.
# Each takes the batch's rewards after --reward_norm (prompt-major [N]) and returns per-token
# advantages [sum(lengths)]; `kl` is per-token k1 for the KL in the reward (None: none).


def _clip(r: Tensor, reward_clip: float) -> Tensor:
    """Rewards clipped to +-reward_clip (0: off) after any baseline and before the KL, as OpenRLHF's
    compute_reward does (its default range is +-10)."""
    return r.clamp(-reward_clip, reward_clip) if reward_clip > 0 else r


def _minus_summed_kl(seq: Tensor, kl: Tensor | None, kl_coef: float, lengths: list[int]) -> Tensor:
    return seq if kl is None else seq - kl_coef * per_sequence_sum(kl.float(), lengths)


def reinforce(r: Tensor, lengths: list[int], group_size: int, kl: Tensor | None = None, kl_coef: float = 0.0,
              reward_clip: float = 0.0) -> Tensor:
    """The paper's REINFORCE (Su et al. 2025, section 3: "the whole response is one action"; their code
    is unpublished, so this is our reading): A = clip(r) - kl_coef * sum_t k1, the same on every token.
    With --reward_norm batch (the paper) r is the batch z-score."""
    return _minus_summed_kl(_clip(r, reward_clip), kl, kl_coef, lengths)[seq_index(lengths, r.device)]


def grpo(r: Tensor, lengths: list[int], group_size: int, kl: Tensor | None = None, kl_coef: float = 0.0,
         reward_clip: float = 0.0) -> Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, DeepSeekMath, section 4.1.2; verl
    compute_grpo_outcome_advantage): A_i = (r_i - mean of its prompt's group) / std of the group, on
    every token. The group z-score is --reward_norm group (required); the KL goes in the loss as k3
    (--kl_mode loss) or is off. Numerically the paper's reinforce over group-normalised rewards."""
    return reinforce(r, lengths, group_size, kl, kl_coef, reward_clip)


def dr_grpo(r: Tensor, lengths: list[int], group_size: int, kl: Tensor | None = None, kl_coef: float = 0.0,
            reward_clip: float = 0.0) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", Eq. 3): GRPO without the
    division by the group's std (which weights easy and hard prompts up): A_i = r_i - mean of its group,
    on every token, over raw rewards (--reward_norm none, required). Its loss is --loss_agg seq_sum_norm."""
    g = r.float().view(-1, group_size)
    centred = (g - g.mean(1, keepdim=True)).flatten()
    return reinforce(centred, lengths, group_size, kl, kl_coef, reward_clip)


def rloo_seq(r: Tensor, lengths: list[int], group_size: int, kl: Tensor | None = None, kl_coef: float = 0.0,
             reward_clip: float = 0.0) -> Tensor:
    """RLOO per sequence (Ahmadian et al. 2024): the leave-one-out baseline on r - kl_coef * sum_t k1."""
    seq = _minus_summed_kl(_clip(r, reward_clip), kl, kl_coef, lengths)
    return leave_one_out(seq, group_size)[seq_index(lengths, r.device)]


def reinforce_pp_seq(r: Tensor, lengths: list[int], group_size: int, kl: Tensor | None = None,
                     kl_coef: float = 0.0, reward_clip: float = 0.0) -> Tensor:
    """REINFORCE++ per sequence: r - kl_coef * sum_t k1 whitened over the batch's sequences."""
    seq = _minus_summed_kl(_clip(r, reward_clip), kl, kl_coef, lengths)
    return whiten(seq)[seq_index(lengths, r.device)]


def rloo(r: Tensor, lengths: list[int], group_size: int, kl: Tensor | None = None, kl_coef: float = 0.0,
         reward_clip: float = 0.0) -> Tensor:
    """OpenRLHF 0.6.0 `rloo` (experience_maker.py, compute_reward, get_cumulative_returns): r minus
    the leave-one-out mean, clipped; per-token rewards (-kl_coef * k1 at each token, r at the last);
    the return per token; whitened over all response tokens of the batch."""
    r = _clip(leave_one_out(r, group_size), reward_clip)
    return whiten(token_returns(outcome_token_rewards(r, kl, kl_coef, lengths), lengths))


def reinforce_pp(r: Tensor, lengths: list[int], group_size: int, kl: Tensor | None = None, kl_coef: float = 0.0,
                 reward_clip: float = 0.0) -> Tensor:
    """REINFORCE++ (Hu 2025; OpenRLHF 0.6.0 `reinforce`): as rloo without the baseline."""
    return whiten(token_returns(outcome_token_rewards(_clip(r, reward_clip), kl, kl_coef, lengths), lengths))


# --advantage NAME -> (the estimator, the --reward_norm it requires; None: any, the paper uses batch)
ESTIMATORS = {"reinforce": (reinforce, None), "grpo": (grpo, "group"), "dr_grpo": (dr_grpo, "none"),
              "rloo": (rloo, None), "reinforce_pp": (reinforce_pp, None), "rloo_seq": (rloo_seq, None),
              "reinforce_pp_seq": (reinforce_pp_seq, None)}


def estimator_norm(estimator: str, norm: str) -> str:
    """The --reward_norm in force: 'auto' is the estimator's own (group for grpo, none for dr_grpo,
    the paper's batch z-score otherwise); a norm that contradicts the estimator is a ValueError."""
    required = ESTIMATORS[estimator][1]
    if norm == "auto":
        return required or "batch"
    if required and norm != required:
        raise ValueError(f"--reward_norm {norm} contradicts --advantage {estimator}, which normalises with "
                         f"'{required}' (leave --reward_norm auto)")
    return norm


def shape_advantages(rewards: Tensor, lengths: list[int], group_size: int, *, norm: str, estimator: str,
                     kl: Tensor | None = None, kl_coef: float = 0.0, reward_clip: float = 0.0) -> Tensor:
    """Per-token advantages [sum(lengths)] from one global batch's rewards [N] (prompt-major: the
    group_size samples of a prompt are consecutive) and, for the KL in the reward, per-token
    k1 = log pi - log pi_ref [sum(lengths)] (None: no KL): the one normalisation of rewards
    (--reward_norm: `batch` z-score, the paper, for every estimator; `group` z-score per prompt, GRPO;
    `none`), then the estimator named by --advantage (ESTIMATORS)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown --advantage {estimator!r}: {', '.join(ESTIMATORS)}")
    if rewards.numel() != len(lengths):
        raise ValueError(f"shape_advantages: {rewards.numel()} rewards for {len(lengths)} responses")
    if min(lengths, default=1) < 1:
        raise ValueError("shape_advantages: every response has at least one token (its end-of-sequence token)")
    for name, x in (("reward", rewards), ("KL", kl)):
        if x is not None and not torch.isfinite(x).all():
            i = (~torch.isfinite(x)).nonzero().flatten()[0].item()
            raise ValueError(f"shape_advantages: non-finite {name} at index {i} ({x.flatten()[i].item()}); "
                             "the verifier or the log-probs failed upstream")
    r = normalize_rewards(rewards, estimator_norm(estimator, norm), group_size)
    return ESTIMATORS[estimator][0](r, lengths, group_size, kl=kl, kl_coef=kl_coef, reward_clip=reward_clip)


# ----------------------------------------------------------------------------------------------
# the loss


def clipped_pg_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_low: float, clip_high: float):
    """Per-token PPO loss -min(r A, clip(r, 1-low, 1+high) A), r = exp(logp - old_logp), and the
    indicators of tokens whose gradient the clip removed (ratio out of range on the side that counts)."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    clipped_low = (ratio < 1 - clip_low) & (adv < 0)
    clipped_high = (ratio > 1 + clip_high) & (adv > 0)
    return loss, ratio, clipped_low, clipped_high


def aggregate(per_token: Tensor, seq_len: Tensor, mode: str, n_tokens: float, n_seqs: float,
              max_new_tokens: int) -> Tensor:
    """Reduce a flat per-token loss to the scalar whose gradient the optimizer step takes.
    `seq_len`: for each token, the length of its sequence. The denominators are totals over the
    whole optimizer step (all micro-batches, all ranks), so accumulation and sharding change nothing.
      token_mean    sum over tokens / tokens in the step
      seq_mean      mean over sequences of each sequence's token mean (OpenRLHF 0.6's PolicyLoss)
      seq_sum_norm  sum over tokens / (sequences * max_new_tokens) (Dr. GRPO)
    """
    if mode == "token_mean":
        return per_token.sum() / n_tokens
    if mode == "seq_mean":
        return (per_token / seq_len).sum() / n_seqs
    if mode == "seq_sum_norm":
        return per_token.sum() / (n_seqs * max_new_tokens)
    raise ValueError(f"unknown --loss_agg {mode!r}: {', '.join(AGGREGATIONS)}")


def policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, seq_len: Tensor, *, clip_low: float, clip_high: float,
                loss_agg: str, n_tokens: float, n_seqs: float, max_new_tokens: int,
                behaviour_logp: Tensor | None = None, correction: str = "none", correction_threshold: float = 2.0,
                ref_logp: Tensor | None = None, kl_coef: float = 0.0) -> tuple[Tensor, dict]:
    """The whole objective of one micro-batch, and its metric sums: the clipped ratio loss
    (clipped_pg_loss), times the per-token rollout-correction weight when a sampler other than the
    trainer drew the tokens (behaviour_logp: importance_weights), plus kl_coef x k3 to the reference
    (ref_logp, --kl_mode loss), aggregated with the step's global denominators (aggregate). Per-token
    inputs are flat over the micro-batch's response tokens; seq_len gives each token its sequence's length."""
    per_token, ratio, clipped_low, clipped_high = clipped_pg_loss(logp, old_logp, adv, clip_low, clip_high)
    sums = {"tokens": float(len(logp)), "clip_low": clipped_low.sum().item(), "clip_high": clipped_high.sum().item(),
            "ratio": ratio.detach().sum().item()}
    if behaviour_logp is not None:  # the sampler's log-probs vs the trainer's pi_old
        weight, is_ratio, corrected = importance_weights(old_logp, behaviour_logp, correction, correction_threshold)
        per_token = per_token * weight
        gap = (old_logp - behaviour_logp).abs()
        sums.update({"engine_gap": gap.sum().item(), "engine_gap_max": gap.max().item(),
                     "is_ratio": is_ratio.sum().item(), "is_ratio_max": is_ratio.max().item(),
                     "is_corrected": corrected.sum().item()})
    if ref_logp is not None:
        k3 = kl_k3(logp, ref_logp)
        per_token = per_token + kl_coef * k3
        sums["kl_k3"] = k3.detach().sum().item()
    return aggregate(per_token, seq_len, loss_agg, n_tokens, n_seqs, max_new_tokens), sums


# ----------------------------------------------------------------------------------------------
# rollout correction: the sampler's log-probs are not the trainer's (another engine, or stale weights)

CORRECTIONS = ("none", "tis", "mask")


def importance_weights(old_logp: Tensor, behaviour_logp: Tensor, mode: str,
                       threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token weights for the policy-gradient loss when the responses were sampled by a behaviour
    policy (the vLLM engine's numerics, or weights a step old) while the loss's ratio is taken against
    the trainer's own log-probs (old_logp). Returns (weights, ratio pi_old / pi_behaviour, which tokens
    the correction changed: capped or masked).
      tis   min(ratio, threshold): truncated importance sampling (Yao et al. 2025, as verl and
            OpenRLHF later adopted), unbiased up to the truncation
      mask  1 where 1/threshold <= ratio <= threshold, else 0: a token the two policies disagree on
            that much is dropped instead of reweighted
      none  1 everywhere (the mismatch is ignored)"""
    ratio = torch.exp(old_logp - behaviour_logp)
    if mode == "tis":
        return ratio.clamp(max=threshold), ratio, ratio > threshold
    if mode == "mask":
        keep = (ratio >= 1 / threshold) & (ratio <= threshold)
        return keep.to(ratio.dtype), ratio, ~keep
    if mode == "none":
        return torch.ones_like(ratio), ratio, torch.zeros_like(ratio, dtype=torch.bool)
    raise ValueError(f"unknown --rollout_correction {mode!r}: {', '.join(CORRECTIONS)}")


# ----------------------------------------------------------------------------------------------
# micro-batches


def micro_batches(idx: list[int], tokens: list[int], max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Split one minibatch (sequence indices `idx`, `tokens[i]` = prompt + response length) into the
    micro-batches of gradient accumulation: `max_rows` sequences each in order, or, with max_tokens,
    first-fit decreasing into micro-batches of at most `max_tokens` tokens (a longer sequence goes
    alone), so a micro-batch of short sequences holds many and one of long ones few. The loss denominators are
    global, so any split gives the same gradient."""
    if max_tokens <= 0:
        return [idx[s:s + max_rows] for s in range(0, len(idx), max_rows)]
    out: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(idx, key=lambda i: -tokens[i]):  # first-fit decreasing
        fit = next((b for b, load in enumerate(loads) if load + tokens[i] <= max_tokens), None)
        if fit is None:
            out.append([])
            loads.append(0)
            fit = len(out) - 1
        out[fit].append(i)
        loads[fit] += tokens[i]
    return out
