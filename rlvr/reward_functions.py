"""Reward functions written for TRL (or verl), run unchanged: `--verifier py:module:fn` or
`py:path/to/file.py:fn` (a file, as verl's custom_reward_function.path), several at once with weights
(`--verifier py:a:f,py:b:g --reward_weights 1,0.5`, TRL's reward_funcs + reward_weights).

A function is called the way its parameters say, never by guessing an order:
  TRL's way        fn(prompts=[...], completions=[...], **columns) when it names `prompts` or `completions`
                   or takes **kwargs; columns are the data set's other columns, by their names (the
                   reference under --answer_field's name, e.g. `solution`, and subject, ...), one list entry
                   per completion. It returns one number per completion: any finite float (normalising is
                   the estimator's job), or None where it does not apply (adds 0, as TRL's nansum).
  the project's    fn(questions, references, responses) -> scores in [0, 1] (a judge, verifiers.PyVerifier):
                   only when its parameters are exactly those names.
Anything else is refused naming both signatures: a positional (prompt, completion, answer) would
otherwise be handed the reference as the completion.
prompts and completions are strings (TRL's standard format): the question and the response. When the
--data prompt column holds chat messages (TRL's conversational format), prompts are the message lists
and each completion is [{"role": "assistant", "content": response}], as TRL passes them.
Imports config, remote (VerifierError) and data (is_conversational) only; verifiers.RewardFunctionVerifier
makes these a verifier (a Judgement per call).
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import inspect
import math
import os
import sys
from pathlib import Path

import torch

from rlvr import config
from rlvr.remote import VerifierError

PROJECT_PARAMS = ("questions", "references", "responses")
PROVENANCE = ("source", "row")  # what data.load_records adds to a row's meta: where it came from, not a column
TRL_SIGNATURE = "fn(prompts, completions, **kwargs) -> list[float] (TRL's reward function)"
PROJECT_SIGNATURE = "fn(questions, references, responses) -> list[float] in [0, 1] (a judge)"


def split_specs(spec: str) -> list[str]:
    """"py:a:f,py:b:g" -> ["py:a:f", "py:b:g"]; one spec -> [spec]."""
    return [s.strip() for s in spec.split(",") if s.strip()]


def is_function_list(spec: str) -> bool:
    """Several py: functions, summed with --reward_weights."""
    parts = split_specs(spec)
    return len(parts) > 1 and all(p.startswith("py:") for p in parts)


def is_trl(spec: str) -> bool:
    """Is this py: spec TRL reward functions (several, or one whose parameters say so)? ValueError naming the
    spec when it is neither kind."""
    return is_function_list(spec) or convention(load_function(spec), spec) == "trl"


def load_function(spec: str):
    """The callable named by "py:module.path:fn" or "py:path/to/file.py:fn" (relative to the working
    directory). ValueError naming the spec for a missing module, file or function."""
    target, _, name = spec[len("py:"):].rpartition(":")
    if not target or not name:
        raise ValueError(f"verifier {spec!r}: expected py:module.path:function or py:path/to/file.py:function")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"verifier {spec!r}: no such file {target}")
        module_name = "rlvr_reward_" + "".join(c if c.isalnum() else "_" for c in str(path))
        module = sys.modules.get(module_name)
        if module is None:
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
            try:
                loader.loader.exec_module(module)
            except Exception as e:
                del sys.modules[module_name]
                raise ValueError(f"verifier {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
        where = f"file {target}"
    else:
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # a user's module in the working directory, as `python -m` finds it
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"verifier {spec!r}: cannot import module {target!r}: {e}") from e
        where = f"module {target!r}"
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"verifier {spec!r}: {where} has no function {name!r}")
    return fn


def convention(fn, spec: str) -> str:
    """"trl" or "project", from the parameter names (see the module's docstring); ValueError naming both
    expected signatures otherwise."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        params = None
    if params is not None:
        names = [p.name for p in params]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if tuple(positional[:3]) == PROJECT_PARAMS and all(
                p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[3:]):
            return "project"
        if "prompts" in names or "completions" in names or any(p.kind == p.VAR_KEYWORD for p in params):
            return "trl"
    got = f"({', '.join(str(p) for p in params)})" if params is not None else "(no signature)"
    raise ValueError(f"verifier {spec!r}: its parameters {got} are neither {TRL_SIGNATURE} nor {PROJECT_SIGNATURE}; "
                     "name them so (arguments are never matched by position)")


def parse_weights(text: str, n: int, flag: str = "reward_weights") -> list[float]:
    """--reward_weights "1,0.5" -> [1.0, 0.5] for n functions ('' : all 1). ConfigError naming the flag."""
    if not text.strip():
        return [1.0] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise config.ConfigError(f"--{flag} {text!r}: expected comma-separated numbers, e.g. 1,0.5") from None
    config.require(all(math.isfinite(w) for w in weights), flag, text, "weights must be finite")
    config.require(len(weights) == n, flag, text, f"{len(weights)} weights for {n} reward function(s) in --verifier; "
                   "give one per function, in their order")
    return weights


def is_conversational(data: str, split: str, prompt_field: str) -> bool:
    """Does --data's prompt column hold chat messages (TRL's conversational format)? Its first row says."""
    import data as data_mod

    try:
        _, rows = data_mod.iter_rows(data, split)
        row = next((r for _, r in rows if isinstance(r, dict)), None)
    except (data_mod.DataError, OSError, StopIteration):
        return False
    return isinstance(row, dict) and isinstance(row.get(prompt_field), list)


class RewardFunctions:
    """TRL reward functions (one or several, weighted): `scores` is their weighted sum per completion (any
    finite float). `rows(records, answer_field, conversational)` gives the data set's columns; without it
    (train_verifier.py's judged rows) the reference is the column `reference`."""

    def __init__(self, specs: list[str], weights: list[float] | None = None):
        self.specs = specs
        self.fns = [load_function(s) for s in specs]
        for fn, s in zip(self.fns, specs):
            if convention(fn, s) != "trl":
                raise ValueError(f"verifier {s!r}: a judge fn(questions, references, responses) cannot be summed "
                                 f"with others; write it as {TRL_SIGNATURE}")
        self.weights = weights or [1.0] * len(specs)
        self.name = ",".join(specs)
        self.answer_field, self.conversational, self.by_question = "reference", False, {}
        self.recent = collections.OrderedDict()  # (rows) -> each function's scores: `part` reads them, not recalls

    def rows(self, records, answer_field: str, conversational: bool) -> "RewardFunctions":
        """Look each call's rows up by (question, reference) in `records` (data.Record) for their columns."""
        self.answer_field, self.conversational = answer_field, conversational
        for r in records:
            self.by_question.setdefault((r.question, r.reference), r)
        return self

    def arguments(self, questions: list[str], references: list[str], responses: list[str]) -> dict:
        """The keyword arguments TRL passes: prompts, completions and every column, one entry per completion."""
        found = [self.by_question.get((q, ref)) for q, ref in zip(questions, references)]
        if self.conversational:
            prompts = [r.messages if r is not None else [{"role": "user", "content": q}] for r, q in zip(found, questions)]
            completions = [[{"role": "assistant", "content": t}] for t in responses]
        else:
            prompts, completions = list(questions), list(responses)
        keys = {}  # column name -> its key in Record.meta (data.load_records: the file's own "source"/"row"
        for r in found:  # are kept as data_source/data_row beside where the row came from, which is no column)
            for key in (r.meta if r is not None else {}):
                if key not in PROVENANCE:
                    keys.setdefault(key.removeprefix("data_") if key in ("data_source", "data_row") else key, key)
        columns = {name: [None if r is None else r.meta.get(key) for r in found] for name, key in keys.items()}
        columns[self.answer_field] = list(references)
        return {"prompts": prompts, "completions": completions, **columns}

    def scores(self, questions: list[str], references: list[str], responses: list[str]) -> torch.Tensor:
        """The weighted sum per completion; VerifierError naming the function for a wrong answer."""
        parts = self.function_scores(questions, references, responses)
        return sum((w * p for w, p in zip(self.weights, parts)), torch.zeros(len(responses), dtype=torch.float64)).float()

    def part(self, i: int, questions: list[str], references: list[str], responses: list[str]) -> torch.Tensor:
        """Function i's own scores (unweighted) for these rows: from the call that just scored them (the
        per-function log, TRL's rewards/<name>), else computed."""
        key = (tuple(questions), tuple(references), tuple(responses))
        parts = self.recent.get(key)
        return (parts if parts is not None else self.function_scores(questions, references, responses))[i].float()

    def function_scores(self, questions: list[str], references: list[str], responses: list[str]) -> list[torch.Tensor]:
        """Each function's scores, float64, None (not applicable) as 0; VerifierError naming the function
        for an answer that is not one finite float per completion."""
        kwargs = self.arguments(questions, references, responses)
        parts = []
        for spec, fn in zip(self.specs, self.fns):
            own = torch.zeros(len(responses), dtype=torch.float64)
            try:
                params = inspect.signature(fn).parameters
                takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
                out = fn(**(kwargs if takes_all else {k: v for k, v in kwargs.items() if k in params}))
            except Exception as e:  # the user's code: one line naming it, what it was given and what it should take
                given = ", ".join(k for k in kwargs if k not in ("prompts", "completions"))
                form = "lists of messages (conversational --data)" if self.conversational else "strings"
                raise VerifierError(f"reward function {spec!r} raised {type(e).__name__}: {e}; expected {TRL_SIGNATURE}, "
                                    f"called with prompts and completions as {form} and the columns {given}") from e
            try:
                values = list(out)
            except TypeError:
                raise VerifierError(f"reward function {spec!r} returned {type(out).__name__}; expected a list of "
                                    f"{len(responses)} floats, one per completion") from None
            if len(values) != len(responses):
                raise VerifierError(f"reward function {spec!r}: returned {len(values)} values for {len(responses)} "
                                    "completions; expected one per completion")
            for i, v in enumerate(values):
                if v is None:  # not applicable to this row (TRL: nansum)
                    continue
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    raise VerifierError(f"reward function {spec!r}: returned {v!r:.40} for completion {i}; expected "
                                        "a float") from None
                if not math.isfinite(x):
                    raise VerifierError(f"reward function {spec!r}: returned {x} for completion {i} (question "
                                        f"{questions[i][:60]!r}); rewards must be finite")
                own[i] = x
            parts.append(own)
        self.recent[(tuple(questions), tuple(references), tuple(responses))] = parts
        while len(self.recent) > 8:  # a few calls back: threads judge groups of one step concurrently
            self.recent.popitem(last=False)
        return parts


def find(verifier):
    """The RewardFunctions inside a verifier (hybrid:py:... holds it as .model), else None."""
    while verifier is not None and not isinstance(verifier, RewardFunctions):
        verifier = getattr(verifier, "model", None)
    return verifier if isinstance(verifier, RewardFunctions) else None


def check_on_rows(spec: str, weights: list[float] | None, records, answer_field: str, conversational: bool,
                  flag: str) -> None:
    """Call the reward functions of `spec` on real rows of the data (each with its reference, and an
    empty answer, as completions) before any model loads; ConfigError naming the flag."""
    try:
        fns = RewardFunctions(split_specs(spec.removeprefix("hybrid:")), weights)
    except ValueError as e:
        raise config.ConfigError(f"--{flag} {spec!r}: {e}") from None
    rows = list(records[:4])
    fns.rows(rows, answer_field, conversational)
    try:
        fns.scores([r.question for r in rows] * 2, [r.reference for r in rows] * 2,
                   [r.reference for r in rows] + [""] * len(rows))
    except VerifierError as e:
        raise config.ConfigError(f"--{flag}: {e} (tried on {len(rows)} rows of the data before any model loads)") from None
