"""Prompt sharing in the log-prob pass: each distinct prompt of a micro-batch runs through the decoder once.

The samples of a group share their prompt, yet the packed layout (model.rows) runs prompt + response of
every sample, so a prompt goes through the model once per sample (at 8 samples and prompts ~1/3 of a
sequence, a quarter of the update's tokens). Here the distinct prompts run once, left-padded, with a KV
cache (gradients on); each layer's K/V are indexed out to the rows that continue them (autograd sums the
gradients of a prompt's rows back into it), and the responses, right-padded, run on that cache with
position ids continuing their prompt's true length. The hidden state at a prompt's last token predicts
its responses' first tokens. Same log-probs as the packed layout up to float rounding (tests/test_prefix_sharing.py).

Only HF-standard attention with a 2-D padding mask and a Cache, so sdpa, eager and flash-attention all run it.
Two passes through the decoder: under FSDP2 each layer is gathered twice per forward (and twice in backward),
so every rank must choose the same layout (`use`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from rlvr import distributed
from rlvr import model as models

# Share when the shared layout's tokens (distinct prompts x longest prompt + rows x longest response, padding
# included) are at most this fraction of the packed layout's (sum of prompt + response). Padding costs what a
# token costs; besides, the shared layout pays for two decoder passes (two FSDP gathers per layer), the K/V
# copies to the rows and their gradient sums, and attention through a padding mask, while on CPU the packed
# layout pays one attention call per distinct sequence length. Measured on CPU (fwd+bwd of 64 rows in
# micro-batches of 32, tiny Qwen2 h128 x 4 layers, 8 groups of 8, prompts 40-50 tokens, one thread, load ~4 on
# 2 cores), packed time / shared time against this fraction: 0.80 (equal 128-token responses) 1.27x, 0.85 1.19x,
# 0.90 1.32x, 1.00 1.22x, 1.13 1.00x, 1.28 0.77x, 1.51 (bench's uneven geometric lengths) 0.71x. The break-even
# is ~1.1 on CPU; 0.95 keeps a margin for GPUs, where the packed varlen kernel has no per-length overhead and
# padding is pure cost.
MAX_TOKEN_FRACTION = 0.95


def token_counts(prompts: list[list[int]], responses: list[list[int]]) -> tuple[int, int]:
    """(shared, packed): the tokens each layout runs through the decoder, padding included."""
    distinct = {tuple(p) for p in prompts}
    shared = len(distinct) * max(len(p) for p in distinct) + len(responses) * max(len(r) for r in responses)
    return shared, sum(len(p) + len(r) for p, r in zip(prompts, responses))


def _cache_kwarg(net) -> str | None:
    """The decoder's name for the KV cache argument (transformers 5.25 renamed past_key_values to cache)."""
    params = inspect.signature(net.get_decoder().forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def supported(net) -> bool:
    """Whether the shared layout can run on this model (else the packed one runs):
    - a decoder taking a Cache (`cache` or `past_key_values`);
    - full attention in every layer: a sliding-window layer's cache has its own mask sizes and would need
      the prefix cut to the window; such models (Gemma2/3, Mistral with a window) keep the packed layout;
    - under activation checkpointing, a transformers that lets a checkpointed layer keep a cache whose
      replay reads the same states (`_can_checkpoint_with_cache`); an older one drops the cache in
      checkpointed layers, and the responses would silently attend to themselves only."""
    config = net.get_decoder().config
    if _cache_kwarg(net) is None or any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    layers = models.decoder_layers(net)
    return all(hasattr(type(m), "_can_checkpoint_with_cache") or not getattr(m, "gradient_checkpointing", False)
               for m in layers)


def use(net, prompts: list[list[int]], responses: list[list[int]]) -> bool:
    """Whether to run this micro-batch in the shared layout: the model supports it, no response is empty
    (a row with nothing to predict), and the token rule (MAX_TOKEN_FRACTION) says it saves work. A sharded
    model: all ranks must run as many decoder passes (FSDP gathers each layer in each), so the layout is
    shared only where every rank's micro-batch says so (one small all-reduce)."""
    veto = not supported(net) or any(len(r) == 0 for r in responses)
    if not veto:
        shared, packed = token_counts(prompts, responses)
        veto = shared > MAX_TOKEN_FRACTION * packed
    if models.is_sharded(net):
        veto = bool(distributed.all_max(torch.tensor([int(veto)])).item())
    return not veto


def layout(prompts: list[list[int]], responses: list[list[int]], device) -> dict[str, torch.Tensor]:
    """The shared layout's tensors: distinct prompts left-padded [U, P] with their mask and positions, each
    row's prompt index `group` [B], responses right-padded [B, R] with their mask and positions continuing
    the prompt's true length."""
    index: dict[tuple, int] = {}
    group = [index.setdefault(tuple(p), len(index)) for p in prompts]
    distinct = [list(p) for p in index]
    width, rwidth = max(len(p) for p in distinct), max(len(r) for r in responses)

    def tensor(rows):
        return torch.tensor(rows, dtype=torch.long, device=device)
    return {
        "prompt_ids": tensor([[0] * (width - len(p)) + p for p in distinct]),
        "prompt_mask": tensor([[0] * (width - len(p)) + [1] * len(p) for p in distinct]),
        # padding positions are masked out; 0 keeps them in the rotary table's range
        "prompt_pos": tensor([[0] * (width - len(p)) + list(range(len(p))) for p in distinct]),
        "group": tensor(group),
        "response_ids": tensor([r + [0] * (rwidth - len(r)) for r in responses]),
        "response_mask": tensor([[1] * len(r) + [0] * (rwidth - len(r)) for r in responses]),
        "response_pos": tensor([list(range(len(p), len(p) + rwidth)) for p in prompts]),
    }


@functools.cache
def _cache_layers():
    """(Cache, _Recording, _Prefix): transformers imported on first use, as model.py imports it (so importing
    train_rl, a --help, stays fast)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class _Recording(DynamicLayer):
        """A layer's cache for the prompt pass: keeps the last K/V written (overwrites, never appends), so a
        checkpointed layer's replay in backward writes the same states again instead of doubling them."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    class _Prefix(DynamicLayer):
        """A layer's cache for the response pass: the rows' prompt K/V, read only. update returns prefix + new
        without storing, so a replay in backward (activation checkpointing) reads the same states."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)

    return Cache, _Recording, _Prefix


@contextlib.contextmanager
def _replayable_cache(net):
    """Checkpointed layers keep the cache: transformers drops it unless a layer declares that its replay
    reads the same states (`_can_checkpoint_with_cache`), which _Recording and _Prefix guarantee."""
    layers = [m for m in models.decoder_layers(net) if getattr(m, "gradient_checkpointing", False)
              and hasattr(type(m), "_can_checkpoint_with_cache")]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


def forward_shared(model, prompt_ids, prompt_mask, prompt_pos, group, response_ids, response_mask, response_pos,
                   temperature, chunk_size, with_entropy, fp32_head=True):
    """Flat per-token log-probs (and entropies) of the responses, row by row, in the shared layout (on a sharded
    model, run as an FSDP forward method: _method)."""
    decoder, name = model.get_decoder(), _cache_kwarg(model)
    Cache, _Recording, _Prefix = _cache_layers()
    recording = Cache(layer_class_to_replicate=_Recording)
    with _replayable_cache(model):
        prompt_out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos,
                             use_cache=True, **{name: recording})
        # index, not expand: each row gets its prompt's K/V; the index's backward sums the rows' gradients
        prefix = Cache(layers=[_Prefix(layer.keys[group], layer.values[group]) for layer in recording.layers])
        out = decoder(input_ids=response_ids, attention_mask=torch.cat([prompt_mask[group], response_mask], 1),
                      position_ids=response_pos, use_cache=True, **{name: prefix})
    # the hidden state at the prompt's last token (left padding: the last column) predicts the first response
    # token; the response's own states predict the rest
    first = prompt_out.last_hidden_state[:, -1][group]
    h = torch.cat([first[:, None], out.last_hidden_state[:, :-1]], 1)
    sel = response_mask.bool()
    return models.head_logprobs(model, h[sel], response_ids[sel], temperature, chunk_size, with_entropy, fp32_head)


def _method(net):
    """forward_shared on `net`; on a sharded model as an FSDP forward method, registered on first use as
    model.shard_model registers forward_logprobs: it calls the decoder and the LM head's weight directly, so
    FSDP must gather the root's parameters (embeddings, final norm, LM head) around it and reduce their gradients."""
    if not models.is_sharded(net):
        return functools.partial(forward_shared, net)
    if not hasattr(net, "forward_shared_logprobs"):
        from torch.distributed.fsdp import register_fsdp_forward_method

        net.forward_shared_logprobs = functools.partial(forward_shared, net)
        register_fsdp_forward_method(net, "forward_shared_logprobs")
    return net.forward_shared_logprobs


def logprobs(net, prompts, responses, temperature: float, chunk_size: int, with_entropy: bool, fp32_head: bool,
             device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat per-token log-probs (and entropies) of `responses` after `prompts`, sequence by sequence: what
    token_logprobs(...)[target_mask] gives in the packed layout."""
    t = layout(prompts, responses, device)
    return _method(net)(t["prompt_ids"], t["prompt_mask"], t["prompt_pos"], t["group"], t["response_ids"],
                        t["response_mask"], t["response_pos"], temperature, chunk_size, with_entropy, fp32_head)
