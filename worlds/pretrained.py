"""The paper's setting in miniature: one pretrained base for the policy and the verifier, and a policy
that writes a short working before its answer. The free-form world's questions (worlds/freeform.py: five
subjects, one expert reference form, many right surface forms), now with

  corpus   generated text about the world (`corpus`): equivalences between surface forms ("Fenn Inc is
           Fenn Incorporated", "7 kg is 7000 g is seven kilograms"), what is NOT the same ("7 g is not
           7 kg"), facts ("Mount Kelo is higher than Lake Osk"), questions with answers in many formats
           ("The answer is X.", "Answer: X", **X**, \\boxed{X}, casing, punctuation) and short worked
           comparisons, on questions of the verifier's half of the question space only: never an RL
           question, held out or not;
  base     a tiny causal LM pretrained next-token on it (`base_model`; toy.build_tiny_model, one thread,
           cached);
  policy   the base instruction-tuned (`tiny_policy`) on the RL training questions to write a working in
           the question's terms, then "Therefore, the answer is X" on the last line, with a small model's
           mistakes (a wrong comparison, a wrong copy, a hedge, an answer that contradicts its working);
  teacher  `teacher` (py:worlds.pretrained:teacher): what a careful human judge accepts of the final line, in
           any common format; the rules are `judge`'s docstring and the README's;
  student  the base distilled from the teacher's labels (`tiny_verifier`, recipes/verifier_pretrained.yaml,
           train_verifier.py sft as the free-form world's), reading only the final line.

    python -m worlds pretrained base # build (or find) the base and say what it knows: held-out loss, probe
    python -m worlds pretrained examples # a question per subject, the policy's training response, the teacher
    python -m worlds pretrained students # the student from the base against one from a random init (README)
"""
from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path

import data
from rlvr import distributed, verifier_prompt, verifiers
from worlds import freeform, toy

SUBJECTS = freeform.SUBJECTS
SYSTEM_PROMPT = ""  # as the free-form world: the instruct SFT taught the format, the prompt stays short

# the base: Qwen2 shape of toy.build_tiny_model (head_dim 64); steps chosen to fit a few CPU minutes
BASE_HIDDEN, BASE_LAYERS, VOCAB = 128, 4, 1024
CORPUS_DOCS = 6000
PRETRAIN_STEPS = 600
INSTRUCT_STEPS = 300
MAX_NEW_TOKENS = 32  # a working (up to ~20 tokens) and the answer line (~10): the recipes' max_new_tokens

# Words the tokenizer's merges are learned from (with the free-form world's): so a working and its
# answer line stay ~30 tokens. The corpus itself is too large to learn merges from in seconds.
WORDS = freeform.CORPUS + " " + " ".join(
    ["Therefore, the answer is The answer is Answer: Final answer: Question: Q: A: **", "\\boxed{", "}",
     "is not is the same as so vs > < earned more less than symbol of short for species genus element firm",
     "mountain lake river higher deeper longer heavier than"])


# ----------------------------------------------------------------------------------------------
# what a question compares: options, their values, the direction, in the question's own words


_ASKS = re.compile(r"Which (is|earned) ([\w -]+?): ")


def asks(p: freeform.Problem) -> tuple[str, str]:
    """("is", "heavier"), ("earned", "more"): the verb and the comparison word of the question."""
    verb, adj = _ASKS.match(p.question).groups()
    return verb, adj


def working(p: freeform.Problem, wrong: bool = False) -> tuple[str, int]:
    """(the working line, the option it picks): "9 > 7, so Fenn Inc earned more." in the question's
    terms; `wrong` flips the comparison sign ("9 < 7, so Holt Corp earned more.")."""
    a, b = p.values
    verb, adj = asks(p)
    sign = ">" if (a > b) != wrong else "<"
    pick = p.win if not wrong else 1 - p.win
    return f"{a} {sign} {b}, so {p.options[pick]} {verb} {adj}.", pick


# the answer line's formats: the policy's (METHOD.md's prompt asks for it) and the others people write
POLICY_FORMAT = "Therefore, the answer is {}."
FORMATS = (POLICY_FORMAT, "The answer is {}.", "Answer: {}", "**{}**", "\\boxed{{{}}}", "Final answer: {}", "{}",
           "The answer is **{}**.", "{}.")


def physics_forms(p: freeform.Problem) -> list[str]:
    """A physics answer's extra right forms: thousands separators, a decimal ("7,000 g", "7.0 kg")."""
    if p.subject != "physics":
        return []
    v, unit = p.reference.split()
    dim = next(d for d, u in freeform.UNITS.items() if u[0] == unit)
    small, factor = freeform.UNITS[dim][2], freeform.UNITS[dim][4]
    return [f"{int(v) * factor:,} {small}", f"{v}.0 {unit}"]


# ----------------------------------------------------------------------------------------------
# the corpus: what the web teaches a real base model, about this world only


def _fact(p: freeform.Problem, rng: random.Random) -> str:
    verb, adj = asks(p)
    win, lose = p.options[p.win], p.options[1 - p.win]
    return f"{win} {verb} {adj} than {lose}."


def _equivalence(p: freeform.Problem, rng: random.Random) -> str:
    forms = list(dict.fromkeys([p.reference] + p.right_forms + physics_forms(p)))
    chain = rng.sample(forms, min(len(forms), rng.choice((2, 2, 3))))
    return rng.choice((" is ", " is the same as ")).join(chain) + "."


def _difference(p: freeform.Problem, rng: random.Random) -> str:
    return f"{rng.choice([p.reference] + p.right_forms)} is not {rng.choice(p.near + [p.wrong_option])}."


def _qa(p: freeform.Problem, rng: random.Random) -> str:
    answer = rng.choice([p.reference, p.options[p.win]] + p.right_forms + physics_forms(p))
    answer = answer.upper() if rng.random() < 0.1 else answer
    return rng.choice(("Q: {}\nA: {}", "Question: {}\n{}", "{}\n{}")).format(p.question, rng.choice(FORMATS).format(answer))


def _worked(p: freeform.Problem, rng: random.Random) -> str:
    line, pick = working(p)
    answer = rng.choice([p.reference, p.options[p.win]] + p.right_forms)
    return f"{p.question}\n{line}\n{rng.choice(FORMATS).format(answer)}"


DOC_KINDS = ((_fact, 0.15), (_equivalence, 0.25), (_difference, 0.15), (_qa, 0.25), (_worked, 0.20))


def corpus(n: int = CORPUS_DOCS, seed: int = 0) -> list[str]:
    """`n` documents about the world's entities, on questions of the verifier's half of the question
    space (freeform._pool): no RL question, held out or not, is in it (tests/test_pretrained.py)."""
    rng = random.Random(f"pretrained-corpus:{seed}")
    problems = freeform._problems(1000, 100 + seed, "verifier")
    kinds, weights = zip(*DOC_KINDS)
    return [rng.choices(kinds, weights)[0](rng.choice(problems), rng) for _ in range(n)]


def heldout_corpus(n: int = 300) -> list[str]:
    """Documents of the same kinds on other questions (another seed): the base's held-out loss."""
    return corpus(n, seed=1)


def base_model() -> str:
    """The base (pretrained next-token on `corpus` for PRETRAIN_STEPS, one thread, cached); rank 0 builds."""
    path = None
    if distributed.rank() == 0:
        path = toy.build_tiny_model(seed=0, hidden_size=BASE_HIDDEN, num_layers=BASE_LAYERS, vocab_size=VOCAB,
                                    corpus=WORDS, docs=corpus(), pretrain_steps=PRETRAIN_STEPS, name="base")
    return distributed.broadcast_object(path)


def random_model() -> str:
    """A model of the base's size and tokenizer, never trained: the student from a random init."""
    return toy.build_tiny_model(seed=0, hidden_size=BASE_HIDDEN, num_layers=BASE_LAYERS, vocab_size=VOCAB,
                                corpus=WORDS)


def equivalence_probe(n: int = 200, seed: int = 2) -> list[tuple[str, str, str]]:
    """(stem, true continuation, false continuation): "Fenn Inc is" + " Fenn Incorporated." against
    " Fenn Limited.", on questions the corpus never used (another seed)."""
    rng = random.Random(f"pretrained-probe:{seed}")
    out = []
    for p in freeform._problems(n, 100 + seed, "verifier"):
        forms = [f for f in p.right_forms + physics_forms(p) if f != p.reference]
        out.append((f"{p.reference} is", f" {rng.choice(forms)}.", f" {rng.choice(p.near)}."))
    return out


def knowledge(path: str) -> dict:
    """What a model knows: its next-token loss on held-out documents (nats per token) and the share of
    probe pairs where it gives the true equivalence a higher log-probability than the false one."""
    import torch

    from rlvr import model

    tok, lm = model.load_tokenizer(path), model.load_model(path)
    nll, count = 0.0, 0
    with torch.no_grad():
        for doc in heldout_corpus():
            ids = torch.tensor([tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]])
            logits = lm(ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1

        def logp(stem, cont):
            s = tok.encode(stem, add_special_tokens=False)
            c = tok.encode(stem + cont, add_special_tokens=False)[len(s):]
            ids = torch.tensor([s + c])
            lp = lm(ids).logits[0, :-1].float().log_softmax(-1)
            return sum(lp[len(s) - 1 + i, t].item() for i, t in enumerate(c))

        probe = equivalence_probe()
        wins = sum(logp(s, t) > logp(s, f) for s, t, f in probe)
    return {"heldout_loss": nll / count, "heldout_ppl": math.exp(nll / count), "probe_true_above_false": wins / len(probe),
            "probe_pairs": len(probe)}


# ----------------------------------------------------------------------------------------------
# the policy: the base, instruction-tuned to work, then answer on the last line


def instruct_response(p: freeform.Problem, rng: random.Random) -> str:
    """What the instruct SFT teaches, with a small model's mistakes:
      70%  the right working, then a right answer (the option as the question writes it, the expert's
           form, or another right form)
      10%  a wrong comparison ("9 < 7") and the option it leads to
       8%  the right working, then a wrong copy (a near-miss of the right option: "Fenn Limited")
       7%  the right working, then a hedge naming both options
       5%  the right working, then the other option (the answer contradicts the working)"""
    u = rng.random()
    line, pick = working(p, wrong=0.70 <= u < 0.80)
    if u < 0.70:
        answer = rng.choice([p.options[p.win]] * 2 + [p.reference] + p.right_forms)
    elif u < 0.80:
        answer = p.options[pick]
    elif u < 0.88:
        answer = rng.choice(p.near)
    elif u < 0.95:
        answer = rng.choice(p.hedges())
    else:
        answer = p.wrong_option
    return f"{line}\n{POLICY_FORMAT.format(answer)}"


def instruct_pairs(heldout_fraction: float) -> list[tuple[list[dict], str]]:
    """(messages, response) pairs on the RL training questions (never a held-out one)."""
    rng = random.Random("pretrained-instruct")
    heldout = {r.question for r in freeform.split(records(0), heldout_fraction)[1]}
    return [(freeform._record(p, 0).messages, instruct_response(p, rng))
            for p in freeform._problems(freeform.RL_QUESTIONS, 0, "rl") if p.question not in heldout]


def records(seed: int = 0) -> list[data.Record]:
    """The RL data set: the free-form world's 600 questions, fixed whatever the run's seed."""
    return freeform.records()


def tiny_policy(heldout_fraction: float = 0.1) -> str:
    """The policy (train_rl.py --policy tiny --data pretrained): the base after INSTRUCT_STEPS of
    instruction tuning on instruct_pairs; cached; rank 0 builds, the others wait."""
    base = base_model()  # on every rank: it broadcasts the base's path (rank 0 alone would leave the others a step behind)
    path = None
    if distributed.rank() == 0:
        path = toy.build_tiny_model(start=base, sft_pairs=instruct_pairs(heldout_fraction),
                                    sft_steps=INSTRUCT_STEPS, name="instruct")
    return distributed.broadcast_object(path)


def sft_pairs(recs: list[data.Record]) -> list[tuple[list[dict], str]]:
    """(messages, reference): the SFT baseline's pairs, the bare expert answers (compare.py)."""
    return freeform.sft_pairs(recs)


# ----------------------------------------------------------------------------------------------
# the teacher: a careful human judge of the final line


_PREFIX = re.compile(r"^(?:(?:therefore|thus|so|hence)\s*,?\s*)?(?:the\s+)?(?:final\s+)?answer\s*(?:is\b)?\s*[:\-]?\s*",
                     re.I)
_BOXED = re.compile(r"^\\boxed\{(.*)\}$")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm)\{([^}]*)\}")
_WRAPS = ("*", "_", "$", '"', "'", "`")
_HEDGE = re.compile(r"\b(?:maybe|perhaps|probably|possibly|either|likely|unsure|not sure|i think|i guess|could be|"
                    r"might be|unclear)\b", re.I)
_CANDIDATES = re.compile(r"\s+(?:or|and|vs\.?|versus|nor)\s+|\s*/\s*|\s*;\s*", re.I)
_PAREN = re.compile(r"^(.*?)\s*\(([^()]*)\)$")
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_QUANTITY = re.compile(rf"({_NUMBER.pattern}|[A-Za-z]+)\s*([A-Za-z]+)")
# SI symbols are case-sensitive (m metre / M mega, g gram / G giga, mg / Mg): a symbol counts only as
# written; litres have two accepted symbols (L and l, mL and ml). Long names are read in any case.
SYMBOLS = {s for u in freeform.UNITS.values() for s in (u[0], u[2])} | {"l", "ml"}
_FOLDED_SYMBOLS = {s.casefold() for s in SYMBOLS}
ELEMENT_SYMBOLS = set(freeform.ELEMENTS.values())


def final_answer(response: str) -> str:
    """The answer of the last line: an answer prefix ("Therefore, the answer is", "Answer:", "Final
    answer:"), bold, \\boxed{}, $...$, quotes and trailing punctuation removed (repeatedly)."""
    line = verifier_prompt.last_line(response).replace("**", "")
    line = _LATEX_TEXT.sub(r"\1", line)
    previous = None
    while line != previous:
        previous = line
        line = line.strip().rstrip(".!;,").strip()
        line = _PREFIX.sub("", line, count=1)
        if (m := _BOXED.match(line)) is not None:
            line = m.group(1)
        for w in _WRAPS:
            if len(line) > 2 and line.startswith(w) and line.endswith(w):
                line = line[1:-1]
    return line


def quantity(text: str) -> tuple[str, float] | None:
    """("mass", grams) of "7 kg", "7.0 kg", "7,000 g", "seven kilograms", "7 Kilograms"; None where the
    number or the unit is not one (a symbol in the wrong case: "7 KG", "7 M", "7 Mg")."""
    m = _QUANTITY.fullmatch(text.strip())
    if not m:
        return None
    number, unit = m.groups()
    if unit.casefold() in _FOLDED_SYMBOLS and unit not in SYMBOLS:
        return None
    if _NUMBER.fullmatch(number):
        value = float(number.replace(",", ""))
    elif number.casefold() in freeform.NUMBER_WORDS:
        value = float(freeform.NUMBER_WORDS.index(number.casefold()))
    else:
        return None
    per_unit = freeform._quantity(f"1 {unit}")
    return None if per_unit is None else (per_unit[0], value * per_unit[1])


def _means(reference: str, answer: str) -> bool:
    want = freeform.accepted(reference)
    if isinstance(want, tuple):
        got = quantity(answer)
        return got is not None and got[0] == want[0] and abs(got[1] - want[1]) < 1e-9 * max(1.0, want[1])
    if answer.casefold() in {s.casefold() for s in ELEMENT_SYMBOLS} and answer not in ELEMENT_SYMBOLS:
        return False  # a chemical symbol in the wrong case ("TN", "tn") is not the element's symbol
    return bool(freeform.judge(reference, answer))


def judge(reference: str, response: str) -> int:
    """1 if the response's final answer (its last line) means the reference, else 0. The rules:
    1. only the last line is read; an answer prefix, bold, \\boxed{}, $...$, quotes and trailing
       punctuation are format, not content (final_answer);
    2. a hedge ("maybe", "probably", "either", "I think", ...) is wrong;
    3. two candidates ("X or Y", "X and Y", "X / Y", "X; Y") are wrong unless every one means the
       reference ("7 kg / 7000 g");
    4. a parenthesis after the answer is a restatement: "Fenn Inc (9 million)" is "Fenn Inc"; a
       quantity in it must mean the reference too ("7 kg (7000 g)" yes, "7 kg (7 g)" no);
    5. a quantity means the reference when its value in the reference's dimension is equal: number
       words, decimals ("7.0 kg"), thousands separators ("7,000 g"), other units of the dimension and
       long unit names in any case; unit symbols only in their own case (mg is not Mg, m is not M);
    6. a name means the reference when it is one of its forms (freeform.accepted: legal forms and
       their abbreviations, the bare firm or place, the element's symbol, the genus abbreviated), in
       any case and with or without dots or a leading article, except a chemical symbol, which has
       one case (Tn, not TN)."""
    answer = final_answer(response)
    if not answer or _HEDGE.search(answer):
        return 0
    parts = [s for s in _CANDIDATES.split(answer) if s is not None]
    if len(parts) > 1:
        return int(all(judge(reference, part) for part in parts))
    if (m := _PAREN.match(answer)) is not None and m.group(1):
        inner = m.group(2).strip()
        if quantity(inner) is not None:
            return int(_means(reference, m.group(1)) and _means(reference, inner))
        if re.fullmatch(r"[\d.,]+(?:\s+[a-z]+)?", inner):  # a value: "(9 million)", "(6 years)"
            return int(_means(reference, m.group(1)))
    return int(_means(reference, answer))


def teacher(questions: list[str], references: list[str], responses: list[str]) -> list[float]:
    """The world's judge (verifier spec py:worlds.pretrained:teacher): 0/1 per response."""
    return [float(judge(ref, resp)) for ref, resp in zip(references, responses)]


teacher_noisy10 = freeform.noisy_teacher(0.10, judge)  # py:worlds.pretrained:teacher_noisy10 (compare.py's noisy judge)
teacher_noisy20 = freeform.noisy_teacher(0.20, judge)


# ----------------------------------------------------------------------------------------------
# the student's rows, and the rows in forms they never show


JUDGE_KINDS = freeform.JUDGE_KINDS


def parse_mix(mix: str) -> list[tuple[str, int]]:
    return freeform.parse_mix(mix)


def judge_rows(mix: str, seed: int) -> list[data.JudgedRow]:
    """freeform.judge_rows (right answers in the world's surface forms against the other option,
    near-misses, hedges, copies, stutters, cuts; verifier-pool questions only), each answer written as
    the policy writes it: a working line, then "Therefore, the answer is X." (the rest bare). Labelled
    by this world's teacher. The forms of `novel_rows` are never among them."""
    rng = random.Random(f"pretrained-judge:{seed}")
    out = []
    for r in freeform.judge_rows(mix, seed):
        text = POLICY_FORMAT.format(r.response) if rng.random() < 0.8 else r.response
        if rng.random() < 0.5:
            text = f"{rng.choice(_workings(r.question))}\n{text}"
        out.append(data.JudgedRow(r.question, r.reference, text, label=judge(r.reference, text)))
    return out


def _workings(question: str) -> list[str]:
    """A working line of the question's kind (the verifier never reads it: the last line decides)."""
    m = re.findall(r"(\d+)", question)
    return [f"{m[0]} > {m[1]}.", f"{m[0]} < {m[1]}."] if len(m) >= 2 else ["So:"]


NOVEL_FORMATS = ("The answer is {}.", "Answer: {}", "**{}**", "\\boxed{{{}}}", "Final answer: {}",
                 "The answer is **{}**.", "ANSWER: {}", "$\\boxed{{{}}}$")


def novel_rows(n: int, seed: int = 0) -> list[data.JudgedRow]:
    """Rows in forms judge_rows never writes, from the teacher's equivalences by a generator of their own:
    answer lines in other formats (NOVEL_FORMATS), right answers restated ("X (9 million)", "7,000 g",
    "7.0 kg", upper case), and wrong ones of a judge's kinds (the other option, a near-miss, a unit symbol
    in the wrong case, a hedge with "probably", two candidates). Verifier-pool questions of another seed;
    labels by the teacher."""
    rng = random.Random(f"pretrained-novel:{seed}")
    problems = freeform._problems(500, 200 + seed, "verifier")
    out = []
    for _ in range(n):
        p = rng.choice(problems)
        a, b = p.values
        value = p.values[p.win]
        if rng.random() < 0.5:
            answer = rng.choice([p.reference.upper(), f"{p.options[p.win]} ({value})", f"{p.reference} ({value} units)"]
                                + physics_forms(p) + [rng.choice(p.right_forms)])
            if answer.endswith(" units)"):
                answer = answer.replace(" units)", ")")
        else:
            wrong = [p.wrong_option, rng.choice(p.near), f"probably {p.options[p.win]}",
                     f"{p.options[p.win]} and {p.wrong_option}"]
            if p.subject == "physics":
                v, unit = p.reference.split()
                wrong.append(f"{v} {unit.upper() if unit != unit.upper() else unit.lower()}")
            answer = rng.choice(wrong)
        text = rng.choice(NOVEL_FORMATS).format(answer)
        out.append(data.JudgedRow(p.question, p.reference, text, label=judge(p.reference, text)))
    return out


VERIFIER_RECIPES = [Path(__file__).resolve().parents[1] / "recipes" / "verifier_pretrained.yaml"]


def tiny_verifier() -> str:
    """The student: the BASE (not the policy) distilled from the teacher by recipes/verifier_pretrained.yaml
    (train_verifier.py sft --student <base>), cached by the recipe's text and _student_key:
    train_rl.py --verifier tiny --data pretrained."""
    base = base_model()
    return toy.tiny_verifier(VERIFIER_RECIPES, extra=_student_key(base), student=base)


def _student_key(start: str) -> str:
    """What a student is distilled from, for its cache key: its start, the policy whose samples it sees, and
    its rows with the teacher's labels (a change of rows or teacher rebuilds it; an edit elsewhere does not)."""
    import hashlib
    import json

    import yaml

    mix = yaml.safe_load(VERIFIER_RECIPES[0].read_text())["toy_mix"]
    rows = [[r.question, r.reference, r.response, r.label] for r in judge_rows(mix, 0) + novel_rows(200)]
    return start + tiny_policy() + hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def random_student() -> str:
    """The same recipe distilled into a model of the base's size and tokenizer from a random init: what
    the base's pretraining is worth to the student (`python -m worlds pretrained students`)."""
    start = random_model()
    return toy.tiny_verifier(VERIFIER_RECIPES, extra=_student_key(start), student=start)


def policy_answers(n_questions: int = 100, samples: int = 4, seed: int = 0) -> list[data.JudgedRow]:
    """The instruct policy's sampled answers to RL training questions (never a distillation question),
    labelled by the teacher: the answers the student grades during RL."""
    from types import SimpleNamespace

    from rlvr import model
    from rlvr import rollout

    path = tiny_policy()
    tokenizer, policy = model.load_tokenizer(path), model.load_model(path)
    recs = freeform.split(records(0))[0][:n_questions]
    opts = SimpleNamespace(samples_per_prompt=samples, max_prompt_len=1024, seed=seed, max_new_tokens=MAX_NEW_TOKENS,
                           temperature=1.0, top_p=1.0)
    out = []
    for step, start in enumerate(range(0, len(recs), 32)):
        drawn = rollout.generate(policy, None, tokenizer, recs[start:start + 32], step, opts)
        out += [data.JudgedRow(r.question, r.reference, t, label=judge(r.reference, t))
                for r, t in zip(drawn.records, drawn.texts)]
    return out


def grade(verifier_path: str, rows: list[data.JudgedRow]) -> dict:
    """A verifier (its saved settings, greedy) against the teacher's labels: agreement, kappa, FPR, FNR."""
    from rlvr import audit

    v = verifiers.build_verifier(verifier_path, settings_from_flags=False)
    got = v([r.question for r in rows], [r.reference for r in rows], [r.response for r in rows]).binary.int().tolist()
    a = audit.agreement([r.label for r in rows], got)
    return {"n": a["n"], "agreement": a["accuracy"], "kappa": a["kappa"], "fpr": a["fp"] / max(1, a["fp"] + a["tn"]),
            "fnr": a["fn"] / max(1, a["fn"] + a["tp"]), "negatives": a["fp"] + a["tn"], "positives": a["fn"] + a["tp"]}


def master_key_rate(verifier_path: str) -> float:
    from rlvr import audit

    recs = records(0)
    v = verifiers.build_verifier(verifier_path, settings_from_flags=False)
    return audit.master_key_probe(v, [r.question for r in recs], [r.reference for r in recs])["fpr"]


def grading_sets() -> dict[str, list[data.JudgedRow]]:
    """The rows a student is graded on: the distillation's held-out rows, the instruct policy's answers,
    answers in novel forms."""
    import yaml

    mix = yaml.safe_load(VERIFIER_RECIPES[0].read_text())["toy_mix"]
    heldout = data.split_heldout(judge_rows(mix, 0), 0.1)[1]  # as train_verifier.py sft splits them
    return {"held-out rows": heldout, "policy answers": policy_answers(), "novel forms": novel_rows(1000)}


def verifier_report(path: str, sets: dict[str, list[data.JudgedRow]]) -> dict:
    """One verifier against the teacher on every grading set, and its master-key rate."""
    return {k: grade(path, rows) for k, rows in sets.items()} | {"master_key_fpr": master_key_rate(path), "path": path}


def students_report() -> dict:
    """The student from the base and the student from a random init, both distilled by the same recipe on
    the same rows: on their held-out rows, on the policy's answers, on novel_rows, and master keys."""
    sets = grading_sets()
    return {name: verifier_report(path, sets)
            for name, path in (("from the base", tiny_verifier()), ("from a random init", random_student()))}


def subject_of(question: str) -> str:
    return freeform.subject_of(question)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m worlds pretrained", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("base", help="build (or find) the base; its held-out next-token loss and equivalence probe")
    sub.add_parser("examples", help="a question per subject, an instruct response, the teacher's verdicts")
    sub.add_parser("students", help="the student from the base against one from a random init (builds both)")
    g = sub.add_parser("grade", help="a verifier (e.g. the next round's student) graded as `students` grades them")
    g.add_argument("verifier", help="a verifier's directory (its saved settings)")
    args = ap.parse_args(argv)
    if args.cmd in ("students", "grade"):
        import json

        print(json.dumps(students_report() if args.cmd == "students" else verifier_report(args.verifier, grading_sets()),
                         indent=1))
        return
    if args.cmd == "base":
        t = time.time()
        path = base_model()
        print(path, f"({time.time() - t:.0f} s)")
        print(knowledge(path))
        return
    rng = random.Random(0)
    for p in freeform._problems(len(SUBJECTS), 0, "rl"):
        response = instruct_response(p, rng)
        print(f"[{p.subject}] {p.question}\n  reference: {p.reference}\n  instruct: {response!r} "
              f"(teacher: {judge(p.reference, response)})")
