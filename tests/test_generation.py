"""generation.py: our decode loop draws what Hugging Face's generate() draws with SeededSampling, from the
same logits (bitwise on the same shapes; within float32 rounding where the batch is smaller: prompts
prefilled once for their samples, ended rows left out)."""
import pytest
import torch

from rlvr import generation, model

# Logits of a smaller batch (each prompt prefilled once, ended rows left out): the same math on fewer rows, where the CPU's matrix
# multiplications may block (so sum) the hidden dimension (128, 512 in the MLP) in another order: float32
# rounding, measured at ~5e-7 on logits of magnitude ~1-10 here. 1e-5 is well above that and far below any
# real error (a wrong position, mask or cache row moves logits by > 1e-2).
LOGIT_ATOL = 1e-5


class _Grab:
    """A logits processor that keeps the scores it is given (first in the list: what sampling starts from)."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def hf_generate(lm, tok, prompts, max_new_tokens, temperature=1.0, top_p=1.0, row_seeds=None):
    """The generation path before generation.py: HF's generate(), greedy over SeededSampling's scores.
    Returns the generated tokens [B, max_new_tokens] (pad after the end) and each step's scores [B, vocab]."""
    from transformers import GenerationConfig, LogitsProcessorList

    ids, mask = model.left_pad(prompts, tok.pad_token_id)
    grab = _Grab()
    processors = LogitsProcessorList([grab])
    if row_seeds is not None:
        processors.append(model.SeededSampling(torch.tensor(row_seeds), temperature, top_p))
    settings = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=sorted(model.eos_ids(lm, tok)), pad_token_id=tok.pad_token_id)
    out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=settings, logits_processor=processors)
    out = out[:, ids.shape[1]:]
    return torch.cat([out, out.new_full((len(prompts), max_new_tokens - out.shape[1]), tok.pad_token_id)], 1), grab.steps


def our_decode(lm, tok, prompts, max_new_tokens, temperature=1.0, top_p=1.0, row_seeds=None, drop_ended=True):
    ids, mask = model.left_pad(prompts, tok.pad_token_id)
    steps = []
    out = generation.decode(lm, ids, mask, max_new_tokens, sorted(model.eos_ids(lm, tok)), tok.pad_token_id,
                            None if row_seeds is None else torch.tensor(row_seeds), temperature, top_p,
                            on_token=lambda rows, tokens, scores: steps.append((rows, scores.clone())),
                            drop_ended=drop_ended)
    return out, steps


@pytest.fixture(scope="module")
def ending(tiny_model_dir):
    """The tiny model with an end-of-sequence bias (responses end at different steps), and its tokenizer;
    3 prompts of different lengths (left padding), 4 samples each (adjacent, as a rollout lays them out)."""
    lm, tok = model.load_model(tiny_model_dir).eval(), model.load_tokenizer(tiny_model_dir)
    bias = torch.zeros(lm.config.vocab_size)
    bias[tok.eos_token_id] = 4.0
    lm.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    prompts = [p for p in ([5, 6], [7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23]) for _ in range(4)]
    return lm, tok, prompts


@pytest.mark.parametrize("temperature,top_p,seeded", [(1.0, 1.0, True), (0.7, 0.9, True), (1.0, 1.0, False)])
def test_decode_draws_hf_generates_tokens_from_its_logits(ending, temperature, top_p, seeded):
    lm, tok, prompts = ending
    seeds = list(range(100, 100 + len(prompts))) if seeded else None
    want, want_scores = hf_generate(lm, tok, prompts, 24, temperature, top_p, seeds)
    ended = (want == tok.eos_token_id).any(1)
    assert ended.any(), "need rows that end early"
    if seeded and temperature == 1.0:
        assert not ended.all(), "need rows that end early and rows cut at max_new_tokens"
    for drop_ended in (False, True):
        got, got_scores = our_decode(lm, tok, prompts, 24, temperature, top_p, seeds, drop_ended)
        assert torch.equal(got, want)
        assert len(got_scores) == len(want_scores)
        for (rows, scores), full in zip(got_scores, want_scores):
            torch.testing.assert_close(scores, full[rows], atol=LOGIT_ATOL, rtol=0)
    # model.generate: the same responses, cut after the first end-of-sequence token
    responses, truncated = model.generate(lm, tok, prompts, 24, temperature, top_p, seeds)
    for row, response, cut in zip(want.tolist(), responses, truncated):
        assert response == (row if cut else row[:row.index(tok.eos_token_id) + 1])


def test_decode_computes_hf_generates_logits_bitwise_on_the_same_shapes(ending):
    """Distinct prompts (one prefill row each) and every row kept to the end: the same operations on the
    same shapes as generate(), so the same float32 bits, whatever the CPU's kernels."""
    lm, tok, prompts = ending
    prompts = prompts[::4]
    want, want_scores = hf_generate(lm, tok, prompts, 12, row_seeds=[7, 8, 9])
    got, got_scores = our_decode(lm, tok, prompts, 12, row_seeds=[7, 8, 9], drop_ended=False)
    assert torch.equal(got, want)
    for (rows, scores), full in zip(got_scores, want_scores):
        assert torch.equal(scores, full[rows])


def test_decode_applies_the_models_generation_config_as_generate_does(tiny_model_dir):
    """min_new_tokens, sequence_bias of generation_config.json (the bench sets lengths so)."""
    lm, tok = model.load_model(tiny_model_dir).eval(), model.load_tokenizer(tiny_model_dir)
    eos = tok.eos_token_id
    lm.generation_config.update(min_new_tokens=6, sequence_bias=[[[eos], 5.0]])
    tok.pad_token = tok.eos_token  # as real tokenizers without a pad token are loaded (load_tokenizer)
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
    want, _ = hf_generate(lm, tok, prompts, 16, row_seeds=[1, 2, 3, 4])
    got, _ = our_decode(lm, tok, prompts, 16, row_seeds=[1, 2, 3, 4])
    assert torch.equal(got, want)
    lengths = [row.index(eos) + 1 if eos in row else 16 for row in want.tolist()]
    assert min(lengths) >= 7 and min(lengths) < 16, lengths  # min_new_tokens held, then the bias ended rows


def test_the_preallocated_cache_holds_what_dynamic_cache_holds(tiny_model_dir):
    """The cache's layers: views of one buffer per layer, equal to DynamicCache's concatenation; rows selected
    (repeated, dropped) as DynamicCache selects them."""
    from transformers import DynamicCache

    lm = model.load_model(tiny_model_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    ours, theirs = generation._cache(lm, 8), DynamicCache(config=lm.config)
    with torch.no_grad():
        for cache in (ours, theirs):
            lm(input_ids=ids, cache=cache, use_cache=True)
            cache.batch_select_indices(torch.tensor([0, 0, 1]))
            lm(input_ids=torch.tensor([[3], [4], [5]]), position_ids=torch.tensor([[4]] * 3), cache=cache, use_cache=True)
            cache.batch_select_indices(torch.tensor([1, 2]))
            lm(input_ids=torch.tensor([[6], [7]]), position_ids=torch.tensor([[5]] * 2), cache=cache, use_cache=True)
    assert ours.get_seq_length() == theirs.get_seq_length() == 6
    for a, b in zip(ours.layers, theirs.layers):
        assert a.k_buf.shape[2] == 8 and a.keys.data_ptr() == a.k_buf.data_ptr()  # a view, not a copy
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_streamed_groups_are_handed_over_when_they_end_with_their_logprobs(ending):
    """rollout_stream on decode's on_token hook: each group right after the step its last response ended,
    with the behaviour log-probs of HF's scores / T (within LOGIT_ATOL), the tokens model.generate draws."""
    from types import SimpleNamespace

    from rlvr import rollout_stream

    lm, tok, prompts = ending
    seeds, temperature = list(range(100, 100 + len(prompts))), 0.8
    want, want_scores = hf_generate(lm, tok, prompts, 24, temperature, 1.0, seeds)
    forwards, seen = [], {}
    hook = lm.register_forward_hook(lambda *args: forwards.append(1))
    try:
        rollout_stream.sample_groups(lm, tok, prompts, seeds, SimpleNamespace(temperature=temperature, top_p=1.0,
                                                                              max_new_tokens=24), 4,
                                     lambda first, *rest: seen.update({first: (len(forwards), *rest)}), record=True)
    finally:
        hook.remove()
    assert sorted(seen) == [0, 4, 8]
    assert [r for f in sorted(seen) for r in seen[f][1]] == model.generate(lm, tok, prompts, 24, temperature, 1.0,
                                                                            seeds)[0]
    early = [f for f, (n, responses, truncated, _) in seen.items() if not any(truncated)]
    assert early and len(forwards) > min(seen[f][0] for f in early), "need a group that ends before the others"
    for first, (n, responses, truncated, logp) in seen.items():
        if not any(truncated):  # the forward whose logits drew the group's last token (the prefill drew token 0)
            assert n == max(len(r) for r in responses)
        for i, (response, lp) in enumerate(zip(responses, logp)):
            row = first + i
            assert torch.equal(want[row, :len(response)], torch.tensor(response))
            ref = torch.stack([(want_scores[t][row] / temperature).log_softmax(-1)[tok_id]
                               for t, tok_id in enumerate(response)])
            torch.testing.assert_close(lp, ref, atol=LOGIT_ATOL, rtol=0)


def test_the_models_repetition_penalty_is_not_the_samplers(tiny_model_dir):
    """Qwen2.5's generation_config.json ships repetition_penalty 1.05, which HF's generate() applies: the
    sampler must draw from the policy the trainer scores, so each step's scores are the model's logits."""
    lm, tok = model.load_model(tiny_model_dir).eval(), model.load_tokenizer(tiny_model_dir)
    lm.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=2)
    prompts = [[5, 6, 7, 5, 6], [8, 9, 8, 9], [5, 6, 7, 5, 6]]
    got, steps = our_decode(lm, tok, prompts, 12, row_seeds=[1, 2, 3])
    penalised, _ = hf_generate(lm, tok, prompts, 12, row_seeds=[1, 2, 3])
    assert not torch.equal(got, penalised)  # the penalty would have changed the samples
    for step, (rows, scores) in enumerate(steps):  # the raw logits of each row's own sequence so far
        for i, row_scores in zip(rows.tolist(), scores):
            seq = torch.tensor([prompts[i] + got[i, :step].tolist()])
            # float32 logits of one row alone vs a batch with a shared prefill: ~1e-6 (other summation order)
            torch.testing.assert_close(row_scores.float(), lm(seq).logits[0, -1].float(), atol=1e-4, rtol=0)
