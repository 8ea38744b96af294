"""model.py: batch layouts, log-probs without full logits, seeded sampling, the LR schedule."""
import math

import pytest
import torch

from rlvr import model

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _naive_logprobs(lm, seq):
    logits = lm(torch.tensor([seq])).logits[0].float().log_softmax(-1)
    return torch.stack([logits[t - 1, seq[t]] for t in range(1, len(seq))])


def test_packed_chunked_logprobs_equal_a_plain_forward(tiny_model_dir):
    lm = model.load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    # equal lengths share a batched attention call
    seqs = [torch.randint(3, 600, (n,), generator=g).tolist() for n in (5, 17, 5, 2, 9, 17)]
    targets = [[False] * 2 + [True] * (len(s) - 2) for s in seqs]
    ids, pos = model.pack(seqs)
    assert pos.tolist()[0][:7] == [0, 1, 2, 3, 4, 0, 1]
    mask = torch.tensor([t for ts in targets for t in ts])[None]
    for chunk in (3, 1024):  # chunking the vocabulary projection changes nothing
        lp, ent = model.token_logprobs(lm, ids, pos, mask, chunk_size=chunk, with_entropy=True)
        got = lp[0][mask[0]]
        want = torch.cat([_naive_logprobs(lm, s)[1:] for s in seqs])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (lp[0][~mask[0]] == 0).all()
    # entropy of the first target's predictive distribution, by hand
    p = lm(torch.tensor([seqs[0]])).logits[0, 1].float().softmax(-1)
    assert ent[0, 2].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-4)


def test_logprob_gradients_match_a_plain_forward(tiny_model_dir):
    a, b = model.load_model(tiny_model_dir), model.load_model(tiny_model_dir)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, pos = model.pack(seqs)
    mask = pos != 0  # every token but each sequence's first is a target
    model.token_logprobs(a, ids, pos, mask, chunk_size=2)[0].sum().backward()
    sum(_naive_logprobs(b, s).sum() for s in seqs).backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_seeded_sampling_is_exact_and_independent_of_the_batch(tiny_model_dir):
    # Gumbel-max over hashed noise samples softmax(logits / T): check the frequencies
    n = 40000
    proc = model.SeededSampling(torch.arange(n), temperature=2.0, top_p=1.0)
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))[None].repeat(n, 1)
    freq = torch.bincount(proc(torch.zeros(n, 4, dtype=torch.long), logits).argmax(-1), minlength=3) / n
    want = torch.tensor([0.6, 0.3, 0.1]).sqrt()  # temperature 2: p^(1/2), renormalised
    torch.testing.assert_close(freq, want / want.sum(), atol=0.01, rtol=0)
    proc = model.SeededSampling(torch.arange(n), temperature=1.0, top_p=0.7)  # nucleus {0.6, 0.3}
    freq = torch.bincount(proc(torch.zeros(n, 4, dtype=torch.long), logits).argmax(-1), minlength=3) / n
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0.0]), atol=0.01, rtol=0)
    # a sample depends on its seed only: same rows in another batch (order, padding) are the same
    tok, lm = model.load_tokenizer(tiny_model_dir), model.load_model(tiny_model_dir)
    p1, p2 = [5, 6, 7, 8, 9], [10, 11]
    a, _ = model.generate(lm, tok, [p1, p2, p1], 8, row_seeds=[1, 2, 3])
    b, _ = model.generate(lm, tok, [p2, p1], 8, row_seeds=[2, 3])
    assert a[1] == b[0] and a[2] == b[1] and a[0] != a[2]


def test_a_sample_depends_only_on_its_seed_and_prompt_not_on_left_padding(tiny_model_dir):
    # prompts of unequal length: batched together, the shorter ones are left-padded to the longest
    tok, lm = model.load_tokenizer(tiny_model_dir), model.load_model(tiny_model_dir)
    prompts, seeds = [[5, 6], [7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]], [11, 12, 13]
    batched, _ = model.generate(lm, tok, prompts, 6, temperature=1.0, row_seeds=seeds)
    alone = [model.generate(lm, tok, [p], 6, temperature=1.0, row_seeds=[s])[0][0] for p, s in zip(prompts, seeds)]
    assert batched == alone
    assert len({tuple(r) for r in batched}) == 3  # real samples, not one greedy answer


def test_generate_cuts_at_eos_and_flags_truncation(tiny_model_dir):
    tok, lm = model.load_tokenizer(tiny_model_dir), model.load_model(tiny_model_dir)
    eos = tok.eos_token_id
    with torch.no_grad():  # all-zero final hidden states -> uniform logits -> greedy picks token 0
        lm.model.norm.weight.zero_()
    responses, truncated = model.generate(lm, tok, [[5, 6, 7]], 4)
    assert responses == [[0, 0, 0, 0]] and truncated == [True]
    bias = torch.zeros(lm.config.vocab_size)
    bias[eos] = 1.0
    lm.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    responses, truncated = model.generate(lm, tok, [[5, 6, 7]], 4)
    assert responses == [[eos]] and truncated == [False]


def test_attention_kernel_choice():
    assert model.attn_implementation("cpu", torch.bfloat16) == "sdpa"




# ------------------------------------------------------------------------------------------ layouts

def test_left_pad():
    ids, mask = model.left_pad([[5, 6, 7], [8], [1, 2]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.int64
    assert model.left_pad([[4]], pad_id=9)[0].tolist() == [[4]]
    for bad in ([[1], []], []):
        with pytest.raises(ValueError, match="left_pad needs at least one sequence and no empty ones"):
            model.left_pad(bad, pad_id=0)


def test_rows_packed_and_padded():
    seqs = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    masks = [[False, False, True, True], [False, True], [False, True, True]]
    ids, pos, att, target = model.rows(seqs, masks, pack=True, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]] and att is None
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert target.tolist() == [[False, False, True, True, False, True, False, True, True]]
    ids, pos, att, target = model.rows(seqs, masks, pack=False, pad_id=99)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 99, 99], [11, 12, 13, 99]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0], [0, 1, 2, 0]]
    assert att.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert target.tolist() == [[False, False, True, True], [False, True, False, False], [False, True, True, False]]
    assert ids.dtype == pos.dtype == att.dtype == torch.int64 and target.dtype == torch.bool
    with pytest.raises(ValueError, match=r"target mask lengths \[4, 1, 3\] differ from sequence lengths \[4, 2, 3\]"):
        model.rows(seqs, [masks[0], [True], masks[2]], pack=True, pad_id=0)
    with pytest.raises(ValueError, match="rows needs at least one sequence"):
        model.rows([], [], pack=False, pad_id=0)


def test_rows_give_the_same_flat_target_tokens_packed_and_padded():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (7, 1, 12, 4, 9)]
    masks = [(torch.rand(len(s), generator=g) < 0.6).tolist() for s in seqs]
    want = [t for s, m in zip(seqs, masks) for t, keep in zip(s, m) if keep]  # sequence by sequence, in order
    for pack in (True, False):
        ids, pos, _, target = model.rows(seqs, masks, pack=pack, pad_id=0)
        assert ids[target].tolist() == want
        assert pos[target].tolist() == [i for s, m in zip(seqs, masks) for i, keep in enumerate(m) if keep]


# ------------------------------------------------------------------------------ optimizer and schedule

def test_lr_factor_by_hand():
    # 10 steps, 2 of warm-up: 1/2, 2/2, then cosine over the 8 left from 1 down to the floor
    assert model.lr_factor(0, 10, 2, "cosine") == 0.5
    assert model.lr_factor(1, 10, 2, "cosine") == 1.0
    assert model.lr_factor(2, 10, 2, "cosine") == 1.0
    assert model.lr_factor(4, 10, 2, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)  # 0.853553
    assert model.lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert model.lr_factor(6, 10, 2, "cosine", min_lr_ratio=0.1) == pytest.approx(0.55)  # 0.1 + 0.9 * 0.5
    assert model.lr_factor(9, 10, 2, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.0380602, abs=1e-7)
    assert model.lr_factor(10, 10, 2, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert model.lr_factor(15, 10, 2, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)  # stays at the floor
    assert model.lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)  # no warm-up: decay from step 0
    assert [model.lr_factor(i, 10, 4, "constant", 0.1) for i in (0, 1, 2, 3, 4, 9, 12)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr schedule 'cosin'"):
        model.lr_factor(5, 10, 2, "cosin")


def test_build_optimizer_follows_lr_factor():
    lm = torch.nn.Linear(2, 1)
    opt, sched = model.build_optimizer(lm, 0.5, (0.8, 0.9), 0.01, total_steps=8, warmup_ratio=0.2,
                                       schedule="cosine", min_lr_ratio=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["weight_decay"] == 0.01
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # ceil(0.2 * 8) = 2 warm-up steps
    assert seen == pytest.approx([0.5 * model.lr_factor(i, 8, 2, "cosine", 0.1) for i in range(8)])
    assert seen[:3] == pytest.approx([0.25, 0.5, 0.5])
    resumed_opt, resumed = model.build_optimizer(lm, 0.5, (0.8, 0.9), 0.01, 8, 0.2, "cosine", 0.1)
    resumed.load_state_dict(sched.state_dict())  # a checkpoint round trip keeps the position
    assert resumed.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="lr schedule 'cosin'"):
        model.build_optimizer(lm, 0.5, (0.9, 0.99), 0.0, 8, 0.2, "cosin")
    with pytest.raises(ValueError, match="total_steps=0 must be >= 1"):
        model.build_optimizer(lm, 0.5, (0.9, 0.99), 0.0, 0, 0.2, "constant")


def test_generation_ignores_the_models_own_sampling_defaults(tiny_model_dir):
    """Qwen2.5 ships repetition_penalty, top_k, top_p and temperature in generation_config.json: the
    sampler must draw from the policy the trainer scores (temperature and top_p given), not from those."""
    lm, tok = model.load_model(tiny_model_dir), model.load_tokenizer(tiny_model_dir)
    prompts = [tok.encode("Which is larger, 3 or 7?"), tok.encode("hi")]
    plain = model.generate(lm, tok, prompts, 10, 1.0, 1.0, [5, 6])
    lm.generation_config.update(repetition_penalty=50.0, top_k=1, top_p=0.01, temperature=0.01, do_sample=True)
    assert model.generate(lm, tok, prompts, 10, 1.0, 1.0, [5, 6]) == plain


def test_a_model_source_that_cannot_load_is_named_before_anything_loads(tiny_model_dir, tmp_path, monkeypatch):
    import json
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "final").mkdir(parents=True)
    assert model.source_problem(tiny_model_dir) is None
    assert model.source_problem("Qwen/Qwen2.5-7B-Instruct") is None  # a hub name: the hub answers for it
    assert model.source_problem("runs/dmeo") == "no such directory"  # runs/ is here: a path, mistyped
    assert model.source_problem("./nothing/final") == "no such directory"
    assert model.source_problem("runs/demo") == ("is not a model directory (no config.json); a run directory? its "
                                                 "model is runs/demo/final")
    (tmp_path / "f.txt").write_text("x")
    assert model.source_problem("f.txt") == "is a file, not a model directory"
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")  # the same model, its chat template removed
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    assert "no chat template (a base model?); --prompt_format plain" in model.source_problem(str(base))
    assert model.source_problem(str(base), chat_template=False) is None
    tok = model.load_tokenizer(str(base), prompt_format="plain")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "Be brief.\n\nQuestion: 2 + 2?\nAnswer:"
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                                                "is_encoder_decoder": True}))
    assert "(model_type 't5') is not a decoder-only causal LM" in model.source_problem(str(t5))
    (t5 / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    assert "is not a decoder-only causal LM" in model.source_problem(str(t5))


def test_a_mistyped_policy_path_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "train_rl.py"), "--policy", str(tmp_path / "runs" / "dmeo"),
                          "--out_dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and not (tmp_path / "run").exists()
    assert out.stderr.strip().splitlines() == [f"train_rl.py: error: --policy '{tmp_path / 'runs' / 'dmeo'}': "
                                               "no such directory"]
