"""The verifier spec grammar (rlvr/verifier_spec.py): every form a verifier flag takes, and what it parses to.
A spec string is parsed there once; this table is the grammar's contract."""
import pytest

from rlvr.verifier_spec import VerifierSpec, parse

FORMS = [
    ("rule:math", dict(kind="rule", target="math")),
    ("rule:substring", dict(kind="rule", target="substring")),
    ("py:worlds.freeform:teacher", dict(kind="py", target="worlds.freeform:teacher")),
    ("policy:rlpr", dict(kind="policy", target="rlpr")),
    ("policy:verifree", dict(kind="policy", target="verifree")),
    ("http://judge:8000", dict(kind="http", target="http://judge:8000", endpoints=("http://judge:8000",))),
    ("https://a:1, http://b:2,", dict(kind="http", target="https://a:1,http://b:2", endpoints=("https://a:1", "http://b:2"))),
    ("runs/v/final", dict(kind="model", target="runs/v/final")),
    ("virtuoussy/Qwen2.5-7B-Instruct-RLVR", dict(kind="model", target="virtuoussy/Qwen2.5-7B-Instruct-RLVR")),
    ("tiny", dict(kind="tiny")),
    ("auto", dict(kind="auto")),
    ("self", dict(kind="self")),
    ("compass:org/CompassVerifier-7B", dict(kind="model", target="org/CompassVerifier-7B", family="compass")),
    ("xverify:http://judge:8000", dict(kind="http", target="http://judge:8000", family="xverify",
                                       endpoints=("http://judge:8000",))),
    ("", dict(kind="model", target="")),  # refused where it is built: "empty verifier spec"
]


@pytest.mark.parametrize("text,want", FORMS, ids=[f or "empty" for f, _ in FORMS])
def test_every_spec_form_parses_to_its_kind_and_target(text, want):
    s = parse(text)
    assert s.text == text
    for key, value in want.items():
        assert getattr(s, key) == value, (key, getattr(s, key))
    assert s.model_verifier is s and s.bare == text.partition(":")[2] if s.family else s.bare == text


def test_hybrid_holds_its_model_verifier_parsed():
    s = parse("hybrid:compass:runs/v")
    assert (s.kind, s.target) == ("hybrid", "compass:runs/v")
    assert s.inner == VerifierSpec("compass:runs/v", "model", "runs/v", family="compass")
    assert s.model_verifier is s.inner
    assert parse("hybrid:tiny").inner.kind == "tiny"
    assert parse("hybrid:py:worlds.freeform:teacher").inner.kind == "py"


def test_a_family_word_is_a_family_only_before_a_colon():
    # "rm" alone is a model named rm (a directory), not the family; "rule" is no family
    assert parse("rm").kind == "model" and parse("rm").family is None
    assert parse("rule:math").family is None
    assert parse("rm:runs/v").family == "rm"
