"""What a verifier reads and how it is asked: the paper's template, the part of a response it reads (the
last non-empty line, <think> blocks dropped), the settings saved beside a verifier's weights
(verifier_settings.json) so it is asked exactly as it learned, and its prompt rendered through its chat
template with its judgement-token ids (VerifierPrompt: the local and remote verifiers and the sft
trainer share it). Imports config, remote (VerifierError) and verifier_families.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from rlvr import config, verifier_families
from rlvr.remote import VerifierError

# ----------------------------------------------------------------------------------------------
# the verifier's input

# The paper's template (docs/method.md; the released RM-7B was trained on exactly this text). Every
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
    if len(ids) != 1:  # a ConfigError (a ValueError): one line naming the flags, not a traceback
        raise config.ConfigError(f"judgement token {spelling!r} is {len(ids)} tokens {ids} for the tokenizer of "
                                 f"{name}; it must be exactly one: choose a one-token spelling with "
                                 "--verifier_positive / --verifier_negative (sft: the student's tokens)")
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
