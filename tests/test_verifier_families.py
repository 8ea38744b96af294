"""verifier_families.py and its wiring in reward.py / train_verifier.py: each family's template against a
fixture copied byte for byte from its official repository, Eq. 3 / Eq. 4 by hand on constructed logits
for every family, a tiny local model asked in each family (against plain forwards), the chain-of-thought
family's decision position, the fake vLLM server asked in the compass family, and a student distilled
into the compass format whose saved settings bring the family back."""
import ast
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import reward
from rlvr import config, remote, verifier_families as vf, verifier_prompt, verifier_spec, verifiers
from reward import judgement_rewards, rewards_from_logits
from rlvr.verifier_prompt import VerifierSettings
from rlvr.verifiers import VerifierOptions

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "verifier_templates"
# A tokenizer whose merges make every family's judgement one token ("Incorrect" is two in the toy's own).
FAMILY_CORPUS = "Incorrect Incorrect Correct Final Decision: Yes\nFinal Decision: No\n"


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's bytes (`git hash-object`): equal ids mean equal bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def literal(source: str, name: str) -> str:
    """The string a module-level `name = ...` assigns in `source`, read by the parser (nothing is run)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"no {name} in the fixture")


# ---------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize("fixture,blob,name,fields,family", [
    # the whole official file, at the commit cited in verifier_families.py
    ("compassverifier_src_prompts.py.txt", "ba23005f34a4edcd095ad932a8d1dd93509faad0", "CV_PROMPT",
     dict(question="{question}", gold_answer="{reference}", llm_response="{response}"), "compass"),
    ("xverify_src_xVerify_prompts_judge_prompt.py.txt", "0b4e1ae6fd7877434ed255b30b41976ba7f0dbb6", "PROMPT",
     dict(question="{question}", output="{response}", answer="{reference}"), "xverify"),
    # lines 16-23 of verifier.py (the rest of that file is its RL code)
    ("general_reasoner_verifier_lines16-23.py.txt", None, "VERIFIER_PROMPT_TEMPLATE",
     dict(question="{question}", ground_truth="{reference}", student_answer="{response}"), "cot"),
])
def test_templates_are_the_official_bytes(fixture, blob, name, fields, family):
    raw = (FIXTURES / fixture).read_bytes()
    if blob:
        assert git_blob_id(raw) == blob  # the fixture is the official file, byte for byte
    official = literal(raw.decode("utf-8"), name)
    assert getattr(vf, name).encode() == official.encode()  # the code's literal is the official one
    # what the official code sends, with our field names in its placeholders, is the family's template
    template = vf.FAMILIES[family].settings["template"]
    assert template.encode() == official.format(**fields).encode()
    # and each field lands where the official code's str.format puts it
    values = {"{question}": "Q? {response}", "{reference}": "R!", "{response}": "A."}
    assert verifier_prompt.fill_template(template, "Q? {response}", "R!", "A.") == \
        official.format(**{k: values[v] for k, v in fields.items()})
    # the source literal of the whole-file fixtures appears in verifier_families.py unchanged
    if family == "compass":
        src = raw.decode("utf-8")
        start = src.index('CV_PROMPT = """')
        assert src[start:src.index('"""', start + 15) + 3] in (ROOT / "rlvr" / "verifier_families.py").read_text("utf-8")
    if family == "xverify":
        assert raw.decode("utf-8") in (ROOT / "rlvr" / "verifier_families.py").read_text("utf-8")


def test_compass_braces_reach_the_verifier_as_the_notebook_sends_them():
    # compass's literal has doubled braces (\\boxed{{}}): str.format makes them single, as the notebook sends
    assert "\\boxed{}" in vf.COMPASS_TEMPLATE and "{{" not in vf.COMPASS_TEMPLATE


def test_the_paper_family_is_the_default_and_old_settings_files_load_as_it(tmp_path):
    assert verifier_prompt.family_settings("rm") == VerifierSettings() and VerifierSettings().family == "rm"
    assert verifier_prompt.family_settings("master-rm") == VerifierSettings(family="master-rm")  # same prompt, see its note
    old = {k: v for k, v in dataclasses.asdict(VerifierSettings()).items() if k != "family"}
    (tmp_path / verifier_prompt.SETTINGS_FILE).write_text(json.dumps(old))  # a settings file from before families
    assert verifier_prompt.load_settings(str(tmp_path)) == VerifierSettings()
    (tmp_path / verifier_prompt.SETTINGS_FILE).write_text(json.dumps({**old, "family": "omni"}))
    with pytest.raises(ValueError, match=r"verifier_settings.json: field 'family' = 'omni' .*valid: rm, master-rm"):
        verifier_prompt.load_settings(str(tmp_path))
    with pytest.raises(ValueError, match="unknown verifier family 'omni'"):
        vf.family("omni")


def test_a_family_flag_that_contradicts_the_saved_one_is_one_line(tmp_path):
    compass = verifier_prompt.family_settings("compass")
    assert verifier_prompt.resolve_settings(None, {"family": "compass"}) == compass  # nothing saved: its own prompt
    assert verifier_prompt.resolve_settings(compass, {"family": "compass"}) == compass
    with pytest.raises(config.ConfigError, match=r"^--verifier_family 'rm': student was trained with family = "
                                                 r"'compass' \(verifier_settings.json\)"):
        verifier_prompt.resolve_settings(compass, {"family": "rm"}, name="student")
    # forced into another family: that family's prompt, not the saved one relabelled
    assert verifier_prompt.resolve_settings(compass, {"family": "xverify"}, force=True) == verifier_prompt.family_settings("xverify")
    with pytest.raises(config.ConfigError, match="--verifier_family 'omni': must be one of rm, master-rm, compass"):
        VerifierOptions(verifier_family="omni").check()
    # a rule verifier is not asked in a family: compass's whole-response reading does not reach it
    assert verifiers.build_verifier("rule:exact", VerifierOptions(verifier_family="compass")).settings == VerifierSettings()


# ---------------------------------------------------------------------------------------------- Eq. 3 / Eq. 4


def _logits(*rows):
    """Logits whose softmax is exactly the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log()


OTHER, POS, NEG, INV = 0, 1, 2, 3  # ids in a 4-token vocabulary


def test_compass_eq3_eq4_by_hand():
    logits = _logits(
        [0.1, 0.5, 0.3, 0.1],    # c = A: binary 1, soft p(A) / (p(A) + p(B) + p(C)) = .5 / .9
        [0.1, 0.2, 0.3, 0.4],    # c = C: judged, counted invalid, binary 0, soft .2 / .9
        [0.05, 0.1, 0.6, 0.25],  # c = B: binary 0, soft .1 / .95
        [0.5, 0.2, 0.2, 0.1],    # c = none of them: unjudged, binary 0, soft 0 (not .2 / .5: issue 32)
    )
    j = rewards_from_logits(logits, [POS], [NEG], "renorm", invalid_ids=[INV])
    assert j.binary.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert j.invalid.tolist() == [False, True, False, False] and j.judged.tolist() == [True, True, True, False]
    # float64 softmax of exact logs, rounded once to float32: 1e-6 covers it
    torch.testing.assert_close(j.soft, torch.tensor([.5 / .9, .2 / .9, .1 / .95, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(j.p_yes, torch.tensor([.5, .2, .1, .2]), atol=1e-6, rtol=0)
    # the paper's Eq. 4 form over the same c, for comparison: C earns 0 as any non-positive judgement would
    e = rewards_from_logits(logits, [POS], [NEG], "eq4", invalid_ids=[INV])
    torch.testing.assert_close(e.soft, torch.tensor([.5, 0.0, 1 - .6, 0.0]), atol=1e-6, rtol=0)
    assert e.invalid.tolist() == j.invalid.tolist()


@pytest.mark.parametrize("family", ["rm", "master-rm", "xverify", "cot"])
def test_two_judgement_families_read_eq4_as_the_paper(family):
    """rm / master-rm (YES/NO), xverify (Correct/Incorrect), cot (" Yes"/" No" at its decision): the
    paper's Eq. 4 over their own two tokens; no invalid class."""
    assert not vf.FAMILIES[family].invalid and not vf.FAMILIES[family].renormalise
    logits = _logits([0.1, 0.6, 0.2, 0.1], [0.1, 0.3, 0.55, 0.05], [0.5, 0.3, 0.15, 0.05])
    j = rewards_from_logits(logits, [POS], [NEG])
    assert j.binary.tolist() == [1.0, 0.0, 0.0] and j.judged.tolist() == [True, True, False]
    torch.testing.assert_close(j.soft, torch.tensor([0.6, 0.45, 0.0]), atol=1e-6, rtol=0)
    assert not j.invalid.any() and (j.verifier_tokens == 0).all()


def test_judgement_rewards_counts_invalid_and_keeps_old_callers():
    c = torch.tensor([1, -1, reward.INVALID, 0])
    p_yes, p_no, p_inv = torch.tensor([.7, .1, .2, .3]), torch.tensor([.2, .8, .1, .1]), torch.tensor([.05, .05, .6, 0])
    j = judgement_rewards(p_yes, p_no, c, "renorm", p_inv)
    torch.testing.assert_close(j.soft, torch.tensor([.7 / .95, .1 / .95, .2 / .9, 0.0]), atol=1e-6, rtol=0)
    assert j.invalid.tolist() == [False, False, True, False] and j.judged.tolist() == [True, True, True, False]
    old = judgement_rewards(p_yes, p_no, torch.tensor([1, -1, 0, 0]))  # no invalid class: as before
    assert not old.invalid.any() and old.select([2, 0]).invalid.tolist() == [False, False]


# ---------------------------------------------------------------------------------------------- a tiny model


@pytest.fixture(scope="module")
def family_model_dir(tmp_path_factory):
    from worlds import toy

    return toy.build_tiny_model(str(tmp_path_factory.mktemp("fam") / "model"), seed=0, corpus=FAMILY_CORPUS)


@pytest.fixture(scope="module")
def lm_tok(family_model_dir):
    from rlvr import model

    return model.load_model(family_model_dir).eval(), model.load_tokenizer(family_model_dir)


QS, REFS = ["What is 3 + 4?", "Name the capital of France.", "2+2"], ["7", "Paris", "4"]
RESP = ["work\nTherefore, the answer is 7.", "<think>hm</think>Paris\r\n", "5"]


def _plain_logits(lm, seqs):
    with torch.no_grad():
        return torch.cat([lm(torch.tensor([s])).logits[:, -1].double() for s in seqs])


@pytest.mark.parametrize("family", ["rm", "master-rm", "compass", "xverify"])
def test_a_tiny_local_model_asked_in_each_first_token_family(lm_tok, family):
    lm, tok = lm_tok
    settings = verifier_prompt.family_settings(family)
    v = verifiers.LocalVerifier(lm, tok, settings, name="tiny", batch_size=2, max_unjudged=1.0)
    # the prompt: the family's template filled, as its single user message (compass, xverify: no system prompt)
    system = "" if not settings.system_prompt else f"<|im_start|>system\n{settings.system_prompt}<|im_end|>\n"
    answer = verifier_prompt.answer_text(RESP[0], settings.full_response)
    want = (system + "<|im_start|>user\n" + verifier_prompt.fill_template(settings.template, QS[0], REFS[0], answer)
            + "<|im_end|>\n<|im_start|>assistant\n")
    seqs = [v.prompt.prompt_ids(*r) for r in zip(QS, REFS, RESP)]
    assert tok.decode(seqs[0]) == want
    # the <think> block: compass and xverify get the raw output, as their code sends it; rm and master-rm the
    # last line after it is dropped (the paper's)
    raw = family in ("compass", "xverify")
    assert ("<think>hm</think>" in tok.decode(seqs[1])) == raw
    assert verifier_prompt.answer_text(RESP[1], settings.full_response, settings.strip_think) == \
        ("<think>hm</think>Paris" if raw else "Paris")
    spell = {"rm": ("YES", "NO", ""), "master-rm": ("YES", "NO", ""), "compass": ("A", "B", "C"),
             "xverify": ("Correct", "Incorrect", "")}[family]
    ids = [tok.encode(w, add_special_tokens=False) if w else [] for w in spell]
    assert (v.prompt.positive_ids, v.prompt.negative_ids, v.prompt.invalid_ids) == tuple(ids)
    # the random model answers neither: the two (three) judgements are set to its argmaxes so every class occurs
    plain = _plain_logits(lm, seqs)
    top = plain.argmax(-1).tolist()
    v.prompt.positive_ids, v.prompt.negative_ids = [top[0]], [plain[1].topk(2).indices[int(top[1] == top[0])].item()]
    if family == "compass":
        v.prompt.invalid_ids = [next(t for t in plain[2].topk(3).indices.tolist()
                                     if t not in v.prompt.positive_ids + v.prompt.negative_ids)]
    j = v(QS, REFS, RESP)
    # by hand from the plain forwards: Eq. 4 (compass: renormalised over A, B, C)
    p = plain.softmax(-1)
    pos, neg, inv = v.prompt.positive_ids[0], v.prompt.negative_ids[0], (v.prompt.invalid_ids or [None])[0]
    want_soft, want_bin, want_inv = [], [], []
    for i, c in enumerate(top):
        p_inv = p[i, inv].item() if inv is not None else 0.0
        if family == "compass":  # renormalised over A, B, C when c is one of them; unjudged: 0
            want_soft.append(p[i, pos].item() / (p[i, pos].item() + p[i, neg].item() + p_inv)
                             if c in (pos, neg, inv) else 0.0)
        else:
            want_soft.append(p[i, pos].item() if c == pos else 1 - p[i, neg].item() if c == neg else 0.0)
        want_bin.append(float(c == pos))
        want_inv.append(c == inv)
    # float32 forwards in a padded batch vs one at a time: 1e-5 on probabilities
    torch.testing.assert_close(j.soft, torch.tensor(want_soft, dtype=torch.float32), atol=1e-5, rtol=0)
    assert j.binary.tolist() == want_bin and j.invalid.tolist() == want_inv and j.binary[0] == 1.0


def test_the_toy_tokenizer_splits_incorrect_and_says_so(tiny_model_dir):
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)  # the toy's own tokenizer: "Incorrect" is several tokens
    with pytest.raises(ValueError, match=r"judgement token 'Incorrect' is \d+ tokens"):
        verifier_prompt.VerifierPrompt(tok, verifier_prompt.family_settings("xverify"))
    compass = verifier_prompt.VerifierPrompt(tok, verifier_prompt.family_settings("compass"))
    assert compass.invalid_ids == tok.encode("C", add_special_tokens=False)


# ---------------------------------------------------------------------------------------------- cot


def test_decision_position_by_hand(lm_tok):
    _, tok = lm_tok
    head = tok.encode("The two agree.\nFinal Decision:", add_special_tokens=False)
    yes = tok.encode(" Yes", add_special_tokens=False)
    assert vf.decision_position(tok, head + yes + [tok.eos_token_id], "Final Decision:") == len(head)
    # the last marker counts; none, or nothing after it, is no decision
    again = head + tok.encode(" No\nwait.\nFinal Decision:", add_special_tokens=False)
    assert vf.decision_position(tok, again + yes, "Final Decision:") == len(again)
    assert vf.decision_position(tok, tok.encode("I think yes", add_special_tokens=False), "Final Decision:") is None
    assert vf.decision_position(tok, head, "Final Decision:") is None


def test_cot_generates_then_reads_the_decision_token(lm_tok, monkeypatch):
    """The verifier's reasoning is scripted (generation itself is model.generate, tested in test_model);
    Eq. 3 / Eq. 4 must come from the model's own probabilities at the position after "Final Decision:",
    c from the token it wrote there, and the generated lengths are the cost."""
    from rlvr import model

    lm, tok = lm_tok
    v = verifiers.LocalVerifier(lm, tok, verifier_prompt.family_settings("cot"), name="cot", max_unjudged=1.0, max_new_tokens=64)
    assert v.prompt.positive_ids == tok.encode(" Yes", add_special_tokens=False)
    prompt0 = v.prompt.prompt_ids(QS[0], REFS[0], RESP[0])
    # a raw prompt (no chat template), as General-Reasoner sends it; the answer's last line
    assert tok.decode(prompt0) == verifier_prompt.fill_template(vf.COT_TEMPLATE, QS[0], REFS[0], "Therefore, the answer is 7.")
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    script = [enc("Both are 7.\nFinal Decision: Yes") + [tok.eos_token_id],
              enc("Paris vs Lyon.\nFinal Decision: No") + [tok.eos_token_id],
              enc("I cannot tell")]
    seen = {}

    def scripted(m, t, prompts, max_new_tokens, temperature=1.0, top_p=1.0, row_seeds=None):
        seen.update(prompts=prompts, max_new_tokens=max_new_tokens, row_seeds=row_seeds)
        return script, [False, False, True]

    monkeypatch.setattr(model, "generate", scripted)
    j = v(QS, REFS, RESP)
    assert seen["max_new_tokens"] == 64 and seen["row_seeds"] is None and seen["prompts"][0] == prompt0
    cut = [len(enc("Both are 7.\nFinal Decision:")), len(enc("Paris vs Lyon.\nFinal Decision:"))]
    p = _plain_logits(lm, [seen["prompts"][i] + script[i][:cut[i]] for i in range(2)]).softmax(-1)
    yes, no = v.prompt.positive_ids[0], v.prompt.negative_ids[0]
    assert j.binary.tolist() == [1.0, 0.0, 0.0] and j.judged.tolist() == [True, True, False]
    # Eq. 4: p(" Yes") where it wrote " Yes", 1 - p(" No") where it wrote " No", 0 without a decision
    torch.testing.assert_close(j.soft, torch.tensor([p[0, yes], 1 - p[1, no], 0.0], dtype=torch.float32),
                               atol=1e-5, rtol=0)
    assert j.verifier_tokens.tolist() == [float(len(s)) for s in script]
    # sampled: the per-response seeds go to the generator
    v.sample = True
    v(QS, REFS, RESP, seeds=[5, 6, 7])
    assert seen["row_seeds"] == [5, 6, 7]


def test_general_reasoners_extraction_and_score_by_hand():
    """TIGER-AI-Lab/General-Reasoner@007e44c verifier.py: extract_solution (the last non-empty \\boxed{}, else the
    last "Final Answer:"-like line, which needs its line break) and compute_rm_score's arithmetic, with a
    one-token-per-character tokenizer."""
    assert vf.extract_solution("a \\boxed{1} b \\boxed{\\frac{x^{2}}{3}} c") == "\\frac{x^{2}}{3}"
    assert vf.extract_solution("Answer: 3\nso\nFINAL ANSWER:  7 kg \nok") == "7 kg"  # the last, any case, stripped
    assert vf.extract_solution("\\boxed{} then\nThe solution is: x\n") == "x"  # an empty box: the line instead
    assert vf.extract_solution("Final Answer: 7") is None  # no line break after it
    assert vf.extract_solution("\\boxed{3}\nFinal Answer: 4\n") == "3"  # a box wins over a later line
    assert vf.extract_solution("work\nTherefore, the answer is 7.") is None  # this repo's worlds' format

    class Chars:
        def encode(self, text):
            return list(text)

    yes, no = "checked.\nFinal Decision: Yes", "Final Decision: No"
    assert vf.compute_rm_score(Chars(), "7", "7", yes) == 1.0
    assert vf.compute_rm_score(Chars(), "7 kg", "7", yes) == pytest.approx(1 - 3 * 0.05, abs=1e-12)
    assert vf.compute_rm_score(Chars(), "x" * 30, "7", yes) == pytest.approx(1 - 10 * 0.05, abs=1e-12)  # at most 10
    # no extracted answer: -0.5, and "No Answer" (9 characters) is what the length penalty compares
    assert vf.compute_rm_score(Chars(), None, "7", yes) == pytest.approx(-0.5 + 1 - 8 * 0.05, abs=1e-12)
    assert vf.compute_rm_score(Chars(), None, "7", no) == -0.5 and vf.compute_rm_score(Chars(), "7", "7", no) == 0.0
    # "Final Decision: Yes" anywhere passes, a later "No" included; the tag is case-sensitive
    assert vf.compute_rm_score(Chars(), "7", "7", yes + "\nFinal Decision: No") == 1.0
    assert vf.compute_rm_score(Chars(), "7", "7", "final decision: yes") == 0.0


def _cot_reference_rows(tok):
    """Responses, what General-Reasoner asks its verifier about them, the verifier's replies, and the
    expected (binary, soft) of --cot_reward compute_rm_score, by hand."""
    responses = ["work\n\\boxed{3 +\n4}", "Final Answer: Lyon\nmore", "5"]
    asked = ["3 +\n4", "Lyon", "No Answer"]  # the whole box (two lines); none: "No Answer"
    replies = ["Final Decision: Yes", "Final Decision: Yes\nFinal Decision: No", "Final Decision: Yes"]
    n = lambda t: len(tok.encode(t))  # noqa: E731
    soft = [1 - 0.05 * min(abs(n(a) - n(r)), 10) - (0.5 if a == "No Answer" else 0) for a, r in zip(asked, REFS)]
    return responses, asked, replies, [1.0, 1.0, 1.0], soft


def test_cot_with_general_reasoners_reward(lm_tok, monkeypatch):
    from rlvr import model

    lm, tok = lm_tok
    v = verifiers.LocalVerifier(lm, tok, verifiers._reading_settings(dict(cot_reward="compute_rm_score"),
                                                                     verifier_prompt.family_settings("cot")),
                                name="cot", max_unjudged=1.0, cot_reward="compute_rm_score")
    responses, asked, replies, binary, soft = _cot_reference_rows(tok)
    script = [tok.encode(r, add_special_tokens=False) + [tok.eos_token_id] for r in replies]
    seen = {}

    def scripted(m, t, prompts, max_new_tokens, temperature=1.0, top_p=1.0, row_seeds=None):
        seen.update(prompts=prompts)
        return script, [False] * 3

    monkeypatch.setattr(model, "generate", scripted)
    j = v(QS, REFS, responses)
    # asked about the extracted answer, raw text as their verifier.py formats it
    assert seen["prompts"] == [tok.encode(vf.VERIFIER_PROMPT_TEMPLATE.format(question=q, ground_truth=r,
                                                                           student_answer=a))
                               for q, r, a in zip(QS, REFS, asked)]
    assert j.binary.tolist() == binary  # row 2: the paper's reading (the last decision, " No") gives 0
    assert j.soft.tolist() == pytest.approx(soft, abs=1e-6)  # float32 of sums of multiples of 0.05
    assert len(set(j.soft.tolist())) == 3
    with pytest.raises(config.ConfigError, match="^--cot_reward 'compute_rm_score': is General-Reasoner's reward"):
        verifiers._reading_settings(dict(cot_reward="compute_rm_score"), verifier_prompt.family_settings("rm"))


def test_cot_with_the_real_generator_counts_its_cost(family_model_dir):
    v = verifiers.build_verifier(family_model_dir, VerifierOptions(verifier_family="cot", verifier_max_new_tokens=3,
                                                                verifier_max_unjudged=1.0))
    j = v(QS[:2], REFS[:2], RESP[:2])
    assert v.prompt.settings.family == "cot" and v.max_new_tokens == 3
    assert ((j.verifier_tokens >= 1) & (j.verifier_tokens <= 3)).all() and not j.judged.any()  # 3 random tokens: no decision
    assert v([], [], []).verifier_tokens.numel() == 0  # a rank without rows (it still runs one dummy generation)
    with pytest.raises(remote.VerifierError, match=r"2 of 2 first tokens \(100%\) were neither ' Yes' nor ' No'"):
        v.max_unjudged = 0.5
        v(QS[:2], REFS[:2], RESP[:2])


# ---------------------------------------------------------------------------------------------- fake vLLM


@pytest.fixture
def compass_server(family_model_dir):
    """test_remote's fake vLLM server, answering for the three compass tokens."""
    from rlvr import model
    from test_remote import FakeVLLM

    tok = model.load_tokenizer(family_model_dir)
    a, b, c = (tok.encode(w, add_special_tokens=False)[0] for w in "ABC")
    probs = {"A": (0.6, 0.2, 0.1), "B": (0.1, 0.7, 0.1), "C": (0.2, 0.1, 0.5)}  # p(A), p(B), p(C) per prompt kind

    class CompassFake(FakeVLLM):
        def reply(self, req, omit=False):
            assert req["max_tokens"] == 1 and req["logprob_token_ids"] == [a, b, c]
            kind = self.table[tuple(req["prompt"])]
            lp = dict(zip((a, b, c), map(math.log, probs[kind])))
            token = {"A": a, "B": b, "C": c}[kind]
            return {"choices": [{"text": "", "logprobs": {
                "tokens": [f"token_id:{token}"], "token_logprobs": [lp[token]],
                "top_logprobs": [{f"token_id:{t}": v for t, v in lp.items()}]}}]}

    server = CompassFake(family_model_dir, a, b)
    yield server
    server.close()


def test_the_fake_vllm_server_asked_in_the_compass_family(compass_server):
    v = verifiers.build_verifier(compass_server.url, VerifierOptions(verifier_family="compass"))
    assert v.prompt.settings == verifier_prompt.family_settings("compass") and v.soft_mode == "renorm"
    for q, r, a, kind in zip(QS, REFS, RESP, "ABC"):
        compass_server.table[tuple(v.prompt.prompt_ids(q, r, a))] = kind
    j = v(QS, REFS, RESP)
    assert j.binary.tolist() == [1.0, 0.0, 0.0] and j.invalid.tolist() == [False, False, True]
    assert j.judged.all()  # C is a judgement: counted invalid, not unjudged
    torch.testing.assert_close(j.soft, torch.tensor([.6 / .9, .1 / .9, .2 / .8]), atol=1e-6, rtol=0)


@pytest.fixture
def cot_server(family_model_dir):
    """test_remote's fake vLLM server, writing scripted reasoning (max_tokens > 1) and answering the
    judgement tokens' log-probabilities at a decision (max_tokens 1) from a table of prefixes."""
    from rlvr import model
    from test_remote import FakeVLLM

    tok = model.load_tokenizer(family_model_dir)
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No"))

    class CotFake(FakeVLLM):
        def reply(self, req, omit=False):
            self.requests.append({k: v for k, v in req.items() if k != "prompt"})
            if req["max_tokens"] > 1:
                ids = self.written[tuple(req["prompt"])][:req["max_tokens"]]
                return {"choices": [{"text": "", "logprobs": {"tokens": [f"token_id:{t}" for t in ids]}}]}
            assert req["logprob_token_ids"] == [yes, no] and req["temperature"] == 0.0
            p_yes, p_no = self.at_decision[tuple(req["prompt"])]
            lp = {yes: math.log(p_yes), no: math.log(p_no)}
            return {"choices": [{"text": "", "logprobs": {
                "tokens": [f"token_id:{yes}"], "token_logprobs": [lp[yes]],
                "top_logprobs": [{f"token_id:{t}": v for t, v in lp.items()}]}}]}

    server = CotFake(family_model_dir, yes, no)
    server.written, server.at_decision, server.requests = {}, {}, []  # prompt -> ids; prefix -> (p_yes, p_no)
    yield server
    server.close()


def test_the_fake_vllm_server_asked_in_the_cot_family(cot_server):
    v = verifiers.build_verifier(cot_server.url, VerifierOptions(verifier_family="cot", verifier_max_new_tokens=40,
                                                              verifier_max_unjudged=1.0))
    tok = v.prompt.tokenizer
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    writes = ["Same.\nFinal Decision: Yes", "Differ.\nFinal Decision: No", "Unsure"]
    prompts = [v.prompt.prompt_ids(*r) for r in zip(QS, REFS, RESP)]
    for p, w, probs in zip(prompts, writes, ((0.8, 0.1), (0.3, 0.6), None)):
        cot_server.written[tuple(p)] = enc(w)
        if probs:  # asked at the prompt + the reasoning up to "Final Decision:"
            cot_server.at_decision[tuple(p + enc(w.rsplit(" ", 1)[0]))] = probs
    j = v(QS, REFS, RESP)
    assert j.binary.tolist() == [1.0, 0.0, 0.0] and j.judged.tolist() == [True, True, False]
    torch.testing.assert_close(j.soft, torch.tensor([0.8, 1 - 0.6, 0.0]), atol=1e-6, rtol=0)  # Eq. 4 by hand
    assert j.verifier_tokens.tolist() == [float(len(enc(w))) for w in writes]
    gen = [r for r in cot_server.requests if r["max_tokens"] > 1]
    assert len(gen) == 3 and all(r["max_tokens"] == 40 and r["temperature"] == 0.0 for r in gen)


def test_the_fake_vllm_server_gives_general_reasoners_reward(cot_server):
    v = verifiers.build_verifier(cot_server.url, VerifierOptions(verifier_family="cot", verifier_max_unjudged=1.0,
                                                              cot_reward="compute_rm_score"))
    tok = v.prompt.tokenizer
    responses, asked, replies, binary, soft = _cot_reference_rows(tok)
    for q, r, a, w in zip(QS, REFS, asked, replies):
        p = tok.encode(vf.VERIFIER_PROMPT_TEMPLATE.format(question=q, ground_truth=r, student_answer=a))
        cot_server.written[tuple(p)] = tok.encode(w, add_special_tokens=False)
        ends = [i for i in range(len(w)) if w.startswith("Final Decision:", i)]
        cot_server.at_decision[tuple(p + tok.encode(w[:ends[-1] + len("Final Decision:")], add_special_tokens=False))] \
            = (0.7, 0.2)
    j = v(QS, REFS, responses)
    assert j.binary.tolist() == binary and j.soft.tolist() == pytest.approx(soft, abs=1e-6)


# ---------------------------------------------------------------------------------------------- distillation


def test_sft_distils_a_student_into_the_compass_format(tmp_path, tiny_model_dir):
    from worlds import toy
    import train_verifier as TV

    rows = [r.to_json() for r in toy.judge_rows("near:24", 3)]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["sft", "--student", tiny_model_dir, "--data", str(labels), "--out_dir", str(tmp_path / "run"),
            "--verifier_family", "compass", "--heldout_fraction", "0.25", "--batch_size", "8",
            "--micro_batch_size", "8", "--epochs", "1", "--pack", "false", "--wandb_mode", "disabled"]
    captured = []
    real_encode = TV.encode

    def spy(prompt, eos_id, rows_, max_len):  # the targets the student is trained on
        out = real_encode(prompt, eos_id, rows_, max_len)
        captured.append((prompt, rows_, out))
        return out

    TV.encode = spy
    try:
        result = TV.run(args)
    finally:
        TV.encode = real_encode
    saved = verifier_prompt.load_settings(result["final"])
    assert saved == verifier_prompt.family_settings("compass")  # the family's prompt and A / B, saved as family compass
    prompt, _, (seqs, kept) = captured[0]
    a, b = prompt.positive_ids[0], prompt.negative_ids[0]
    assert (prompt.tokenizer.decode([a]), prompt.tokenizer.decode([b])) == ("A", "B")
    # each kept row's target (the token after its prompt) is A for the teacher's YES, B for its NO
    assert len(seqs) == len(kept) > 0 and {r.label for r in kept} == {0, 1}
    assert all(ids[n] == (a if r.label else b) for (ids, n), r in zip(seqs, kept))
    student = verifiers.build_verifier(result["final"], VerifierOptions(verifier_max_unjudged=1.0))
    assert student.prompt.settings.family == "compass" and student.prompt.invalid_ids
    with pytest.raises(config.ConfigError, match="--verifier_family 'rm'.*trained with family = 'compass'"):
        verifiers.build_verifier(result["final"], VerifierOptions(verifier_family="rm"))
    with pytest.raises(config.ConfigError, match="^--verifier_family 'cot': sft distils a first-token judgement"):
        TV.run(args[:-2] + ["--verifier_family", "cot", "--wandb_mode", "disabled"])


# ---------------------------------------------------------------------------------------------- logging


def test_invalid_judgements_and_verifier_tokens_reach_the_step_metrics():
    """The Judgement's invalid flags, generated lengths and cut answers survive the rollout's row packing
    and are reduced over ranks into verifier/invalid_rate, verifier/tokens_mean and verifier/cut_frac."""
    import data
    from rlvr import rl_config
    from rlvr import rollout
    import train_rl

    def part(invalid, tokens, cut):
        n = len(invalid)
        j = reward.Judgement(torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.ones(n, dtype=torch.bool),
                             torch.tensor(invalid), torch.tensor(tokens), torch.tensor(cut))
        j = rollout._judgement(rollout._entries(j))  # as the rollout source packs and unpacks rows
        assert j.invalid.tolist() == invalid and j.verifier_tokens.tolist() == tokens and j.cut.tolist() == cut
        ro = rollout.Rollout([data.Record("id", [], "q", "r", {})] * n, [[1]] * n, [[2, 3]] * n, ["t"] * n,
                             [False] * n, list(range(n)))
        keys = ("loss", "entropy", "entropy_tokens", "clip_low", "clip_high", "tokens", "ratio", "skipped",
                "engine_gap", "is_ratio", "is_corrected")
        update = {k: 0.0 for k in keys} | {"grad_norm": 0.0, "engine_gap_max": 0.0, "is_ratio_max": 0.0}
        return train_rl.step_record(ro, j, torch.zeros(n), {}, update, step=1)

    parts = [part([True, False, False], [10.0, 0.0, 5.0], [False, False, True]),
             part([True, False], [3.0, 2.0], [False, False])]  # two ranks
    m = train_rl.reduce_step(parts, torch.zeros(5), [], 1, rl_config.Config())
    assert m["verifier/invalid_rate"] == pytest.approx(2 / 5) and m["verifier/tokens_mean"] == pytest.approx(20 / 5)
    assert m["verifier/cut_frac"] == pytest.approx(1 / 5)


def test_a_judge_is_named_with_its_family_and_never_falls_back_to_the_paper_prompt(family_model_dir, tmp_path):
    # An eval / audit judge takes no prompt flags: a released CompassVerifier (no verifier_settings.json) is
    # named "compass:<model>"; without the family it is refused, not asked with the paper's YES/NO prompt.
    judge = verifiers.build_verifier(f"compass:{family_model_dir}", VerifierOptions(), settings_from_flags=False)
    assert judge.prompt.settings == verifier_prompt.family_settings("compass") and judge.prompt.invalid_ids
    with pytest.raises(config.ConfigError, match=r"no verifier_settings.json .*<family>:<model> for a judge"):
        verifiers.build_verifier(family_model_dir, VerifierOptions(), settings_from_flags=False)
    with pytest.raises(config.ConfigError, match=r"no verifier_settings.json"):  # the same, before any model loads
        verifiers.check_saved_settings(family_model_dir, VerifierOptions(), from_flags=False)
    verifiers.check_saved_settings(f"xverify:{family_model_dir}", VerifierOptions(), from_flags=False)
    # the reward verifier: the flag and the spec name the family once; a contradiction is one line
    with pytest.raises(config.ConfigError, match="--verifier_family 'xverify' contradicts the verifier compass:"):
        verifiers.build_verifier(f"compass:{family_model_dir}", VerifierOptions(verifier_family="xverify"))
    # a family is how a model is asked: not of a rule, a py: judge, a policy reward or another family
    for inner in ("rule:exact", "py:worlds.freeform:teacher", "policy:rlpr", f"xverify:{family_model_dir}", ""):
        with pytest.raises(config.ConfigError, match=r"^--eval_verifier 'compass:.*expected compass:<model verifier>"):
            verifiers.check_spec(f"compass:{inner}", "eval_verifier")
    # a hub name, a path and a server keep their meaning: only a family's name before the colon is one
    assert verifier_spec.split_family("org/CompassVerifier-7B") == (None, "org/CompassVerifier-7B")
    assert verifier_spec.split_family("http://host:8000") == (None, "http://host:8000")
    assert verifier_spec.split_family("cot:http://host:8000") == ("cot", "http://host:8000")


def test_soft_mode_is_the_familys_own_and_a_contradiction_is_refused(family_model_dir):
    # auto: the paper's Eq. 4 for rm, the renormalised one for compass (its Eq. 4 over A / B / C)
    assert reward.family_soft_mode("auto", False) == "eq4" and reward.family_soft_mode("renorm", False) == "renorm"
    assert reward.family_soft_mode("auto", True) == "renorm" == reward.family_soft_mode("renorm", True)
    with pytest.raises(ValueError, match="--soft_mode eq4: the compass family"):
        reward.family_soft_mode("eq4", True, "compass")
    # through the flags: refused before the weights load, never silently overridden
    with pytest.raises(config.ConfigError, match="--soft_mode eq4: the compass family"):
        verifiers.build_verifier(f"compass:{family_model_dir}", VerifierOptions(soft_mode="eq4"))
    assert verifiers.build_verifier(f"compass:{family_model_dir}", VerifierOptions()).soft_mode == "renorm"



def test_cot_may_write_as_many_tokens_as_general_reasoner_lets_its_verifier():
    # TIGER-AI-Lab/General-Reasoner@007e44c verifier.py: SamplingParams(max_tokens=2048) for the verifier's reply
    assert verifiers.VerifierOptions().verifier_max_new_tokens == 2048
