"""reward.py: template bytes, last line and <think>, Eq. 3 / Eq. 4 by hand (greedy and sampled c),
verifier settings saved with the weights, the local verifier against plain forwards, rules (rule:math
against a public labelled set), agreement figures and the master-key probe. The HTTP transport and the
math-verify pool are tested in test_remote.py."""
import json
import math
import re
import threading
from pathlib import Path

import pytest
import torch

import reward
from rlvr import audit, config, rules, verifier_prompt, verifiers
from rlvr.remote import VerifierError
from reward import Judgement, judgement_rewards, rewards_from_logits
from rlvr.verifier_prompt import VerifierSettings, last_line
from rlvr.verifiers import VerifierOptions

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
FINAL_LINES = ROOT / "tests" / "data" / "math_final_lines.jsonl"

# A hard-coded copy of the paper's prompt (two trailing spaces on every non-empty line but "---").
PAPER_TEMPLATE = """Given a problem, determine whether the final answer in the provided (incomplete) solution process matches the reference answer.  
The reference answer may be one single option character (e.g., A, B, C, D), a numerical value, an expression, or a list of answers if multiple questions are involved.  
**The reference answer may be in Chinese or another language, but your evaluation should be language-agnostic.**  

Your task:  
- Compare the final output of the solution process with the reference answer.  
- If they **match exactly**, output **YES**.  
- If they **do not match**, output **NO**.  
- If the solution process is unclear, incomplete, or ambiguous, assume it is incorrect and output **NO**.  

Your output must be strictly **'YES'** or **'NO'**, with no additional words, punctuation, or explanation.  

---

**Question:**  
{question}  

**Solution Process (Final Step Only):**  
{response}  

**Reference Answer:**  
{reference}  

**Output:**  
"""  # noqa: W291


# ---------------------------------------------------------------------------------------------- the input


def test_template_bytes_match_the_hard_copy():
    assert verifier_prompt.TEMPLATE.encode() == PAPER_TEMPLATE.encode()
    assert verifier_prompt.TEMPLATE.count("  \n") == 16 and verifier_prompt.TEMPLATE.endswith("**Output:**  \n")
    assert verifier_prompt.SYSTEM_PROMPT == "You are a helpful assistant."


def test_template_bytes_match_method_md():
    block = re.search(r"\n```\n(Given a problem.*?\n)```\n", METHOD.read_text(encoding="utf-8"), re.S).group(1)
    assert verifier_prompt.TEMPLATE.encode() == block.encode()


def test_fill_template_keeps_braces_in_values_literal():
    out = verifier_prompt.fill_template("Q={question}|R={reference}|A={response}", "a {response} {x}", "7", "z")
    assert out == "Q=a {response} {x}|R=7|A=z"


@pytest.mark.parametrize("text,expected", [
    ("a\nb\nTherefore, the answer is 7.", "Therefore, the answer is 7."),
    ("a\nlast\n\n\n", "last"),
    ("a\r\nlast\r\n\r\n", "last"),
    ("a\rlast\r", "last"),
    ("no newline at all", "no newline at all"),
    ("a\nlast  \n   \n\t\n", "last"),
    ("  indented last  ", "indented last"),
    ("", ""),
    (" \n \n", ""),
])
def test_last_line(text, expected):
    assert last_line(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("<think>\nwork\nso 5\n</think>\nTherefore, the answer is 7.", "Therefore, the answer is 7."),
    ("<think>a</think>x\n<think>b\n</think>\ny", "y"),                   # every closed block goes
    ("work\nso 5\n</think>\nThe answer is 7", "The answer is 7"),        # the chat template opened the block
    ("<think>\nstill thinking\nso the answer is 5", ""),                 # unclosed: no answer at all
    ("The answer is 7\n<think>\nmore thoughts", ""),
    ("plain\nanswer 3", "answer 3"),
])
def test_think_blocks_go_before_the_last_line(text, expected):
    assert verifier_prompt.answer_text(text) == expected
    assert verifier_prompt.answer_text(text, think=False) == last_line(text)  # strip_think off: as before


def test_prompt_renders_settings_through_the_chat_template(tiny_model_dir):
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)
    ids = verifier_prompt.VerifierPrompt(tok).prompt_ids("What is 3 + 4?", "7", "<think>7?</think>step 1\nThe answer is 7.\n\n")
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                + verifier_prompt.fill_template(verifier_prompt.TEMPLATE, "What is 3 + 4?", "7", "The answer is 7.")
                + "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids) == expected
    bare = VerifierSettings(system_prompt="", full_response=True, template="{reference}|{response}")
    text = tok.decode(verifier_prompt.VerifierPrompt(tok, bare).prompt_ids("q", "r", "step 1\nlast"))
    assert text == "<|im_start|>user\nr|step 1\nlast<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------- Eq. 3 / Eq. 4


def _logits(*rows):
    """Logits whose softmax is exactly the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log()


YES, NO = 1, 2  # ids in a 4-token vocabulary


def test_eq3_eq4_by_hand():
    logits = _logits(
        [0.1, 0.6, 0.2, 0.1],    # c = YES: binary 1, soft = p(YES) = 0.6
        [0.1, 0.3, 0.55, 0.05],  # c = NO: binary 0, soft = 1 - p(NO) = 0.45
        [0.5, 0.3, 0.15, 0.05],  # c = neither: binary 0, soft 0 (renorm too: an unjudged c earns nothing)
        [0.97, 0.0, 0.0, 0.03],  # neither, both 0: renorm 0, not NaN
    )
    j = rewards_from_logits(logits, [YES], [NO])
    assert j.binary.tolist() == [1.0, 0.0, 0.0, 0.0] and j.judged.tolist() == [True, True, False, False]
    torch.testing.assert_close(j.soft, torch.tensor([0.6, 0.45, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(j.p_yes, torch.tensor([0.6, 0.3, 0.3, 0.0]), atol=1e-6, rtol=0)
    r = rewards_from_logits(logits, [YES], [NO], soft_mode="renorm")
    torch.testing.assert_close(r.soft, torch.tensor([0.6 / 0.8, 0.3 / 0.85, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert r.binary.tolist() == j.binary.tolist()
    # ratio: the same ratio whatever c is, the unjudged row too (issue 32: renorm used to do this)
    q = rewards_from_logits(logits, [YES], [NO], soft_mode="ratio")
    torch.testing.assert_close(q.soft, torch.tensor([0.6 / 0.8, 0.3 / 0.85, 0.3 / 0.45, 0.0]), atol=1e-6, rtol=0)
    assert q.binary.tolist() == j.binary.tolist() and q.judged.tolist() == j.judged.tolist()
    for t in (j.binary, j.soft, j.p_yes, r.soft):
        assert t.dtype == torch.float32 and t.device.type == "cpu"


def test_eq4_softmax_is_over_the_whole_vocabulary_and_variants_sum():
    logits = torch.tensor([[0.0, 2.0, 1.0, 1.5]])  # softmax by hand: p = exp(l) / sum(exp(l))
    z = math.exp(0) + math.exp(2) + math.exp(1) + math.exp(1.5)
    assert rewards_from_logits(logits, [YES], [NO]).soft.item() == pytest.approx(math.exp(2) / z, abs=1e-6)
    j2 = rewards_from_logits(logits, [YES, 3], [NO])  # token 3 as a second spelling of YES
    assert j2.p_yes.item() == pytest.approx((math.exp(2) + math.exp(1.5)) / z, abs=1e-6)


def test_sampled_c_inverts_the_cdf_at_the_seeds_uniform():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1], dtype=torch.float64)
    seeds = list(range(40))
    got = reward.first_token(probs.expand(40, 4), seeds).tolist()
    cdf = [0.1, 0.6, 0.9, 1.0]
    want = [next(k for k, c in enumerate(cdf) if reward._uniform(s) < c) for s in seeds]  # by hand
    assert got == want and len(set(got)) == 4
    # a seed's token depends on nothing else: alone, reversed, in another batch
    assert reward.first_token(probs[None], [7]).item() == got[7]
    assert reward.first_token(probs.expand(40, 4), seeds[::-1]).tolist() == got[::-1]


def test_sampled_eq3_and_eq4_read_the_same_c():
    p = [0.05, 0.5, 0.3, 0.15]  # p(YES) 0.5, p(NO) 0.3
    logits, seeds = _logits(*[p] * 3000), list(range(3000))
    j = rewards_from_logits(logits, [YES], [NO], seeds=seeds)
    c = reward.first_token(logits.softmax(-1), seeds)
    soft_by_hand = torch.where(c == YES, 0.5, torch.where(c == NO, 1 - 0.3, 0.0)).float()
    torch.testing.assert_close(j.soft, soft_by_hand)
    assert torch.equal(j.binary, (c == YES).float()) and torch.equal(j.judged, (c == YES) | (c == NO))
    assert 0.46 < j.binary.mean().item() < 0.54  # c ~ p: P(YES) = 0.5
    again = rewards_from_logits(logits[:10], [YES], [NO], seeds=seeds[:10])  # same seeds, other batch
    assert torch.equal(again.binary, j.binary[:10])


def test_judgement_rewards_rejects_unknown_soft_mode():
    with pytest.raises(ValueError, match="renorm"):
        judgement_rewards(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long), soft_mode="bogus")


# ---------------------------------------------------------------------------------------------- settings


CUSTOM = VerifierSettings(template="Q: {question}\nA: {response}\nRef: {reference}\nVerdict:",
                          system_prompt="You grade arithmetic.", full_response=True)


def test_settings_round_trip_and_errors(tmp_path):
    assert verifier_prompt.load_settings(str(tmp_path)) is None  # no file: the paper's defaults apply
    verifier_prompt.save_settings(tmp_path, CUSTOM)
    assert verifier_prompt.load_settings(str(tmp_path)) == CUSTOM
    (tmp_path / verifier_prompt.SETTINGS_FILE).write_text(json.dumps({"positive": "YES", "temprature": "x"}))
    with pytest.raises(ValueError, match=r"verifier_settings.json: field 'temprature'"):
        verifier_prompt.load_settings(str(tmp_path))


def test_resolve_settings_refuses_a_flag_that_contradicts_the_saved_value():
    default = verifier_prompt.resolve_settings(None, {"system_prompt": ""})
    assert default == VerifierSettings(system_prompt="")  # nothing saved: flags apply
    assert verifier_prompt.resolve_settings(CUSTOM, {"full_response": True}) == CUSTOM  # agreeing flags are fine
    with pytest.raises(config.ConfigError, match=r"--verifier_system_prompt 'You are a helpful assistant.'.*"
                                                 r"trained with system_prompt = 'You grade arithmetic.'"):
        verifier_prompt.resolve_settings(CUSTOM, {"system_prompt": verifier_prompt.SYSTEM_PROMPT}, name="student")
    forced = verifier_prompt.resolve_settings(CUSTOM, {"system_prompt": verifier_prompt.SYSTEM_PROMPT}, force=True)
    assert forced.system_prompt == verifier_prompt.SYSTEM_PROMPT and forced.template == CUSTOM.template


def test_verifier_options_check_names_the_flag(tmp_path):
    for bad, match in ((dict(verifier_timeout=0), "--verifier_timeout 0"),
                       (dict(verifier_max_unjudged=2.0), "max_unjudged"),
                       (dict(verifier_template=str(tmp_path / "none.txt")), "no such file"),
                       (dict(verifier_positive="A", verifier_negative="A"), "must differ")):
        with pytest.raises(config.ConfigError, match=match):
            VerifierOptions(**bad).check()
    (tmp_path / "t.txt").write_text("{reference} {response}")
    o = VerifierOptions(verifier_template=str(tmp_path / "t.txt"), verifier_system_prompt="",
                        verifier_strip_think=False)
    assert o.settings_overrides() == {"template": "{reference} {response}", "system_prompt": "", "strip_think": False}


def test_saved_settings_travel_with_the_verifier(tiny_model_dir, tmp_path):
    """A verifier saved with a non-default prompt is asked exactly that way by build_verifier(dir) with
    no flags; a contradicting flag is refused unless forced."""
    import shutil

    from rlvr import model

    student = tmp_path / "student"
    shutil.copytree(tiny_model_dir, student)
    verifier_prompt.save_settings(student, CUSTOM)
    opts = dict(verifier_max_unjudged=1.0)  # the random tiny model answers anything
    built = verifiers.build_verifier(str(student), VerifierOptions(**opts))
    explicit = verifiers.LocalVerifier(model.load_model(str(student)).eval(), model.load_tokenizer(str(student)), CUSTOM,
                                    max_unjudged=1.0)
    rows = (["What is 3 + 4?", "2+2"], ["7", "4"], ["work\nTherefore, the answer is 7.", "<think>x</think>5"])
    assert built.prompt.settings == CUSTOM
    assert [built.prompt.prompt_ids(*r) for r in zip(*rows)] == [explicit.prompt.prompt_ids(*r) for r in zip(*rows)]
    jb, je = built(*rows), explicit(*rows)
    for name in ("binary", "soft", "p_yes", "judged"):
        assert torch.equal(getattr(jb, name), getattr(je, name)), name
    with pytest.raises(config.ConfigError, match="--verifier_system_prompt ''.*You grade arithmetic"):
        verifiers.build_verifier(str(student), VerifierOptions(verifier_system_prompt="", **opts))
    forced = verifiers.build_verifier(str(student),
                                   VerifierOptions(verifier_system_prompt="", verifier_force_settings=True, **opts))
    assert forced.prompt.settings.system_prompt == "" and forced.prompt.settings.template == CUSTOM.template
    # a judge built with settings_from_flags=False ignores the prompt flags and keeps the saved settings
    judge = verifiers.build_verifier(str(student), VerifierOptions(verifier_system_prompt="", **opts),
                                  settings_from_flags=False)
    assert judge.prompt.settings == CUSTOM


# ---------------------------------------------------------------------------------------------- local verifier


def test_judgement_token_resolution(tiny_model_dir):
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)
    yes = tok.encode("YES", add_special_tokens=False)
    assert verifier_prompt.judgement_token_ids(tok, "YES") == yes
    variants = verifier_prompt.judgement_token_ids(tok, "YES", sum_variants=True)
    assert variants[0] == yes[0] and tok.encode(" YES", add_special_tokens=False)[0] in variants
    assert all(len(tok.decode([i]).strip()) == 3 for i in variants)
    with pytest.raises(ValueError, match=r"'Affirmative!' is \d+ tokens .* tiny"):
        verifier_prompt.judgement_token_ids(tok, "Affirmative!", name="tiny")
    with pytest.raises(ValueError, match="share token ids"):
        verifier_prompt.VerifierPrompt(tok, VerifierSettings(positive="YES", negative="YES"))


QS = ["What is 3 + 4?", "What is 9 - 5? " * 6, "Q", "Name the capital of France.", "2+2", "x" * 40, "y"]
REFS = ["7", "4", "A", "Paris", "4", "B", "C"]
RESP = ["work\nTherefore, the answer is 7.", "NO", "", "Paris\r\n\r\n", "5", "long " * 30, "Therefore, YES"]


def _tiny_local(tiny_model_dir, **kw):
    """The random tiny model says neither YES nor NO: its most common argmax becomes "positive" and
    another argmax "negative", so c takes more than one class."""
    from rlvr import model

    m = model.load_model(tiny_model_dir).eval()
    v = verifiers.LocalVerifier(m, model.load_tokenizer(tiny_model_dir), name="tiny", **kw)
    seqs = [v.prompt.prompt_ids(q, r, a) for q, r, a in zip(QS, REFS, RESP)]
    with torch.no_grad():
        plain = torch.cat([m(torch.tensor([s])).logits[:, -1] for s in seqs])
    top = plain.argmax(-1)
    pos = int(top.mode().values)
    v.prompt.positive_ids = [pos]
    v.prompt.negative_ids = [next((int(t) for t in top if int(t) != pos), int(plain[0].topk(2).indices[1]))]
    return v, seqs, plain


def test_local_verifier_batched_equals_one_at_a_time(tiny_model_dir):
    v, seqs, plain = _tiny_local(tiny_model_dir, batch_size=3, max_unjudged=1.0)
    assert len({len(s) for s in seqs}) >= 5  # different lengths: padding matters
    torch.testing.assert_close(v.last_logits(seqs), plain, atol=1e-5, rtol=0)
    j = v(QS, REFS, RESP)
    ref = rewards_from_logits(plain, v.prompt.positive_ids, v.prompt.negative_ids)
    for got, want in ((j.binary, ref.binary), (j.soft, ref.soft), (j.p_yes, ref.p_yes)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(j.judged, ref.judged) and j.binary.sum() >= 1 and (j.soft > 0).all()
    assert v([], [], []).binary.numel() == 0
    with pytest.raises(ValueError, match="equally long"):
        v(["q"], [], ["a"])


def test_local_sampled_c_depends_on_the_seed_alone(tiny_model_dir):
    v, _, plain = _tiny_local(tiny_model_dir, batch_size=2, sample=True, max_unjudged=1.0)
    seeds = [11, 22, 33, 44, 55, 66, 77]
    j = v(QS, REFS, RESP, seeds=seeds)
    ref = rewards_from_logits(plain, v.prompt.positive_ids, v.prompt.negative_ids, seeds=seeds)
    torch.testing.assert_close(j.soft, ref.soft, atol=1e-5, rtol=0)
    alone = v(QS[3:4], REFS[3:4], RESP[3:4], seeds=seeds[3:4])
    assert alone.binary.item() == j.binary[3].item() and alone.soft.item() == pytest.approx(j.soft[3].item(), abs=1e-5)
    # no seeds: fresh ones per call, so two calls draw differently (7 rows x 3 classes)
    draws = {tuple(reward.first_token(plain.softmax(-1), verifiers._seeds_for(None, 7, True, 0, k)).tolist())
             for k in range(3)}
    assert len(draws) > 1


def test_unjudged_share_above_the_bound_is_an_error_naming_the_tokens(tiny_model_dir):
    from rlvr import model

    v = verifiers.LocalVerifier(model.load_model(tiny_model_dir).eval(), model.load_tokenizer(tiny_model_dir), name="tiny")
    with pytest.raises(VerifierError, match=r"verifier tiny: 7 of 7 first tokens \(100%\) were neither 'YES' nor "
                                            r"'NO'.*answered instead: \{"):
        v(QS, REFS, RESP)
    with pytest.raises(VerifierError, match="were neither"):  # the master-key probe obeys the same rule
        audit.master_key_probe(v, QS, REFS, n=2)
    v.max_unjudged = 1.0
    assert (~v(QS, REFS, RESP).judged).all()


# ---------------------------------------------------------------------------------------------- rules


def test_final_answer_and_normalize():
    assert rules.final_answer("work\nTherefore, the answer is 42.\n") == "42."
    assert rules.final_answer("THE ANSWER IS: B") == "B"
    assert rules.final_answer("so the answer is 3") == "so the answer is 3"  # only a leading phrase
    assert rules.final_answer("<think>the answer is 3</think>\nThe answer is 4") == "4"
    assert rules.normalize_answer("  Paris\t\n  France!?。 ") == "paris france"


def test_substring_rule_by_hand():
    v = verifiers.build_verifier("rule:substring")
    j = v(["q"] * 5, ["Paris", "B", "mitochondria", "7", ""],
          ["...\nTherefore, the answer is paris.", "Therefore, the answer is C", "It is the  MITOCHONDRIA.",
           "x\n\n", "a"])
    assert j.binary.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0] and j.judged.all()
    assert torch.equal(j.soft, j.binary) and torch.equal(j.p_yes, j.binary)


def test_jaccard_rule_by_hand_including_cjk():
    assert rules.word_set("Hello, WORLD hello") == {"hello", "world"}
    assert rules.word_set("细胞膜 cell 2") == {"细", "胞", "膜", "cell", "2"}
    v = verifiers.build_verifier("rule:jaccard")
    j = v(["q"] * 4, ["the cell membrane", "细胞膜", "A B", "x"],
          ["Therefore, the answer is the membrane", "答案：细胞壁", "b a", ""])
    # {the, membrane} vs {the, cell, membrane}: 2/3;  {答,案,细,胞,壁} vs {细,胞,膜}: 2/6;  equal sets: 1
    torch.testing.assert_close(j.soft, torch.tensor([2 / 3, 2 / 6, 1.0, 0.0]))
    assert j.binary.tolist() == [0.0, 0.0, 1.0, 0.0] and torch.equal(j.p_yes, j.soft)


def test_unknown_rule_lists_valid_ones():
    with pytest.raises(ValueError, match="rule:substring, rule:exact, rule:jaccard, rule:math"):
        verifiers.build_verifier("rule:xyz")


def test_math_rule_reads_prose_latex_and_boxed_answers():
    v = verifiers.build_verifier("rule:math", VerifierOptions(math_timeout=10.0))
    try:
        cases = [  # (reference, response, correct)
            ("\\frac{1}{2}", "Therefore, the answer is 0.5.", 1), ("x+1", "1+x", 1), ("7", "so $\\boxed{7}$", 1),
            ("2\\sqrt{2}", "\\sqrt{8}", 1), ("3", "4", 0), ("x", "y", 0),
            ("3", "It takes 3 bolts.", 1), ("2", "x equals 2.", 1),                      # prose: what $...$ broke
            ("18", "Melanie started with 18 vacuum cleaners.", 1), ("20", "It is 21 cm long.", 0),
            ("2", "2\\sqrt{2}", 0), ("1", "1+x", 0),                    # bare math: plain parse reads 2 and 1
            ("12", "<think>maybe 11</think>\nThe answer is 12", 1), ("12", "<think>the answer is 12", 0),
            ("324", "Therefore, the total cost will be \\$324.", 1),                  # an escaped dollar is money
        ]
        j = v(["q"] * len(cases), [c[0] for c in cases], [c[1] for c in cases])
        assert j.binary.tolist() == [float(c[2]) for c in cases] and v.timeouts == 0
    finally:
        v.math.close()


def test_math_rule_time_bound_scores_zero_and_counts():
    # The bound is generous (5 s: "7" takes milliseconds even on a machine 50x busier than idle, and the
    # clock starts only once a worker holds the answer, not while it imports sympy); 9^(9^9) has 370 million
    # digits: sympy hangs in C far longer. The worker is killed at the bound, the answer scores 0 and is
    # counted, and the next one is judged by a fresh worker.
    v = verifiers.build_verifier("rule:math", VerifierOptions(math_timeout=5.0))
    try:
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("j", v(["q"] * 2, ["1", "7"], ["$9^{9^{9}}$", "7"])),
                              daemon=True)
        th.start()
        th.join(300)  # a hang detector only: the bound itself is the 5 s above
        assert not th.is_alive(), "rule:math did not bound the time of one answer"
        assert out["j"].binary.tolist() == [0.0, 1.0] and v.timeouts == 1
    finally:
        v.math.close()


def test_math_rule_works_from_a_thread():
    v = verifiers.build_verifier("rule:math")
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("j", v(["q"], ["12"], ["The answer is 12"])))
    th.start()
    th.join(60)
    v.math.close()
    assert out["j"].binary.tolist() == [1.0]


def test_math_rule_agrees_with_public_labels_at_least_as_well_as_plain_math_verify():
    """tests/data/math_final_lines.jsonl (see its README): final lines of public model and human
    solutions with correctness labels. rule:math must agree with the labels at least as often as
    math_verify.verify(parse(reference), parse(final line)) called plainly, overall and per source."""
    import logging

    from math_verify import parse, verify

    rows = [json.loads(line) for line in FINAL_LINES.read_text(encoding="utf-8").splitlines()]
    v = verifiers.build_verifier("rule:math", VerifierOptions(math_timeout=10.0))
    try:
        ours = v(["q"] * len(rows), [r["reference"] for r in rows], [r["final_line"] for r in rows]).binary.tolist()
    finally:
        v.math.close()
    logging.disable(logging.CRITICAL)
    try:
        plain = [float(verify(parse(r["reference"]), parse(r["final_line"]))) for r in rows]
    finally:
        logging.disable(logging.NOTSET)
    labels = [r["label"] for r in rows]
    for source in sorted({r["source"] for r in rows}) + ["all"]:
        idx = [i for i, r in enumerate(rows) if source in ("all", r["source"])]
        a = audit.agreement([labels[i] for i in idx], [int(ours[i]) for i in idx])["accuracy"]
        b = audit.agreement([labels[i] for i in idx], [int(plain[i]) for i in idx])["accuracy"]
        print(f"{source}: {len(idx)} rows, rule:math {a:.4f}, plain math-verify {b:.4f}")
        assert a >= b, source
    assert len(rows) > 1500 and audit.agreement(labels, [int(x) for x in ours])["accuracy"] > 0.96


def test_judgement_is_the_interface_of_every_verifier():
    j = verifiers.build_verifier("rule:jaccard")(["q"], ["a b"], ["a"])
    assert isinstance(j, Judgement) and j.judged.dtype == torch.bool
    assert verifiers.build_verifier("rule:math").name == "rule:math"


# ----------------------------------------------------------------------------------------------
# bounded inputs (issue 21): what a verifier cannot read is cut or replaced, never a crash


def test_an_answer_longer_than_the_verifier_reads_is_cut_to_its_end_and_counted(tiny_model_dir, capsys):
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)
    short = verifier_prompt.VerifierPrompt(tok, VerifierSettings(full_response=True)).prompt_ids("q", "7", "so 7")
    n = len(short) + 40  # the positions: room for 40 tokens more than a short answer
    p = verifier_prompt.VerifierPrompt(tok, VerifierSettings(full_response=True), "v", max_len=n)
    assert p.prompt_ids("q", "7", "so 7") == short and p.cut == 0
    long_answer = "BEGINNING " + "blah " * 2000 + "so the answer is 7"
    ids = p.batch_ids(["q", "q"], ["7", "7"], [long_answer, "so 7"])
    assert [len(i) < n for i in ids] == [True, True] and len(ids[0]) >= n - 8  # cut to fit, not far below
    assert ids[1] == short and p.cut == 1
    text = tok.decode(ids[0])
    assert "the answer is 7" in text and "BEGINNING" not in text  # the end survives, the start is cut
    assert text.endswith(tok.decode(short)[-30:])  # the template's end (generation prompt) is intact
    assert f"1 of 2 answers were longer than its {n} positions and were cut to their end (1 so far)" in \
        capsys.readouterr().err
    # a question too long on its own: its middle goes, the template and the answer stay (issue 35): no answer cut
    assert len(p.prompt_ids("why " * 500, "7", "7")) < n and p.cut == 1 and p.cut_middle["question"] == 1


def test_lone_surrogates_are_replaced_not_a_crash(tiny_model_dir):
    v = _tiny_local(tiny_model_dir, max_unjudged=1.0)[0]
    bad, clean = "The answer is 7 \ud800 \udfff", "The answer is 7 ? ?"
    assert verifier_prompt.encodable(bad) == clean and verifier_prompt.encodable("7 ✓ 中") == "7 ✓ 中"
    got, want = v(["q \ud83d"], ["7"], [bad]), v(["q ?"], ["7"], [clean])
    assert torch.equal(got.p_yes, want.p_yes)


def test_a_20000_token_answer_is_judged_within_the_verifier_positions(tiny_model_dir, capsys):
    v = _tiny_local(tiny_model_dir, max_unjudged=1.0)[0]
    assert v.prompt.max_len == 4096  # the tiny model's max_position_embeddings
    j = v(["q", "q"], ["7", "7"], [" ".join(str(i % 10) for i in range(20000)), "7"])
    assert j.p_yes.shape == (2,) and torch.isfinite(j.p_yes).all() and v.prompt.cut == 1
    assert j.cut.tolist() == [True, False]  # which one: train_rl logs the share as verifier/cut_frac
    assert "1 of 2 answers were longer than its 4096 positions" in capsys.readouterr().err


def test_a_verifier_directory_without_settings_is_refused_before_anything_loads(tiny_model_dir, tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("{question} {reference} {response}")
    with pytest.raises(config.ConfigError, match=f"verifier {tiny_model_dir}: no verifier_settings.json"):
        verifiers.check_saved_settings(tiny_model_dir, VerifierOptions(), from_flags=True)
    verifiers.check_saved_settings(tiny_model_dir, VerifierOptions(verifier_paper_defaults=True), from_flags=False)
    verifiers.check_saved_settings(tiny_model_dir, VerifierOptions(verifier_template=str(template)), from_flags=True)
    with pytest.raises(config.ConfigError):  # a judge that is not asked with the prompt flags: the template is not its
        verifiers.check_saved_settings(tiny_model_dir, VerifierOptions(verifier_template=str(template)), from_flags=False)
    verifiers.check_saved_settings("rule:math", VerifierOptions(), from_flags=True)  # not a directory: checked when built
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "verifier_settings.json").write_text("{not json")
    with pytest.raises(config.ConfigError, match="unreadable verifier settings"):
        verifiers.check_saved_settings(str(tmp_path / "v"), VerifierOptions(), from_flags=True)
