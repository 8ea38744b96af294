"""The rollout's decode loop: sampling with seeded Gumbel noise over a Hugging Face causal LM, without
HF's generate(). The same tokens as `model.generate(...)` with our SeededSampling processor (tests/
test_generation.py), at less cost on small models where generate's per-token overhead shows:

- the KV cache is preallocated to prompt width + max_new_tokens and written in place (HF's DynamicCache
  grows by concatenation: one copy of the whole cache per layer per token); attention still runs over
  exactly the filled prefix, so it computes what it computed before;
- each distinct prompt is prefilled once (a rollout's `samples_per_prompt` rows repeat their prompt) and
  its cache rows copied to the samples;
- rows that have ended leave the batch, so later tokens are computed for live rows only.

Imports nothing of the recipe's; model.generate (the entry point, FSDP and padding) calls decode().
"""
from __future__ import annotations

import inspect

import torch

# ----------------------------------------------------------------------------------------------
# seeded sampling


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """A counter-based hash on int64 tensors (two's-complement wrap-around; `>>` is arithmetic in
    torch, so the shifted-in sign bits are masked off to get a logical shift)."""
    def shr(v, k):
        return (v >> k) & ((1 << (64 - k)) - 1)
    x = x + (0x9E3779B97F4A7C15 - (1 << 64))
    x = (x ^ shr(x, 30)) * (0xBF58476D1CE4E5B9 - (1 << 64))
    x = (x ^ shr(x, 27)) * (0x94D049BB133111EB - (1 << 64))
    return x ^ shr(x, 31)


def perturb(scores: torch.Tensor, row_seeds: torch.Tensor, generated: int, temperature: float,
            top_p: float) -> torch.Tensor:
    """scores / T (top-p filtered) plus Gumbel noise hashed from (row seed, index of the generated token,
    token): its argmax is an exact sample of softmax(scores / T) within the nucleus."""
    scores = scores.float() / temperature
    if top_p < 1.0:
        sorted_scores, order = scores.sort(-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    key = _splitmix64(row_seeds.to(scores.device)[:, None] * 1_000_003 + generated)
    bits = _splitmix64(key * 0x100000001B3 + vocab[None])
    u = (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) / float(1 << 53)  # uniform in (0, 1)
    return scores + (-torch.log(-torch.log(u))).float()


class SeededSampling:
    """Logits processor for temperature / top-p sampling by the Gumbel-max trick, with noise that is
    a hash of (row seed, index of the generated token, token): greedy decoding over perturbed scores
    is then an exact sample, and a sample depends only on its own seed and prompt, never on which rank
    or batch it ran in (nor on the left padding a longer prompt in the batch adds). So one process and
    N processes draw the same rollouts, and a resumed run redraws them. One instance per generate call:
    the first call sees the (padded) prompt width, from which later calls count generated tokens.
    (HF's generate takes it as a logits processor; decode() calls perturb() itself.)"""

    def __init__(self, row_seeds: torch.Tensor, temperature: float, top_p: float):
        self.row_seeds, self.temperature, self.top_p = row_seeds, temperature, top_p
        self.prompt_width: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        generated = input_ids.shape[1] - self.prompt_width  # 0 for the first new token
        return perturb(scores, self.row_seeds, generated, self.temperature, self.top_p)


# ----------------------------------------------------------------------------------------------
# the KV cache


def _preallocated_layer(capacity: int):
    from transformers.cache_utils import DynamicLayer

    class Preallocated(DynamicLayer):
        """A DynamicLayer whose keys and values live in a buffer of `capacity` positions, allocated at the
        first update and written in place; update() returns the filled prefix as a view, so attention sees
        exactly the tensors DynamicLayer's concatenation would build."""

        def lazy_initialization(self, key_states, value_states):
            self.device, self.filled = key_states.device, 0
            b, h, _, d = key_states.shape
            self.k_buf = key_states.new_empty(b, h, capacity, d)
            self.v_buf = value_states.new_empty(b, h, capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.filled, key_states.shape[-2]
            self.k_buf[:, :, n:n + m] = key_states
            self.v_buf[:, :, n:n + m] = value_states
            self.filled = n + m
            self.keys, self.values = self.k_buf[:, :, :n + m], self.v_buf[:, :, :n + m]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.filled if self.is_initialized else 0

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep (or repeat) rows `indices`: a fresh buffer, only the filled prefix copied."""
            if not self.is_initialized:
                return
            n = self.filled
            k_buf = self.k_buf.new_empty(len(indices), *self.k_buf.shape[1:])
            v_buf = self.v_buf.new_empty(len(indices), *self.v_buf.shape[1:])
            k_buf[:, :, :n].copy_(self.k_buf[:, :, :n].index_select(0, indices))
            v_buf[:, :, :n].copy_(self.v_buf[:, :, :n].index_select(0, indices))
            self.k_buf, self.v_buf = k_buf, v_buf
            self.keys, self.values = k_buf[:, :, :n], v_buf[:, :, :n]

    return Preallocated


def _cache(model, capacity: int):
    """The model's DynamicCache (its sliding-window or other layer kinds as HF builds them), every plain
    full-attention layer preallocated to `capacity` positions."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layer = _preallocated_layer(capacity)
    cache = DynamicCache(config=model.config)
    cache.layers = [layer() if type(x) is DynamicLayer else x for x in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = layer
    return cache


# ----------------------------------------------------------------------------------------------
# the decode loop


# HF's logits processors that act on each row alone and keep no per-batch state: with only these, ended rows
# can leave the batch (any other processor, e.g. one holding per-row tensors, keeps every row to the end)
_ROW_WISE = {"SequenceBiasLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "MinLengthLogitsProcessor",
             "RepetitionPenaltyLogitsProcessor", "NoBadWordsLogitsProcessor", "NoRepeatNGramLogitsProcessor",
             "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor", "TemperatureLogitsWarper",
             "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "ForcedEOSTokenLogitsProcessor",
             "InfNanRemoveLogitsProcessor", "ExponentialDecayLengthPenalty", "LogitNormalization"}


def config_processors(model, eos: list[int], pad_id: int, mask: torch.Tensor | None, prompt_width: int, device):
    """The logits processors HF's generate() builds from the model's generation_config under our settings
    (greedy over our perturbed scores: min_new_tokens, sequence_bias... of the model's generation_config.json
    apply, sampling warpers do not), less its repetition penalties: the same list otherwise, so the same
    tokens. `mask`: the attention mask as generate() keeps it (None without padding). Private transformers
    API (5.x); tests/test_generation.py checks the tokens against generate()."""
    from transformers import GenerationConfig, LogitsProcessorList

    settings = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=pad_id)
    generation_config, _ = model._prepare_generation_config(settings)
    # The sampler draws from the policy the trainer scores (softmax(logits / T), top-p). Qwen2.5's file ships
    # repetition_penalty 1.05, which generate() applies (a setting left at its default is filled from the
    # model's file), so the rollouts came from another policy than the one whose ratio the update takes. TRL
    # (repetition_penalty 1.0 unless asked) and verl / OpenRLHF (vLLM's SamplingParams) sample without it.
    generation_config.repetition_penalty = generation_config.encoder_repetition_penalty = None
    generation_config.no_repeat_ngram_size = generation_config.encoder_no_repeat_ngram_size = None
    model._prepare_special_tokens(generation_config, True, device=device)
    return model._get_logits_processor(generation_config=generation_config, input_ids_seq_length=prompt_width,
                                       logits_processor=LogitsProcessorList(), device=device,
                                       model_kwargs={"attention_mask": mask})


def _select_rows(processors, keep: torch.Tensor) -> None:
    """Processors' per-row state, for the rows kept: the repetition penalty's prompt lengths (it skips
    each row's left padding)."""
    for p in processors:
        if isinstance(getattr(p, "prompt_ignore_length", None), torch.Tensor):
            p.prompt_ignore_length = p.prompt_ignore_length.to(keep.device)[keep]


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: list[int], pad_id: int,
           row_seeds: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
           on_token=None, drop_ended: bool = True) -> torch.Tensor:
    """Generated tokens [B, max_new_tokens] of left-padded prompts `ids` / `mask` [B, W] (on the model's
    device), `pad_id` after a row's end-of-sequence token: what HF's generate() returns after the prompt,
    with SeededSampling(row_seeds, temperature, top_p) as its logits processor (row_seeds None: greedy).

    on_token(rows, tokens, scores) after each step: rows [L] (indices into the batch) still generating,
    the tokens they drew [L], and the scores sampling started from [L, vocab] (the raw logits after the
    generation config's processors, before temperature and noise).
    """
    batch, width = ids.shape
    device = ids.device
    eos_t = torch.tensor(sorted(eos), device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    if max_new_tokens <= 0:
        return out
    # as generate(): positions count real tokens (padding at 0), and an all-ones mask is dropped
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    padded = not bool((mask == 1).all())
    processors = config_processors(model, sorted(eos), pad_id, mask if padded else None, width, device)
    drop_ended = drop_ended and all(type(p).__name__ in _ROW_WISE for p in processors)
    full_mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], 1) if padded else None
    seq = torch.cat([ids, ids.new_full((batch, max_new_tokens), pad_id)], 1) if len(processors) else None
    step_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    # prefill each distinct prompt once: identical rows are adjacent (a group's samples)
    same = (ids[1:] == ids[:-1]).all(-1) & (mask[1:] == mask[:-1]).all(-1)
    first = torch.cat([same.new_ones(1), ~same])
    unique = first.nonzero().squeeze(1)
    cache = _cache(model, width + max_new_tokens)
    logits = model(input_ids=ids[unique], position_ids=positions[unique],
                   attention_mask=mask[unique] if padded else None, cache=cache, use_cache=True,
                   **step_kwargs).logits[:, -1].float()
    if len(unique) < batch:
        owner = first.long().cumsum(0) - 1  # row -> its prompt's index in `unique`
        cache.batch_select_indices(owner)
        logits = logits[owner]
    rows = torch.arange(batch, device=device)  # the batch rows still in the batch
    live = torch.ones(batch, dtype=torch.bool, device=device)  # of those, not yet ended
    seeds = row_seeds.to(device) if row_seeds is not None else None
    position = positions[:, -1]
    for t in range(max_new_tokens):
        scores = processors(seq[:, :width + t], logits) if seq is not None else logits
        tokens = (perturb(scores, seeds, t, temperature, top_p) if seeds is not None else scores).argmax(-1)
        tokens = torch.where(live, tokens, pad_id)
        out[rows, t] = tokens
        if on_token is not None:
            on_token(rows[live], tokens[live], scores[live])
        live &= ~torch.isin(tokens, eos_t)
        if t == max_new_tokens - 1 or not bool(live.any()):
            break
        if seq is not None:
            seq[:, width + t] = tokens
        if drop_ended and not bool(live.all()):
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, live, position = rows[keep], live[keep], position[keep]
            seeds = seeds[keep] if seeds is not None else None
            seq = seq[keep] if seq is not None else None
            full_mask = full_mask[keep] if full_mask is not None else None
            _select_rows(processors, keep)
            tokens = tokens[keep]
        position = position + 1
        logits = model(input_ids=tokens[:, None], position_ids=position[:, None],
                       attention_mask=full_mask[:, :width + t + 1] if full_mask is not None else None,
                       cache=cache, use_cache=True, **step_kwargs).logits[:, -1].float()
    return out
