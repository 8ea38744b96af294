"""How an answer is judged: the verifier's prompt, the paper's Eq. 3 (binary) and Eq. 4 (soft) rewards,
the settings a verifier is asked with, local / remote / rule verifiers, and which references a math rule
can grade. How far to trust a verifier (agreement figures, calibration, the master-key probe, the live
audit) is audit.py's.

Every verifier maps (questions, references, responses) to a Judgement, one entry per response:
    build_verifier("rule:substring" | "rule:exact" | "rule:jaccard" | "rule:math" | "path/or/hub-name" |
                   "http://host:8000" | "py:module:function", VerifierOptions(...))
A model verifier is asked and read in a family's format (verifier_families.py: the paper's YES/NO by
default, CompassVerifier's A/B/C, xVerify's Correct/Incorrect, a chain-of-thought verifier that generates).
The transport (HTTP to vLLM, math-verify worker processes) is remote.py's. Imports model, remote, config,
verifier_families.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Protocol

import torch
from torch import Tensor

import config
import model
import verifier_families
from remote import TRAILING_PUNCT, CompletionsClient, MathPool, VerifierError  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------------------------
# the verifier's input

# The paper's template (METHOD.md; the released RM-7B was trained on exactly this text). Every
# non-empty line but "---" ends in two spaces (markdown line breaks); the text ends with the newline
# after "**Output:**  ". Built from its lines so the trailing spaces cannot be lost by an editor.
_TEMPLATE_LINES = (
    "Given a problem, determine whether the final answer in the provided (incomplete) solution process matches "
    "the reference answer.",
    "The reference answer may be one single option character (e.g., A, B, C, D), a numerical value, an "
    "expression, or a list of answers if multiple questions are involved.",
    "**The reference answer may be in Chinese or another language, but your evaluation should be "
    "language-agnostic.**",
    "", "Your task:",
    "- Compare the final output of the solution process with the reference answer.",
    "- If they **match exactly**, output **YES**.",
    "- If they **do not match**, output **NO**.",
    "- If the solution process is unclear, incomplete, or ambiguous, assume it is incorrect and output **NO**.",
    "", "Your output must be strictly **'YES'** or **'NO'**, with no additional words, punctuation, or explanation.",
    "", "---", "",
    "**Question:**", "{question}", "",
    "**Solution Process (Final Step Only):**", "{response}", "",
    "**Reference Answer:**", "{reference}", "",
    "**Output:**",
)
TEMPLATE = "".join(line + ("\n" if line in ("", "---") else "  \n") for line in _TEMPLATE_LINES)
SYSTEM_PROMPT = "You are a helpful assistant."  # what the authors' scripts send; "" sends none
_FIELDS = re.compile(r"\{(question|reference|response)\}")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_think(text: str) -> str:
    """The response without its reasoning: closed <think>...</think> blocks are removed, and text up to
    a lone </think> (the chat template opened the block) too. An unclosed <think> means the answer
    never came: "" (the verifier then sees an empty answer, not a line of the reasoning)."""
    text = _THINK_BLOCK.sub("", text)
    text = text.rsplit("</think>", 1)[-1]
    return "" if "<think>" in text else text


def last_line(text: str) -> str:
    """The last line with any non-whitespace character, stripped ("" if there is none).
    Handles \\n, \\r\\n and lone \\r line ends, trailing blank lines and text with no newline."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def answer_text(response: str, full_response: bool = False, think: bool = True) -> str:
    """What a verifier reads of a response: <think> blocks dropped (think=True), then the last line
    (the paper: the final step only) or the whole response."""
    text = strip_think(response) if think else response
    return text.strip() if full_response else last_line(text)


def _middle(tokenizer, ids: list[int], n: int) -> str:
    """The text of `ids` in at most about n tokens: its start and its end, joined by ' … '."""
    n = max(n - 4, 0)  # the marker's tokens
    return tokenizer.decode(ids[:n // 2]) + " … " + tokenizer.decode(ids[len(ids) - (n - n // 2):] if n else [])


def fill_template(template: str, question: str, reference: str, response: str) -> str:
    """One pass over the template, so braces or "{response}" inside a question stay literal."""
    values = {"question": question, "reference": reference, "response": response}
    return _FIELDS.sub(lambda m: values[m.group(1)], template)


# ----------------------------------------------------------------------------------------------
# the judgement: Eq. 3 and Eq. 4 from one first token c

SoftMode = Literal["eq4", "renorm"]


@dataclass
class Judgement:
    """One entry per response, on the CPU."""
    binary: Tensor  # Eq. 3, {0, 1} float32
    soft: Tensor    # Eq. 4 (or the renormalised variant), [0, 1] float32
    p_yes: Tensor   # probability of the positive token(s), for logging and distillation, float32
    judged: Tensor  # bool: the first token c was the positive or the negative token (rules: all True)
    invalid: Tensor | None = None  # bool: c was the family's "invalid" judgement (compass C); default all False
    tokens: Tensor | None = None   # float32: tokens the verifier generated (cot's cost); default all 0
    cut: Tensor | None = None      # bool: the answer was longer than the verifier's positions, cut to its end

    def __post_init__(self):
        if self.invalid is None:
            self.invalid = torch.zeros(len(self.binary), dtype=torch.bool)
        if self.tokens is None:
            self.tokens = torch.zeros(len(self.binary))
        if self.cut is None:
            self.cut = torch.zeros(len(self.binary), dtype=torch.bool)

    def select(self, idx: list[int]) -> "Judgement":
        """The entries of responses `idx`, in that order."""
        return Judgement(self.binary[idx], self.soft[idx], self.p_yes[idx], self.judged[idx], self.invalid[idx],
                         self.tokens[idx], self.cut[idx])


class Verifier(Protocol):
    name: str

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement: ...
    # seeds: one per response; used only by a verifier that samples c (Eq. 3 as the paper writes it)


INVALID = 2  # token_class of a family's third judgement (compass "C"): judged, never rewarded


def judgement_rewards(p_yes: Tensor, p_no: Tensor, c_class: Tensor, soft_mode: SoftMode = "eq4",
                      p_invalid: Tensor | None = None) -> Judgement:
    """Rewards from the judgement-token probabilities and the class of the first output token c
    (+1 positive, -1 negative, INVALID a family's invalid judgement, 0 anything else), greedy or
    sampled: both equations read the same c.
    Eq. 3: binary = 1 if c is positive. Eq. 4: p(YES) if c = YES, 1 - p(NO) if c = NO, 0 otherwise.
    soft_mode="renorm": p(YES) / (p(YES) + p(NO) [+ p(invalid)]), 0 when all are 0."""
    p_yes, p_no, c = p_yes.double().cpu(), p_no.double().cpu(), c_class.cpu()
    zero = torch.zeros_like(p_yes)
    if soft_mode == "eq4":
        soft = torch.where(c == 1, p_yes, torch.where(c == -1, 1.0 - p_no, zero))
    elif soft_mode == "renorm":
        den = p_yes + p_no + (zero if p_invalid is None else p_invalid.double().cpu())
        soft = torch.where(den > 0, p_yes / den.clamp_min(torch.finfo(torch.float64).tiny), zero)
    else:
        raise ValueError(f"soft_mode={soft_mode!r}: expected eq4 or renorm")
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


def _hash(*parts) -> int:
    """64 bits of a counter-based hash: the same parts give the same number in any process."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _uniform(seed: int) -> float:
    return _hash("c", seed) / 2.0 ** 64  # in [0, 1)


# ----------------------------------------------------------------------------------------------
# what a verifier reads and answers: its settings travel with its weights

SETTINGS_FILE = "verifier_settings.json"


@dataclass(frozen=True)
class VerifierSettings:
    """Everything that shapes what a verifier reads and answers. train_verifier.py sft saves them beside
    the weights; build_verifier reads them back, so a verifier is asked exactly as it was trained."""
    template: str = TEMPLATE
    system_prompt: str = SYSTEM_PROMPT
    positive: str = "YES"
    negative: str = "NO"
    full_response: bool = False  # the whole response instead of its last line
    strip_think: bool = True     # drop <think>...</think> before taking the last line
    sum_variants: bool = False   # sum p over "YES", " Yes", "yes"... (every one-token spelling)
    family: str = "rm"           # verifier_families.FAMILIES: how it is asked and read (files without it: rm)


def family_settings(name: str) -> VerifierSettings:
    """The settings a verifier of family `name` is asked with by default (its published prompt)."""
    return VerifierSettings(family=name, **verifier_families.family(name).settings)


def save_settings(directory: str | os.PathLike, settings: VerifierSettings) -> str:
    path = Path(directory) / SETTINGS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(settings), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def load_settings(name_or_path: str) -> VerifierSettings | None:
    """The settings saved with a verifier (a directory, or a hub repository holding the file); None for
    a verifier without them (the released RM-7B): build_verifier then needs --verifier_paper_defaults."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / SETTINGS_FILE
        path = path if path.exists() else None
    else:
        from transformers.utils import cached_file

        path = cached_file(name_or_path, SETTINGS_FILE, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    if path is None:
        return None
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable verifier settings: {e}") from e
    defaults = VerifierSettings()
    for key, value in values.items():
        if not hasattr(defaults, key) or type(value) is not type(getattr(defaults, key)):
            raise ValueError(f"{path}: field {key!r} = {value!r} is not a verifier setting of that type; "
                             f"expected fields {[f.name for f in dataclasses.fields(defaults)]}")
    if values.get("family", "rm") not in verifier_families.FAMILIES:
        raise ValueError(f"{path}: field 'family' = {values['family']!r} is not a verifier family; "
                         f"valid: {', '.join(verifier_families.FAMILIES)}")
    return dataclasses.replace(defaults, **values)


def require_settings(saved: VerifierSettings | None, name: str, paper_defaults: bool, template_given: bool) -> None:
    """A model verifier without saved settings is asked with the paper's template only when the user says
    so (template_given: a template file or a --verifier_family names the prompt): asked with a prompt it
    did not learn, a distilled verifier judges something else (a reward mean of 0.54 fell to 0.007,
    without a word, when its settings file was missing)."""
    if saved is None and not (paper_defaults or template_given):
        raise config.ConfigError(
            f"verifier {name}: no {SETTINGS_FILE} (the prompt it was trained with); name its template with "
            "--verifier_template FILE or a family (--verifier_family, or <family>:<model> for a judge), or pass "
            "--verifier_paper_defaults to ask it with the paper's template and "
            "YES/NO (right for the released RM-7B, virtuoussy/Qwen2.5-7B-Instruct-RLVR, and for a general judge)")


def split_family(spec: str) -> tuple[str | None, str]:
    """("compass", "org/CompassVerifier-7B") for "compass:org/CompassVerifier-7B": a model verifier asked in
    a named family's format (verifier_families.py) in any role. Eval, audit and log-only judges take no
    prompt flags, so a released judge without verifier_settings.json (CompassVerifier, xVerify) is named
    this way, not asked with the paper's prompt. (None, spec) for any other spec."""
    head, sep, rest = spec.partition(":")
    return (head, rest) if sep and head in verifier_families.FAMILIES else (None, spec)


def check_saved_settings(spec: str, options: "VerifierOptions", from_flags: bool) -> None:
    """require_settings for a verifier that is a local directory, before anything loads (a hub name or
    a server is checked when it is built). from_flags: the reward verifier (--verifier_template counts)."""
    family, spec = split_family(spec.removeprefix("hybrid:"))  # its model verifier
    if spec and Path(spec).is_dir():
        try:
            saved = load_settings(spec)
        except ValueError as e:
            raise config.ConfigError(str(e)) from None
        require_settings(saved, spec, options.verifier_paper_defaults, family is not None
                         or from_flags and bool(options.verifier_template or options.verifier_family))


def resolve_settings(saved: VerifierSettings | None, overrides: dict, force: bool = False,
                     name: str = "verifier") -> VerifierSettings:
    """The settings to ask with: the saved ones (or the paper's defaults), with `overrides` ({field:
    value} from flags). A flag that contradicts a saved value is a ConfigError naming both values,
    unless `force`: a verifier asked differently from its training judges something else."""
    if saved is not None and not force:
        for key, value in overrides.items():
            if value != getattr(saved, key):
                raise config.ConfigError(
                    f"--verifier_{key} {value!r:.60}: {name} was trained with {key} = {getattr(saved, key)!r:.60} "
                    f"({SETTINGS_FILE}); drop the flag to ask it as trained, or add --verifier_force_settings")
    family = overrides.get("family", saved.family if saved else "rm")
    # a family named by a flag starts from its own published prompt, not from what was saved for another one
    base = saved if saved is not None and saved.family == family else family_settings(family)
    return dataclasses.replace(base, **overrides)


# ----------------------------------------------------------------------------------------------
# the prompt, rendered through the verifier's chat template


def judgement_token_ids(tokenizer, spelling: str, sum_variants: bool = False, name: str = "verifier") -> list[int]:
    """Token ids of one side of the judgement. The main spelling must encode to exactly one token (a
    verifier whose answer is several tokens cannot be read from one position). With sum_variants
    every casing, with and without a leading space, that is one token is added: the model's
    probability mass for "YES" / " Yes" / "yes"... is summed."""
    ids = tokenizer.encode(spelling, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"judgement token {spelling!r} is {len(ids)} tokens {ids} for the tokenizer of "
                         f"{name}; it must be exactly one (choose another spelling)")
    out = [ids[0]]
    if sum_variants:
        for word in (spelling, spelling.upper(), spelling.lower(), spelling.capitalize()):
            for v in (word, " " + word):
                vid = tokenizer.encode(v, add_special_tokens=False)
                if len(vid) == 1 and vid[0] not in out:
                    out.append(vid[0])
    return out


def encodable(text: str) -> str:
    """`text` as the tokenizer can take it: what UTF-8 cannot encode (a lone surrogate, from a cut
    character or a crafted response) becomes '?', where the tokenizer would raise a TypeError."""
    return text.encode("utf-8", "replace").decode("utf-8")


class VerifierPrompt:
    """A verifier's prompt (its settings' template through the tokenizer's chat template) and its
    judgement-token ids, resolved once. The local and the remote verifier and the SFT trainer use it,
    so a student is trained on exactly the tokens it is later asked with. With `max_len` (the positions
    the verifier can read), an answer too long for them is cut to its end, where the final answer is,
    and counted in `cut` (the verifiers say so); SFT passes none: it drops over-long rows instead."""

    def __init__(self, tokenizer, settings: VerifierSettings = VerifierSettings(), name: str = "verifier",
                 max_len: int | None = None):
        for f in ("{reference}", "{response}"):
            if f not in settings.template:
                raise ValueError(f"verifier template of {name} has no {f} field")
        self.family = verifier_families.family(settings.family)
        if self.family.chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer of {name} has no chat template; the verifier prompt is rendered through it")
        self.tokenizer, self.settings, self.name, self.max_len, self.cut = tokenizer, settings, name, max_len, 0
        self.cut_middle = Counter()  # prompts whose "question" / "reference" lost its middle (_cut_middles)
        self.positive_ids = judgement_token_ids(tokenizer, settings.positive, settings.sum_variants, name)
        self.negative_ids = judgement_token_ids(tokenizer, settings.negative, settings.sum_variants, name)
        self.invalid_ids = judgement_token_ids(tokenizer, self.family.invalid, settings.sum_variants, name) \
            if self.family.invalid else []
        pos_neg = set(self.positive_ids + self.negative_ids)
        if set(self.positive_ids) & set(self.negative_ids) or set(self.invalid_ids) & pos_neg:
            raise ValueError(f"positive {settings.positive!r} and negative {settings.negative!r}"
                             + (f" and invalid {self.family.invalid!r}" if self.family.invalid else "")
                             + f" share token ids for {name}")

    def prompt_ids(self, question: str, reference: str, response: str) -> list[int]:
        """The prompt's ids; at most max_len - 1 of them (the judgement token needs a position)."""
        question, reference, response = encodable(question), encodable(reference), encodable(response)
        answer = answer_text(response, self.settings.full_response, self.settings.strip_think)
        ids = self._render(question, reference, answer)
        if self.max_len is None or len(ids) < self.max_len:
            return ids
        answer_ids = self.tokenizer.encode(answer, add_special_tokens=False)
        keep = len(answer_ids) - (len(ids) - self.max_len + 1)
        if keep <= 0:  # the question and reference alone are too long
            return self._cut_middles(question, reference, answer_ids)
        self.cut += 1
        while keep > 0:  # a cut can re-tokenise differently at its edge: cut again until it fits
            ids = self._render(question, reference, self.tokenizer.decode(answer_ids[-keep:]))
            if len(ids) < self.max_len:
                return ids
            keep -= len(ids) - self.max_len + 1
        return ids[-(self.max_len - 1):]

    def _cut_middles(self, question: str, reference: str, answer_ids: list[int]) -> list[int]:
        """A prompt whose question and reference alone overflow the positions: the template stays whole, the
        answer too if it fits in half of the positions left (else it is cut to its end, as above), and the
        question and reference lose their middles (start and end kept, joined by ' … '), counted in
        cut_middle. Cutting the prompt's front instead would drop the template's instructions."""
        tok = self.tokenizer
        texts = {"question": question, "reference": reference}
        ids_of = {k: tok.encode(v, add_special_tokens=False) for k, v in texts.items()}
        room = self.max_len - 1 - len(self._render("", "", ""))  # positions for the three texts
        ids: list[int] = []
        for _ in range(8):  # a cut can re-tokenise differently at its edges: shrink until it fits
            n_q, n_r = len(ids_of["question"]), len(ids_of["reference"])
            n_a = min(len(answer_ids), max(room - n_q - n_r, room // 2))
            both = room - n_a
            n_q = min(n_q, max(both - n_r, both // 2))
            kept = {"question": n_q, "reference": both - n_q}
            cut = {k: len(ids_of[k]) > kept[k] for k in texts}
            parts = {k: _middle(tok, ids_of[k], kept[k]) if cut[k] else texts[k] for k in texts}
            ids = self._render(parts["question"], parts["reference"], tok.decode(answer_ids[-n_a:]) if n_a > 0 else "")
            if len(ids) < self.max_len:
                self.cut_middle.update(k for k in texts if cut[k])
                self.cut += n_a < len(answer_ids)
                return ids
            room -= len(ids) - self.max_len + 1
        return ids[-(self.max_len - 1):]  # the template alone is too long

    def _render(self, question: str, reference: str, answer: str) -> list[int]:
        s = self.settings
        if not self.family.chat:  # raw text, tokenised as the family's own code does (special tokens included)
            return self.tokenizer.encode(fill_template(s.template, question, reference, answer))
        messages = [{"role": "user", "content": fill_template(s.template, question, reference, answer)}]
        if s.system_prompt:
            messages.insert(0, {"role": "system", "content": s.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def batch_ids(self, questions: list[str], references: list[str], responses: list[str]) -> list[list[int]]:
        """prompt_ids of each row; one line on stderr when some answers had to be cut, and which ones in
        `last_cut` (the verifiers put it in Judgement.cut, logged as verifier/cut_frac)."""
        before, out, self.last_cut = self.cut, [], []
        middles = Counter(self.cut_middle)
        for q, r, a in zip(questions, references, responses):
            row = self.cut
            out.append(self.prompt_ids(q, r, a))
            self.last_cut.append(self.cut > row)
        if self.cut > before:
            print(f"[verifier] {self.name}: {self.cut - before} of {len(out)} answers were longer than its "
                  f"{self.max_len} positions and were cut to their end ({self.cut} so far)", file=sys.stderr, flush=True)
        if middles != self.cut_middle:
            print(f"[verifier] {self.name}: " + ", ".join(f"{self.cut_middle[k] - middles[k]} of {len(out)} {k}s"
                                                        for k in ("question", "reference") if self.cut_middle[k] > middles[k])
                  + f" were longer than its {self.max_len} positions allow and lost their middles (start and end kept; "
                  "the template and the answer whole)", file=sys.stderr, flush=True)
        return out

    def check_judged(self, judged: Tensor, answered, max_unjudged: float, counts: Tensor | None = None) -> None:
        """VerifierError when the share of first tokens that are neither judgement token is above
        max_unjudged: a verifier that answers something else gives rewards of 0 that mean nothing.
        `answered()` lists the first tokens (called only to name them); `counts` [unjudged, total]
        replaces this call's own when given (summed over ranks)."""
        unjudged, total = (counts.tolist() if counts is not None else ((~judged).sum().item(), judged.numel()))
        if total and unjudged / total > max_unjudged:
            others = Counter(self.tokenizer.decode([t]) for t, ok in zip(answered(), judged.tolist()) if not ok)
            raise VerifierError(
                f"verifier {self.name}: {int(unjudged)} of {int(total)} first tokens ({unjudged / total:.0%}) were "
                f"neither {self.settings.positive!r} nor {self.settings.negative!r}"
                f"{f' nor {self.family.invalid!r}' if self.family.invalid else ''} (--verifier_max_unjudged "
                f"{max_unjudged}); "
                f"it answered instead: {dict(others.most_common(5))}. Is it asked with the prompt it was trained on?")


def _seeds_for(seeds: list[int] | None, n: int, sample: bool, base: int, call: int) -> list[int] | None:
    """The per-response seeds of a sampling verifier: the caller's, else fresh ones for each call."""
    if not sample:
        return None
    if seeds is None:
        return [_hash(base, call, i) >> 1 for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"verifier: {len(seeds)} seeds for {n} responses")
    return list(seeds)


def judge_decisions(prompt: VerifierPrompt, seqs: list[list[int]], generated: list[list[int]], probs,
                    soft_mode: SoftMode, pad_id: int) -> tuple[Judgement, object]:
    """Eq. 3 / Eq. 4 of a generating family (cot), the local and the remote verifier alike: c is the token
    the verifier wrote right after its decision marker, p(positive) and p(negative) that position's
    probabilities, `probs(prefixes)` -> [rows, 2], each prefix the prompt and the reasoning before c (the
    same softmax over the whole vocabulary as a first token). No marker: unjudged. Returns the Judgement,
    its `tokens` the generated lengths (the verifier's cost), and a function listing c per row."""
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
    j.tokens = torch.tensor([float(len(g)) for g in generated])
    decided = [g[a] if a is not None else (g[-1] if g else pad_id) for g, a in zip(generated, at)]
    return j, lambda: decided


def _check_lengths(questions, references, responses):
    if not (len(questions) == len(references) == len(responses)):
        raise ValueError(f"verifier: got {len(questions)} questions, {len(references)} references and "
                         f"{len(responses)} responses; they must be equally long")


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
                 batch_size: int = 8, soft_mode: SoftMode = "eq4", sample: bool = False, max_unjudged: float = 0.1,
                 seed: int = 0, max_new_tokens: int = 1024):
        self.prompt = VerifierPrompt(tokenizer, settings, name, getattr(lm.config, "max_position_embeddings", None))
        self.model, self.name, self.batch_size, self.max_new_tokens = lm, name, batch_size, max_new_tokens
        self.soft_mode = "renorm" if self.prompt.family.renormalise else soft_mode  # the family's Eq. 4
        self.sample, self.max_unjudged, self.seed, self.calls = sample, max_unjudged, seed, 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sharded = model.is_sharded(lm)
        self.device = next(lm.parameters()).device

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        _check_lengths(questions, references, responses)
        seeds = _seeds_for(seeds, len(questions), self.sample, self.seed, self.calls)
        self.calls += 1
        seqs = self.prompt.batch_ids(questions, references, responses)
        if self.prompt.family.decision:
            j, answered = self.judge_after_reasoning(seqs, seeds)
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

    def judge_after_reasoning(self, seqs: list[list[int]], seeds: list[int] | None) -> tuple[Judgement, object]:
        """A generating family (cot): the reasoning from model.generate, the decision's probabilities from
        one forward pass over the prompt and the reasoning before it (judge_decisions)."""
        # a rank without rows still generates (one token from a pad): a sharded verifier gathers its weights there
        gen = model.generate(self.model, self.prompt.tokenizer, seqs or [[self.pad_id]],
                             self.max_new_tokens if seqs else 1, row_seeds=seeds if seqs else None)[0][:len(seqs)]
        pos, neg = self.prompt.positive_ids, self.prompt.negative_ids

        def probs(prefixes):  # every rank calls last_logits, with or without rows (a sharded verifier)
            p = self.last_logits(prefixes).double().softmax(-1)
            return torch.stack([p[:, pos].sum(-1), p[:, neg].sum(-1)], -1) if prefixes else torch.zeros(0, 2)
        return judge_decisions(self.prompt, seqs, gen, probs, self.soft_mode, self.pad_id)

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
                 soft_mode: SoftMode = "eq4", sample: bool = False, max_unjudged: float = 0.1, seed: int = 0,
                 max_new_tokens: int = 1024):
        self.client, self.name = client, f"{client.model_id} at {','.join(client.endpoints)}"
        self.prompt = VerifierPrompt(tokenizer, settings, self.name, client.max_model_len)
        self.soft_mode = "renorm" if self.prompt.family.renormalise else soft_mode  # the family's Eq. 4
        self.sample, self.max_unjudged, self.seed, self.calls = sample, max_unjudged, seed, 0
        self.max_new_tokens = max_new_tokens  # a generating family's (cot) reasoning

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        _check_lengths(questions, references, responses)
        if not questions:
            return _empty_judgement()
        seeds = _seeds_for(seeds, len(questions), self.sample, self.seed, self.calls)
        self.calls += 1
        pos, neg, inv = self.prompt.positive_ids, self.prompt.negative_ids, self.prompt.invalid_ids
        prompts = self.prompt.batch_ids(questions, references, responses)
        seeds = seeds and [s % 2 ** 31 for s in seeds]
        if self.prompt.family.decision:  # cot: the server writes the reasoning, then is asked at the decision
            def probs(prefixes):
                replies = self.client.first_token(prefixes, pos + neg, None)
                return torch.tensor([[sum(math.exp(r["logprobs"][i]) for i in ids) for ids in (pos, neg)]
                                     for r in replies], dtype=torch.float64).reshape(-1, 2)
            gen = self.client.generate(prompts, self.max_new_tokens, seeds)
            j, answered = judge_decisions(self.prompt, prompts, gen, probs, self.soft_mode, 0)
            self.prompt.check_judged(j.judged, answered, self.max_unjudged)
            j.cut = torch.tensor(self.prompt.last_cut, dtype=torch.bool)
            return j
        replies = self.client.first_token(prompts, pos + neg + inv, seeds)
        p = torch.tensor([[math.exp(r["logprobs"][i]) for i in pos + neg + inv] for r in replies], dtype=torch.float64)
        tokens = torch.tensor([r["token"] for r in replies])
        k = len(pos) + len(neg)
        j = judgement_rewards(p[:, :len(pos)].sum(-1), p[:, len(pos):k].sum(-1), token_class(tokens, pos, neg, inv),
                              self.soft_mode, p[:, k:].sum(-1) if inv else None)
        self.prompt.check_judged(j.judged, tokens.tolist, self.max_unjudged)
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
    verifier_max_new_tokens: int = _flag(1024, "tokens a generating verifier (--verifier_family cot) may write before "
                                               "its decision")
    verifier_force_settings: bool = _flag(False, "let the flags above override the verifier's saved settings")
    verifier_paper_defaults: bool = _flag(False, "ask model verifiers without verifier_settings.json (the released "
                                                 "RM-7B, a general judge) with the paper's template and YES/NO; "
                                                 "without it they are refused")
    soft_mode: SoftMode = _flag("eq4", "Eq. 4 as the paper writes it, or renorm: p(YES) / (p(YES) + p(NO))")
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


def build_verifier(spec: str, options: VerifierOptions | None = None, *, settings_from_flags: bool = True,
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
    family, spec = split_family(spec)
    if family is not None:  # "<family>:<model>": asked in that family's format, whatever the role
        if overrides.get("family", family) != family:
            raise config.ConfigError(f"--verifier_family {overrides['family']!r} contradicts the verifier "
                                     f"{family}:{spec}; name the family once")
        overrides["family"] = family
    reading = dict(soft_mode=o.soft_mode, sample=o.verifier_sample) if settings_from_flags else {}
    if spec.startswith("rule:"):
        # a family is how a model is asked: a rule reads the response as its own flags say
        rule_overrides = {k: v for k, v in overrides.items() if k != "family"}
        return RuleVerifier(spec[len("rule:"):], resolve_settings(None, rule_overrides), math_timeout=o.math_timeout)
    if spec.startswith("py:"):
        return PyVerifier(spec, o.verifier_timeout)
    if spec.startswith("hybrid:"):
        return HybridVerifier(RuleVerifier("math", resolve_settings(None, {}), math_timeout=o.math_timeout),
                              build_verifier(spec[len("hybrid:"):], o, settings_from_flags=settings_from_flags,
                                             device=device, dtype=dtype, shard=shard, seed=seed,
                                             trust_remote_code=trust_remote_code))
    if spec.startswith("policy:"):  # verifier_free.PolicyReward: train_rl.load_verifiers builds it with the policy
        raise ValueError(f"verifier {spec!r} scores the policy being trained: a reward source of train_rl.py "
                         "--verifier only")
    if spec.startswith(("http://", "https://")):
        client = CompletionsClient([e.strip() for e in spec.split(",") if e.strip()], o.verifier_timeout,
                                   o.verifier_retries, o.verifier_concurrency)
        source = o.verifier_tokenizer or client.model_id
        saved = load_settings(source)
        require_settings(saved, f"{spec} ({source})", o.verifier_paper_defaults,
                         "template" in overrides or "family" in overrides)
        settings = resolve_settings(saved, overrides, o.verifier_force_settings, spec)
        tokenizer = model.load_tokenizer(source, trust_remote_code=trust_remote_code)
        return RemoteVerifier(client, tokenizer, settings, max_unjudged=o.verifier_max_unjudged, seed=seed,
                              max_new_tokens=o.verifier_max_new_tokens, **reading)
    if not spec.strip():
        raise ValueError(f"empty verifier spec; give rule:{'|rule:'.join(RULES)}, an http(s):// endpoint, "
                         "a model directory or a hub name")
    saved = load_settings(spec)
    require_settings(saved, spec, o.verifier_paper_defaults, "template" in overrides or "family" in overrides)
    settings = resolve_settings(saved, overrides, o.verifier_force_settings, spec)
    dtype = dtype or model.compute_dtype()
    if shard:  # every rank of the group calls this: the weights are read once, by rank 0, into the shards
        m = model.load_sharded(spec, device, dtype, trust_remote_code, mixed_precision=False, frozen=True)
    else:
        m = model.load_model(spec, device, dtype, trust_remote_code).eval().requires_grad_(False)
    return LocalVerifier(m, model.load_tokenizer(spec, trust_remote_code=trust_remote_code), settings, name=spec,
                         batch_size=o.verifier_batch_size, max_unjudged=o.verifier_max_unjudged, seed=seed,
                         max_new_tokens=o.verifier_max_new_tokens, **reading)


# ----------------------------------------------------------------------------------------------
# rule verifiers: the paper's baselines and a math-equivalence check

RULES = ("substring", "exact", "jaccard", "math")
POLICY_SOURCES = ("rlpr", "verifree")  # policy:<source>, verifier_free.py's rewards without a verifier
# What a math rule can grade: a number, a fraction or expression, LaTeX, or an option letter. Prose
# ("Western blot", "Concept Assimilation") is not: rule:math scores every answer to it 0.
_OPTION = re.compile(r"^\(?[A-J]\)?$")
_WORD = re.compile(r"[^\W\d_]{2,}")


def looks_mathematical(reference: str) -> bool:
    """True for references a math rule can compare: "7", "14/2", "\\frac{1}{2}", "x^2+1", "3.5 cm", "(C)";
    False for words: "Western blot", "Muscles". Digits or LaTeX, and at most two words besides
    LaTeX commands (a unit, "x", "pi")."""
    text = reference.strip().strip("$").strip()
    if _OPTION.match(text):
        return True
    words = _WORD.findall(re.sub(r"\\[A-Za-z]+", " ", text))
    return bool(re.search(r"\d|\\", text)) and len(words) <= 2


def math_reference_share(references: list[str]) -> float:
    """The share of references a math rule can grade (looks_mathematical); 0.0 for none."""
    return sum(looks_mathematical(r) for r in references) / max(1, len(references))
_ANSWER_PREFIX = re.compile(r"^\s*(?:therefore\s*,?\s*)?the answer is\s*:?\s*", re.IGNORECASE)
# CJK ideographs, kana and their compatibility blocks: one token per character (no spaces between
# words in Chinese/Japanese). Hangul is space-separated and stays word-level.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def final_answer(response: str, full_response: bool = False, think: bool = True) -> str:
    """The answer a rule judges: what a verifier reads (answer_text), with a leading "Therefore, the
    answer is" (or "the answer is", any case) removed."""
    return _ANSWER_PREFIX.sub("", answer_text(response, full_response, think), count=1)


def normalize(text: str) -> str:
    """Light normalisation for substring matching: casefold, collapse whitespace, strip trailing punctuation."""
    return " ".join(text.casefold().split()).rstrip(TRAILING_PUNCT + " ")


def substring_match(answer: str, reference: str) -> float:
    """1.0 if the normalised reference occurs in the normalised answer (an empty reference never matches)."""
    ref = normalize(reference)
    return float(bool(ref) and ref in normalize(answer))


def tokens(text: str) -> set[str]:
    """Casefolded \\w+ words; each CJK character is a token of its own."""
    return set(_TOKEN.findall(text.casefold()))


def jaccard(answer: str, reference: str) -> float:
    """|A ∩ B| / |A ∪ B| of the two token sets; 0 when both are empty."""
    a, b = tokens(answer), tokens(reference)
    return len(a & b) / len(a | b) if a | b else 0.0


class RuleVerifier:
    """The rule baselines. substring: binary = reference in answer (normalised); exact: binary = answer
    equals reference (both normalised as for substring); jaccard: soft =
    token-set Jaccard similarity, binary = 1 only when the sets are equal; math: math-verify
    equivalence of the final answer (remote.math_equal, in a MathPool). soft and p_yes carry what the
    rule has (its similarity, else its binary); every response counts as judged."""

    def __init__(self, rule: str, settings: VerifierSettings = VerifierSettings(), math_timeout: float = 5.0,
                 math_workers: int = 2):
        if rule not in RULES:
            raise ValueError(f"unknown rule verifier 'rule:{rule}'; valid: {', '.join('rule:' + r for r in RULES)}")
        self.rule, self.name, self.settings = rule, f"rule:{rule}", settings
        self.math = MathPool(math_workers, math_timeout) if rule == "math" else None  # processes start lazily

    @property
    def timeouts(self) -> int:
        return self.math.timeouts if self.math else 0

    def __call__(self, questions: list[str], references: list[str], responses: list[str],
                 seeds: list[int] | None = None) -> Judgement:
        _check_lengths(questions, references, responses)
        answers = [final_answer(r, self.settings.full_response, self.settings.strip_think) for r in responses]
        if self.rule == "math":
            scores = [float(ok) for ok in self.math(list(zip(references, answers)))]
        elif self.rule == "substring":
            scores = [substring_match(a, ref) for a, ref in zip(answers, references)]
        elif self.rule == "exact":
            scores = [float(bool(normalize(ref)) and normalize(a) == normalize(ref)) for a, ref in zip(answers, references)]
        else:
            scores = [jaccard(a, ref) for a, ref in zip(answers, references)]
        s = torch.tensor(scores, dtype=torch.float32)
        return Judgement(binary=(s >= 1.0).float(), soft=s, p_yes=s.clone(),
                         judged=torch.ones(len(s), dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# hybrid routing: hybrid:<model verifier spec>


def routes_to_math(reference: str, response: str) -> bool:
    """Does hybrid routing send this row to rule:math? Both the reference and the final answer
    (final_answer: the last line, "Therefore, the answer is" removed) must look mathematical
    (looks_mathematical: digits or LaTeX, at most two words besides): "7 kg" vs "7000 g" goes to the rule;
    "seven kilograms", prose and content-free master keys ("Thought process:", ":") go to the model."""
    return looks_mathematical(reference) and looks_mathematical(final_answer(response))


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
        _check_lengths(questions, references, responses)
        route = [routes_to_math(ref, r) for ref, r in zip(references, responses)]
        parts = []
        for verifier, rows in ((self.math, [i for i, m in enumerate(route) if m]),
                               (self.model, [i for i, m in enumerate(route) if not m])):
            if rows or verifier is self.model:
                j = verifier([questions[i] for i in rows], [references[i] for i in rows],
                             [responses[i] for i in rows], None if seeds is None else [seeds[i] for i in rows])
                parts.append((rows, j))
        out = Judgement(torch.zeros(len(route)), torch.zeros(len(route)), torch.zeros(len(route)),
                        torch.zeros(len(route), dtype=torch.bool))  # invalid, tokens, cut: zeros until filled
        for rows, j in parts:
            if rows:
                for name in ("binary", "soft", "p_yes", "judged", "invalid", "tokens", "cut"):
                    getattr(out, name)[rows] = getattr(j, name).to(getattr(out, name).dtype)
        return out


def check_spec(spec: str, flag: str) -> None:
    """A rule or py: spec that cannot run is a ConfigError naming `flag`, before any model loads
    (a py: function is imported and tried on one row)."""
    try:
        family, inner = split_family(spec)
        if family is not None and (not inner.strip() or inner.startswith(("rule:", "py:", "policy:", "hybrid:"))
                                   or split_family(inner)[0] is not None):
            raise ValueError(f"expected {family}:<model verifier> (a model directory, hub name or http(s):// "
                             "endpoint): a family says how a model is asked")
        if spec.startswith("policy:"):
            if spec[len("policy:"):] not in POLICY_SOURCES:
                raise ValueError(f"unknown reward source; valid: {', '.join('policy:' + k for k in POLICY_SOURCES)}")
            if flag != "verifier":
                raise ValueError("is a reward source of --verifier only: it scores the policy being trained, "
                                 "not a judge")
        if spec.startswith("hybrid:"):
            inner = spec[len("hybrid:"):]
            if not inner.strip() or inner.startswith(("rule:", "hybrid:", "policy:")):
                raise ValueError("expected hybrid:<model verifier>: a model directory, hub name, http(s):// "
                                 "endpoint, py:module:function or tiny (rule:math takes the math rows)")
            check_spec(inner, flag)
        if spec.startswith("rule:") and spec[len("rule:"):] not in RULES:
            raise ValueError(f"unknown rule verifier; valid: {', '.join('rule:' + r for r in RULES)}")
        if spec.startswith("py:"):
            PyVerifier(spec)
    except (ValueError, VerifierError) as e:
        raise config.ConfigError(f"--{flag} {spec!r}: {e}") from e


# ----------------------------------------------------------------------------------------------
# a user's judge written in Python: py:module.path:function


class PyVerifier:
    """"py:module.path:function": function(questions, references, responses) -> one score in [0, 1] per
    response (0/1 judgements or probabilities), e.g. py:freeform:teacher, a demo world's judge that
    knows its equivalences. binary = score >= 0.5; soft and p_yes = the score; every response counts as
    judged. The module is imported from the working directory or sys.path; the function is checked on
    one row when built, and its answer on every call: a missing module or function, a wrong length or
    a value outside [0, 1] is one line naming the spec; so is an exception it raises, or no answer within
    `timeout` seconds (--verifier_timeout, as for an HTTP judge: a judge that hangs stops the run, it is
    not waited for)."""

    def __init__(self, spec: str, timeout: float = 60.0):  # check_spec builds one without flags: the flag's default
        import importlib

        self.name, self.timeout = spec, timeout
        module_name, _, function = spec[len("py:"):].rpartition(":")
        if not module_name or not function:
            raise ValueError(f"verifier {spec!r}: expected py:module.path:function")
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # a user's module in the working directory, as `python -m` finds it
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"verifier {spec!r}: cannot import module {module_name!r}: {e}") from e
        self.fn = getattr(module, function, None)
        if not callable(self.fn):
            raise ValueError(f"verifier {spec!r}: module {module_name!r} has no function {function!r}")
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
        _check_lengths(questions, references, responses)
        s = self.scores(questions, references, responses)
        return Judgement(binary=(s >= 0.5).float(), soft=s, p_yes=s.clone(), judged=torch.ones(len(s), dtype=torch.bool))
