"""The verifiers and how one is built from its spec: a causal LM in this process (LocalVerifier), vLLM
servers (RemoteVerifier), a Python judge (PyVerifier, py:module:function), hybrid routing (rule:math on
the rows it grades right, a model verifier elsewhere), and the rules (rlvr/rules.py); the options both
trainers share (VerifierOptions), and the checks a spec gets before any model loads. A spec string is
parsed once, by verifier_spec.parse; everything here takes the parsed value. Imports config, model,
remote (the transport), verifier_families, verifier_prompt, verifier_spec, rules and reward.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import Tensor

import reward
from reward import (Judgement, SoftMode, SoftModeFlag, Verifier, family_soft_mode, first_token, judgement_rewards,
                    rewards_from_logits, token_class)
from rlvr import config, model, remote, reward_functions, verifier_families
from rlvr.remote import CompletionsClient, VerifierError
from rlvr.rules import RULES, RuleVerifier, routes_to_math
from rlvr.verifier_prompt import VerifierPrompt, VerifierSettings, load_settings, require_settings, resolve_settings
from rlvr.verifier_spec import POLICY_SOURCES, VerifierSpec, parse, split_family


def _seeds_for(seeds: list[int] | None, n: int, sample: bool, base: int, call: int) -> list[int] | None:
    """The per-response seeds of a sampling verifier: the caller's, else fresh ones for each call."""
    if not sample:
        return None
    if seeds is None:
        return [reward.stable_hash(base, call, i) >> 1 for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"verifier: {len(seeds)} seeds for {n} responses")
    return list(seeds)


CotReward = Literal["paper", "compute_rm_score"]  # --cot_reward


def asked_solutions(responses: list[str], cot_reward: CotReward) -> tuple[list[str], list[str | None] | None]:
    """(what the verifier is asked about, the extracted solutions): the responses themselves (paper), or
    General-Reasoner's extract_solution of each, "No Answer" where none was found (compute_rm_score)."""
    if cot_reward == "paper":
        return responses, None
    solutions = [verifier_families.extract_solution(r) for r in responses]
    return [s or verifier_families.NO_ANSWER for s in solutions], solutions


def judge_decisions(prompt: VerifierPrompt, seqs: list[list[int]], generated: list[list[int]], probs,
                    soft_mode: SoftMode, pad_id: int, solutions: list[str | None] | None = None,
                    references: list[str] | None = None) -> tuple[Judgement, object]:
    """Eq. 3 / Eq. 4 of a generating family (cot), the local and the remote verifier alike: c is the token
    the verifier wrote right after its decision marker, p(positive) and p(negative) that position's
    probabilities, `probs(prefixes)` -> [rows, 2], each prefix the prompt and the reasoning before c (the
    same softmax over the whole vocabulary as a first token). No marker: unjudged. Returns the Judgement,
    its `verifier_tokens` the generated lengths (the verifier's cost), and a function listing c per row.
    With `solutions` (--cot_reward compute_rm_score, asked_solutions): General-Reasoner's reward instead:
    binary is their decision (the reply contains "Final Decision: Yes" anywhere), soft their compute_rm_score
    (with its -0.5 and length penalty); p_yes and judged stay the decision token's."""
    at = [verifier_families.decision_position(prompt.tokenizer, g, prompt.family.decision) for g in generated]
    found = [i for i, a in enumerate(at) if a is not None]
    p = torch.zeros(len(seqs), 2, dtype=torch.float64)
    c = torch.zeros(len(seqs), dtype=torch.long)
    at_decision = probs([seqs[i] + generated[i][:at[i]] for i in found])
    if found:
        p[found] = at_decision.double()
        c[found] = token_class(torch.tensor([generated[i][at[i]] for i in found]), prompt.positive_ids,
                               prompt.negative_ids)
    j = judgement_rewards(p[:, 0], p[:, 1], c, soft_mode)
    if solutions is not None:
        replies = [prompt.tokenizer.decode(g, skip_special_tokens=True) for g in generated]
        j.binary = torch.tensor([float(verifier_families.passes(r)) for r in replies])
        j.soft = torch.tensor([verifier_families.compute_rm_score(prompt.tokenizer, s, ref, r)
                               for s, ref, r in zip(solutions, references, replies)], dtype=torch.float32)
    j.verifier_tokens = torch.tensor([float(len(g)) for g in generated])
    decided = [g[a] if a is not None else (g[-1] if g else pad_id) for g, a in zip(generated, at)]
    return j, lambda: decided


def _empty_judgement() -> Judgement:
    z = torch.zeros(0)
    return Judgement(z, z.clone(), z.clone(), torch.zeros(0, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# local verifier: a causal LM in this process


class LocalVerifier:
    """A Hugging Face causal LM judged with one forward pass per batch and no generate(): the lm_head
    runs at the last position only (logits_to_keep=1), so no [B, T, vocab] tensor ever exists.
    Rows are sorted by length into batches of `batch_size` so padding stays small. A generated family
    (cot) generates up to `max_new_tokens` first (judge_after_reasoning)."""

    def __init__(self, lm, tokenizer, settings: VerifierSettings = VerifierSettings(), name: str = "local verifier",
                 batch_size: int = 8, soft_mode: SoftModeFlag = "auto", sample: bool = False, max_unjudged: float = 0.1,
                 seed: int = 0, max_new_tokens: int = 2048, cot_reward: CotReward = "paper"):
        self.prompt = VerifierPrompt(tokenizer, settings, name, getattr(lm.config, "max_position_embeddings", None))
        self.cot_reward = cot_reward
        self.model, self.name, self.batch_size, self.max_new_tokens = lm, name, batch_size, max_new_tokens
        self.soft_mode = family_soft_mode(soft_mode, self.prompt.family.renormalise, self.prompt.family.name)
        self.sample, self.max_unjudged, self.seed, self.calls = sample, max_unjudged, seed, 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sharded = model.is_sharded(lm)
        self.device = next(lm.parameters()).device

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        reward.check_lengths(questions, references, responses)
        seeds = _seeds_for(seeds, len(questions), self.sample, self.seed, self.calls)
        self.calls += 1
        asked, solutions = asked_solutions(responses, self.cot_reward)
        seqs = self.prompt.batch_ids(questions, references, asked)
        if self.prompt.family.decision:
            j, answered = self.judge_after_reasoning(seqs, seeds, solutions, references)
        else:
            logits = self.last_logits(seqs)
            j = rewards_from_logits(logits, self.prompt.positive_ids, self.prompt.negative_ids, self.soft_mode, seeds,
                                    self.prompt.invalid_ids) if seqs else _empty_judgement()
            answered = lambda: first_token(logits.double().softmax(-1), seeds).tolist()  # noqa: E731
        counts = torch.tensor([(~j.judged).sum().item(), len(seqs)], device=self.device)
        if self._distributed():  # every rank raises, or none does: a lone raise would hang the others
            torch.distributed.all_reduce(counts)
        self.prompt.check_judged(j.judged, answered, self.max_unjudged, counts.cpu())
        j.cut = torch.tensor(self.prompt.last_cut, dtype=torch.bool)
        return j

    def judge_after_reasoning(self, seqs: list[list[int]], seeds: list[int] | None, solutions=None,
                              references=None) -> tuple[Judgement, object]:
        """A generating family (cot): the reasoning from model.generate, the decision's probabilities from
        one forward pass over the prompt and the reasoning before it (judge_decisions)."""
        # a rank without rows still generates (one token from a pad): a sharded verifier gathers its weights there
        gen = model.generate(self.model, self.prompt.tokenizer, seqs or [[self.pad_id]],
                             self.max_new_tokens if seqs else 1, row_seeds=seeds if seqs else None)[0][:len(seqs)]
        pos, neg = self.prompt.positive_ids, self.prompt.negative_ids

        def probs(prefixes):  # every rank calls last_logits, with or without rows (a sharded verifier)
            p = self.last_logits(prefixes).double().softmax(-1)
            return torch.stack([p[:, pos].sum(-1), p[:, neg].sum(-1)], -1) if prefixes else torch.zeros(0, 2)
        return judge_decisions(self.prompt, seqs, gen, probs, self.soft_mode, self.pad_id, solutions, references)

    def _distributed(self) -> bool:
        return self.sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    # no_grad, not inference_mode: an FSDP2-sharded verifier (every GPU run, even at one rank) allocates its
    # all-gather buffers inside the forward, and FSDP2 cannot run there under inference mode ("Inference
    # tensors do not track version counter"); when the verifier is the student being trained (sft's
    # held-out eval), buffers made there would also make its next training step fail ("Inplace update
    # to inference tensor outside InferenceMode").
    @torch.no_grad()
    def last_logits(self, sequences: list[list[int]]) -> Tensor:
        """[N, vocab] logits of the next token after each sequence, in the given order."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first: OOM shows at once
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        n_calls = len(batches)
        if self._distributed():
            n = torch.tensor(n_calls, device=self.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
            n_calls = int(n)
        out = torch.empty(len(sequences), 0)
        for b in range(n_calls):
            rows = [sequences[i] for i in batches[b]] if b < len(batches) else [[self.pad_id]]  # dummy: keep step
            ids, mask = model.left_pad(rows, self.pad_id)
            # Positions count real tokens only, so a padded row is computed exactly as it is alone.
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=pos.to(self.device), logits_to_keep=1, use_cache=False).logits[:, -1]
            if b < len(batches):
                if out.shape[1] == 0:
                    out = torch.empty(len(sequences), logits.shape[-1])
                out[batches[b]] = logits.float().cpu()
        return out


# ----------------------------------------------------------------------------------------------
# remote verifier: `vllm serve <verifier>`


class RemoteVerifier:
    """The same rewards from vLLM servers: the prompt rendered here as token ids (so local and remote
    see the same tokens), the first output token (greedy, or sampled with a seed per request) and the
    exact log-probabilities of the judgement tokens (remote.CompletionsClient). A generating family
    (cot): the server writes the reasoning, then is asked once more at its decision (judge_decisions)."""

    def __init__(self, client: CompletionsClient, tokenizer, settings: VerifierSettings = VerifierSettings(),
                 soft_mode: SoftModeFlag = "auto", sample: bool = False, max_unjudged: float = 0.1, seed: int = 0,
                 max_new_tokens: int = 2048, cot_reward: CotReward = "paper"):
        self.client, self.name = client, f"{client.model_id} at {','.join(client.endpoints)}"
        self.prompt = VerifierPrompt(tokenizer, settings, self.name, client.max_model_len)
        self.soft_mode = family_soft_mode(soft_mode, self.prompt.family.renormalise, self.prompt.family.name)
        self.sample, self.max_unjudged, self.seed, self.calls = sample, max_unjudged, seed, 0
        self.max_new_tokens, self.cot_reward = max_new_tokens, cot_reward  # a generating family's (cot)

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        reward.check_lengths(questions, references, responses)
        if not questions:
            return _empty_judgement()
        seeds = _seeds_for(seeds, len(questions), self.sample, self.seed, self.calls)
        self.calls += 1
        pos, neg, inv = self.prompt.positive_ids, self.prompt.negative_ids, self.prompt.invalid_ids
        asked, solutions = asked_solutions(responses, self.cot_reward)
        prompts = self.prompt.batch_ids(questions, references, asked)
        seeds = seeds and [s % 2 ** 31 for s in seeds]
        if self.prompt.family.decision:  # cot: the server writes the reasoning, then is asked at the decision
            def probs(prefixes):
                replies = self.client.first_token(prefixes, pos + neg, None)
                return torch.tensor([[sum(math.exp(r["logprobs"][i]) for i in ids) for ids in (pos, neg)]
                                     for r in replies], dtype=torch.float64).reshape(-1, 2)
            gen = self.client.generate(prompts, self.max_new_tokens, seeds)
            j, answered = judge_decisions(self.prompt, prompts, gen, probs, self.soft_mode, 0, solutions, references)
            self.prompt.check_judged(j.judged, answered, self.max_unjudged)
            j.cut = torch.tensor(self.prompt.last_cut, dtype=torch.bool)
            return j
        replies = self.client.first_token(prompts, pos + neg + inv, seeds)
        p = torch.tensor([[math.exp(r["logprobs"][i]) for i in pos + neg + inv] for r in replies], dtype=torch.float64)
        first_tokens = torch.tensor([r["token"] for r in replies])
        k = len(pos) + len(neg)
        j = judgement_rewards(p[:, :len(pos)].sum(-1), p[:, len(pos):k].sum(-1), token_class(first_tokens, pos, neg, inv),
                              self.soft_mode, p[:, k:].sum(-1) if inv else None)
        self.prompt.check_judged(j.judged, first_tokens.tolist, self.max_unjudged)
        j.cut = torch.tensor(self.prompt.last_cut, dtype=torch.bool)
        return j


# ----------------------------------------------------------------------------------------------
# one way to get any verifier from a string, with the flags both trainers share


def _flag(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class VerifierOptions:
    """How the verifier is asked (its settings; a saved setting wins unless forced), how its answer is
    read, and how it is reached. A second dataclass in train_rl.py's and train_verifier.py's parser."""
    verifier_template: str = _flag("", "template file with {question} {reference} {response} "
                                       "('': the verifier's saved template, else the paper's)")
    verifier_system_prompt: Optional[str] = _flag(None, "system message (default: saved, else the paper's; '': none)")
    verifier_positive: Optional[str] = _flag(None, "positive judgement token (default: saved, else YES)")
    verifier_negative: Optional[str] = _flag(None, "negative judgement token (default: saved, else NO)")
    verifier_full_response: Optional[bool] = _flag(None, "show the whole response, not its last line (default: "
                                                         "saved, else false)")
    verifier_strip_think: Optional[bool] = _flag(None, "drop <think>...</think> before taking the last line "
                                                       "(default: saved, else true)")
    verifier_sum_variants: Optional[bool] = _flag(None, "sum p over one-token spellings (YES, Yes, ' yes'...) "
                                                        "(default: saved, else false)")
    verifier_family: Optional[str] = _flag(None, "how the verifier is asked and read: "
                                                 f"{' | '.join(verifier_families.FAMILIES)} (verifier_families.py; "
                                                 "default: saved, else rm, the paper's)")
    verifier_max_new_tokens: int = _flag(2048, "tokens a generating verifier (--verifier_family cot) may write before "
                                               "its decision (2048: General-Reasoner's verifier.py)")
    cot_reward: CotReward = _flag("paper", "the reward verifier of --verifier_family cot: paper: Eq. 3 / Eq. 4 at "
                                           "the token after the last 'Final Decision:', on the last line; "
                                           "compute_rm_score: General-Reasoner's (its extracted \\boxed{} / 'Final "
                                           "Answer:' answer, -0.5 without one, 'Final Decision: Yes' anywhere, a length "
                                           "penalty) as --reward_type soft, its decision alone as binary")
    verifier_force_settings: bool = _flag(False, "let the flags above override the verifier's saved settings")
    verifier_paper_defaults: bool = _flag(False, "ask model verifiers without verifier_settings.json (the released "
                                                 "RM-7B, a general judge) with the paper's template and YES/NO; "
                                                 "without it they are refused")
    soft_mode: SoftModeFlag = _flag("auto", "eq4: Eq. 4 as the paper writes it; renorm: p(YES) / (p(YES) + p(NO)) when c "
                                            "is YES or NO (0 otherwise, as Eq. 4); ratio: that ratio whatever c is (a "
                                            "judge that does not answer in the format: a base or random model); auto: "
                                            "the family's own (eq4, renorm for compass)")
    verifier_sample: bool = _flag(False, "sample the first token c, seeded per response (Eq. 3 as the paper writes "
                                         "it); Eq. 4 reads the same c")
    verifier_batch_size: int = _flag(16, "rows per forward pass of a local verifier")
    verifier_tokenizer: str = _flag("", "tokenizer and saved settings of an http verifier (default: the served model)")
    verifier_timeout: float = _flag(60.0, "seconds per request to an http verifier, and per call of a py: judge")
    verifier_retries: int = _flag(3, "retries per request to an http verifier (with backoff)")
    verifier_concurrency: int = _flag(16, "requests in flight to http verifiers")
    verifier_max_unjudged: float = _flag(0.1, "error when a larger share of a call's first tokens is neither "
                                              "judgement token")
    math_timeout: float = _flag(5.0, "seconds rule:math may spend on one answer (then it scores 0)")

    def check(self) -> None:
        req = config.require
        req(self.verifier_batch_size >= 1, "verifier_batch_size", self.verifier_batch_size, "must be >= 1")
        req(self.verifier_timeout > 0, "verifier_timeout", self.verifier_timeout, "must be > 0")
        req(self.verifier_retries >= 0, "verifier_retries", self.verifier_retries, "must be >= 0")
        req(self.verifier_concurrency >= 1, "verifier_concurrency", self.verifier_concurrency, "must be >= 1")
        req(0 <= self.verifier_max_unjudged <= 1, "verifier_max_unjudged", self.verifier_max_unjudged,
            "must be in [0, 1]")
        req(self.math_timeout > 0, "math_timeout", self.math_timeout, "must be > 0")
        req(self.verifier_family is None or self.verifier_family in verifier_families.FAMILIES, "verifier_family",
            self.verifier_family, f"must be one of {', '.join(verifier_families.FAMILIES)}")
        req(self.verifier_max_new_tokens >= 1, "verifier_max_new_tokens", self.verifier_max_new_tokens, "must be >= 1")
        for flag in ("verifier_positive", "verifier_negative"):
            req(getattr(self, flag) != "", flag, getattr(self, flag), "must not be empty")
        req(self.verifier_positive is None or self.verifier_positive != self.verifier_negative, "verifier_negative",
            self.verifier_negative, "must differ from --verifier_positive")
        if self.verifier_template:
            path = Path(self.verifier_template)
            req(path.is_file(), "verifier_template", self.verifier_template, "no such file")
            text = path.read_text(encoding="utf-8")
            for f in ("{reference}", "{response}"):
                req(f in text, "verifier_template", self.verifier_template, f"has no {f} field")

    def settings_overrides(self) -> dict:
        """{setting: value} for every prompt flag that was given."""
        out = {key: getattr(self, "verifier_" + key) for key in
               ("system_prompt", "positive", "negative", "full_response", "strip_think", "sum_variants", "family")}
        if self.verifier_template:
            out["template"] = Path(self.verifier_template).read_text(encoding="utf-8")
        return {k: v for k, v in out.items() if v is not None}


def _reading_settings(reading: dict, settings: VerifierSettings) -> VerifierSettings:
    """--soft_mode and --cot_reward against the verifier's family, before anything loads (a ConfigError
    naming the flag); the settings the verifier is asked with: with --cot_reward compute_rm_score it reads
    the extracted answer whole, as General-Reasoner sends it (asked_solutions)."""
    try:
        family_soft_mode(reading.get("soft_mode", "auto"), verifier_families.family(settings.family).renormalise,
                         settings.family)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    if reading.get("cot_reward", "paper") == "paper":
        return settings
    config.require(settings.family == "cot", "cot_reward", reading["cot_reward"],
                   f"is General-Reasoner's reward of the cot family; this verifier is asked as {settings.family}")
    return dataclasses.replace(settings, full_response=True, strip_think=False)


def build_verifier(spec: str | VerifierSpec, options: VerifierOptions | None = None, *, settings_from_flags: bool = True,
                   device="cpu", dtype: torch.dtype | None = None, shard: bool = False, seed: int = 0,
                   trust_remote_code: bool = False) -> Verifier:
    """"rule:substring" | "rule:exact" | "rule:jaccard" | "rule:math" | "http(s)://host:port[,http://host2:port]"
    (round robin) | "py:module.path:function" (PyVerifier) | a local model directory or hub name. A model verifier is asked with its saved
    settings (load_settings), the prompt flags of `options` on top (resolve_settings). With
    settings_from_flags=False (eval, audit and log-only judges) only the transport options apply:
    saved settings or the paper's defaults, greedy c, Eq. 4. A local model loads in `dtype` (default:
    model.compute_dtype(), bf16 on the GPU path, as flash-attention needs)."""
    o = options or VerifierOptions()
    o.check()
    overrides = o.settings_overrides() if settings_from_flags else {}
    parsed = spec if isinstance(spec, VerifierSpec) else parse(spec)
    spec = parsed.bare  # the spec without its family, as it names the model in messages
    if parsed.family is not None:  # "<family>:<model>": asked in that family's format, whatever the role
        if overrides.get("family", parsed.family) != parsed.family:
            raise config.ConfigError(f"--verifier_family {overrides['family']!r} contradicts the verifier "
                                     f"{parsed.text}; name the family once")
        overrides["family"] = parsed.family
    reading = dict(soft_mode=o.soft_mode, sample=o.verifier_sample, cot_reward=o.cot_reward) \
        if settings_from_flags else {}
    if parsed.kind == "rule":
        # a family is how a model is asked: a rule reads the response as its own flags say
        rule_overrides = {k: v for k, v in overrides.items() if k != "family"}
        return RuleVerifier(parsed.target, resolve_settings(None, rule_overrides), math_timeout=o.math_timeout)
    if parsed.kind == "py":  # a judge, or TRL reward functions (reward_functions.py: their parameters say)
        if reward_functions.is_trl(spec):
            return RewardFunctionVerifier(reward_functions.split_specs(spec))
        return PyVerifier(spec, o.verifier_timeout)
    if parsed.kind == "hybrid":
        return HybridVerifier(RuleVerifier("math", resolve_settings(None, {}), math_timeout=o.math_timeout),
                              build_verifier(parsed.inner, o, settings_from_flags=settings_from_flags,
                                             device=device, dtype=dtype, shard=shard, seed=seed,
                                             trust_remote_code=trust_remote_code))
    if parsed.kind == "policy":  # verifier_free.PolicyReward: train_rl.load_verifiers builds it with the policy
        raise ValueError(f"verifier {spec!r} scores the policy being trained: a reward source of train_rl.py "
                         "--verifier only")
    if parsed.kind == "http":
        client = CompletionsClient(list(parsed.endpoints), o.verifier_timeout, o.verifier_retries,
                                   o.verifier_concurrency)
        source = o.verifier_tokenizer or client.model_id
        saved = load_settings(source)
        require_settings(saved, f"{spec} ({source})", o.verifier_paper_defaults,
                         "template" in overrides or "family" in overrides)
        settings = resolve_settings(saved, overrides, o.verifier_force_settings, spec)
        settings = _reading_settings(reading, settings)
        tokenizer = model.load_tokenizer(source, trust_remote_code=trust_remote_code)
        return RemoteVerifier(client, tokenizer, settings, max_unjudged=o.verifier_max_unjudged, seed=seed,
                              max_new_tokens=o.verifier_max_new_tokens, **reading)
    if not spec.strip():
        raise ValueError(f"empty verifier spec; give rule:{'|rule:'.join(RULES)}, an http(s):// endpoint, "
                         "a model directory or a hub name")
    saved = load_settings(spec)
    require_settings(saved, spec, o.verifier_paper_defaults, "template" in overrides or "family" in overrides)
    settings = resolve_settings(saved, overrides, o.verifier_force_settings, spec)
    settings = _reading_settings(reading, settings)  # before the weights load
    dtype = dtype or model.compute_dtype()
    if shard:  # every rank of the group calls this: the weights are read once, by rank 0, into the shards
        m = model.load_sharded(spec, device, dtype, trust_remote_code, mixed_precision=False, frozen=True)
    else:
        m = model.load_model(spec, device, dtype, trust_remote_code).eval().requires_grad_(False)
    return LocalVerifier(m, model.load_tokenizer(spec, trust_remote_code=trust_remote_code), settings, name=spec,
                         batch_size=o.verifier_batch_size, max_unjudged=o.verifier_max_unjudged, seed=seed,
                         max_new_tokens=o.verifier_max_new_tokens, **reading)


def check_saved_settings(spec: str | VerifierSpec, options: "VerifierOptions", from_flags: bool) -> None:
    """require_settings for a verifier that is a local directory, before anything loads (a hub name or
    a server is checked when it is built). from_flags: the reward verifier (--verifier_template counts)."""
    asked = (spec if isinstance(spec, VerifierSpec) else parse(spec)).model_verifier  # hybrid's model verifier
    if asked.kind == "model" and asked.target and Path(asked.target).is_dir():
        try:
            saved = load_settings(asked.target)
        except ValueError as e:
            raise config.ConfigError(str(e)) from None
        require_settings(saved, asked.target, options.verifier_paper_defaults, asked.family is not None
                         or from_flags and bool(options.verifier_template or options.verifier_family))


# ----------------------------------------------------------------------------------------------
# hybrid routing: hybrid:<model verifier spec>


class HybridVerifier:
    """hybrid:<spec>: rule:math for the rows where both the reference and the answer parse as mathematics
    (routes_to_math), the model verifier <spec> for the others, per row; the Judgement is assembled in the
    rows' order. Cheaper (the model reads fewer rows), and a math rule cannot be fooled by a master key.
    The model verifier is called on every call, with no rows if none is routed to it (a sharded one
    holds collectives in every call). train_rl.py logs the share routed to the rule,
    verifier/routed_math_share."""

    def __init__(self, math: "RuleVerifier", model_verifier: Verifier):
        self.math, self.model, self.name = math, model_verifier, f"hybrid:{model_verifier.name}"
        self.sharded = getattr(model_verifier, "sharded", False)  # rollout._thread_safe reads it

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        reward.check_lengths(questions, references, responses)
        route = [routes_to_math(ref, r) for ref, r in zip(references, responses)]
        parts = []
        for verifier, rows in ((self.math, [i for i, m in enumerate(route) if m]),
                               (self.model, [i for i, m in enumerate(route) if not m])):
            if rows or verifier is self.model:
                j = verifier([questions[i] for i in rows], [references[i] for i in rows],
                             [responses[i] for i in rows], None if seeds is None else [seeds[i] for i in rows])
                parts.append((rows, j))
        out = Judgement(torch.zeros(len(route)), torch.zeros(len(route)), torch.zeros(len(route)),
                        torch.zeros(len(route), dtype=torch.bool))  # invalid, verifier_tokens, cut: zeros until filled
        out.routed = torch.tensor(route, dtype=torch.bool)
        for rows, j in parts:
            if rows:
                for name in ("binary", "soft", "p_yes", "judged", "invalid", "verifier_tokens", "cut"):
                    getattr(out, name)[rows] = getattr(j, name).to(getattr(out, name).dtype)
        return out


def check_judgement_tokens(spec: str, options: "VerifierOptions", from_flags: bool, flag: str,
                           trust_remote_code: bool = False) -> None:
    """A local model verifier's judgement tokens (its saved settings, the prompt flags on top when
    from_flags, a <family>: prefix) read through its tokenizer before any model loads: a token that is
    several tokens, or a tokenizer the prompt cannot be rendered through, is a ConfigError naming `flag`."""
    asked = parse(spec).model_verifier
    inner = asked.target
    if asked.kind != "model" or not inner or not Path(inner).is_dir() or not (Path(inner) / "config.json").is_file():
        return
    overrides = options.settings_overrides() if from_flags else {}
    if asked.family is not None:
        overrides["family"] = asked.family
    try:
        settings = resolve_settings(load_settings(inner), overrides, options.verifier_force_settings, inner)
        VerifierPrompt(model.load_tokenizer(inner, trust_remote_code=trust_remote_code), settings, inner)
    except ValueError as e:  # ConfigError is one
        raise config.ConfigError(f"--{flag} {spec!r}: {e}") from None


def check_roles(cfg, options: VerifierOptions) -> None:
    """train_rl.py's verifier flags (--verifier, --eval_verifier, --audit_verifier, --log_verifiers), before
    any model loads: no credentials in a URL, a model verifier's saved settings and files, every spec
    buildable (check_spec), and what a policy: reward source rules out. One line naming the flag."""
    req = config.require
    for name in ("verifier", "eval_verifier", "audit_verifier", "log_verifiers"):
        refused = remote.url_credentials(getattr(cfg, name))
        req(refused is None, name, remote.redact(getattr(cfg, name)), refused)
    for name, spec in [(n, getattr(cfg, n)) for n in ("verifier", "eval_verifier", "audit_verifier")] + \
            [("log_verifiers", s.strip()) for s in cfg.log_verifiers.split(",")]:
        check_saved_settings(spec, options, from_flags=name == "verifier")
    for name in ("verifier", "eval_verifier", "audit_verifier"):
        asked = parse(getattr(cfg, name)).model_verifier  # hybrid's, compass:<model>'s model
        if asked.kind == "model" and asked.target:  # a model directory or hub name
            chat = verifier_families.family(asked.family).chat if asked.family else True  # cot is sent as raw text
            problem = model.source_problem(asked.target, chat, cfg.trust_remote_code, plain_flag="")
            req(problem is None, name, getattr(cfg, name), str(problem))
    for name in ("verifier", "eval_verifier", "audit_verifier", "log_verifiers"):
        for spec in getattr(cfg, name).split(",") if name == "log_verifiers" else [getattr(cfg, name)]:
            if spec.strip() not in ("auto", "self"):
                check_spec(spec.strip(), name)
                check_judgement_tokens(spec.strip(), options, name == "verifier", name, cfg.trust_remote_code)
    functions = reward_functions.split_specs(cfg.verifier.removeprefix("hybrid:"))
    if cfg.reward_weights:
        req(all(f.startswith("py:") for f in functions), "reward_weights", cfg.reward_weights,
            "weighs the py: reward functions of --verifier (py:a:f,py:b:g)")
        reward_functions.parse_weights(cfg.reward_weights, len(functions))
    if parse(cfg.verifier).kind == "policy":  # verifier_free.PolicyReward: the policy scores its own rollouts
        req(not cfg.async_steps, "async_steps", cfg.async_steps, f"with --verifier {cfg.verifier}: the worker's batch "
            "would be scored by a policy in the middle of its update; use --async_steps 0")
        req(not cfg.stream_judging, "stream_judging", cfg.stream_judging, f"with --verifier {cfg.verifier}: the policy "
            "cannot score in a thread while it generates; use --stream_judging false")
        req(cfg.eval_verifier != "self", "eval_verifier", cfg.eval_verifier, f"--verifier {cfg.verifier} is not a "
            "grader of held-out answers; name a judge")
    else:  # the flags of the policy: sources do nothing to a verifier
        req(cfg.verifier_free_answer == "auto", "verifier_free_answer", cfg.verifier_free_answer,
            f"is read by --verifier policy:rlpr|policy:verifree, not {cfg.verifier}")
    req(not cfg.rlpr_repetition_penalty or parse(cfg.verifier).text == "policy:rlpr", "rlpr_repetition_penalty",
        cfg.rlpr_repetition_penalty, f"is read by --verifier policy:rlpr, not {cfg.verifier}")
    req(options.cot_reward == "paper" or parse(cfg.verifier).model_verifier.kind not in ("rule", "py", "policy"),
        "cot_reward", options.cot_reward, f"is the reward of a cot model verifier, not of {cfg.verifier}")


def check_spec(spec: str, flag: str) -> None:
    """A rule or py: spec that cannot run is a ConfigError naming `flag`, before any model loads
    (a py: function is imported and tried on one row)."""
    parsed = parse(spec)
    try:
        if parsed.family is not None and (not parsed.bare.strip() or parsed.kind in ("rule", "py", "policy", "hybrid")
                                          or split_family(parsed.bare)[0] is not None):
            raise ValueError(f"expected {parsed.family}:<model verifier> (a model directory, hub name or "
                             "http(s):// endpoint): a family says how a model is asked")
        if parsed.kind == "policy":
            if parsed.target not in POLICY_SOURCES:
                raise ValueError(f"unknown reward source; valid: {', '.join('policy:' + k for k in POLICY_SOURCES)}")
            if flag != "verifier":
                raise ValueError("is a reward source of --verifier only: it scores the policy being trained, "
                                 "not a judge")
        if parsed.kind == "hybrid":
            if not parsed.target.strip() or parsed.inner.kind in ("rule", "hybrid", "policy"):
                raise ValueError("expected hybrid:<model verifier>: a model directory, hub name, http(s):// "
                                 "endpoint, py:module:function or tiny (rule:math takes the math rows)")
            check_spec(parsed.target, flag)
        if parsed.kind == "rule" and parsed.target not in RULES:
            raise ValueError(f"unknown rule verifier; valid: {', '.join('rule:' + r for r in RULES)}")
        if parsed.kind == "py":
            if reward_functions.is_trl(spec):  # imported and its parameters read; called on real rows later
                reward_functions.RewardFunctions(reward_functions.split_specs(spec))
            else:
                PyVerifier(spec)
    except (ValueError, VerifierError) as e:
        raise config.ConfigError(f"--{flag} {spec!r}: {e}") from e


# ----------------------------------------------------------------------------------------------
# TRL reward functions (reward_functions.py) as a verifier


class RewardFunctionVerifier(reward_functions.RewardFunctions):
    """py: TRL reward functions, one or several weighted: soft = their weighted sum (any finite float, left
    to the estimator to normalise), binary = soft >= 0.5 (Eq. 3, and eval's accuracy, as for a judge's
    score), p_yes = soft; every response is judged."""

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        reward.check_lengths(questions, references, responses)
        return score_judgement(self.scores(questions, references, responses))


class RewardFunctionPart:
    """One of several reward functions, unweighted, as a log-only verifier (TRL logs rewards/<function>):
    it reads the scores the weighted call just computed for the same rows, so nothing is called twice."""

    def __init__(self, functions: reward_functions.RewardFunctions, i: int):
        self.functions, self.i, self.name = functions, i, functions.specs[i]

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        reward.check_lengths(questions, references, responses)
        return score_judgement(self.functions.part(self.i, questions, references, responses))


def score_judgement(s: Tensor) -> Judgement:
    """A reward function's scores as a Judgement: soft = p_yes = the score, binary = score >= 0.5, all judged."""
    return Judgement(binary=(s >= 0.5).float(), soft=s, p_yes=s.clone(), judged=torch.ones(len(s), dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# a user's judge written in Python: py:module.path:function


class PyVerifier:
    """"py:module.path:function" (or py:path/to/file.py:function) whose parameters are exactly
    (questions, references, responses) -> one score in [0, 1] per
    response (0/1 judgements or probabilities), e.g. py:worlds.freeform:teacher, a demo world's judge that
    knows its equivalences. binary = score >= 0.5; soft and p_yes = the score; every response counts as
    judged. The module is imported from the working directory or sys.path; the function is checked on
    one row when built, and its answer on every call: a missing module or function, a wrong length or
    a value outside [0, 1] is one line naming the spec; so is an exception it raises, or no answer within
    `timeout` seconds (--verifier_timeout, as for an HTTP judge: a judge that hangs stops the run, it is
    not waited for)."""

    def __init__(self, spec: str, timeout: float = 60.0):  # check_spec builds one without flags: the flag's default
        self.name, self.timeout = spec, timeout
        self.fn = reward_functions.load_function(spec)  # a module or a file (py:path/to/file.py:fn)
        if reward_functions.convention(self.fn, spec) != "project":
            raise ValueError(f"verifier {spec!r} is a TRL reward function: build it with build_verifier")
        self.scores(["What is 1 + 1?"], ["2"], ["2"])  # checked once here, on one row, before any run starts

    def _answer(self, questions: list[str], references: list[str], responses: list[str]):
        """The function's answer, within self.timeout seconds. It runs in a daemon thread: Python cannot
        interrupt a function, only stop waiting for it (and the process exits without it)."""
        box = {}

        def call():
            try:
                box["answer"] = self.fn(list(questions), list(references), list(responses))
            except BaseException as e:  # anything it raises is the judge's failure, named in one line
                box["error"] = e
        thread = threading.Thread(target=call, name=f"judge {self.name}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise VerifierError(f"verifier {self.name!r}: no answer within {self.timeout:g}s for {len(responses)} "
                                "responses (--verifier_timeout); is it stuck?")
        if "error" in box:
            e = box["error"]
            raise VerifierError(f"verifier {self.name!r} raised {type(e).__name__}: {str(e)[:300]}") from e
        return box["answer"]

    def scores(self, questions: list[str], references: list[str], responses: list[str]) -> Tensor:
        answer = self._answer(questions, references, responses)
        try:
            out = torch.as_tensor(answer, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise VerifierError(f"verifier {self.name!r}: its answer is not a list of numbers: {e}") from e
        if out.shape != (len(responses),):
            raise VerifierError(f"verifier {self.name!r}: returned shape {tuple(out.shape)} for {len(responses)} "
                                "responses; expected one score per response")
        if not bool(((out >= 0) & (out <= 1)).all()):  # NaN fails too
            raise VerifierError(f"verifier {self.name!r}: returned {out[~((out >= 0) & (out <= 1))][0].item()}; "
                                "scores must be in [0, 1]")
        return out

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        reward.check_lengths(questions, references, responses)
        s = self.scores(questions, references, responses)
        return Judgement(binary=(s >= 0.5).float(), soft=s, p_yes=s.clone(), judged=torch.ones(len(s), dtype=torch.bool))
