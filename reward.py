"""From a verifier's judgement to the reward the loop uses: the paper's Eq. 3 (binary) and Eq. 4 (soft)
from the verifier's first output token c, the renormalised soft reward a family asks for, and a pointer
to the z-score every estimator applies (rl_math.normalize_rewards). docs/method.md has the method as
this repo implements it.

Every verifier (rlvr/verifiers.py: a model here or behind a server, a Python judge, hybrid routing;
rlvr/rules.py: the rule baselines; rlvr/verifier_free.py: the policy's own probability of the
reference) maps (questions, references, responses) to a Judgement, one entry per response:
    judgement.binary   Eq. 3: 1 if c is the positive token (YES)
    judgement.soft     Eq. 4: p(YES) if c = YES, 1 - p(NO) if c = NO, 0 otherwise (or renormalised)
The loop then z-scores the chosen one over the batch or the prompt's group (rl_math.normalize_rewards,
rl_math.znorm) before the estimator turns it into advantages. Imports rl_math only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from rlvr.rl_math import normalize_rewards, znorm  # noqa: F401 (the z-score of the rewards lives with the estimators)

# ----------------------------------------------------------------------------------------------
# the judgement: Eq. 3 and Eq. 4 from one first token c

SoftMode = Literal["eq4", "renorm", "ratio"]
SoftModeFlag = Literal["auto", "eq4", "renorm", "ratio"]  # --soft_mode: auto is the family's own Eq. 4


@dataclass
class Judgement:
    """One entry per response, on the CPU."""
    binary: Tensor  # Eq. 3, {0, 1} float32
    soft: Tensor    # Eq. 4 (or the renormalised variant), [0, 1] float32
    p_yes: Tensor   # probability of the positive token(s), for logging and distillation, float32
    judged: Tensor  # bool: the first token c was the positive or the negative token (rules: all True)
    invalid: Tensor | None = None  # bool: c was the family's "invalid" judgement (compass C); default all False
    verifier_tokens: Tensor | None = None  # float32: tokens the verifier generated (cot's cost); default all 0
    cut: Tensor | None = None      # bool: the answer was longer than the verifier's positions, cut to its end
    routed: Tensor | None = None   # bool: hybrid routing sent the row to rule:math (rules.routes_to_math)

    def __post_init__(self):
        if self.invalid is None:
            self.invalid = torch.zeros(len(self.binary), dtype=torch.bool)
        if self.verifier_tokens is None:
            self.verifier_tokens = torch.zeros(len(self.binary))
        if self.cut is None:
            self.cut = torch.zeros(len(self.binary), dtype=torch.bool)
        if self.routed is None:
            self.routed = torch.zeros(len(self.binary), dtype=torch.bool)

    def select(self, idx: list[int]) -> "Judgement":
        """The entries of responses `idx`, in that order."""
        return Judgement(self.binary[idx], self.soft[idx], self.p_yes[idx], self.judged[idx], self.invalid[idx],
                         self.verifier_tokens[idx], self.cut[idx], self.routed[idx])


class Verifier(Protocol):
    name: str

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement: ...
    # seeds: one per response; used only by a verifier that samples c (Eq. 3 as the paper writes it)


INVALID = 2  # token_class of a family's third judgement (compass "C"): judged, never rewarded


def family_soft_mode(flag: SoftModeFlag, renormalises: bool, family: str = "") -> SoftMode:
    """The soft reward a verifier family gives: --soft_mode auto is the family's own Eq. 4 (eq4 for the
    paper's RM-7B, renorm for a family whose Eq. 4 is renormalised over its judgements, CompassVerifier's
    A / B / C); a flag that contradicts a renormalising family is refused, never silently overridden."""
    if renormalises:
        if flag == "eq4":
            raise ValueError(f"--soft_mode eq4: the {family} family's soft reward is p(positive) renormalised over its "
                             "judgements (its Eq. 4); use --soft_mode auto or renorm")
        return "ratio" if flag == "ratio" else "renorm"
    return "eq4" if flag == "auto" else flag


def judgement_rewards(p_yes: Tensor, p_no: Tensor, c_class: Tensor, soft_mode: SoftMode = "eq4",
                      p_invalid: Tensor | None = None) -> Judgement:
    """Rewards from the judgement-token probabilities and the class of the first output token c
    (+1 positive, -1 negative, INVALID a family's invalid judgement, 0 anything else), greedy or
    sampled: both equations read the same c.
    Eq. 3: binary = 1 if c is positive. Eq. 4: p(YES) if c = YES, 1 - p(NO) if c = NO, 0 otherwise.
    soft_mode="renorm": p(YES) / (p(YES) + p(NO) [+ p(invalid)]) when c is one of the family's judgements,
    0 when c is none of them (unjudged, as in Eq. 4) or all are 0. soft_mode="ratio": the same ratio
    whatever c is: the judge's preference between its answers, defined for a model that does not answer
    in the format (a base or random model judging; the tests' self-judging random policy)."""
    p_yes, p_no, c = p_yes.double().cpu(), p_no.double().cpu(), c_class.cpu()
    zero = torch.zeros_like(p_yes)
    if soft_mode == "eq4":
        soft = torch.where(c == 1, p_yes, torch.where(c == -1, 1.0 - p_no, zero))
    elif soft_mode in ("renorm", "ratio"):
        den = p_yes + p_no + (zero if p_invalid is None else p_invalid.double().cpu())
        ok = den > 0 if soft_mode == "ratio" else (den > 0) & (c != 0)  # renorm: an unjudged c earns 0
        soft = torch.where(ok, p_yes / den.clamp_min(torch.finfo(torch.float64).tiny), zero)
    else:
        raise ValueError(f"soft_mode={soft_mode!r}: expected eq4, renorm or ratio")
    return Judgement(binary=(c == 1).float(), soft=soft.clamp(0.0, 1.0).float(), p_yes=p_yes.float(), judged=c != 0,
                     invalid=c == INVALID)


def rewards_from_logits(logits: Tensor, positive_ids: list[int], negative_ids: list[int],
                        soft_mode: SoftMode = "eq4", seeds: list[int] | None = None,
                        invalid_ids: list[int] = ()) -> Judgement:
    """Eq. 3 and Eq. 4 from the [B, vocab] logits of the first output position. Probabilities are a
    softmax over the whole vocabulary; the ids of each side are summed (one id each unless spelling
    variants are summed). c is the argmax, or with `seeds` a sample (first_token). `invalid_ids`: a
    family's third judgement (compass "C"), counted in Judgement.invalid and in renorm's denominator."""
    probs = logits.double().softmax(-1).cpu()
    p_yes, p_no = probs[:, positive_ids].sum(-1), probs[:, negative_ids].sum(-1)
    c = token_class(first_token(probs, seeds), positive_ids, negative_ids, invalid_ids)
    return judgement_rewards(p_yes, p_no, c, soft_mode, probs[:, list(invalid_ids)].sum(-1) if invalid_ids else None)


def first_token(probs: Tensor, seeds: list[int] | None = None) -> Tensor:
    """The first output token per row of [B, vocab] probabilities: the argmax, or one drawn from the
    row by inverting its CDF at a uniform that depends on that row's seed alone, so a seed gives the
    same token whatever the batch, its order or the rank."""
    if seeds is None:
        return probs.argmax(-1)
    if len(seeds) != len(probs):
        raise ValueError(f"first_token: {len(seeds)} seeds for {len(probs)} rows")
    cdf = probs.double().cumsum(-1)
    u = torch.tensor([_uniform(s) for s in seeds], dtype=torch.float64)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def token_class(tokens: Tensor, positive_ids: list[int], negative_ids: list[int],
                invalid_ids: list[int] = ()) -> Tensor:
    """+1 for a positive token, -1 for a negative one, INVALID for a family's invalid one, 0 for anything else."""
    c = torch.isin(tokens, torch.tensor(positive_ids)).long() - torch.isin(tokens, torch.tensor(negative_ids)).long()
    return c + INVALID * torch.isin(tokens, torch.tensor(list(invalid_ids), dtype=torch.long)).long()


def stable_hash(*parts) -> int:
    """64 bits of a counter-based hash: the same parts give the same number in any process."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _uniform(seed: int) -> float:
    return stable_hash("c", seed) / 2.0 ** 64  # in [0, 1)


def check_lengths(questions, references, responses):
    """Every verifier's first check: one question and one reference per response."""
    if not (len(questions) == len(references) == len(responses)):
        raise ValueError(f"verifier: got {len(questions)} questions, {len(references)} references and "
                         f"{len(responses)} responses; they must be equally long")
