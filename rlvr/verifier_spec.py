"""The verifier spec grammar, parsed once into a typed value (VerifierSpec); every other file takes
that value. The forms, in any verifier role (--verifier, --eval_verifier, --audit_verifier,
--log_verifiers, train_verifier.py --teacher / --verifier):

    rule:<substring|exact|jaccard|math>     a rule baseline (rlvr/rules.py)
    py:<module.path or file.py>:<function>  a Python judge (rlvr/verifiers.PyVerifier)
    hybrid:<model verifier>                 rule:math where it grades right, the model elsewhere
    policy:<rlpr|verifree>                  the policy's own probability of the reference (--verifier only)
    http(s)://host:port[,http://host2:port] vLLM servers, round robin
    <family>:<model verifier>               a model asked in a family's format (verifier_families.py)
    tiny                                    the --data world's distilled demo verifier (worlds/)
    auto, self                              --eval_verifier / --audit_verifier: the world's teacher or a
                                            math rule / the reward verifier itself
    anything else                           a model directory or hub name

Imports verifier_families only (the family names).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlvr import verifier_families

POLICY_SOURCES = ("rlpr", "verifree")  # policy:<source>, verifier_free.py's rewards without a verifier
Kind = Literal["rule", "py", "hybrid", "policy", "http", "model", "tiny", "auto", "self"]
WORDS = ("tiny", "auto", "self")


@dataclass(frozen=True)
class VerifierSpec:
    """One verifier spec, parsed. `target`: the rule's name, py:'s module:function, policy:'s source, the
    model's directory or hub name, the endpoints joined by commas; `family`: <family>:<model>'s family;
    `inner`: hybrid:'s model verifier; `endpoints`: http's servers."""
    text: str
    kind: Kind
    target: str = ""
    family: str | None = None
    inner: "VerifierSpec | None" = None
    endpoints: tuple[str, ...] = ()

    @property
    def bare(self) -> str:
        """The spec without its <family>: prefix."""
        return split_family(self.text)[1]

    @property
    def model_verifier(self) -> "VerifierSpec":
        """The spec of the model this verifier asks (hybrid's inner one, else itself)."""
        return self.inner if self.kind == "hybrid" and self.inner is not None else self


def split_family(spec: str) -> tuple[str | None, str]:
    """("compass", "org/CompassVerifier-7B") for "compass:org/CompassVerifier-7B": a model verifier asked in
    a named family's format (verifier_families.py) in any role. Eval, audit and log-only judges take no
    prompt flags, so a released judge without verifier_settings.json (CompassVerifier, xVerify) is named
    this way, not asked with the paper's prompt. (None, spec) for any other spec."""
    head, sep, rest = spec.partition(":")
    return (head, rest) if sep and head in verifier_families.FAMILIES else (None, spec)


def parse(text: str) -> VerifierSpec:
    """The spec's structure; whether its names exist (a rule, a source, a module, a model) is checked
    where it is built (rlvr/verifiers.check_spec, before any model loads)."""
    family, rest = split_family(text)
    if family is not None:
        inner = parse(rest)
        return VerifierSpec(text, inner.kind, inner.target, family, inner.inner, inner.endpoints)
    if text in WORDS:
        return VerifierSpec(text, text)
    for prefix in ("rule", "py", "policy"):
        if text.startswith(prefix + ":"):
            return VerifierSpec(text, prefix, text[len(prefix) + 1:])
    if text.startswith("hybrid:"):
        return VerifierSpec(text, "hybrid", text[len("hybrid:"):], inner=parse(text[len("hybrid:"):]))
    if text.startswith(("http://", "https://")):
        endpoints = tuple(e.strip() for e in text.split(",") if e.strip())
        return VerifierSpec(text, "http", ",".join(endpoints), endpoints=endpoints)
    return VerifierSpec(text, "model", text)
