"""The free-form world: a miniature of the paper's problem, answers a rule cannot grade. Five subjects
(physics, chemistry, economics, geography, biology) ask the same learnable skill (which of two options
has the larger, or smaller, number) about made-up entities, and every question has ONE expert
reference form ("7 kg", "Birch Limited", "Mount Kelo", "Tarnium", "Velka ardens") while a right
answer may be written many ways ("seven kilograms", "7000 g", "Birch Ltd", "Mt. Kelo", "Tn",
"V. ardens", "the Kelo River") and a wrong one may share most of the reference's words ("7 g",
"Birch Corporation", "Lake Kelo", "tarnium oxide", "Velka minax", a hedge naming both options, a
copy of the question). The teacher (`teacher`) knows these equivalences: it stands in for the
paper's 72B judge. Data plus one judge; the trainers reach this world through worlds.py only.

API for compare.py: records(n, seed) -> RL questions (data.Record with meta["subject"]);
split(records, heldout_fraction) -> (train, held-out) as train_rl.py splits them; RL_QUESTIONS;
tiny_policy(heldout_fraction=0.1) -> the warm-started policy's directory; sft_pairs(records) ->
(messages, reference) pairs on the references; teacher / teacher_noisy10 / teacher_noisy20 (verifier specs
py:worlds.freeform:teacher, py:worlds.freeform:teacher_noisy10, ...); SUBJECTS.

    python -m worlds freeform rules      # each rule verifier's false-positive / false-negative rate against the teacher
    python -m worlds freeform examples   # a few questions, references, right and wrong answers per subject
"""
from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import data
from rlvr import distributed
from worlds import toy

SUBJECTS = ("physics", "chemistry", "economics", "geography", "biology")
SYSTEM_PROMPT = ""  # no system prompt: the cost of the demo is its prompt length
RL_QUESTIONS = 600   # the RL data set (train_rl.py holds out 10% of it by question hash)
WARM_START_STEPS = 500

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# physics: dimension -> (unit of the question, its long name, the smaller unit, its long name, factor)
UNITS = {"mass": ("kg", "kilograms", "g", "grams", 1000), "length": ("m", "metres", "cm", "centimetres", 100),
         "time": ("h", "hours", "min", "minutes", 60), "volume": ("L", "litres", "mL", "millilitres", 1000)}
PHYSICS_ADJ = {"mass": ("heavier", "lighter"), "length": ("longer", "shorter"), "time": ("longer", "shorter"),
               "volume": ("larger", "smaller")}
# chemistry: made-up elements and their symbols
ELEMENTS = {"velium": "Vl", "tarnium": "Tn", "orbium": "Ob", "kesium": "Ks", "dravium": "Dv", "lumium": "Lm",
            "pexium": "Px", "sorium": "Sr"}
COMPOUNDS = ("oxide", "chloride")
# economics: firm names and their legal forms (long, abbreviation)
FIRMS = ("Alder", "Birch", "Cedar", "Dune", "Elm", "Fenn", "Gale", "Holt")
LEGAL = {"Limited": "Ltd", "Corporation": "Corp", "Incorporated": "Inc", "Company": "Co"}
# geography: feature kind -> (abbreviation, comparison words, unit)
FEATURES = {"Mount": ("Mt", ("higher", "lower"), "km"), "Lake": ("L", ("deeper", "shallower"), "m"),
            "River": ("R", ("longer", "shorter"), "km")}
PLACES = ("Kelo", "Tarn", "Osk", "Pell", "Varo", "Miri", "Duna", "Sorel")
# biology: genus and species epithets
GENERA = ("Velka", "Tora", "Mirra", "Casso", "Drel", "Ostra", "Pym", "Luma")
EPITHETS = ("ardens", "minax", "rosea", "glauca", "tenuis", "nova", "ferox", "alba")

# the tokenizer's merges are learned from these words too, so a prompt stays ~20 tokens
CORPUS = " ".join(
    ["Which is heavier lighter longer shorter denser less dense higher lower deeper shallower earned more less",
     "longer-lived shorter-lived lives years million or the a an at g/mL kg kilograms g grams m metres meters",
     "cm centimetres km h hours min minutes L litres mL millilitres larger smaller ( ) : ? . element"] + list(NUMBER_WORDS) + [f"{n} {n.capitalize()} {s}" for n, s in ELEMENTS.items()]
    + list(COMPOUNDS) + list(FIRMS) + list(LEGAL) + list(LEGAL.values()) + list(FEATURES) + list(PLACES)
    + [v[0] for v in FEATURES.values()] + list(GENERA) + list(EPITHETS) + [g[0] + "." for g in GENERA])


# ----------------------------------------------------------------------------------------------
# one problem: a subject, two options with numbers, a direction; the answer is the option with the
# larger number (or the smaller). A problem knows its question, its reference (the expert's one
# form), the right answers' other surface forms, and the wrong answers that look right.


class Problem:
    def __init__(self, subject: str, rng: random.Random):
        self.subject = subject
        a, b = rng.sample(range(1, 10), 2)
        self.values = (a, b)
        self.larger = rng.random() < 0.5
        self.win = 0 if (a > b) == self.larger else 1  # index of the right option
        getattr(self, f"_make_{subject}")(rng)

    # each _make_ sets: question, reference, options (a name per option as the question writes it),
    # right_forms (surface forms of the right answer), near (wrong answers lexically close to it)

    def _make_physics(self, rng):
        dim = rng.choice(list(UNITS))
        unit, long, small, small_long, factor = UNITS[dim]
        a, b = self.values
        self.question = f"Which is {PHYSICS_ADJ[dim][not self.larger]}: {a} {unit} or {b} {unit}?"
        v, w = self.values[self.win], self.values[1 - self.win]
        self.reference = f"{v} {unit}"
        self.options = (f"{a} {unit}", f"{b} {unit}")
        self.right_forms = [f"{v} {unit}", f"{v} {long}", f"{NUMBER_WORDS[v]} {long}", f"{v * factor} {small}",
                            f"{v * factor} {small_long}", f"{v}{unit}"]
        self.near = [f"{v} {small}", f"{v} {small_long}", f"{w} {long}", f"{NUMBER_WORDS[w]} {long}",
                     f"{v * 10} {unit}", f"{w * factor} {small}"]

    def _make_chemistry(self, rng):
        names = rng.sample(list(ELEMENTS), 2)
        a, b = self.values
        adj = "denser" if self.larger else "less dense"
        self.question = f"Which is {adj}: {names[0]} at {a} g/mL or {names[1]} at {b} g/mL?"
        name, other = names[self.win], names[1 - self.win]
        self.reference = name.capitalize()
        self.options = tuple(names)
        sym = ELEMENTS[name]
        self.right_forms = [name.capitalize(), name, sym, f"{name.capitalize()} ({sym})", f"element {sym}"]
        self.near = [f"{name} {c}" for c in COMPOUNDS] + [other.capitalize(), ELEMENTS[other],
                                                          f"{other.capitalize()} ({sym})"]

    def _make_economics(self, rng):
        bases = rng.sample(FIRMS, 2)
        kinds = [rng.choice(list(LEGAL)) for _ in bases]
        # the question writes each name in full or abbreviated; the reference is always the full name
        written = [f"{base} {LEGAL[k] if rng.random() < 0.5 else k}" for base, k in zip(bases, kinds)]
        a, b = self.values
        self.question = f"Which earned {'more' if self.larger else 'less'}: {written[0]} ({a} million) or " \
                        f"{written[1]} ({b} million)?"
        base, kind = bases[self.win], kinds[self.win]
        self.reference = f"{base} {kind}"
        self.options = tuple(written)
        self.right_forms = [f"{base} {kind}", f"{base} {LEGAL[kind]}", f"{base} {LEGAL[kind]}.", base,
                            f"{base} {kind}".lower(), f"the {base} {kind}"]
        self.near = [f"{base} {k}" for k in LEGAL if k != kind] + [f"{bases[1 - self.win]} {kind}"]

    def _make_geography(self, rng):
        kind = rng.choice(list(FEATURES))
        abbr, adjs, unit = FEATURES[kind]
        places = rng.sample(PLACES, 2)
        written = [f"{abbr} {p}" if rng.random() < 0.5 else f"{kind} {p}" for p in places]
        a, b = self.values
        self.question = f"Which is {adjs[not self.larger]}: {written[0]} ({a} {unit}) or {written[1]} ({b} {unit})?"
        place = places[self.win]
        self.reference = f"{kind} {place}"
        self.options = tuple(written)
        self.right_forms = [f"{kind} {place}", f"{abbr} {place}", f"{abbr}. {place}", place] + (
            [f"mount {place}", f"Mt {place}"] if kind == "Mount" else [f"the {place} {kind}", f"{place} {kind}"])
        self.near = [f"{k} {place}" for k in FEATURES if k != kind] + [f"{kind} {places[1 - self.win]}"]

    def _make_biology(self, rng):
        genera, epithets = rng.sample(GENERA, 2), rng.sample(EPITHETS, 2)
        names = [f"{g} {e}" for g, e in zip(genera, epithets)]
        written = [f"{g[0]}. {e}" if rng.random() < 0.5 else f"{g} {e}" for g, e in zip(genera, epithets)]
        a, b = self.values
        self.question = f"Which is {'longer' if self.larger else 'shorter'}-lived: {written[0]} ({a} years) or " \
                        f"{written[1]} ({b} years)?"
        i = self.win
        self.reference = names[i]
        self.options = tuple(written)
        self.right_forms = [names[i], f"{genera[i][0]}. {epithets[i]}", names[i].lower(), f"{genera[i][0]} {epithets[i]}"]
        self.near = [f"{genera[i]} {epithets[1 - i]}", f"{genera[1 - i]} {epithets[i]}",
                     f"{genera[i][0]}. {epithets[1 - i]}", names[1 - i]]

    @property
    def wrong_option(self) -> str:
        return self.options[1 - self.win]

    def hedges(self) -> list[str]:
        """Answers listing both options (the right one among them): a judge must not accept them."""
        right, wrong = self.options[self.win], self.options[1 - self.win]
        return [f"{right} or {wrong}", f"{wrong} or {right}", f"{self.reference} or {wrong}",
                f"either {right} or {wrong}"]


def _problems(n: int, seed: int, pool: str) -> list[Problem]:
    """n distinct problems of `pool` ("rl" or "verifier": disjoint halves of the question space, by a
    salted question hash), subjects in turn."""
    rng = random.Random(f"freeform:{pool}:{seed}")
    out, seen, i = [], set(), 0
    for _ in range(100 * n):
        if len(out) == n:
            break
        p = Problem(SUBJECTS[i % len(SUBJECTS)], rng)
        if p.question not in seen and _pool(p.question) == pool:
            seen.add(p.question)
            out.append(p)
            i += 1
    if len(out) < n:
        raise ValueError(f"the free-form world has fewer than {n} distinct {pool} questions")
    return out


def _pool(question: str) -> str:
    """The half of the question space a question belongs to: RL questions and the verifier's rows
    never share a question (the paper keeps distillation prompts out of RL)."""
    return "verifier" if int(hashlib.sha256(f"pool {question}".encode()).hexdigest()[:8], 16) % 2 else "rl"


def _record(p: Problem, row: int, system_prompt: str = SYSTEM_PROMPT) -> data.Record:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": p.question})
    return data.make_record(p.question, p.reference, messages, {"subject": p.subject, "source": "freeform", "row": row})


def records(n: int = RL_QUESTIONS, seed: int = 0, system_prompt: str = SYSTEM_PROMPT) -> list[data.Record]:
    """The RL data set: `n` distinct questions, the subjects in turn, each with its expert reference.
    Fixed by `seed` (train_rl.py uses seed 0 whatever the run's seed, like a released data set)."""
    return [_record(p, i + 1, system_prompt) for i, p in enumerate(_problems(n, seed, "rl"))]


def split(recs: list[data.Record], heldout_fraction: float = 0.1) -> tuple[list[data.Record], list[data.Record]]:
    """(train, held-out): train_rl.py's split (data.split_heldout by question hash)."""
    return data.split_heldout(recs, heldout_fraction)


# ----------------------------------------------------------------------------------------------
# the teacher: parses the reference, knows every alias, abbreviation, unit and number word


_ARTICLE = re.compile(r"^(?:the|a|an)\s+")
_ANSWER_PREFIX = re.compile(r"^\s*(?:therefore\s*,?\s*)?the answer is\s*:?\s*")


def _norm(text: str) -> str:
    """The last line, casefolded, an answer prefix, a leading article, dots after letters and
    trailing punctuation removed, whitespace collapsed."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    s = " ".join(lines[-1].casefold().split()) if lines else ""
    s = _ANSWER_PREFIX.sub("", s)
    s = re.sub(r"(?<=[a-z])\.(?=\s|$)", "", s).rstrip(" .!")
    return _ARTICLE.sub("", s)


def _quantity(text: str) -> tuple[str, float] | None:
    """("mass", grams) or ("length", centimetres) of "7 kg", "seven kilograms", "7000 g"; else None."""
    m = re.fullmatch(r"(\d+|[a-z]+)\s*([a-z]+)", text.casefold())
    if not m:
        return None
    number, unit = m.groups()
    value = int(number) if number.isdigit() else NUMBER_WORDS.index(number) if number in NUMBER_WORDS else None
    if value is None:
        return None
    for dim, (u, long, small, small_long, factor) in UNITS.items():
        names = {u.lower(): factor, long: factor, long[:-1]: factor, small.lower(): 1, small_long: 1, small_long[:-1]: 1}
        if dim == "length":
            names |= {"meters": factor, "meter": factor, "centimeters": 1, "centimeter": 1}
        if dim == "volume":
            names |= {"liters": factor, "liter": factor, "milliliters": 1, "milliliter": 1, "l": factor, "ml": 1}
        if dim == "time":
            names |= {"hr": factor, "hrs": factor, "mins": 1}
        if unit in names:
            return dim, value * names[unit]
    return None


def accepted(reference: str) -> set[str] | tuple[str, float]:
    """What the teacher accepts for an expert reference: a quantity (dimension, value in the small
    unit), or the set of normalised names of the entity."""
    ref = _norm(reference)
    if (q := _quantity(ref)) is not None:
        return q
    words = ref.split()
    if len(words) == 2 and words[1] in {k.lower() for k in LEGAL}:
        base, kind = words
        abbr = LEGAL[kind.capitalize()].lower()
        return {ref, f"{base} {abbr}", base}
    if len(words) == 2 and words[0] in {k.lower() for k in FEATURES}:
        kind, place = words
        abbr = FEATURES[kind.capitalize()][0].lower()
        return {ref, f"{abbr} {place}", place, f"{place} {kind}"}
    if ref in ELEMENTS:
        sym = ELEMENTS[ref].lower()
        return {ref, sym, f"{ref} ({sym})", f"element {sym}"}
    if len(words) == 2 and words[0].capitalize() in GENERA:
        return {ref, f"{words[0][0]} {words[1]}"}
    return {ref}  # a reference outside the world: normalised exact match


def judge(reference: str, response: str) -> int:
    """1 if the response's answer (its last line) means the reference, else 0."""
    want, got = accepted(reference), _norm(response)
    if isinstance(want, tuple):
        return int(_quantity(got) == want)
    return int(got.replace(".", "") in {w.replace(".", "") for w in want})


def teacher(questions: list[str], references: list[str], responses: list[str]) -> list[float]:
    """The free-form world's judge (verifier spec py:worlds.freeform:teacher): 0/1 per response."""
    return [float(judge(ref, resp)) for ref, resp in zip(references, responses)]


def noisy_teacher(rate: float, judge_of=None):
    """The teacher (or `judge_of(reference, response)`, another world's) with each label flipped with
    probability `rate`, decided by a hash of (question, reference, response): the same row always gets
    the same label, whatever the batch or the run."""
    def judge_noisy(questions, references, responses):
        out = []
        for q, ref, resp in zip(questions, references, responses):
            u = int(hashlib.sha256(f"noise {rate} {q}\n{ref}\n{resp}".encode()).hexdigest()[:8], 16) / 16 ** 8
            y = (judge_of or judge)(ref, resp)
            out.append(float(1 - y if u < rate else y))
        return out
    judge_noisy.__name__ = f"teacher_noisy{round(rate * 100)}"
    return judge_noisy


teacher_noisy10 = noisy_teacher(0.10)  # py:worlds.freeform:teacher_noisy10
teacher_noisy20 = noisy_teacher(0.20)  # py:worlds.freeform:teacher_noisy20


# ----------------------------------------------------------------------------------------------
# the warm start and the verifier's rows


def _warm_response(p: Problem, rng: random.Random) -> str:
    """An instruct model's habits: the option as the question wrote it (40%), the expert's form (20%),
    another right form (30%), or a hedge naming both options (10%)."""
    u = rng.random()
    if u < 0.4:
        return p.options[p.win]
    if u < 0.6:
        return p.reference
    if u < 0.9:
        return rng.choice(p.right_forms)
    return rng.choice(p.hedges())


def warm_start_pairs(heldout_fraction: float) -> list[tuple[list[dict], str]]:
    """(messages, response) pairs on the RL training questions (never the held-out ones), answers in
    the mix of surface forms of _warm_response."""
    rng = random.Random("freeform-warm")
    problems = _problems(RL_QUESTIONS, 0, "rl")
    heldout = {r.question for r in split(records(), heldout_fraction)[1]}
    return [(_record(p, 0).messages, _warm_response(p, rng)) for p in problems if p.question not in heldout]


def sft_pairs(recs: list[data.Record]) -> list[tuple[list[dict], str]]:
    """(messages, reference) pairs: supervised fine-tuning on the expert's answers (the SFT baseline)."""
    return [(r.messages, r.reference) for r in recs]


def tiny_policy(heldout_fraction: float = 0.1) -> str:
    """The free-form world's policy (train_rl.py --policy tiny --data freeform): the tiny model with
    this world's tokenizer, warm-started for WARM_START_STEPS on the RL training questions (never the
    held-out ones). One fixed model, cached; call it on every rank: rank 0 builds, the others wait."""
    path = None
    if distributed.rank() == 0:
        path = toy.build_tiny_model(seed=0, sft_pairs=warm_start_pairs(heldout_fraction),
                                    sft_steps=WARM_START_STEPS, corpus=CORPUS)
    return distributed.broadcast_object(path)


VERIFIER_RECIPES = [Path(__file__).resolve().parents[1] / "recipes" / "verifier_freeform.yaml"]


def tiny_verifier() -> str:
    """The student distilled from the teacher on this world (recipes/verifier_freeform.yaml), cached by
    the recipe's text and this file's: train_rl.py --verifier tiny --data freeform."""
    return toy.tiny_verifier(VERIFIER_RECIPES, extra=Path(__file__).read_text())


JUDGE_KINDS = ("other", "near", "hedge", "copy", "garbage", "cut")


def parse_mix(mix: str) -> list[tuple[str, int]]:
    """"other:600,near:600" -> [("other", 600), ("near", 600)]; ValueError naming the bad part."""
    return toy.parse_mix(mix, JUDGE_KINDS)


def judge_rows(mix: str, seed: int) -> list[data.JudgedRow]:
    """Rows for verifier distillation, labelled by the teacher, on questions of the verifier's half of
    the question space (never an RL question). Each kind is half right answers (any surface form) and
    half wrong ones of that kind:
      other    the other option, in any of its forms
      near     lexical near-misses: the right number with the wrong unit, the same firm name with another
               legal form, another feature of the same place, a compound, the genus with the other epithet
      hedge    both options named
      copy     the question itself, or a fragment of it
      garbage  fragments of answers in a row: the stutters a policy drifts into
      cut      a right answer cut short ("M.", "Mir", "Mt"), or its words with another name ("Mt Ltd"); the
               teacher's label decides ("Birch", cut from "Birch Ltd", is right)"""
    rng = random.Random(f"freeform-judge:{seed}")
    problems = _problems(1000, seed, "verifier")
    out = []
    for kind, count in parse_mix(mix):
        for _ in range(count):
            p = rng.choice(problems)
            if rng.random() < 0.5:
                text = rng.choice(p.right_forms + [p.options[p.win]])
            elif kind == "other":
                text = rng.choice([p.wrong_option, p.wrong_option.lower()])
            elif kind == "near":
                text = rng.choice(p.near)
            elif kind == "hedge":
                text = rng.choice(p.hedges())
            elif kind == "copy":
                words = p.question.split()
                i = rng.randrange(len(words))
                text = rng.choice([p.question, " ".join(words[i:i + rng.randrange(2, 6)])])
            elif kind == "garbage":
                pieces = p.question.rstrip("?").split() + p.right_forms[0].split() + p.wrong_option.split()
                text = " ".join(rng.choice(pieces) for _ in range(rng.randrange(1, 5)))
            else:
                form = rng.choice(p.right_forms)
                words = form.split()
                text = rng.choice([form[:rng.randrange(1, len(form))], words[0] + " " + rng.choice(
                    list(LEGAL) + list(LEGAL.values()) + list(FEATURES) + list(PLACES[:3] + FIRMS[:3] + EPITHETS[:3]))])
            out.append(data.JudgedRow(p.question, p.reference, text, label=judge(p.reference, text)))
    return out


# ----------------------------------------------------------------------------------------------
# the rules measured on this world


RULE_SPECS = ("rule:substring", "rule:exact", "rule:jaccard", "rule:math")


def rule_errors(rows: list[tuple[str, str, str, str]], specs: tuple[str, ...] = RULE_SPECS) -> dict:
    """{rule: {subject: (false-positive rate, false-negative rate, negatives, positives)}} of each rule
    against the teacher on (subject, question, reference, response) rows; rule:jaccard is thresholded
    at 0.5 (its soft score), the others are their binary."""
    from rlvr import verifiers

    labels = teacher([], [r[2] for r in rows], [r[3] for r in rows])
    out = {}
    for spec in specs:
        j = verifiers.build_verifier(spec)
        got = j([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
        yes = (got.soft >= 0.5).tolist() if spec == "rule:jaccard" else got.binary.bool().tolist()
        if getattr(j, "math", None) is not None:
            j.math.close()  # the math-verify worker processes
        table = {}
        for subject in SUBJECTS + ("all",):
            idx = [i for i, r in enumerate(rows) if subject in ("all", r[0])]
            neg = [i for i in idx if not labels[i]]
            pos = [i for i in idx if labels[i]]
            table[subject] = (sum(yes[i] for i in neg) / max(1, len(neg)), sum(not yes[i] for i in pos) / max(1, len(pos)),
                              len(neg), len(pos))
        out[spec] = table
    return out


def policy_rollouts(n_questions: int, samples: int, seed: int = 0, max_new_tokens: int = 12) -> list[tuple]:
    """(subject, question, reference, response) of the warm-started policy on RL training questions,
    sampled at temperature 1 as train_rl.py samples them."""
    from types import SimpleNamespace

    from rlvr import model
    from rlvr import rollout

    path = tiny_policy()
    tokenizer, policy = model.load_tokenizer(path), model.load_model(path)
    recs = split(records())[0][:n_questions]
    opts = SimpleNamespace(samples_per_prompt=samples, max_prompt_len=1024, seed=seed, max_new_tokens=max_new_tokens,
                           temperature=1.0, top_p=1.0)
    out = []
    for step, start in enumerate(range(0, len(recs), 32)):
        drawn = rollout.generate(policy, None, tokenizer, recs[start:start + 32], step, opts)
        out += [(r.meta["subject"], r.question, r.reference, t) for r, t in zip(drawn.records, drawn.texts)]
    return out


def print_rule_table(title: str, errors: dict) -> None:
    print(f"\n{title}: false-positive rate / false-negative rate against the teacher (rule:jaccard at >= 0.5)")
    print("| rule | " + " | ".join(SUBJECTS + ("all",)) + " |")
    print("|---|" + "---|" * (len(SUBJECTS) + 1))
    for spec, table in errors.items():
        print(f"| {spec} | " + " | ".join(f"{fp:.2f} / {fn:.2f}" for fp, fn, _, _ in table.values()) + " |")
    neg, pos = next(iter(errors.values()))["all"][2:]
    print(f"({neg} wrong and {pos} right answers by the teacher)")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m worlds freeform", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rules", help="each rule's false-positive / false-negative rate against the teacher, per subject")
    r.add_argument("--questions", type=int, default=200, help="RL training questions the warm-started policy answers")
    r.add_argument("--samples", type=int, default=4, help="answers sampled per question")
    r.add_argument("--mix", default="other:400,near:400,hedge:200,copy:200", help="the world's judged rows (judge_rows)")
    sub.add_parser("examples", help="a question per subject with its reference, right and wrong answers")
    args = ap.parse_args(argv)
    if args.cmd == "examples":
        for p in _problems(len(SUBJECTS), 0, "rl"):
            print(f"[{p.subject}] {p.question}\n  reference: {p.reference}\n  right: {p.right_forms}\n"
                  f"  near-misses (wrong): {p.near}\n  hedges (wrong): {p.hedges()[:2]}")
        return
    rows = policy_rollouts(args.questions, args.samples)
    print_rule_table(f"the warm-started policy's answers ({args.questions} questions x {args.samples})", rule_errors(rows))
    judged = [(subject_of(r.question), r.question, r.reference, r.response) for r in judge_rows(args.mix, 0)]
    print_rule_table(f"the world's judged rows ({args.mix})", rule_errors(judged))


def subject_of(question: str) -> str:
    """The subject of one of this world's questions, from its wording."""
    if re.match(r"Which is \w+: \d+ \w+ or \d", question):
        return "physics"
    for subject, word in (("chemistry", "g/mL"), ("economics", "earned"), ("biology", "-lived")):
        if word in question:
            return subject
    return "geography"
