"""Rewards without a verifier: the policy's own probability of the reference answer after its reasoning.

    train_rl.py --verifier policy:rlpr       # RLPR: mean token probability of the reference, debiased
    train_rl.py --verifier policy:verifree   # VeriFree: the reference's likelihood

Both read a response as (reasoning, final answer) (split_answer), replace the final answer with the
reference y*, and score the reference's tokens under the current policy pi_theta:

  RLPR (Yu et al. 2025, "RLPR: Extrapolating RLVR to General Domains without Verifiers", arXiv 2506.18254,
  Eq. for f_seq and the debiased reward): r = (1/|y*|) sum_i pi_theta(y*_i | x, z, y*_<i), the mean token
  PROBABILITY (not log-probability); debiased r_hat = clip(r - r_base, 0, 1), where r_base is the same
  score of the reference right after the prompt, no reasoning: r_base = (1/|y*|) sum_i pi(y*_i | x, y*_<i).
  In both the reference follows whitespace, one space if none, as their code writes prompt + ' ' + reference
  (continuation_ids, rlpr=True).
  Their code (github.com/OpenBMB/RLPR at 8490fca326c625a1697a09ac1a1476a4f6f76325):
  verl/workers/reward_manager/prob.py compute_scoreB ('mean_exp_log_softmax': torch.mean(torch.exp(logp)))
  and the shaping 'threshold_0' (0 below 0) of examples/RLPR/reproduce_qwen.sh; r_base ("scoreA") is
  computed ONCE, before any update, for every training prompt (verl/trainer/ppo/ray_trainer.py
  compute_promptgt2scoreA(0), get_scoreA: prompt + ' ' + reference). Here too: for every training record
  when the reward is built (before any update and before a resume loads a checkpoint), and for any other
  question the first time it is scored.
  Standard-deviation filter (same file, ray_trainer.py fit(): filter_mode=EMA, filter_target=
  final_reward_std): a prompt group is kept when the (Bessel) std of its rewards is >= beta x an
  exponential moving average (ratio 0.99) of the batches' mean group std: std_filter_keep, StdFilter.

  VeriFree (Zhou et al. 2025, "Reinforcing General Reasoning without Verifiers", arXiv 2505.21493):
  R = pi_theta(y* | x, z) = exp(sum_i log pi_theta(y*_i | x, z, y*_<i)), the reference's likelihood.
  Their code (github.com/sail-sg/VeriFree at 718b3636161b03e02acc4f511ca5ea3c209e600e), verifree.py:
  logp_reward = logps[answer span].sum(), then --reward_source p: torch.exp; the reasoning is tokenised
  apart from the reference (think ids + answer ids), as here. Their second gradient term (a supervised
  term on y* weighted by R) is not part of a reward and is left out.

Where the answer is (--verifier_free_answer): last_line (ours) reads the response as above, so this repo's
untagged answers get a reward; tags is each reference's own R1 answer-tag format, under which an untagged
response earns 0 (a one-line warning at the first batch where no response has the tags); auto (the default)
takes tags where the training prompts ask for the tags, as the references' do, else last_line (answer_format):
  RLPR (ray_trainer.py replace_answer_with_gt_batch, format_mode R1 of reproduce_qwen.sh): a response with
  exactly one <think>, </think> and <answer>, in that order, has its <answer> section replaced by the
  reference after the section's leading whitespace (' ' when none); any other response scores 0
  (rlpr_answer_context). Its reward is their prob.py: 0.9 x clip(r - r_base, 0, 1) + 0.1 x format_reward,
  r rounded to bfloat16 from its float32 mean (compute_scoreB; r_base is not rounded).
  VeriFree (verifree.py lines 173-190, 371-382): the response cut at its first "<answer", then the summed
  log-probs of "> \\boxed{REFERENCE} </answer>", all its tokens; R = 0 without "<answer", for a response cut
  at the generation limit, or when the cut response and that answer exceed the limit (verifree_answer).
--rlpr_repetition_penalty: RLPR's detect_repetition_with_hash (verl/utils/reward_score/repetition.py): -1
added to a non-zero reward when a window of 10 words occurs 10 times; the std filter reads the sum, as theirs.

binary (Eq. 3's slot, --reward_type binary) is score >= 0.5, as for py: judges.
z-score normalisation is the loop's, as for every reward (rl_math.shape_advantages).
"""
from __future__ import annotations

import math
import re
import sys
from collections import Counter

import torch
from torch import Tensor

import data
import reward
from rlvr import distributed, rules, verifier_prompt, verifier_spec

KINDS = verifier_spec.POLICY_SOURCES
_LINE_END = re.compile(r"\r\n|\r|\n")


# ----------------------------------------------------------------------------------------------
# a response as reasoning, then its final answer


def split_answer(response: str) -> tuple[str, str]:
    """(reasoning, final answer): the final answer is what rules.final_answer reads (the last non-empty
    line, a leading "Therefore, the answer is" removed); the reasoning is everything before it, the
    answer prefix included ("...\\nTherefore, the answer is "), so the reference takes the answer's place
    and nothing else changes. A one-line response ("Birch Ltd", the free-form world's) has no reasoning:
    ("", "Birch Ltd"). The answer's trailing whitespace is dropped."""
    starts = [0] + [m.end() for m in _LINE_END.finditer(response)]
    for start in reversed(starts):
        end = _LINE_END.search(response, start)
        line = response[start:end.start() if end else len(response)]
        if line.strip():
            text = line.lstrip()
            prefix = rules._ANSWER_PREFIX.match(text)
            at = start + len(line) - len(text) + (prefix.end() if prefix else 0)
            return response[:at], response[at:start + len(line)].rstrip()
    return response, ""


def continuation_ids(tokenizer, reasoning: str, reference: str, rlpr: bool = False,
                     whitespace: str = " \t") -> tuple[list[int], list[int]]:
    """(reasoning ids, reference ids), each tokenised on its own (as VeriFree does), so the reference's
    tokens are the same whatever precedes them. Spaces that end the reasoning ("the answer is ") go with
    the reference (" 7 kg"). rlpr=True, RLPR's rule (OpenBMB/RLPR@8490fca ray_trainer.py: get_scoreA's
    prompt + ' ' + reference, replace_answer_with_gt_batch's leading whitespace, ' ' when there is none,
    and locate_substring_tokens: the scored tokens are those that overlap the reference's characters):
    the reference always follows whitespace, one space when the reasoning ends without it, and leading
    tokens that are that whitespace alone stay with the reasoning, unscored (" 7 kg" -> " " | "7 kg";
    " Birch" -> "| Birch": its first token holds the space and a letter, so it is scored). `whitespace`: the
    characters that count as the reasoning's trailing whitespace (RLPR's <answer> section: line breaks too)."""
    head = reasoning.rstrip(whitespace)
    space = reasoning[len(head):] or (" " if rlpr else "")
    enc = lambda s: tokenizer.encode(verifier_prompt.encodable(s), add_special_tokens=False) if s else []  # noqa: E731
    ids, lead = enc(space + reference), enc(space)
    k = len(lead) if rlpr and lead and ids[:len(lead)] == lead else 0
    return enc(head) + ids[:k], ids[k:]


# ----------------------------------------------------------------------------------------------
# the references' answer-tag format (--verifier_free_answer tags): R1's <think>...</think><answer>...</answer>

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
FORMAT_COEFFICIENT = 0.1  # RLPR's reward_model.format_coefficient (main_ppo.py's default)
_R1_ANSWER = re.compile(r"^.*<think>.*</think>.*<answer>.*$", re.DOTALL)  # their valid_flag pattern
_R1_FORMAT = re.compile(r"<think>.*</think>.*<answer>.*</answer>.*", re.DOTALL)  # their format_reward pattern


def answer_format(flag: str, records: list, name: str) -> str:
    """--verifier_free_answer auto: the references' tags format where the training prompts ask for the answer
    tags (a prompt holds "<answer>", as the references' R1 prompts do), else last_line, under which an
    untagged policy's answers still earn a reward (under tags every one would earn 0). Said on one line."""
    if flag != "auto":
        return flag
    asks = sum(any(ANSWER in m.get("content", "") for m in r.messages) for r in records)
    chosen = "tags" if asks else "last_line"
    if distributed.rank() == 0:
        print(f"[{name}] --verifier_free_answer auto: {chosen} ({asks} of {len(records)} training prompts ask for "
              f"{ANSWER} tags); --verifier_free_answer tags|last_line sets it", flush=True)
    return chosen


def rlpr_answer_context(response: str) -> str | None:
    """RLPR's replace_answer_with_gt_batch (R1): the text the reference follows, the response up to its
    <answer> and that section's leading whitespace (' ' when none); None for a response without exactly
    one <think>, </think> and <answer> in that order (their valid_flag False: no scored token, r = 0)."""
    if not (all(response.count(t) == 1 for t in (THINK, END_THINK, ANSWER)) and _R1_ANSWER.fullmatch(response)):
        return None
    head, section = response.split(ANSWER)
    lead = section[:len(section) - len(section.lstrip(" \n\t\r"))]
    return head + ANSWER + (lead or " ")


def format_reward(response: str) -> float:
    """RLPR's format_reward (prob.py, R1): 1 when each of the four tags occurs once and the response is
    <think>...</think>...<answer>...</answer>... from its first character, else 0."""
    ok = all(response.count(t) == 1 for t in (THINK, END_THINK, ANSWER, END_ANSWER)) and _R1_FORMAT.fullmatch(response)
    return 1.0 if ok else 0.0


def verifree_answer(response: str, reference: str) -> tuple[str, str] | None:
    """VeriFree's (think text, answer text): the response cut at its first "<answer" with that "<answer"
    kept, and "> \\boxed{REFERENCE} </answer>" (their Jinja template's rendering); None without "<answer"."""
    at = response.find("<answer")
    return None if at < 0 else (response[:at] + "<answer", "> \\boxed{" + reference + "} </answer>")


def detect_repetition_with_hash(text: str, window_size: int = 10, max_repetitions_limit: int = 10) -> int:
    """RLPR's repetition penalty: -1 when a window of `window_size` words (split at whitespace, then at
    underscores) occurs `max_repetitions_limit` times (10: their reward_model default), else 0."""
    words = [w for segment in text.split() for w in segment.split("_")]
    counts = Counter(tuple(words[i:i + window_size]) for i in range(len(words) - window_size + 1))
    return -1 if len(words) > window_size and max(counts.values()) >= max_repetitions_limit else 0


# ----------------------------------------------------------------------------------------------
# the formulas, on each reference's token log-probs


def segments(flat: Tensor, lengths: list[int]) -> list[Tensor]:
    """Flat per-token values cut into one tensor per sequence."""
    if sum(lengths) != flat.numel():
        raise ValueError(f"segments: {flat.numel()} values for lengths summing to {sum(lengths)}")
    return list(torch.split(flat, lengths))


def rlpr_score(logp: list[Tensor], bf16: bool = False) -> Tensor:
    """RLPR's f_seq: the mean over the reference's tokens of exp(log-prob), per sequence; 0 for an empty
    reference (their compute_scoreB: ground_truth_mask.sum() == 0 -> 0). float64; bf16: as their
    compute_scoreB, the mean in float32 rounded to bfloat16."""
    if bf16:
        return torch.tensor([torch.tensor(lp.float().exp().mean().item(), dtype=torch.bfloat16).item()
                             if lp.numel() else 0.0 for lp in logp], dtype=torch.float64)
    return torch.tensor([lp.double().exp().mean().item() if lp.numel() else 0.0 for lp in logp], dtype=torch.float64)


def verifree_score(logp: list[Tensor]) -> Tensor:
    """VeriFree's R: exp of the sum of the reference's token log-probs, per sequence; 0 for an empty
    reference (their logp_reward = -inf). float64."""
    return torch.tensor([lp.double().sum().exp().item() if lp.numel() else 0.0 for lp in logp], dtype=torch.float64)


def rlpr_debias(score: Tensor, base: Tensor) -> Tensor:
    """RLPR's debiased reward clip(r - r_base, 0, 1)."""
    return (score - base).clamp(0.0, 1.0)


def group_stds(rewards: Tensor, group_size: int) -> Tensor:
    """The sample (Bessel) std of each prompt group's rewards (rows in groups of `group_size`), as RLPR's
    verl computes final_reward_stds (torch.std)."""
    return rewards.double().view(-1, group_size).std(dim=1, unbiased=True)


def std_filter_keep(stds: Tensor, threshold: float) -> Tensor:
    """RLPR's filter: keep the groups whose reward std is >= threshold (acc_tensor >= accuracy_lower_bound)."""
    return stds >= threshold


class StdFilter:
    """RLPR's adaptive threshold (--std_filter_beta with --filter_groups): a step keeps the prompt groups
    whose reward std is >= beta x an exponential moving average of the steps' mean group std (ema <-
    ratio * ema + (1 - ratio) * mean, started at the first step's mean; ratio 0.99 as their recipes). The
    threshold is fixed during a step (every refill round uses it) and moves at its end (end_step), with
    the std of every group the step judged, as their score_std_list; the first step drops nothing
    (their filter_start_step / filter_ema_start_step delays are left out). NaN/inf stds are skipped, as theirs."""

    def __init__(self, beta: float, ratio: float = 0.99):
        self.beta, self.ratio, self.ema, self.seen = beta, ratio, None, []

    @property
    def threshold(self) -> float:
        return 0.0 if self.ema is None else self.beta * self.ema

    def keep(self, groups: Tensor) -> Tensor:
        """The keep mask of [groups, samples] rewards; their stds count toward this step's mean."""
        stds = group_stds(groups.flatten(), groups.shape[1])
        self.seen.append(stds)
        return std_filter_keep(stds, self.threshold)

    def end_step(self) -> None:
        stds = torch.cat(self.seen) if self.seen else torch.zeros(0)
        self.seen = []
        finite = stds[torch.isfinite(stds)]
        if finite.numel():
            mean = finite.mean().item()
            self.ema = mean if self.ema is None else self.ratio * self.ema + (1 - self.ratio) * mean

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"]


# ----------------------------------------------------------------------------------------------
# the reward source


class PolicyReward:
    """policy:rlpr | policy:verifree, a reward source of the Verifier shape: (questions, references,
    responses) -> Judgement, scored by the policy being trained. `logprobs(prompts, continuations)` ->
    the flat log-probs of each continuation's tokens after its prompt (train_rl.forward_logprobs on the
    policy: the one log-prob path). Prompts are the records' own (system prompt and chat template, as
    rollout renders them); a question outside `records` is asked as one user message.
    Called under no_grad (not inference_mode: an FSDP2-sharded policy cannot all-gather there). A policy
    sharded over several ranks runs collectives in every forward: `sharded` tells rollout._thread_safe to
    judge in the main thread, and every call runs as many forwards on every rank.
    `answer` (--verifier_free_answer): last_line or tags; `repetition_penalty` (--rlpr_repetition_penalty);
    `max_new_tokens`: the generation limit VeriFree's tags format checks."""

    def __init__(self, kind: str, logprobs, tokenizer, records: list, max_prompt_len: int, batch_size: int,
                 sharded: bool = False, answer: str = "last_line", repetition_penalty: bool = False,
                 max_new_tokens: int = 2 ** 62):
        if kind not in KINDS:
            raise ValueError(f"unknown reward source 'policy:{kind}'; valid: {', '.join('policy:' + k for k in KINDS)}")
        self.kind, self.name, self.logprobs, self.tokenizer = kind, f"policy:{kind}", logprobs, tokenizer
        self.max_prompt_len, self.batch_size, self.sharded = max_prompt_len, batch_size, sharded
        self.answer = answer_format(answer, records, self.name)
        self.repetition_penalty, self.max_new_tokens = repetition_penalty, max_new_tokens
        self.warned = False  # the tags format's warning is said once
        self.records = {r.question: r for r in records}
        self.base: dict[tuple[str, str], float] = {}  # RLPR's r_base per (question, reference)
        if kind == "rlpr":
            self.base_scores([r.question for r in records], [r.reference for r in records])

    def prompt_ids(self, questions: list[str]) -> list[list[int]]:
        recs = [self.records.get(q) or data.make_record(q, "", [{"role": "user", "content": q}], {}) for q in questions]
        return data.tokenize_prompts(self.tokenizer, recs, self.max_prompt_len)

    @torch.no_grad()
    def reference_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> Tensor:
        """Flat log-probs of every continuation's tokens, in batches of batch_size; a sharded policy on
        several ranks runs as many forwards on each (a dummy one-token row where a rank has none left)."""
        rows = [i for i, c in enumerate(continuations) if c]  # an empty reference scores 0: nothing to run
        calls = math.ceil(len(rows) / self.batch_size)
        if self.sharded and distributed.world_size() > 1:
            calls = int(distributed.all_max(torch.tensor([calls]))[0])
        out = []
        for b in range(calls):
            idx = rows[b * self.batch_size:(b + 1) * self.batch_size]
            if idx:
                out.append(self.logprobs([prompts[i] for i in idx], [continuations[i] for i in idx]).float().cpu())
            else:
                self.logprobs([[0]], [[0]])  # keeps the ranks' collectives in step
        return torch.cat(out) if out else torch.zeros(0)

    def scores(self, prompts: list[list[int]], references: list[list[int]], bf16: bool = False) -> Tensor:
        """The kind's score of each reference's tokens after its prompt (RLPR's rounded to bfloat16: bf16)."""
        logp = segments(self.reference_logprobs(prompts, references), [len(r) for r in references])
        return rlpr_score(logp, bf16) if self.kind == "rlpr" else verifree_score(logp)

    def answer_ids(self, response: str, reference: str, cut: bool) -> tuple[list[int], list[int]] | None:
        """(the ids between the prompt and the reference, the reference's scored ids) for the answer format;
        None where the format gives the response no reward (tags: no answer tags; VeriFree: cut at the
        generation limit, or its think and answer ids longer than it)."""
        if self.answer == "last_line":
            return continuation_ids(self.tokenizer, split_answer(response)[0], reference, rlpr=self.kind == "rlpr")
        if self.kind == "rlpr":
            context = rlpr_answer_context(response)
            return None if context is None else continuation_ids(self.tokenizer, context, reference, rlpr=True,
                                                                 whitespace=" \t\r\n")
        texts = verifree_answer(response, reference)
        if texts is None or cut:
            return None
        think, answer = (self.tokenizer.encode(verifier_prompt.encodable(t), add_special_tokens=False) for t in texts)
        return None if len(think) + len(answer) > self.max_new_tokens else (think, answer)

    def base_scores(self, questions: list[str], references: list[str]) -> Tensor:
        """RLPR's r_base of each (question, reference): cached; the missing ones scored now, in one pass."""
        missing = list(dict.fromkeys(k for k in zip(questions, references) if k not in self.base))
        if self.sharded and distributed.world_size() > 1:  # every rank scores the union: equal forward counts
            missing = list(dict.fromkeys(k for part in distributed.gather_objects(missing) for k in part))
        if missing:
            prompts, refs = [], []
            for p, (_, r) in zip(self.prompt_ids([q for q, _ in missing]), missing):
                head, ref_ids = continuation_ids(self.tokenizer, "", r, rlpr=True)
                prompts.append(p + head)
                refs.append(ref_ids)
            self.base.update(zip(missing, self.scores(prompts, refs).tolist()))
        return torch.tensor([self.base[k] for k in zip(questions, references)], dtype=torch.float64)

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None, truncated: list[bool] | None = None) -> reward.Judgement:
        """The rewards; `truncated`: which responses the generation limit cut (the rollout's; VeriFree's
        tags format gives them 0). A call with it is a training batch: the tags format's warning reads it."""
        reward.check_lengths(questions, references, responses)
        cut = truncated if truncated is not None else [False] * len(responses)
        rows, prompts, refs = [], [], []
        for i, (p, ref, resp) in enumerate(zip(self.prompt_ids(questions), references, responses)):
            ids = self.answer_ids(resp, ref, cut[i])
            if ids is not None:  # prompt + reasoning, then the reference in the answer's place
                rows.append(i)
                prompts.append(p + ids[0])
                refs.append(ids[1])
        if self.answer == "tags" and not rows and truncated is not None and not self.warned:
            self.warned = True
            print(f"[{self.name}] --verifier_free_answer tags: no response of this batch of {len(responses)} has "
                  f"the answer tags ({'<think>, </think>, <answer>' if self.kind == 'rlpr' else '<answer'}); every "
                  "reward is 0 (--verifier_free_answer last_line reads the last line)", file=sys.stderr, flush=True)
        score = torch.zeros(len(responses), dtype=torch.float64)
        score[rows] = self.scores(prompts, refs, bf16=self.answer == "tags")
        if self.kind == "rlpr":
            score[rows] = rlpr_debias(score[rows], self.base_scores([questions[i] for i in rows],
                                                                   [references[i] for i in rows]))
            if self.answer == "tags":  # their prob.py: (1 - c) x the debiased score + c x the format reward
                fmt = torch.tensor([format_reward(responses[i]) for i in rows], dtype=torch.float64)
                score[rows] = (1 - FORMAT_COEFFICIENT) * score[rows] + FORMAT_COEFFICIENT * fmt
        s = score.clamp(0.0, 1.0)
        if self.repetition_penalty:  # added to a non-zero reward only (their reward_tensor.nonzero())
            penalty = torch.tensor([float(detect_repetition_with_hash(r)) for r in responses], dtype=torch.float64)
            s += penalty * (s != 0)
        s = s.float()
        return reward.Judgement(binary=(s >= 0.5).float(), soft=s, p_yes=s.clone(),
                                judged=torch.ones(len(s), dtype=torch.bool))
