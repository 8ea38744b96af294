"""RL with verifiable rewards from a generative verifier: the GRPO-family loop, written out by hand.

    python train_rl.py          # the main job on CPU (the free-form world): a distilled tiny verifier's soft reward trains a tiny policy
    torchrun --nproc_per_node 8 train_rl.py --config recipes/paper_reinforce_soft.yaml

train() is the algorithm. Each step:
    rollout -> judge -> advantages -> policy_update -> log -> maybe audit / eval -> maybe checkpoint
The functions below are defined in that order; the formulas live in rl_math.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import reward
import worlds
from rlvr import distributed, metrics, model, remote, verifiers
from rlvr import (audit, checkpoint, config, distributed, judging, metrics, model, prefix_sharing, remote, rl_config,
                  rl_math, rollout, rollout_async, rundir, threads, verifier_free, verifier_spec, verifiers)
from rlvr.rl_config import Config


# ----------------------------------------------------------------------------------------------
# 1. rollout and 2. judge: rollout.py
# 3. advantages: log-probs before the update, then rewards (+ KL) -> per-token advantages


@dataclass
class Batch:
    """The update's input on this rank; per-token tensors are flat and sequence-major."""
    prompts: list[list[int]]
    responses: list[list[int]]
    advantages: torch.Tensor
    old_logp: torch.Tensor | None      # None: on-policy with a single update (the update's forward is pi_old)
    ref_logp: torch.Tensor | None      # with --kl_mode loss
    behaviour_logp: torch.Tensor | None
    entropy: torch.Tensor | None

    def __post_init__(self):
        self.offsets = [0]
        for r in self.responses:
            self.offsets.append(self.offsets[-1] + len(r))

    def take(self, x: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """The flat per-token values of sequences `idx`, in that order."""
        return torch.cat([x[self.offsets[i]:self.offsets[i + 1]] for i in idx])


def old_logprobs_source(cfg: Config, ro: rollout.Rollout) -> str:
    """Where the ratio's pi_old comes from. "update": on-policy with a single update, the update's own
    forward (ratio 1). "trainer": a no-grad pass first, when the batch feeds several updates (later ones
    are off-policy), the KL goes into the reward (before the update), or a stale batch is corrected
    (--rollout_correction: weights pi_old / pi_sampler). "sampler": a stale batch (--async_steps 1)
    without correction takes the sampling weights' own log-probs: the trainer no longer has them."""
    if ro.staleness and cfg.rollout_correction == "none":
        return "sampler"
    if cfg.ppo_epochs * cfg.minibatches > 1 or cfg.kl_mode == "reward" or ro.staleness:
        return "trainer"
    return "update"


def forward_logprobs(net, prompts, responses, idx, cfg: Config, device, with_entropy=False):
    """Flat per-token log-probs (and entropies) of responses `idx` under `net`: one forward pass. Packed rows;
    where samples share prompts and that saves work, each distinct prompt runs once (prefix_sharing.py).
    --pack false keeps its padded rows (the layout for architectures the packed path cannot run)."""
    ps, rs = [prompts[i] for i in idx], [responses[i] for i in idx]
    if cfg.pack and prefix_sharing.use(net, ps, rs):
        return prefix_sharing.logprobs(net, ps, rs, cfg.temperature, cfg.logprob_chunk, with_entropy, cfg.fp32_lm_head,
                                       device)
    seqs = [p + r for p, r in zip(ps, rs)]
    targets = [[False] * len(p) + [True] * len(r) for p, r in zip(ps, rs)]
    ids, pos, att, tmask = model.rows(seqs, targets, cfg.pack, 0, device)
    lp, ent = model.token_logprobs(net, ids, pos, tmask, att, cfg.temperature, cfg.logprob_chunk, with_entropy,
                                   cfg.fp32_lm_head)
    return lp[tmask], (ent[tmask] if with_entropy else None)


@torch.no_grad()
def logprobs_no_grad(net, ro: rollout.Rollout, cfg: Config, device, with_entropy=False):
    lps, ents = [], []
    for start in range(0, len(ro.responses), cfg.micro_batch_size):
        idx = list(range(start, min(start + cfg.micro_batch_size, len(ro.responses))))
        lp, ent = forward_logprobs(net, ro.prompts, ro.responses, idx, cfg, device, with_entropy)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)


def advantages(policy, ref, ro: rollout.Rollout, rewards: torch.Tensor, cfg: Config, device) -> tuple[Batch, dict]:
    """`rewards`: the global batch's [N] (all ranks, rank order). Returns this rank's Batch and the
    global per-token KL total for logging."""
    old = ent = ref_lp = None
    source = old_logprobs_source(cfg, ro)
    if source == "trainer":
        old, ent = logprobs_no_grad(policy, ro, cfg, device, with_entropy=True)
    elif source == "sampler":
        old = ro.behaviour_logp.to(device)
    if ref is not None:
        ref_lp = logprobs_no_grad(ref, ro, cfg, device)[0]
    kl_local = rl_math.kl_k1(old, ref_lp) if cfg.kl_mode == "reward" else None
    # shaping needs the whole batch (whitening over all tokens, group baselines): every rank computes
    # it from the gathered batch and keeps its slice, so 1 rank and N ranks agree exactly
    parts = distributed.gather_objects((ro.lengths, None if kl_local is None else kl_local.cpu()))
    lengths = [n for part, _ in parts for n in part]
    kl = None if kl_local is None else torch.cat([k for _, k in parts])
    adv = rl_math.shape_advantages(rewards.cpu(), lengths, cfg.samples_per_prompt, norm=cfg.reward_norm,
                                   estimator=cfg.advantage, kl=kl, kl_coef=cfg.kl_coef, reward_clip=cfg.reward_clip)
    first = sum(len(part) for part, _ in parts[:distributed.rank()])
    start, end = sum(lengths[:first]), sum(lengths[:first + len(ro.lengths)])
    batch = Batch(ro.prompts, ro.responses, adv[start:end].to(device), old, ref_lp if cfg.kl_mode == "loss" else None,
                  ro.behaviour_logp, ent)
    stats = {"advantage/mean": adv.mean().item(), "advantage/std": adv.std(unbiased=False).item(),
             "advantage/min": adv.min().item(), "advantage/max": adv.max().item()}
    if kl is not None:
        stats["kl/k1"] = kl.sum().item() / max(1, kl.numel())
    return batch, stats


# ----------------------------------------------------------------------------------------------
# 4. policy update: clipped ratio loss over epochs x minibatches x micro-batches


def plan_update(batch: Batch, cfg: Config, step: int) -> tuple[list[list[list[int]]], torch.Tensor]:
    """The step's minibatches (--ppo_epochs x --minibatches, in a seeded order), each cut into
    micro-batches, and every minibatch's global token and sequence counts (the loss denominators, in
    one collective). A rank with fewer micro-batches gets empty ones: FSDP gathers and reduces inside
    every forward/backward, so all ranks must run as many."""
    n_local = len(batch.responses)
    order = torch.randperm(n_local, generator=torch.Generator().manual_seed(rollout.sample_seed(cfg.seed, step, 0, "order")))
    size = n_local // cfg.minibatches
    minibatches = [order[m * size:(m + 1) * size].tolist() for m in range(cfg.minibatches)] * cfg.ppo_epochs
    counts = distributed.all_sum(torch.tensor([[sum(len(batch.responses[i]) for i in mb), len(mb)]
                                               for mb in minibatches], dtype=torch.float64))
    tokens = [len(p) + len(r) for p, r in zip(batch.prompts, batch.responses)]
    plans = [rl_math.micro_batches(mb, tokens, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch) for mb in minibatches]
    calls = distributed.all_max(torch.tensor([len(p) for p in plans])).tolist()
    return [p + [[]] * (c - len(p)) for p, c in zip(plans, calls)], counts


def micro_batch_loss(policy, batch: Batch, idx: list[int], counts: list[float], cfg: Config, device,
                     with_entropy: bool) -> tuple[torch.Tensor, dict]:
    """rl_math.policy_loss of micro-batch `idx` under the policy's current weights, and its metric
    sums. pi_old is the batch's old log-probs, or (None: on-policy, one update) this forward's own,
    detached (ratio 1). An empty micro-batch is a forward/backward that adds nothing (the FSDP rule)."""
    if not idx:
        lp, _ = forward_logprobs(policy, [[0]], [[0]], [0], cfg, device)
        return lp.sum() * 0, {}
    lp, ent = forward_logprobs(policy, batch.prompts, batch.responses, idx, cfg, device, with_entropy)
    seq_len = torch.cat([torch.full((len(batch.responses[i]),), float(len(batch.responses[i]))) for i in idx])
    loss, sums = rl_math.policy_loss(
        lp, lp.detach() if batch.old_logp is None else batch.take(batch.old_logp, idx), batch.take(batch.advantages, idx),
        seq_len.to(device), clip_low=cfg.clip_low, clip_high=cfg.clip_high, loss_agg=cfg.loss_agg,
        n_tokens=counts[0], n_seqs=counts[1], max_new_tokens=cfg.max_new_tokens,
        behaviour_logp=None if batch.behaviour_logp is None else batch.take(batch.behaviour_logp, idx).to(device),
        correction=cfg.rollout_correction, correction_threshold=cfg.correction_threshold,
        ref_logp=None if batch.ref_logp is None else batch.take(batch.ref_logp, idx), kl_coef=cfg.kl_coef)
    if with_entropy:
        sums.update(entropy=ent.sum().item(), entropy_tokens=float(len(ent)))
    return loss, sums | {"loss": loss.item()}


def accumulate(total: dict, sums: dict, first_pass: bool) -> None:
    """Add one micro-batch's metric sums (maxima for *_max); the sampler-vs-trainer gap once per token,
    on the first pass over the batch."""
    for k, v in sums.items():
        if k.startswith(("engine_gap", "is_")) and not first_pass:
            continue
        total[k] = max(total.get(k, 0.0), v) if k.endswith("_max") else total.get(k, 0.0) + v


def optimizer_step(policy, optimizer, scheduler, cfg: Config) -> float | None:
    """Clip the gradient norm and step; a non-finite norm (global, so every rank agrees) is not applied.
    Returns the norm, or None when skipped."""
    norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
    finite = bool(torch.isfinite(norm))
    if finite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item() if finite else None


def policy_update(policy, optimizer, scheduler, batch: Batch, cfg: Config, step: int, device) -> tuple[float, dict]:
    """The clipped policy-gradient update(s) of one rollout batch: for each minibatch, gradient
    accumulation over its micro-batches, then one optimizer step. Returns (mean loss, the step's metric
    sums). Without a no-grad pass before (batch.entropy is None) the first pass gives the entropy."""
    plans, counts = plan_update(batch, cfg, step)
    sums = dict.fromkeys(("loss", "tokens", "clip_low", "clip_high", "ratio", "kl_k3", "entropy", "entropy_tokens",
                          "skipped", "engine_gap", "engine_gap_max", "is_ratio", "is_ratio_max", "is_corrected"), 0.0)
    grad_norm = 0.0
    policy.train()
    for k, plan in enumerate(plans):
        first_pass = k < cfg.minibatches
        for idx in plan:
            loss, part = micro_batch_loss(policy, batch, idx, counts[k].tolist(), cfg, device,
                                          with_entropy=batch.entropy is None and first_pass)
            (loss * distributed.world_size()).backward()  # FSDP averages gradients over ranks; denominators are global
            accumulate(sums, part, first_pass)
        norm = optimizer_step(policy, optimizer, scheduler, cfg)
        sums["skipped"] += norm is None
        grad_norm = grad_norm if norm is None else norm
    if batch.entropy is not None:
        sums["entropy"], sums["entropy_tokens"] = batch.entropy.sum().item(), len(batch.entropy)
    sums["grad_norm"] = grad_norm
    return sums["loss"] / len(plans), sums


# ----------------------------------------------------------------------------------------------
# 5. log: every rank's numbers and rows in one collective; rank 0 writes


def step_record(ro: rollout.Rollout, judged: reward.Judgement, used: torch.Tensor, logged: dict, update: dict, step: int) -> dict:
    """This rank's contribution to the step's metrics and files (reduced on every rank by log_step)."""
    sums = {"binary": judged.binary.sum().item(), "soft": judged.soft.sum().item(),
            "p_yes": judged.p_yes.sum().item(), "unjudged": (~judged.judged).sum().item(),
            "invalid": judged.invalid.sum().item(), "verifier_tokens": judged.verifier_tokens.sum().item(),
            "cut": judged.cut.sum().item(), "routed": judged.routed.sum().item(),
            "truncated": float(sum(ro.truncated)), "length": float(sum(ro.lengths))}
    for name, j in logged.items():
        sums[f"{name}/binary"], sums[f"{name}/soft"] = j.binary.sum().item(), j.soft.sum().item()
    sums.update({f"update/{k}": v for k, v in update.items() if k not in ("grad_norm", "engine_gap_max", "is_ratio_max")})
    rows = [{"step": step, "question": r.question, "reference": r.reference, "response": t,
             "reward": float(used[i]), "p_yes": float(judged.p_yes[i])}
            for i, (r, t) in enumerate(zip(ro.records, ro.texts))]
    return {"n": len(ro.responses), "sums": sums, "length_max": max(ro.lengths),
            "gap_max": update["engine_gap_max"], "is_ratio_max": update["is_ratio_max"], "grad_norm": update["grad_norm"],
            "rows": rows}


def reduce_step(parts: list[dict], rewards: torch.Tensor, logged_names: list[str], updates: int, cfg: Config) -> dict:
    n = sum(p["n"] for p in parts)
    s = {k: sum(p["sums"][k] for p in parts) for k in parts[0]["sums"]}
    tokens = max(1.0, s["length"])
    m = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std(unbiased=False).item(),
         "reward/binary_mean": s["binary"] / n, "reward/soft_mean": s["soft"] / n, "reward/p_yes_mean": s["p_yes"] / n,
         "reward/unjudged_frac": s["unjudged"] / n, "response/length_mean": s["length"] / n,
         # a verifier family's "invalid" judgements (compass C) and a generating verifier's cost (cot)
         "verifier/invalid_rate": s["invalid"] / n, "verifier/tokens_mean": s["verifier_tokens"] / n,
         # answers longer than the verifier's positions, judged on their end (verifier_prompt.VerifierPrompt)
         "verifier/cut_frac": s["cut"] / n,
         "response/length_max": max(p["length_max"] for p in parts), "response/truncated": s["truncated"] / n,
         "loss": s["update/loss"] / updates, "grad_norm": parts[0]["grad_norm"],
         "entropy": s["update/entropy"] / max(1.0, s["update/entropy_tokens"]),
         "clip/low_frac": s["update/clip_low"] / max(1.0, s["update/tokens"]),
         "clip/high_frac": s["update/clip_high"] / max(1.0, s["update/tokens"]),
         "ratio/mean": s["update/ratio"] / max(1.0, s["update/tokens"]), "update/skipped": s["update/skipped"]}
    if cfg.kl_mode == "loss":
        m["kl/k3"] = s["update/kl_k3"] / max(1.0, s["update/tokens"])
    for name in logged_names:
        m[f"reward/{name}/binary_mean"], m[f"reward/{name}/soft_mean"] = s[f"{name}/binary"] / n, s[f"{name}/soft"] / n
    if verifier_spec.parse(cfg.verifier).kind == "hybrid":  # the share of responses the router gave rule:math
        m["verifier/routed_math_share"] = s["routed"] / n
    if any(p["gap_max"] for p in parts) or s["update/engine_gap"]:  # a sampler other than the trainer
        m["rollout/engine_logprob_gap_mean"] = s["update/engine_gap"] / tokens
        m["rollout/engine_logprob_gap_max"] = max(p["gap_max"] for p in parts)
        m["rollout/is_ratio_mean"] = s["update/is_ratio"] / tokens
        m["rollout/is_ratio_max"] = max(p["is_ratio_max"] for p in parts)
        m["rollout/corrected_frac"] = s["update/is_corrected"] / tokens
    return m


# ----------------------------------------------------------------------------------------------
# 7. eval: answers to held-out prompts, graded by the eval verifier


EVAL_QUESTIONS = "eval_questions.jsonl"  # each eval's answers graded right, per held-out question


@torch.no_grad()
def evaluate(policy, tokenizer, heldout, grader, cfg: Config, device, questions_file: Path | None = None,
             step: int = 0) -> dict:
    """Accuracy overall and per subject, of greedy answers or of cfg.eval_samples sampled ones per
    prompt. Prompts are sharded over ranks (padded with repeats so every rank runs as many batches:
    FSDP gathers inside generate's forward). No held-out prompts: no eval ({}; load_data said so).
    `questions_file`: rank 0 appends one row per question {"step", "question", "subject", "correct",
    "answers"} (compare.py pairs two runs' answers question by question)."""
    records = heldout[:cfg.eval_prompts] if cfg.eval_prompts else heldout
    if not records:
        return {}
    k = max(1, cfg.eval_samples)
    world, rank = distributed.world_size(), distributed.rank()
    slots = list(range(len(records) * k))  # answer j of prompt i is slot i * k + j, named by its seed
    mine = slots[rank::world]
    per_rank = math.ceil(len(slots) / world)
    n_real = len(mine)
    mine = mine + slots[:per_rank - n_real]
    policy.eval()
    correct = []
    for start in range(0, per_rank, cfg.micro_batch_size):
        batch = [records[slot // k] for slot in mine[start:start + cfg.micro_batch_size]]
        prompts = data.tokenize_prompts(tokenizer, batch, cfg.max_prompt_len)
        seeds = [rollout.sample_seed(cfg.seed, 0, slot, "eval") for slot in mine[start:start + cfg.micro_batch_size]]
        responses, _ = model.generate(policy, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                      seeds if cfg.eval_samples else None)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        correct += grader([r.question for r in batch], [r.reference for r in batch], texts).binary.tolist()
    totals: dict[str, list[float]] = {}
    per_question = [0.0] * len(records)
    for part in distributed.gather_objects([(slot // k, c) for slot, c in zip(mine[:n_real], correct)]):
        for i, c in part:
            per_question[i] += c
            for key in {"", records[i].meta.get("subject", "")}:
                totals.setdefault(key, [0.0, 0])
                totals[key][0] += c
                totals[key][1] += 1
    if questions_file is not None and distributed.rank() == 0:
        metrics.append_jsonl(questions_file, [{"step": step, "question": r.question, "subject": r.meta.get("subject", ""),
                                               "correct": c, "answers": k} for r, c in zip(records, per_question)])
    out = {"eval/accuracy": totals[""][0] / totals[""][1], "eval/prompts": len(records)}
    out.update({f"eval/accuracy/{key}": c / n for key, (c, n) in sorted(totals.items()) if key})
    return out


# ----------------------------------------------------------------------------------------------
# set-up: paths, data, models, verifiers, resume


def resolve_paths(cfg: Config) -> tuple[str, str]:
    """(policy path, reward verifier spec): the tiny models of the --data world (worlds.py) are built on
    rank 0 once (cached)."""
    world = worlds.of(cfg.data)
    if cfg.policy == "tiny" and cfg.data not in worlds.WORLDS and distributed.rank() == 0:
        print(f"--policy tiny: the numeric toy's tiny policy (worlds.py), warm-started on the toy's questions, not on "
              f"--data {cfg.data}'s: a smoke test of the loop; name your model with --policy", flush=True)
    policy = world.tiny_policy(cfg.heldout_fraction) if cfg.policy == "tiny" else cfg.policy
    spec = verifier_spec.parse(cfg.verifier)
    verifier = world.tiny_verifier() if spec.kind == "tiny" else cfg.verifier
    if spec.kind == "hybrid" and spec.inner.kind == "tiny":  # rule:math where it can grade, the tiny verifier elsewhere
        verifier = "hybrid:" + world.tiny_verifier()
    return policy, verifier


def load_data(cfg: Config) -> tuple[list, list]:
    """(training records, held-out records), before any model loads. Held-out questions never reach
    training."""
    say = print if distributed.rank() == 0 else (lambda *a, **k: None)
    if cfg.data in worlds.WORLDS:
        records = worlds.WORLDS[cfg.data].records(cfg.seed)  # a demo world: every question once
    else:
        records, skipped = data.load_records(cfg.data, cfg.data_split, cfg.prompt_field, cfg.answer_field,
                                             skip_bad=cfg.skip_bad_rows)
        if skipped:
            say(f"skipped {len(skipped)} bad rows (--skip_bad_rows); first: {skipped[0]}")
    train_set, heldout = data.split_heldout(records, cfg.heldout_fraction)
    if cfg.eval_data:
        heldout, _ = data.load_records(cfg.eval_data, cfg.eval_split, cfg.prompt_field, cfg.answer_field)
        train_set, n = data.drop_hashes(train_set, {data.question_hash(r.question) for r in heldout})
        say(f"eval: {len(heldout)} prompts from {cfg.eval_data}[{cfg.eval_split}]; {n} of them removed from training")
    if cfg.exclude_hashes:
        train_set, n = data.drop_hashes(train_set, data.read_hashes(cfg.exclude_hashes))
        say(f"excluded {n} training prompts listed in {cfg.exclude_hashes}")
    return train_set, heldout


def drop_long_prompts(cfg: Config, tokenizer, train_set: list, heldout: list) -> tuple[list, list]:
    """Prompts longer than --max_prompt_len in the policy's tokens are dropped (and counted)."""
    say = print if distributed.rank() == 0 else (lambda *a, **k: None)
    train_set, n_long = data.drop_long(train_set, tokenizer, cfg.max_prompt_len)
    heldout, n_long_heldout = data.drop_long(heldout, tokenizer, cfg.max_prompt_len)
    if not train_set:
        raise data.DataError(f"--data {cfg.data}: no training prompts left (held out, excluded or too long)")
    say(f"data: {len(train_set)} train / {len(heldout)} held-out prompts"
        + (f", {n_long} longer than --max_prompt_len dropped" if n_long else "")
        + (f", {n_long_heldout} held-out ones longer than --max_prompt_len dropped (the eval is over the rest)"
           if n_long_heldout else "")
        + ("; no eval (no held-out prompts: --heldout_fraction > 0 or --eval_data gives some)" if not heldout else ""))
    return train_set, heldout


def load_models(cfg: Config, policy_path: str, device):
    """The policy (float32 master weights; FSDP2 computes in bf16 on the GPU path) and, only when a KL
    term is on, a frozen reference (in the compute dtype)."""
    gpu = distributed.gpu_path()
    policy = model.load_sharded(policy_path, device, torch.float32, cfg.trust_remote_code, model.compute_dtype(),
                                mixed_precision=gpu, activation_checkpointing=cfg.activation_checkpointing)
    ref = None
    if cfg.kl_mode != "none":
        ref = model.load_sharded(policy_path, device, model.compute_dtype(), cfg.trust_remote_code,
                                 mixed_precision=False, frozen=True)
    return policy, ref


def load_verifiers(cfg: Config, vopts, spec: str, device, policy=None, tokenizer=None, train_set=()) -> dict:
    """The reward verifier (asked with its saved settings and the verifier flags), and the judges that
    only grade: eval, audit, log-only (their own settings; transport flags only). A policy: spec is
    the policy's own probability of the reference (verifier_free.py), built on `policy` before any update."""
    def build(s, from_flags):
        parsed = verifier_spec.parse(s)
        if parsed.kind == "policy":
            logprobs = lambda p, r: forward_logprobs(policy, p, r, range(len(p)), cfg, device)[0]  # noqa: E731
            return verifier_free.PolicyReward(parsed.target, logprobs, tokenizer, train_set, cfg.max_prompt_len,
                cfg.micro_batch_size, sharded=model.is_sharded(policy), answer=cfg.verifier_free_answer,
                repetition_penalty=cfg.rlpr_repetition_penalty, max_new_tokens=cfg.max_new_tokens)
        return verifiers.build_verifier(parsed, vopts, settings_from_flags=from_flags, device=device,
                                     shard=distributed.is_initialized(), seed=cfg.seed,
                                     trust_remote_code=cfg.trust_remote_code)
    reward_verifier = build(spec, True)
    eval_verifier = build(cfg.eval_verifier, False) if cfg.eval_verifier != "self" else reward_verifier
    # self-grading asks the reward verifier as it was trained (its prompt flags) but greedily; a second
    # object too when the rollout source judges in a thread meanwhile
    if cfg.eval_verifier == "self" and (cfg.async_steps or vopts.verifier_sample):
        eval_verifier = verifiers.build_verifier(spec, dataclasses.replace(vopts, verifier_sample=False),
                                              device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                              shard=distributed.is_initialized(), seed=cfg.seed,
                                              trust_remote_code=cfg.trust_remote_code)
    return {"reward": reward_verifier, "eval": eval_verifier,
            "audit": build(cfg.audit_verifier, False) if cfg.audit_verifier else None,
            "logged": {s: build(s, False) for s in filter(None, cfg.log_verifiers.split(","))}}


def resume(cfg: Config, ckpt_dir: Path, policy, optimizer, scheduler) -> dict:
    """The checkpoint's trainer state ({"step": 0, ...} when starting fresh). Outputs written after the
    checkpoint's step are cut back, so a killed and resumed run writes what an uninterrupted one does."""
    state = checkpoint.load_checkpoint(str(ckpt_dir), policy, optimizer, scheduler) if cfg.resume != "no" else None
    if state is None:  # --resume yes without a checkpoint was refused before anything loaded
        return {"step": 0, "streaks": {"nonfinite": 0, "audit": 0}}
    if distributed.rank() == 0:
        for name in ("rollouts.jsonl", "audit.jsonl", EVAL_QUESTIONS) if not cfg.eval_only else ():  # it writes to eval_only/ only
            metrics.rewind_jsonl(Path(cfg.out_dir) / name, state["step"])
        print(f"resumed from step {state['step']} ({ckpt_dir})")
    return state


# --resume may change these: they are applied from the step it resumes at (the others are the run's: a
# checkpoint restores the optimizer, scheduler and sampler, so a new --lr or --seed would not be applied)
RESUME_MAY_CHANGE = {"steps", "save_every", "keep_checkpoints", "eval_every", "eval_prompts", "eval_samples",
                     "eval_verifier", "audit_verifier", "audit_every", "audit_samples", "audit_max_fpr",
                     "audit_patience", "log_verifiers", "master_key_prompts", "master_key_warn", "log_samples",
                     "max_nonfinite_steps", "filter_patience", "dump_rollouts", "wandb_project", "wandb_run_name",
                     "wandb_mode", "resume", "overwrite", "config", "out_dir", "eval_only", "verifier_batch_size",
                     "verifier_timeout", "verifier_retries", "verifier_concurrency", "math_timeout"}


def check_resume(cfg: Config, vopts: verifiers.VerifierOptions) -> None:
    """Before a resumed run loads anything: the flags it changed are ones it may change (RESUME_MAY_CHANGE;
    config.json, which the run rewrites, never says what did not happen), and its files are whole: each
    named with its first bad line, metrics.jsonl missing. A ConfigError or DataError naming the flag or file."""
    ckpt = checkpoint.latest_checkpoint(str(Path(cfg.out_dir) / "checkpoints")) if cfg.resume != "no" else None
    if ckpt is None or cfg.eval_only:  # a fresh start, or an evaluation that writes to eval_only/ alone
        return
    now = json.loads(remote.redact(json.dumps({**asdict(cfg), **asdict(vopts)}, default=str)))  # as config.json has it
    config.check_resumed_flags(Path(cfg.out_dir) / "config.json", now, RESUME_MAY_CHANGE)
    step = int(re.fullmatch(r"step_(\d+)", Path(ckpt).name)[1])
    if not (Path(cfg.out_dir) / "metrics.jsonl").exists():
        raise data.DataError(f"--resume: {Path(cfg.out_dir) / 'metrics.jsonl'} is missing while {ckpt} exists: the "
                             f"record of steps 1..{step} is gone; restore it, or create an empty one to go on without it")
    for name in ("metrics.jsonl", "rollouts.jsonl", "audit.jsonl", "samples.jsonl"):
        try:
            metrics.check_jsonl(Path(cfg.out_dir) / name, step)
        except ValueError as e:
            raise data.DataError(f"--resume from {ckpt}: {e}") from None


def write_outputs(out_dir: Path, rows: list[dict], audited: list[dict], cfg: Config) -> None:
    """Rank 0: every judged response (train_verifier.py label input) and the audit's disagreements
    with the judge's label (train_verifier.py sft input: the next distillation round's data)."""
    if distributed.rank() != 0:
        return
    if cfg.dump_rollouts:
        metrics.append_jsonl(out_dir / "rollouts.jsonl", rows)
    disagreements = [r for r in audited if r["label"] != r["reward_label"]]
    if disagreements:
        metrics.append_jsonl(out_dir / "audit.jsonl", disagreements)


def frac_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """The share of prompt groups (group_size consecutive responses) whose rewards are all equal: no
    advantage inside the group under a group baseline (TRL logs it as frac_reward_zero_std)."""
    groups = rewards.float().view(-1, group_size)
    return (groups.max(1).values == groups.min(1).values).float().mean().item()


def warn_no_signal(m: dict, step: int, cfg: Config, streaks: dict, say: bool = True) -> None:
    """One line on stderr at the first step of a run of steps whose rewards carry no signal: every response
    rewarded alike, or, with a per-group baseline, alike within every group (loss and gradient 0 but for
    the KL term). Said again only after a step with signal."""
    group = rl_math.estimator_norm(cfg.advantage, cfg.reward_norm) == "group" or cfg.advantage in (
        "dr_grpo", "rloo", "rloo_seq")
    none = m["reward/std"] == 0 or (group and m["reward/frac_zero_std"] == 1)
    if none and not streaks.get("no_signal") and say:
        print(f"WARNING: step {step}: no reward signal: " + (
            f"every response got the same {cfg.reward_type} reward ({m['reward/mean']:.3g})" if m["reward/std"] == 0
            else f"every prompt's {cfg.samples_per_prompt} responses got the same reward within their group "
                 f"(reward/frac_zero_std 1.0; {cfg.advantage} compares inside groups)")
            + ", so this update is 0 but for the KL term. Is the verifier's reward constant (see rollouts.jsonl)? "
              "More --samples_per_prompt or --filter_groups help when only some groups are alike", file=sys.stderr,
              flush=True)
    streaks["no_signal"] = int(none)


def check_streaks(m: dict, streaks: dict, step: int, cfg: Config, out_dir: Path) -> str | None:
    """Update the runs of bad steps; return why the run must stop (after a checkpoint), if it must."""
    streaks["nonfinite"] = streaks["nonfinite"] + 1 if m["update/skipped"] else 0
    if streaks["nonfinite"] >= cfg.max_nonfinite_steps:
        raise model.NonFiniteError(f"step {step}: the loss or gradients were NaN/inf in {streaks['nonfinite']} steps in a "
                             f"row; those updates were not applied. Last checkpoint: "
                             f"{checkpoint.latest_checkpoint(str(out_dir / 'checkpoints'))}. Lower --lr or check rewards.")
    if "audit/rows" in m:
        fpr = m.get("audit/false_positive_rate", 0.0)
        streaks["audit"] = streaks["audit"] + 1 if cfg.audit_max_fpr > 0 and fpr > cfg.audit_max_fpr else 0
        if streaks["audit"] >= cfg.audit_patience:
            return (f"step {step}: the audit judge {cfg.audit_verifier} found the reward verifier saying YES to "
                    f"{fpr:.1%} of the answers it judged wrong, above --audit_max_fpr {cfg.audit_max_fpr} for "
                    f"{streaks['audit']} audits in a row: the policy is hacking the verifier. The disagreements are in "
                    f"{out_dir / 'audit.jsonl'}: harden the verifier with train_verifier.py sft --data on them.")
    if "rollout/groups_kept_frac" in m:  # --filter_groups
        streaks["filter"] = streaks.get("filter", 0) + 1 if m["rollout/groups_kept_frac"] == 0 else 0
        if streaks["filter"] >= cfg.filter_patience:
            return (f"step {step}: --filter_groups kept no group in {streaks['filter']} steps in a row (--filter_patience "
                    f"{cfg.filter_patience}): every prompt's {cfg.samples_per_prompt} responses got the same "
                    f"{cfg.reward_type} reward ({m['reward/mean']:.3g} on average) in all {1 + cfg.max_filter_rounds} "
                    "rounds, so the updates were 0. Is the verifier's reward constant (see reward/std)?")
    return None


def start_engine(cfg: Config, policy_path: str, policy, device, resumed: bool):
    """The in-process vLLM engine (--rollout_engine vllm), created after the trainer's models: it sizes
    its KV cache around them."""
    if cfg.rollout_engine != "vllm":
        return None
    from rlvr.vllm_engine import VLLMEngine
    engine = VLLMEngine(policy_path, seed=cfg.seed, max_model_len=cfg.max_prompt_len + cfg.max_new_tokens,
                        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                        dtype="auto" if device.type == "cuda" else "float32")
    if resumed:
        engine.load_weights(policy)  # the checkpoint's weights, not policy_path's
    return engine


# ----------------------------------------------------------------------------------------------
# the algorithm


def train(cfg: Config, vopts: verifiers.VerifierOptions) -> dict:
    rank, world, device = distributed.init()
    n_threads, why = threads.choose(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    threads.apply(n_threads)
    if rank == 0:
        print(threads.start_up_line(n_threads, why), flush=True)
    if rank == 0 and distributed.is_initialized():  # torchrun (or the GPU path): how the ranks compute, once
        print(f"distributed: {world} rank(s), backend {torch.distributed.get_backend()}, device {device.type}, "
              f"compute dtype {str(model.compute_dtype()).removeprefix('torch.')}"
              f"{' (FSDP2 mixed precision, float32 master weights)' if distributed.gpu_path() else ''}", flush=True)
    torch.manual_seed(cfg.seed)
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    train_set, heldout = load_data(cfg)
    cfg = judging.choose_graders(cfg, [r.reference for r in train_set + heldout])
    judging.check_reward_functions(cfg, train_set + heldout)
    check_resume(cfg, vopts)
    policy_path, verifier_spec = resolve_paths(cfg)
    tokenizer = model.load_tokenizer(policy_path, cfg.trust_remote_code, cfg.prompt_format)
    train_set, heldout = drop_long_prompts(cfg, tokenizer, train_set, heldout)
    policy, ref = load_models(cfg, policy_path, device)
    updates_per_step = cfg.ppo_epochs * cfg.minibatches
    optimizer, scheduler = model.build_optimizer(policy, cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay,
                                                 cfg.steps * updates_per_step, cfg.warmup_ratio, cfg.lr_schedule,
                                                 cfg.min_lr_ratio)
    # after the optimizer: policy:rlpr runs the policy now, and a sharded policy's first forward (FSDP2's lazy
    # init) before its optimizer exists leaves the optimizer with parameters the checkpoint cannot name
    judges = load_verifiers(cfg, vopts, verifier_spec, device, policy, tokenizer, train_set)
    judging.give_columns(cfg, judges, train_set + heldout)
    sampler = data.PromptSampler(len(train_set), cfg.prompts_per_step, cfg.seed, rank, world)
    state = resume(cfg, ckpt_dir, policy, optimizer, scheduler)
    start, streaks = state["step"], state["streaks"]
    log = metrics.Metrics(str(out_dir / "eval_only" if cfg.eval_only else out_dir),
                          {**asdict(cfg), **asdict(vopts), "policy_path": policy_path, "verifier_path": verifier_spec},
                          cfg.wandb_project, cfg.wandb_run_name or None, cfg.wandb_mode, rank,
                          resume_step=None if cfg.eval_only else start)
    if cfg.eval_only:
        result = evaluate(policy, tokenizer, heldout, judges["eval"], cfg, device, out_dir / "eval_only" / EVAL_QUESTIONS,
                          start)
        log.log(start, result)
        log.close()
        return {"eval": result}
    if start == 0:  # before any update: the verifier's master-key rate and the policy's starting accuracy
        m = judging.probe_master_keys(judges["reward"], train_set, cfg) if cfg.master_key_prompts else {}
        log.log(0, m | (evaluate(policy, tokenizer, heldout, judges["eval"], cfg, device, out_dir / EVAL_QUESTIONS, 0)
                        if cfg.eval_every else {}))
    common = (cfg, policy, tokenizer, train_set, sampler, judges["reward"], judges["logged"])
    source = rollout_async.AsyncSource(*common, policy_path) if cfg.async_steps else \
        rollout.RolloutSource(*common, start_engine(cfg, policy_path, policy, device, resumed=start > 0))
    if start:
        source.load_state_dict(state["rollout"])

    stop, timer, history, stopped = checkpoint.StopSignal(), metrics.PhaseTimer(device), [], None
    bar = metrics.progress(range(start, cfg.steps), desc="rl", disable=rank != 0, initial=start, total=cfg.steps)
    try:
        for step in bar:
            t0 = time.time()
            with timer("rollout"):  # generate and judge (async: the batch generated during the last update)
                ro, judged, also, info = source.next(step)
                used = (judged.soft if cfg.reward_type == "soft" else judged.binary).float()
            with timer("logprobs"):
                rewards = distributed.all_gather_cat(used.to(device))
                batch, m = advantages(policy, ref, ro, rewards, cfg, device)
            with timer("update"):
                _, update = policy_update(policy, optimizer, scheduler, batch, cfg, step, device)
            with timer("sync"):
                source.after_update(policy)  # the vLLM engine takes the new weights
            audited = []
            if judges["audit"] is not None and cfg.audit_every and (step + 1) % cfg.audit_every == 0:
                with timer("audit"):
                    audited = judging.audit_rollout(judges["audit"], ro, judged, step + 1, cfg, len(rewards))
            # everything each rank reports, in one collective
            parts = distributed.gather_objects(step_record(ro, judged, used, also, update, step + 1) | {"audit": audited})
            m.update(reduce_step(parts, rewards, list(judges["logged"]), updates_per_step, cfg) | info)
            m["reward/frac_zero_std"] = frac_zero_std(rewards.cpu(), cfg.samples_per_prompt)  # TRL's name
            warn_no_signal(m, step + 1, cfg, streaks, say=rank == 0)  # every rank: their streaks stay equal
            rows, audited = [r for p in parts for r in p["rows"]], [r for p in parts for r in p["audit"]]
            if audited:
                m.update(audit.audit_metrics(audited))
            last = step + 1 == cfg.steps
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                with timer("eval"):
                    m.update(evaluate(policy, tokenizer, heldout, judges["eval"], cfg, device, out_dir / EVAL_QUESTIONS,
                                      step + 1))
            m.update(timer.pop() | {"time/step": time.time() - t0, "lr": scheduler.get_last_lr()[0],
                                    "epoch": sampler.epoch, **metrics.peak_memory(device)})
            m["throughput/tokens_per_s"] = m["response/length_mean"] * len(rewards) / max(m["time/step"], 1e-9)
            write_outputs(out_dir, rows, audited, cfg)
            if cfg.log_samples:
                log.table(step + 1, "samples", list(rows[0]), [list(r.values()) for r in rows[:cfg.log_samples]])
            log.log(step + 1, m)
            if "eval/accuracy" in m and not last:
                log.plot()  # out_dir/curves.png, redrawn at each eval and at the end
            history.append(m)
            if rank == 0:
                bar.write(log.summary(step + 1, m, ["reward/mean", "eval/accuracy", "audit/false_positive_rate",
                                                   "kl/k1", "entropy", "response/length_mean", "time/step"]))
            halt = check_streaks(m, streaks, step + 1, cfg, out_dir)
            stopping = stop.should_stop()
            if last or stopping or halt or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                checkpoint.save_checkpoint(str(ckpt_dir), step + 1, policy, optimizer, scheduler,
                                           {"rollout": source.state_dict(), "streaks": dict(streaks)},
                                           keep=cfg.keep_checkpoints)
            if halt:
                raise remote.VerifierError(halt + f" Checkpoint: {ckpt_dir}.")
            if stopping:
                stopped = stop.received
                break
    finally:
        source.close()  # after the checkpoint: an async worker holds the batch it saves
        stop.restore()  # also when the run raised: a Ctrl-C after train() returns interrupts again
    if stopped is None:
        checkpoint.export_hf(policy, tokenizer, str(out_dir / "final"))
    log.plot()
    log.close()
    return {"history": history, "stopped": stopped, "start": start, "policy": policy_path, "verifier": verifier_spec,
            "eval_verifier": cfg.eval_verifier, "audit_verifier": cfg.audit_verifier}


# ----------------------------------------------------------------------------------------------
# command line


def closing_lines(cfg: Config, result: dict) -> list[str]:
    """What was trained on what, and what the grader says of it."""
    h = result["history"]
    lines = [f"trained {result['policy']} on the {cfg.reward_type} reward of {result['verifier']} "
             f"({cfg.advantage}, --reward_norm {rl_math.estimator_norm(cfg.advantage, cfg.reward_norm)}), steps {result['start']}..{result['start'] + len(h)}"]
    rows = [m for m in metrics.read_jsonl(Path(cfg.out_dir) / "metrics.jsonl") if "eval/accuracy" in m]
    evals = [(m["step"], m["eval/accuracy"]) for m in rows]
    if len(evals) >= 2:
        grader = result["verifier"] + " (self)" if result["eval_verifier"] == "self" else result["eval_verifier"]
        lines.append(f"held-out accuracy graded by {grader}: {evals[0][1]:.3f} (step {evals[0][0]}) -> "
                     f"{evals[-1][1]:.3f} (step {evals[-1][0]})")
        if subjects := [k for k in rows[-1] if k.startswith("eval/accuracy/") and k in rows[0]]:
            lines.append("  per subject: " + ", ".join(f"{k.removeprefix('eval/accuracy/')} {rows[0][k]:.3f} -> "
                                                       f"{rows[-1][k]:.3f}" for k in subjects))
    for key in [k for k in h[-1] if k.startswith("reward/rule:") and k.endswith("binary_mean")] + ["reward/mean"]:
        k = max(1, len(h) // 5)
        lines.append(f"{key}: first {k} steps {sum(x[key] for x in h[:k]) / k:.3f} -> "
                     f"last {k} steps {sum(x[key] for x in h[-k:]) / k:.3f}")
    if fpr := [m["audit/false_positive_rate"] for m in h if "audit/false_positive_rate" in m]:
        lines.append(f"audit by {result['audit_verifier']}: false-positive rate {sum(fpr) / len(fpr):.3f} mean, "
                     f"{max(fpr):.3f} max over {len(fpr)} audits; disagreements in {Path(cfg.out_dir) / 'audit.jsonl'}")
    if (Path(cfg.out_dir) / "curves.png").exists():
        lines.append(f"picture of the run: {Path(cfg.out_dir) / 'curves.png'}")
    if cfg.verifier == "tiny" and cfg.dump_rollouts:  # the paper's loop, closed: the README's round 2
        def here(*parts):  # the repo's files, from where the user is
            return os.path.normpath(os.path.join(os.path.relpath(Path(__file__).resolve().parent), *parts))
        nxt = next_round_dir(cfg.out_dir)
        lines += ["next round: distil the verifier again with this run's rollouts (labelled by its teacher), then train "
                  "on it:",
                  "  " + shlex.join([*launcher(), here("train_verifier.py"), "sft", "--config",
                                     here(worlds.of(cfg.data).verifier_recipe), "--student",
                                     result["verifier"], "--policy_rollouts", str(Path(cfg.out_dir) / "rollouts.jsonl"),
                                     "--lr", "3e-4", "--out_dir", f"{nxt}_verifier"]),
                  "  " + shlex.join([*launcher(), here("train_rl.py"), *next_round_flags(result["argv"]),
                                     "--verifier", f"{nxt}_verifier/final", "--out_dir", nxt])]
    return lines


def launcher() -> list[str]:
    """How this run was started, for the commands it prints: torchrun with its ranks, or python."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_WORLD_SIZE" not in os.environ:
        return ["python"]
    local, world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(os.environ.get("WORLD_SIZE", 1))
    nodes = ["--nnodes", str(world // max(local, 1))] if world > local else []
    return ["torchrun", *nodes, "--nproc_per_node", str(local)]


def claim_out_dir(cfg: Config) -> None:
    """Rank 0 locks out_dir for the run's life (--eval_only: out_dir/eval_only, where it writes) and
    refuses a directory holding an earlier run's files unless --resume continues it or --overwrite
    empties it; before any model loads."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    if cfg.eval_only:
        rundir.lock(Path(cfg.out_dir) / "eval_only")
        rundir.add_listed(cfg.out_dir, "eval_only")  # an --overwrite of the run removes its evaluations too
        return
    ckpts = str(Path(cfg.out_dir) / "checkpoints")
    rundir.claim(cfg.out_dir, cfg.resume, cfg.overwrite, lambda: checkpoint.latest_checkpoint(ckpts) is not None,
                 inputs=(cfg.data, cfg.eval_data, cfg.exclude_hashes))  # what it reads is never removed


def next_round_dir(out_dir: str) -> str:
    """runs/demo -> runs/demo_round2 -> runs/demo_round3: a new directory for each round."""
    match = re.fullmatch(r"(.*)_round(\d+)", out_dir.rstrip("/"))
    return f"{match[1]}_round{int(match[2]) + 1}" if match else f"{out_dir.rstrip('/')}_round2"


def next_round_flags(argv: list[str]) -> list[str]:
    """This run's flags without those the next round sets (--verifier, --out_dir) or must not repeat (--resume)."""
    out, i = [], 0
    while i < len(argv):
        name, has_value = argv[i].split("=")[0].replace("-", "_").lstrip("_"), "=" in argv[i]
        if name in ("verifier", "out_dir", "resume"):
            takes_next = not has_value and i + 1 < len(argv) and (name != "resume" or argv[i + 1] in ("yes", "no", "auto"))
            i += 1 + takes_next
            continue
        out.append(argv[i])
        i += 1
    return out


def check_config(cfg: Config, vopts: verifiers.VerifierOptions) -> None:
    """Every flag before any model loads, each checked where its meaning lives: the flags' own ranges and
    relations, the rollout's, the verifiers' specs and files, the policy's files, the checkpoint to resume.
    A bad value is one line naming its flag (exit status 2)."""
    rl_config.check_config(cfg)
    worlds.check(cfg)
    rollout.check(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    verifiers.check_roles(cfg, vopts)
    model.check_policy_source(cfg)
    checkpoint.check_resume(cfg)
    vopts.check()


def parse_config(argv: list[str] | None = None) -> tuple[Config, verifiers.VerifierOptions]:
    """train_rl.py's flags (Config) and the verifier's (VerifierOptions), from argv and --config, checked."""
    cfg, vopts = config.parse_config((Config, verifiers.VerifierOptions), argv, prog="train_rl.py",
                                     groups=rl_config.HELP_GROUPS)
    if model.run_final_model(cfg.policy):  # a finished run's directory: its final model, as the README promises
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"--policy {cfg.policy}: a run directory; training its final model "
                  f"{model.run_final_model(cfg.policy)}")
        cfg = dataclasses.replace(cfg, policy=model.run_final_model(cfg.policy))
    check_config(cfg, vopts)
    if cfg.kl_coef is None:  # the KL term's default strength, used only when --kl_mode is on
        cfg = dataclasses.replace(cfg, kl_coef=0.01 if cfg.kl_mode != "none" else 0.0)
    return cfg, vopts


def main() -> None:
    argv = sys.argv[1:]
    try:
        cfg, vopts = parse_config(argv)
        claim_out_dir(cfg)
    except config.ConfigError as e:
        config.exit_on_error("train_rl.py", e)
    try:
        with config.one_line_errors("train_rl.py", (remote.VerifierError, data.DataError, checkpoint.CheckpointError,
                                                    model.NonFiniteError)):
            result = train(cfg, vopts)
    finally:
        distributed.shutdown()
    if int(os.environ.get("RANK", 0)) != 0 or "history" not in result:
        return
    if result["history"]:
        print("\n".join(closing_lines(cfg, result | {"argv": argv})))
    if result["stopped"] is not None:
        print(f"stopped by signal {result['stopped']} after a checkpoint; continue with the same command and --resume",
              file=sys.stderr)
        sys.exit(128 + result["stopped"])


if __name__ == "__main__":
    main()
