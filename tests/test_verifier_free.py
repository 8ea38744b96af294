"""verifier_free.py: RLPR's and VeriFree's rewards from the policy's own probability of the reference,
by hand on small tensors and against a token-by-token implementation on the tiny model."""
import math
from pathlib import Path

import pytest
import torch

import data
import train_rl
from rlvr import verifier_free as vf

# float64 sums of a handful of terms: exact to ~1e-15; 1e-12 leaves room without hiding a wrong formula
F64 = 1e-12


def test_split_answer_takes_the_last_line_and_keeps_the_answer_prefix_in_the_reasoning():
    assert vf.split_answer("Birch Ltd") == ("", "Birch Ltd")  # the free-form world: no reasoning
    assert vf.split_answer("Let me see.\nTherefore, the answer is 7 kg  \n\n") == \
        ("Let me see.\nTherefore, the answer is ", "7 kg")
    assert vf.split_answer("a\r\nb\rthe answer is: x") == ("a\r\nb\rthe answer is: ", "x")
    assert vf.split_answer("step one\n  Mount Kelo") == ("step one\n  ", "Mount Kelo")
    assert vf.split_answer("") == ("", "")
    assert vf.split_answer("  \n") == ("  \n", "")
    # reasoning + answer is the response up to the answer's end: nothing but the answer is replaced
    for r in ("x\ny", "one\n\nTherefore, the answer is 5\n", "just text"):
        head, answer = vf.split_answer(r)
        assert r.rstrip().startswith(head) and (head + answer) == r.rstrip()


def test_continuation_ids_move_the_reasonings_trailing_spaces_to_the_reference(tiny_model_dir):
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)
    head, ref = vf.continuation_ids(tok, "so the answer is ", "7 kg")
    assert head == tok.encode("so the answer is", add_special_tokens=False)
    assert ref == tok.encode(" 7 kg", add_special_tokens=False)
    assert vf.continuation_ids(tok, "", "7 kg") == ([], tok.encode("7 kg", add_special_tokens=False))


def test_rlprs_reference_follows_a_space_and_a_token_of_that_space_alone_is_not_scored(tiny_model_dir):
    """RLPR's rule (OpenBMB/RLPR@8490fca: prompt + ' ' + reference; the answer's leading whitespace, ' ' when
    none; the scored tokens overlap the reference's characters), by hand on the tiny tokenizer, which writes
    " 7 kg" as ' ', '7', ' ', 'k', 'g' and " Birch" as ' B', 'i', 'r', 'ch'."""
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert [tok.decode([i]) for i in enc(" 7 kg")] == [" ", "7", " ", "k", "g"]
    assert [tok.decode([i]) for i in enc(" Birch")][:2] == [" B", "i"]
    # no reasoning: one space inserted, alone in its token: context, not scored
    assert vf.continuation_ids(tok, "", "7 kg", rlpr=True) == (enc(" "), enc("7 kg"))
    # the space shares the reference's first token: scored with it (VeriFree's way scores "Birch" without it)
    assert vf.continuation_ids(tok, "", "Birch Ltd", rlpr=True) == ([], enc(" Birch Ltd"))
    assert vf.continuation_ids(tok, "", "Birch Ltd") == ([], enc("Birch Ltd"))
    # the reasoning's own trailing space is the whitespace (none added); a line break gets one space after it
    assert vf.continuation_ids(tok, "so the answer is ", "7 kg", rlpr=True) == (enc("so the answer is") + enc(" "),
                                                                               enc("7 kg"))
    assert vf.continuation_ids(tok, "x\n", "7 kg", rlpr=True) == (enc("x\n") + enc(" "), enc("7 kg"))


def test_scores_by_hand():
    lp = [torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.8)]), torch.zeros(0)]
    # RLPR: mean of probabilities (0.5 + 0.25) / 2; not exp(mean log) = sqrt(0.125) = 0.354
    assert vf.rlpr_score(lp).tolist() == pytest.approx([0.375, 0.8, 0.0], abs=1e-7)  # float32 log inputs
    # VeriFree: the product 0.5 * 0.25
    assert vf.verifree_score(lp).tolist() == pytest.approx([0.125, 0.8, 0.0], abs=1e-7)
    r, base = torch.tensor([0.6, 0.2, 0.9], dtype=torch.float64), torch.tensor([0.2, 0.6, 0.0], dtype=torch.float64)
    assert vf.rlpr_debias(r, base).tolist() == pytest.approx([0.4, 0.0, 0.9], abs=F64)
    flat = torch.arange(6.0)
    assert [s.tolist() for s in vf.segments(flat, [2, 0, 4])] == [[0, 1], [], [2, 3, 4, 5]]
    with pytest.raises(ValueError):
        vf.segments(flat, [2, 2])


def test_std_filter_by_hand():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2, 0.4], dtype=torch.float64)
    stds = vf.group_stds(rewards, 2)
    # Bessel: two values a, b have std |a - b| / sqrt(2)
    assert stds.tolist() == pytest.approx([1 / math.sqrt(2), 0.0, 0.2 / math.sqrt(2)], abs=F64)
    f = vf.StdFilter(beta=0.5, ratio=0.9)
    groups = rewards.view(3, 2)
    assert f.keep(groups).tolist() == [True, True, True]  # no step before: threshold 0
    f.end_step()
    m1 = stds.mean().item()
    assert f.ema == pytest.approx(m1, abs=F64) and f.threshold == pytest.approx(0.5 * m1, abs=F64)
    # threshold 0.5 * (1 + 0.2) / (3 sqrt 2) = 0.2 / sqrt 2: stds 0.1, 0.3 and 0.2 - 1e-9 over sqrt 2
    g2 = torch.tensor([[0.0, 0.1], [0.0, 0.3], [0.0, 0.2 - 1e-9]], dtype=torch.float64)
    assert f.keep(g2).tolist() == [False, True, False]
    g3 = torch.tensor([[0.5, 0.5]], dtype=torch.float64)  # a refill round of the same step: same threshold
    assert f.keep(g3).tolist() == [False] and f.threshold == pytest.approx(0.5 * m1, abs=F64)
    f.end_step()  # the step's mean over both rounds' four groups
    s2 = torch.cat([vf.group_stds(g2.flatten(), 2), vf.group_stds(g3.flatten(), 2)]).mean().item()
    assert f.ema == pytest.approx(0.9 * m1 + 0.1 * s2, abs=F64)
    g = vf.StdFilter(0.5, 0.9)
    g.load_state_dict(f.state_dict())
    assert g.threshold == f.threshold


class FakeTokenizer:
    """One token per character; a chat template that writes the user message."""
    chat_template = "x"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 + 1 for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["content"] for m in messages) + ">"


def test_policy_reward_scores_the_reference_after_the_reasoning_and_debiases_by_the_start():
    # a "policy" whose log-prob of every reference token is log(0.1 * (1 + len(its prompt) % 5)):
    # the score depends on what precedes the reference, which is what the test checks
    calls = []

    def logprobs(prompts, conts):
        calls.append(len(prompts))
        return torch.cat([torch.full((len(c),), math.log(0.1 * (1 + len(p) % 5))) for p, c in zip(prompts, conts)])

    recs = [data.make_record("Q12", "ab", [{"role": "user", "content": "Q12"}], {})]
    tok = FakeTokenizer()
    rlpr = vf.PolicyReward("rlpr", logprobs, tok, recs, max_prompt_len=100, batch_size=2)
    # the rendered prompt "Q12>": 4 tokens, then RLPR's space (a token of its own, unscored): 5 ->
    # p = 0.1 * (1 + 5 % 5) = 0.1 = r_base
    assert rlpr.base[("Q12", "ab")] == pytest.approx(0.1, abs=1e-7)
    j = rlpr(["Q12"] * 3, ["ab"] * 3, ["ab", "xy\nthe answer is zz", "abc\nab"])
    # "ab": no reasoning, the space: r = r_base -> 0. "xy\nthe answer is " (16 characters and its own
    # trailing space, unscored): 4 + 17 = 21 tokens -> p = 0.2 -> 0.2 - 0.1. "abc\n" and RLPR's space:
    # 4 + 4 + 1 = 9 -> 0.5 -> 0.4
    assert j.soft.tolist() == pytest.approx([0.0, 0.1, 0.4], abs=1e-6)
    recs = [data.make_record("Q1", "ab", [{"role": "user", "content": "Q1"}], {})]
    verifree = vf.PolicyReward("verifree", logprobs, tok, recs, max_prompt_len=100, batch_size=2)
    j = verifree(["Q1"] * 3, ["ab"] * 3, ["ab", "x\nab", "xyz\nab"])
    # a 2-token reference: p^2; prompts 3, 5, 7 tokens -> p 0.4, 0.1, 0.3
    assert j.soft.tolist() == pytest.approx([0.16, 0.01, 0.09], abs=1e-6)
    assert j.binary.tolist() == [0.0, 0.0, 0.0] and bool(j.judged.all())
    assert calls == [1, 2, 1, 2, 1]  # r_base of the record, then each call in batches of 2 rows
    # a question outside the records: one user message; RLPR's base computed at first sight and kept
    before = len(rlpr.base)
    j = rlpr(["Q22?"], ["ab"], ["x\nab"])
    assert len(rlpr.base) == before + 1
    # prompt "Q22?>" 5 tokens and the space: base p = 0.2; with "x\n" and the space 8 tokens: p = 0.4 -> 0.4 - 0.2
    assert j.soft.tolist() == pytest.approx([0.2], abs=1e-6)


# ---------------------------------------------------------------------------------------------- the references' tags

BF16_03 = 0.30078125  # 0.3 in bfloat16 (8 significant bits): 1.0011010b x 2^-2


def test_rlprs_tags_format_by_hand():
    """--verifier_free_answer tags for RLPR (OpenBMB/RLPR@8490fca ray_trainer.py replace_answer_with_gt_batch
    and prob.py, format_mode R1): the <answer> section replaced by the reference after its leading whitespace
    (' ' when none), 0 without exactly one <think>, </think>, <answer> in order; the reward 0.9 x clip(r -
    r_base) + 0.1 x format, r rounded to bfloat16 from float32, r_base not. The fake policy of the test above:
    every reference token has p = 0.1 x (1 + len(prompt) % 5)."""
    def logprobs(prompts, conts):
        return torch.cat([torch.full((len(c),), math.log(0.1 * (1 + len(p) % 5))) for p, c in zip(prompts, conts)])

    recs = [data.make_record("Q12", "ab", [{"role": "user", "content": "Q12"}], {})]
    r = vf.PolicyReward("rlpr", logprobs, FakeTokenizer(), recs, max_prompt_len=100, batch_size=2, answer="tags")
    think = "<think>xyzw</think><answer>"  # 7 + 4 + 8 + 8 = 27 characters
    responses = [
        think + "zz</answer>",                 # "Q12>" 4 + 27 + their ' ' 1 = 32 -> p 0.3; format 1
        think + "\nzz",                        # its own "\n" is the whitespace: 32 -> 0.3; no </answer>: format 0
        "so " + think + "zz</answer>",         # 3 + 32 = 35 -> p 0.1; text before <think>: format 0
        "ab",                                  # no tags: 0
        "<think>a</think><answer>zz<answer>",  # two <answer>: 0
        "<answer>zz</answer><think>a</think>",  # out of order: 0
    ]
    j = r(["Q12"] * 6, ["ab"] * 6, responses)
    base = 0.1  # "Q12>" and RLPR's space: 5 tokens, p 0.1; not rounded
    bf16_01 = 0.10009765625  # 0.1 in bfloat16
    want = [0.9 * (BF16_03 - base) + 0.1, 0.9 * (BF16_03 - base), 0.9 * (bf16_01 - base), 0.0, 0.0, 0.0]
    # float32 log-probs and a float32 reward: 1e-6; the bf16 rounding moves the first three by >= 8e-5
    assert j.soft.tolist() == pytest.approx(want, abs=1e-6)
    assert vf.format_reward(responses[0]) == 1.0 and vf.format_reward("<think></think><answer></answer>\n") == 1.0
    assert vf.rlpr_answer_context(think + "  zz") == think + "  " and vf.rlpr_answer_context("ab") is None


def test_verifrees_tags_format_by_hand():
    """--verifier_free_answer tags for VeriFree (sail-sg/VeriFree@718b363 verifree.py lines 173-190, 371-382):
    the response cut at its first "<answer", then the summed log-probs of all the tokens of
    "> \\boxed{REFERENCE} </answer>"; R = 0 without "<answer", when the generation limit cut the response, or
    when the cut response and that answer are longer than the limit."""
    def logprobs(prompts, conts):
        return torch.cat([torch.full((len(c),), math.log(0.1 * (1 + len(p) % 5))) for p, c in zip(prompts, conts)])

    recs = [data.make_record("Q1", "ab", [{"role": "user", "content": "Q1"}], {})]
    r = vf.PolicyReward("verifree", logprobs, FakeTokenizer(), recs, max_prompt_len=100, batch_size=2, answer="tags",
                        max_new_tokens=40)
    answer = "> \\boxed{ab} </answer>"
    assert vf.verifree_answer("x<answer>zz", "ab") == ("x<answer", answer) and len(answer) == 22
    responses = ["x<answer>zz</answer>",          # "Q1>" 3 + "x<answer" 8 = 11 -> p 0.2, 22 tokens
                 "ab<answer>q<answer>",            # the first "<answer": 3 + 9 = 12 -> p 0.3
                 "x<answer>zz</answer>",           # cut by the generation limit: 0
                 "ab",                             # no "<answer": 0
                 "y" * 11 + "<answer>zz"]          # 18 + 22 = 40 tokens: at the limit, scored: 3 + 18 -> p 0.2
    j = r(["Q1"] * 5, ["ab"] * 5, responses, truncated=[False, False, True, False, False])
    want = [0.2 ** 22, 0.3 ** 22, 0.0, 0.0, 0.2 ** 22]
    assert j.soft.tolist() == pytest.approx(want, rel=1e-5, abs=0)  # 22 float32 log-probs summed: ~1e-6 relative
    assert r(["Q1"], ["ab"], ["y" * 12 + "<answer>zz"]).soft.tolist() == [0.0]  # 19 + 22 > 40


def test_tags_format_warns_once_when_no_response_has_tags(capsys):
    def logprobs(prompts, conts):
        return torch.cat([torch.full((len(c),), math.log(0.5)) for c in conts])

    recs = [data.make_record("Q1", "ab", [{"role": "user", "content": "Q1"}], {})]
    r = vf.PolicyReward("verifree", logprobs, FakeTokenizer(), recs, max_prompt_len=100, batch_size=2, answer="tags")
    assert r(["Q1"] * 2, ["ab"] * 2, ["ab", "cd"]).soft.tolist() == [0.0, 0.0]
    assert capsys.readouterr().err == ""  # the master-key probe's call (no truncation flags): no warning
    r(["Q1"] * 2, ["ab"] * 2, ["ab", "cd"], truncated=[False, False])
    r(["Q1"] * 2, ["ab"] * 2, ["ab", "cd"], truncated=[False, False])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no response of this batch of 2" in err
    assert "--verifier_free_answer last_line" in err


def test_rlprs_repetition_penalty_by_hand():
    """OpenBMB/RLPR@8490fca verl/utils/reward_score/repetition.py detect_repetition_with_hash (window 10, limit
    10 as ray_trainer.py passes it) and its use: -1 added to the non-zero rewards only."""
    ten = "a b c d e f g h i j "
    assert vf.detect_repetition_with_hash(ten * 10) == -1  # windows at 0, 10, ..., 90: the same one 10 times
    assert vf.detect_repetition_with_hash(ten * 9 + "a b c d e f g h i") == 0  # 99 words: that window 9 times
    assert vf.detect_repetition_with_hash(" ".join(["a_b_c_d_e_f_g_h_i_j"] * 10)) == -1  # underscores split words
    assert vf.detect_repetition_with_hash("x " * 10) == 0  # 10 words: not more than the window

    def logprobs(prompts, conts):
        return torch.cat([torch.full((len(c),), math.log(0.1 * (1 + len(p) % 5))) for p, c in zip(prompts, conts)])

    recs = [data.make_record("Q12", "ab", [{"role": "user", "content": "Q12"}], {})]
    r = vf.PolicyReward("rlpr", logprobs, FakeTokenizer(), recs, max_prompt_len=100, batch_size=4,
                        repetition_penalty=True)
    # last line: "Q12>" 4 + "x\n" 2 + RLPR's space 1 = 7 -> p 0.3 -> 0.3 - 0.1; 4 + 202 + 1 = 207: the same;
    # 4 + 405 + 1 = 410 -> p 0.1 = r_base -> 0
    j = r(["Q12"] * 3, ["ab"] * 3, ["x\nab", ten * 10 + "x\nab", ten * 20 + "xyzw\nab"])
    assert j.soft.tolist() == pytest.approx([0.2, 0.2 - 1.0, 0.0], abs=1e-6)  # the third's 0 is not penalised


def straightforward(lm, prompt: list[int], reference: list[int], kind: str) -> float:
    """The paper's formula token by token: a full forward per position, softmax, math.exp."""
    probs = []
    for t in range(len(reference)):
        ids = torch.tensor([prompt + reference[:t]])
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0, -1].double()
        probs.append(math.exp(logits[reference[t]].item() - torch.logsumexp(logits, -1).item()))
    return sum(probs) / len(probs) if kind == "rlpr" else math.prod(probs)


@pytest.mark.parametrize("kind", vf.KINDS)
def test_against_a_token_by_token_implementation_on_the_tiny_model(tiny_model_dir, kind):
    from rlvr import model
    import train_rl

    tok, lm = model.load_tokenizer(tiny_model_dir), model.load_model(tiny_model_dir).eval()
    cfg, _ = train_rl.parse_config(["--data", "toy"])
    qs = ["What is 2 + 3?", "What is 7 - 4?"]
    recs = [data.make_record(q, ref, [{"role": "user", "content": q}], {}) for q, ref in zip(qs, ["5 5", "3 + 0"])]

    def logprobs(prompts, conts):
        return train_rl.forward_logprobs(lm, prompts, conts, list(range(len(prompts))), cfg, "cpu")[0]

    r = vf.PolicyReward(kind, logprobs, tok, recs, max_prompt_len=256, batch_size=3)
    responses = ["7", "first 3 then 4\nthe answer is 12", "so\n3", "1 2 3\n4"]
    questions, refs = [qs[0], qs[0], qs[1], qs[1]], ["5 5", "5 5", "3 + 0", "3 + 0"]
    got = r(questions, refs, responses).soft
    prompts, ref_ids, raw, base = [], [], [], []
    for q, ref, resp in zip(questions, refs, responses):
        prompt = data.tokenize_prompts(tok, [next(x for x in recs if x.question == q)], 256)[0]
        head, ids = vf.continuation_ids(tok, vf.split_answer(resp)[0], ref, rlpr=kind == "rlpr")
        prompts.append(prompt + head)
        ref_ids.append(ids)
        raw.append(straightforward(lm, prompt + head, ids, kind))
        base_head, base_ids = vf.continuation_ids(tok, "", ref, rlpr=True)
        base.append(straightforward(lm, prompt + base_head, base_ids, kind))
    assert all(len(ids) >= 2 for ids in ref_ids)  # a mean of probabilities is not their product
    assert len(set(raw)) == len(raw)  # the rows differ: the comparison means something
    # float32 forwards, packed vs one sequence at a time: log-probs agree to ~1e-6, so relative 1e-4
    assert r.scores(prompts, ref_ids).tolist() == pytest.approx(raw, rel=1e-4, abs=1e-9)
    want = [min(1.0, max(0.0, a - b)) for a, b in zip(raw, base)] if kind == "rlpr" else raw
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", vf.KINDS)
def test_the_tags_format_against_a_token_by_token_implementation_on_the_tiny_model(tiny_model_dir, kind):
    """--verifier_free_answer tags on real tokens: the text before the reference written out by hand (RLPR: up
    to <answer> and its whitespace, ' ' when none; VeriFree: up to "<answer", then "> \\boxed{..} </answer>"),
    each part tokenised on its own, and the references' formulas token by token."""
    from rlvr import model
    import train_rl

    tok, lm = model.load_tokenizer(tiny_model_dir), model.load_model(tiny_model_dir).eval()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    cfg, _ = train_rl.parse_config(["--data", "toy"])
    q, ref = "What is 2 + 3?", "5 5"
    rec = data.make_record(q, ref, [{"role": "user", "content": q}], {})

    def logprobs(prompts, conts):
        return train_rl.forward_logprobs(lm, prompts, conts, list(range(len(prompts))), cfg, "cpu")[0]

    r = vf.PolicyReward(kind, logprobs, tok, [rec], max_prompt_len=256, batch_size=3, answer="tags")
    responses = ["<think>2 and 3</think><answer>5</answer>", "<think>so</think> then <answer>\n4 4", "5 5"]
    got = r([q] * 3, [ref] * 3, responses).soft.tolist()
    prompt = data.tokenize_prompts(tok, [rec], 256)[0]
    assert [tok.decode([i]) for i in enc(" 5 5")][:2] == [" ", "5"]  # RLPR's space is a token of its own here
    if kind == "rlpr":
        base = straightforward(lm, prompt + enc(" "), enc(ref), kind)
        bf16 = lambda x: torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()  # noqa: E731
        contexts = [("<think>2 and 3</think><answer>", " ", 1.0), ("<think>so</think> then <answer>", "\n", 0.0)]
        want = [0.9 * max(0.0, bf16(straightforward(lm, prompt + enc(head) + enc(space), enc(ref), kind)) - base)
                + 0.1 * fmt for head, space, fmt in contexts]
    else:  # ~20 unlikely tokens: R ~ 1e-53, 0 in the float32 reward, so the float64 scores are compared
        ids = [(enc(head + "<answer"), enc("> \\boxed{5 5} </answer>")) for head in ("<think>2 and 3</think>",
                                                                                  "<think>so</think> then ")]
        assert [r.answer_ids(x, ref, False) for x in responses[:2]] == ids
        want = [straightforward(lm, prompt + head, answer, kind) for head, answer in ids]
        got = r.scores([prompt + head for head, _ in ids], [answer for _, answer in ids]).tolist() + got[2:]
    assert len(set(want)) == 2 and min(want) > 0 and got[2] == 0.0  # the rows differ; the untagged answer gets 0
    # float32 forwards, packed vs one sequence at a time: ~1e-6 in log-prob (bf16 rounding of such close means
    # lands on the same value but at a rounding boundary)
    assert got[:2] == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", vf.KINDS)
def test_two_rl_steps_log_the_formula_of_the_policy_that_sampled(kind, tmp_path, monkeypatch):
    # 2 steps on the free-form world with the warm-started tiny policy; every call of the reward is recorded
    # with a copy of the policy's weights at that moment, and each logged reward is recomputed token by
    # token from those weights (r_base from the weights before any update). The world's answers are one
    # line (no reasoning): RLPR's r equals r_base and its reward is 0 (the weights never move);
    # VeriFree's is pi(reference | prompt), the same for a prompt's every response.
    import json

    from rlvr import model
    import train_rl

    calls, seen = [], {}
    load = train_rl.load_verifiers

    def load_and_keep(cfg, vopts, spec, device, policy=None, *rest):
        seen["policy"] = policy
        return load(cfg, vopts, spec, device, policy, *rest)

    score = vf.PolicyReward.__call__

    def recorded(self, questions, references, responses, seeds=None, truncated=None):
        weights = {k: v.detach().clone() for k, v in seen["policy"].state_dict().items()}
        j = score(self, questions, references, responses, seeds, truncated)
        calls.append((weights, list(questions), list(references), list(responses), j.soft.tolist()))
        return j

    monkeypatch.setattr(train_rl, "load_verifiers", load_and_keep)
    monkeypatch.setattr(vf.PolicyReward, "__call__", recorded)
    out = tmp_path / kind
    cfg, vopts = train_rl.parse_config([
        "--verifier", f"policy:{kind}", "--steps", "2", "--prompts_per_step", "4", "--samples_per_prompt", "4",
        "--eval_every", "0", "--eval_prompts", "4", "--eval_samples", "0", "--audit_every", "0", "--log_verifiers", "",
        "--out_dir", str(out), "--wandb_mode", "disabled", "--seed", "1"])
    result = train_rl.train(cfg, vopts)
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    steps = [c for c in calls if len(c[1]) == 16]  # the start's master-key probe asks 64 rows
    assert len(steps) == 2 and len(rows) == 32
    tok = model.load_tokenizer(result["policy"])
    lm = model.load_model(result["policy"]).eval()
    initial = {k: v.clone() for k, v in lm.state_dict().items()}
    records = {r.question: r for r in train_rl.load_data(cfg)[0]}
    for step, (weights, questions, refs, responses, _) in enumerate(steps, start=1):
        logged = [r for r in rows if r["step"] == step]
        assert [r["response"] for r in logged] == responses and [r["question"] for r in logged] == questions
        for r in logged:
            prompt = data.tokenize_prompts(tok, [records[r["question"]]], cfg.max_prompt_len)[0]
            head, ref_ids = vf.continuation_ids(tok, vf.split_answer(r["response"])[0], r["reference"],
                                                rlpr=kind == "rlpr")
            lm.load_state_dict(weights)
            want = straightforward(lm, prompt + head, ref_ids, kind)
            if kind == "rlpr":
                lm.load_state_dict(initial)
                base_head, base_ids = vf.continuation_ids(tok, "", r["reference"], rlpr=True)
                base = straightforward(lm, prompt + base_head, base_ids, kind)
                want = min(1.0, max(0.0, want - base))
            # the logged reward is float32; the forwards agree to ~1e-6 in log-prob
            assert r["reward"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    if kind == "verifree":
        assert len({r["reward"] for r in rows}) > 4  # prompts differ: the check is not of a constant
        # the update moved the weights: step 2's rewards are the updated policy's, not the start's
        assert any(not torch.equal(steps[0][0][k], steps[1][0][k]) for k in steps[0][0])


@pytest.mark.parametrize("extra, flag", [
    (["--async_steps", "1"], "--async_steps"), (["--stream_judging", "true"], "--stream_judging"),
    (["--eval_verifier", "self"], "--eval_verifier"), (["--log_verifiers", "policy:rlpr"], "--log_verifiers"),
    (["--verifier", "policy:nope"], "--verifier"), (["--std_filter_beta", "0.5"], "--std_filter_beta"),
    (["--filter_groups", "true", "--std_filter_beta", "-1"], "--std_filter_beta")])
def test_flags_a_policy_reward_cannot_run_with_are_refused_in_one_line(extra, flag):
    from rlvr import config

    with pytest.raises(config.ConfigError) as e:
        train_rl.parse_config(["--verifier", "policy:rlpr", *extra])
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, flag", [
    (["--verifier", "rule:exact", "--verifier_free_answer", "tags"], "--verifier_free_answer"),
    (["--verifier", "policy:verifree", "--rlpr_repetition_penalty", "true"], "--rlpr_repetition_penalty"),
    (["--verifier", "rule:exact", "--rlpr_repetition_penalty", "true"], "--rlpr_repetition_penalty"),
    (["--verifier", "policy:rlpr", "--cot_reward", "compute_rm_score"], "--cot_reward")])
def test_the_verifier_free_flags_are_refused_where_nothing_reads_them(argv, flag):
    from rlvr import config

    with pytest.raises(config.ConfigError) as e:
        train_rl.parse_config(argv)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)
    cfg, _ = train_rl.parse_config(["--verifier", "policy:rlpr", "--verifier_free_answer", "tags",
                                    "--rlpr_repetition_penalty", "true"])
    assert (cfg.verifier_free_answer, cfg.rlpr_repetition_penalty) == ("tags", True)
    default, _ = train_rl.parse_config(["--verifier", "policy:rlpr"])
    assert (default.verifier_free_answer, default.rlpr_repetition_penalty) == ("auto", False)


def test_auto_takes_the_tags_format_only_where_the_training_prompts_ask_for_the_tags(capsys):
    """The references' format is the default where it can reward something: their R1 prompts ask for
    <answer> tags; prompts that do not (this repo's worlds) get last_line, not a reward of 0 everywhere."""
    def logprobs(prompts, conts):
        return torch.cat([torch.full((len(c),), math.log(0.5)) for c in conts])

    r1 = "Think in <think> </think>, then answer in <answer> </answer>."
    plain = [data.make_record("Q1", "ab", [{"role": "user", "content": "Q1"}], {})]
    asking = plain + [data.make_record("Q2", "cd", [{"role": "system", "content": r1},
                                                   {"role": "user", "content": "Q2"}], {})]
    build = lambda recs, flag: vf.PolicyReward("verifree", logprobs, FakeTokenizer(), recs, max_prompt_len=100,  # noqa: E731
                                               batch_size=2, answer=flag)
    assert build(plain, "auto").answer == "last_line"
    assert "auto: last_line (0 of 1 training prompts ask for <answer> tags)" in capsys.readouterr().out
    assert build(asking, "auto").answer == "tags"
    assert "auto: tags (1 of 2" in capsys.readouterr().out
    assert build(asking, "last_line").answer == "last_line" and build(plain, "tags").answer == "tags"
    assert capsys.readouterr().out == ""  # a format named by the flag is not announced


def test_dynamic_sampling_with_rlprs_std_filter_keeps_the_groups_above_the_threshold():
    from types import SimpleNamespace

    from rlvr import rollout
    from rlvr import rollout_filter

    cfg = SimpleNamespace(samples_per_prompt=2, prompts_per_step=3, reward_type="soft", max_filter_rounds=1)

    def round_rows(number, rewards):
        n = len(rewards)
        return rollout.Samples(index=list(range(n)), prompt=[[1]] * n, seed=[100 * number + i for i in range(n)],
                               staleness=[0] * n, reward=[(0.0, r, r, True) for r in rewards])

    rounds = {0: [0.0, 1.0, 0.5, 0.5, 0.2, 0.4], 1: [0.0, 0.6, 0.1, 0.1, 0.3, 0.9]}
    f = vf.StdFilter(beta=0.5)
    f.load_state_dict({"ema": 0.4})  # threshold 0.2: group stds (Bessel) 0.707, 0, 0.141 | 0.424, 0, 0.424
    parts, info = rollout_filter.filter_groups(cfg, round_rows(0, rounds[0]), lambda r: round_rows(r, rounds[r]), f)
    assert [p.seed for p in parts] == [[0, 1], [100, 101], [104, 105]]
    assert info["rollout/std_filter_threshold"] == pytest.approx(0.2, abs=F64)
    assert info["rollout/filter_rounds"] == 1.0 and info["rollout/groups_kept_frac"] == 0.5
    mean = (math.sqrt(0.5) + 0.2 / math.sqrt(2) + 2 * 0.6 / math.sqrt(2)) / 6  # every group of the step
    assert f.ema == pytest.approx(0.99 * 0.4 + 0.01 * mean, abs=F64)
    # without it: DAPO's rule, groups whose rewards are not all equal (0.2 vs 0.4 is kept)
    parts, _ = rollout_filter.filter_groups(cfg, round_rows(0, rounds[0]), lambda r: round_rows(r, rounds[r]))
    assert [p.seed for p in parts] == [[0, 1], [4, 5], [100, 101]]


def test_the_std_filters_threshold_is_resumed_from_a_checkpoint():
    from rlvr import verifiers
    from rlvr import rl_config
    from rlvr import rollout

    cfg = rl_config.Config(filter_groups=True, std_filter_beta=0.5, prompts_per_step=2, samples_per_prompt=2)
    new = lambda: rollout.RolloutSource(cfg, None, None, [], data.PromptSampler(10, 2, 0),  # noqa: E731
                                        verifiers.build_verifier("rule:exact"))
    src, resumed = new(), new()
    src.std_filter.ema = 0.3
    state = src.state_dict()
    assert state["std_filter"] == {"ema": 0.3}
    resumed.load_state_dict(state)
    assert resumed.std_filter.threshold == pytest.approx(0.15, abs=F64)
    off = rollout.RolloutSource(rl_config.Config(), None, None, [], data.PromptSampler(10, 2, 0),
                                verifiers.build_verifier("rule:exact"))
    assert off.std_filter is None and "std_filter" not in off.state_dict()  # checkpoints as before
    for s in (src, resumed, off):
        s.close()


@pytest.mark.parametrize("kind", vf.KINDS)
def test_two_ranks_score_what_one_rank_scores(kind, tmp_path):
    # the policy FSDP-sharded over 2 ranks (gloo): every forward all-gathers, so both ranks must run as
    # many (RLPR's r_base of the union of their questions, dummy rows where a rank has fewer batches)
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    args = ["--verifier", f"policy:{kind}", "--steps", "2", "--prompts_per_step", "4", "--samples_per_prompt", "4",
            "--micro_batch_size", "3", "--eval_every", "0", "--eval_prompts", "4", "--eval_samples", "0",
            "--audit_every", "0", "--log_verifiers", "", "--wandb_mode", "disabled", "--seed", "2",
            "--master_key_prompts", "2"]  # the probe is not what this test compares: 34 judgements, not 1088
    rewards = []
    for nproc in (None, 2):
        out = tmp_path / f"ranks{nproc or 1}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc else [sys.executable]
        done = subprocess.run(launcher + [str(root / "train_rl.py"), *args, "--out_dir", str(out)], env=env, cwd=root,
                              capture_output=True, text=True, timeout=1200)  # a hang detector: a loaded machine is slow
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        rewards.append([json.loads(line)["reward"] for line in (out / "rollouts.jsonl").read_text().splitlines()])
    assert len(rewards[0]) == len(rewards[1]) == 32
    # the same responses scored in other batches: float32 forwards agree to ~1e-6 in log-prob
    assert rewards[1] == pytest.approx(rewards[0], rel=1e-4, abs=1e-6)
