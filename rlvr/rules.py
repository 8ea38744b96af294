"""The rule verifiers, the paper's baselines: substring and exact match, Jaccard similarity, and
math-verify equivalence (rule:math); which references a math rule can grade (looks_mathematical); and
where hybrid routing may send a row to the rule (routes_to_math). Imports reward (Judgement), remote
(the math-verify workers) and verifier_prompt (what a verifier reads of a response).
"""
from __future__ import annotations

import re

import torch

import reward
from reward import Judgement
from rlvr.remote import TRAILING_PUNCT, MathPool
from rlvr.verifier_prompt import VerifierSettings, answer_text

# ----------------------------------------------------------------------------------------------
# rule verifiers: the paper's baselines and a math-equivalence check

RULES = ("substring", "exact", "jaccard", "math")
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


def normalize_answer(text: str) -> str:
    """Light normalisation for substring matching: casefold, collapse whitespace, strip trailing punctuation."""
    return " ".join(text.casefold().split()).rstrip(TRAILING_PUNCT + " ")


def substring_match(answer: str, reference: str) -> float:
    """1.0 if the normalised reference occurs in the normalised answer (an empty reference never matches)."""
    ref = normalize_answer(reference)
    return float(bool(ref) and ref in normalize_answer(answer))


def word_set(text: str) -> set[str]:
    """Casefolded \\w+ words; each CJK character is a token of its own."""
    return set(_TOKEN.findall(text.casefold()))


def jaccard(answer: str, reference: str) -> float:
    """|A ∩ B| / |A ∪ B| of the two token sets; 0 when both are empty."""
    a, b = word_set(answer), word_set(reference)
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
        reward.check_lengths(questions, references, responses)
        answers = [final_answer(r, self.settings.full_response, self.settings.strip_think) for r in responses]
        if self.rule == "math":
            scores = [float(ok) for ok in self.math(list(zip(references, answers)))]
        elif self.rule == "substring":
            scores = [substring_match(a, ref) for a, ref in zip(answers, references)]
        elif self.rule == "exact":
            scores = [float(bool(normalize_answer(ref)) and normalize_answer(a) == normalize_answer(ref)) for a, ref in zip(answers, references)]
        else:
            scores = [jaccard(a, ref) for a, ref in zip(answers, references)]
        s = torch.tensor(scores, dtype=torch.float32)
        return Judgement(binary=(s >= 1.0).float(), soft=s, p_yes=s.clone(),
                         judged=torch.ones(len(s), dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# hybrid routing: hybrid:<model verifier spec>


_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_LETTERS = re.compile(r"[^\W\d_]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_LIST_SEPARATOR = re.compile(r";|,(?!\d{3}(?!\d))")  # a comma that is no thousands separator lists candidates


def math_form(text: str) -> tuple[set[str], int, int]:
    """What rule:math cannot see in an answer: its words besides LaTeX commands (units, variables,
    hedges: "kg", "x", "or"), how many numbers it holds and how many list separators ("3 kg, 7 kg")."""
    bare = _LATEX_COMMAND.sub(" ", text.strip().strip("$"))
    return set(_LETTERS.findall(bare)), len(_NUMBER.findall(bare)), len(_LIST_SEPARATOR.findall(bare))


def routes_to_math(reference: str, response: str) -> bool:
    """Does hybrid routing send this row to rule:math? Only where the rule's verdict is the truth: the
    reference looks mathematical, and the final answer (final_answer: the last line, "Therefore, the answer
    is" removed) is one candidate in the reference's own terms: the same words (units, variables: the
    rule ignores units, so "7 g" for "7 kg" must not reach it), at least one and no more numbers than the
    reference, no more list separators. "\\frac{1}{2}" vs "0.5" and "7 kg" vs "7 kg" go to the rule; "7000 g"
    for "7 kg", "3 kg, 7 kg", "x = 3 or 7", prose and master keys ("Thought process: 7", ":") to the model."""
    if not looks_mathematical(reference):
        return False
    words, numbers, separators = math_form(reference)
    a_words, a_numbers, a_separators = math_form(final_answer(response))
    return a_words == words and (1 <= a_numbers <= numbers if numbers else a_numbers == 0) and a_separators <= separators


