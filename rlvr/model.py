"""Models: load with the right attention kernel, shard with FSDP2, lay batches out (left-padded for
generation; packed or right-padded for log-probs), compute per-token log-probs without full-vocabulary
float32 logits, generate with seeded sampling (the decode loop: generation.py), and the one optimizer and LR
schedule of both trainers.

Imports config.py, distributed.py and generation.py only. The tiny offline models of the demo are built in toy.py.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from pathlib import Path

import torch

from rlvr import config, distributed, generation
from rlvr.generation import SeededSampling  # noqa: F401 (callers and tests name it model.SeededSampling)

# ----------------------------------------------------------------------------------------------
# loading


class NonFiniteError(FloatingPointError):
    """Loss or gradients stayed NaN/inf: the run stops rather than train on (or save) garbage, in both
    trainers (train_rl.py after a streak of skipped updates, train_verifier.py sft at once)."""


def compute_dtype() -> torch.dtype:
    """The dtype models compute in: bf16 on the GPU path (distributed.gpu_path(): FSDP2 mixed precision,
    frozen models loaded in it, as flash-attention requires), float32 on the plain CPU path."""
    return torch.bfloat16 if distributed.gpu_path() else torch.float32


def _flash_attn_unusable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash-attention 2 cannot run here (None: it can)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it needs fp16 or bf16, the model computes in {str(dtype).removeprefix('torch.')}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"it needs compute capability >= 8.0 (Ampere), this GPU has {major}.{minor}"
    try:  # import, not find_spec: a build compiled against another torch is installed but fails here
        import flash_attn  # noqa: F401
    except Exception as e:  # ImportError, or an undefined symbol from a mismatched build
        return f"flash_attn does not import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


@functools.cache
def _say_once(line: str) -> None:
    if distributed.rank() == 0:
        print(line, flush=True)


def attn_implementation(device: torch.device | str, dtype: torch.dtype, model_class=None) -> str:
    """flash-attention 2 on a GPU where it can run (varlen kernels for packed rows; an importable
    flash_attn, fp16/bf16 compute, compute capability >= 8.0), else sdpa, said in one line; eager for an
    architecture without sdpa support (Gemma2: its attention softcapping)."""
    supports = (lambda kind: getattr(model_class, f"_supports_{kind}", True)) if model_class else (lambda kind: True)
    device = torch.device(device)
    if device.type == "cuda" and supports("flash_attn"):
        reason = _flash_attn_unusable(device, dtype)
        if reason is None:
            return "flash_attention_2"
        _say_once(f"attention: {'sdpa' if supports('sdpa') else 'eager'}, not flash-attention 2: {reason}")
    return "sdpa" if supports("sdpa") else "eager"


# --prompt_format plain: a prompt for a base model without a chat template, as a base model's few-shot
# evaluation reads: the system message, "Question: ...", then "Answer:" (BOS first where the model has one).
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ m['content'] }}\n\n{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\n{% else %}"
    "Answer: {{ m['content'] }}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}")
_HUB_NAME = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


def has_chat_template(directory: str | Path) -> bool:
    """Whether a saved tokenizer carries a chat template (in tokenizer_config.json or its own file)."""
    d = Path(directory)
    if (d / "chat_template.jinja").exists() or (d / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def run_final_model(spec: str) -> str | None:
    """A finished run's directory (its config.json, if any, is the run's; final/ holds the model) -> its
    final model; None for anything else."""
    path = Path(spec).expanduser()
    if not (path / "final" / "config.json").is_file():
        return None
    try:
        own = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    except ValueError:
        own = {}
    return None if isinstance(own, dict) and "model_type" in own else str(path / "final")


def source_problem(spec: str, chat_template: bool = True, trust_remote_code: bool = False,
                   plain_flag: str = "--prompt_format") -> str | None:
    """Why `spec`, a local directory or a hub name, cannot be loaded as a causal LM here, read from its
    config and tokenizer files before any weights load (None: it can, or it is a hub name not on disk,
    which the hub answers for). `chat_template`: the prompts go through the tokenizer's chat template;
    `plain_flag`: the caller's flag that prompts with plain text instead ('': it has none, a verifier)."""
    path = Path(spec).expanduser()
    if not path.exists():
        first = Path(spec.split("/")[0]).expanduser()
        if _HUB_NAME.fullmatch(spec) and not spec.startswith((".", "~")) and not first.is_dir():
            return None
        return "no such directory"  # a path: absolute, relative, or under a directory that exists here
    if not path.is_dir():
        return "is a file, not a model directory"
    if not (path / "config.json").is_file():
        inside = [sub for sub in ("final", "checkpoints") if (path / sub).is_dir()]
        return ("is not a model directory (no config.json)"
                + (f"; a run directory? its model is {path / 'final'}" if inside else ""))
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as e:
        return f"config.json is not valid JSON ({e})"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type is None and (path / "final" / "config.json").is_file():  # a run's config.json, not a model's
        return f"is a run directory, not a model; its final model is {path / 'final'}"
    remote = trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if config.get("is_encoder_decoder") or (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote):
        return (f"architecture {config.get('architectures')} (model_type {model_type!r}) is not a decoder-only causal "
                "LM that transformers' AutoModelForCausalLM loads: the recipe trains and asks only those")
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder") and not remote:
        # BERT, RoBERTa...: AutoModelForCausalLM loads them (BertLMHeadModel), but as saved they are masked LMs,
        # whose next-token "probabilities" mean nothing
        return (f"architecture {config.get('architectures')} (model_type {model_type!r}) is a masked LM (an encoder; "
                "config.json has no is_decoder: true), not a causal LM: its first-token probabilities would be "
                "meaningless; the recipe trains and asks only decoder-only causal LMs")
    if chat_template and not has_chat_template(path):
        if not plain_flag:
            return ("its tokenizer has no chat template (a base model?); a verifier's prompt is rendered through "
                    "it: give a chat (instruct) model")
        return (f"its tokenizer has no chat template (a base model?); {plain_flag} plain prompts it with plain "
                "text: the system message, 'Question: ...', then 'Answer:'")
    return None


def check_policy_source(cfg) -> None:
    """--policy before anything loads: a mistyped path, a run directory, an encoder-decoder or a base model
    prompted as a chat model is one line naming the flag, not a traceback later ('tiny' is built)."""
    if cfg.policy != "tiny":
        problem = source_problem(cfg.policy, cfg.prompt_format == "chat", cfg.trust_remote_code)
        config.require(problem is None, "policy", cfg.policy, str(problem))


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, prompt_format: str = "chat"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if prompt_format == "plain":
        tok.chat_template = PLAIN_TEMPLATE
    tok.padding_side = "left"  # generation batches are left-padded so every row ends at -1
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _model_config(name_or_path: str, device, dtype: torch.dtype, trust_remote_code: bool,
                  compute_dtype: torch.dtype | None):
    """(config, attention kernel) of a causal LM, as every load builds it: dropout off, the kernel chosen
    for the dtype the forward runs in."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with _load_error(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    # dropout off (TRL's disable_dropout): the update's forward must be the policy that sampled (ratio 1
    # on-policy), and a log-prob must not be noise. GPT-2's checkpoints ship 0.1.
    for name, value in vars(config).items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    return config, attn_implementation(device, compute_dtype or dtype, model_class)


@contextlib.contextmanager
def _load_error(name_or_path: str):
    try:
        yield
    except OSError as e:
        raise OSError(f"cannot load model '{name_or_path}': {e}\n(no hub access here? build a tiny "
                      f"offline model with `python -m worlds toy tiny --out DIR`)") from e


def load_model(name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, compute_dtype: torch.dtype | None = None):
    """A Hugging Face causal LM from a hub name or a local directory, safetensors weights only, in
    `dtype`. The attention kernel is chosen for `compute_dtype` (default: dtype), the dtype the forward
    runs in: bf16 for float32 weights that FSDP2 mixed precision casts (shard_model)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight file drowns the training log
    config, attn = _model_config(name_or_path, device, dtype, trust_remote_code, compute_dtype)
    with _load_error(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=trust_remote_code, use_safetensors=True)
    return model.to(device)


def load_sharded(name_or_path: str, device: torch.device | str, dtype: torch.dtype, trust_remote_code: bool = False,
                 compute_dtype: torch.dtype | None = None, *, mixed_precision: bool, frozen: bool = False,
                 activation_checkpointing: bool = False):
    """load_model, then shard_model (`frozen`: eval mode, no gradients), with the weights read once: under a
    process group every rank builds the model on the meta device (no memory), shards it, allocates its
    own shard (1/world of the weights) on `device`, and rank 0 alone reads the checkpoint (on the CPU)
    and broadcasts it tensor by tensor into the shards. So no GPU ever holds the whole float32 model (a
    7B policy: 28 GB), as torchtitan loads. Without a group: the plain load."""
    if not distributed.is_initialized():
        lm = load_model(name_or_path, device, dtype, trust_remote_code, compute_dtype)
        return shard_model(lm.eval().requires_grad_(False) if frozen else lm, mixed_precision, activation_checkpointing)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    config, attn = _model_config(name_or_path, device, dtype, trust_remote_code, compute_dtype)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn,
                                              trust_remote_code=trust_remote_code)
    lm.eval()  # as from_pretrained returns it
    if frozen:
        lm.requires_grad_(False)
    lm = shard_model(lm, mixed_precision, activation_checkpointing)
    # uninitialised memory for this rank's shards and for the buffers. Tied embeddings stay one parameter:
    # FSDP2 shards it once, and to_empty swaps a DTensor parameter in place (tests/test_load_once.py).
    lm.to_empty(device=device)
    full = load_model(name_or_path, "cpu", dtype, trust_remote_code, compute_dtype) if distributed.rank() == 0 else None
    # a copy, not arithmetic: each rank's shard holds exactly the checkpoint's numbers
    set_model_state_dict(lm, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # What a state dict leaves out, as rank 0's from_pretrained made it: the non-persistent buffers
    # (rotary inv_freq, Gemma's embed_scale; computed from the config, small) and the generation config
    # (generation_config.json's end-of-sequence ids, which generate() stops at).
    buffers, generation_config = distributed.broadcast_object(
        (dict(full.named_non_persistent_buffers()), full.generation_config) if full is not None else None)
    for name, value in buffers.items():
        lm.get_buffer(name).copy_(value)
    lm.generation_config = generation_config
    del full
    return lm


# ----------------------------------------------------------------------------------------------
# FSDP2


def is_sharded(model) -> bool:
    """FSDP2-sharded: every forward all-gathers, so all ranks must run as many forwards."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model, mixed_precision: bool, activation_checkpointing: bool = False):
    """fully_shard each decoder layer, then the root. No-op without a process group.

    bf16 parameters with float32 gradient reduction when `mixed_precision` (GPU); the sharded
    master weights stay in the dtype the model was loaded in (float32 for a trained policy).
    """
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": functools.partial(_recompute_as_forward, model)})
    if not distributed.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # Our log-prob path calls the decoder and the lm_head weight directly (to chunk the vocabulary
    # projection); registering it as a forward method makes FSDP gather the root's parameters
    # (embeddings, final norm, lm_head) and reduce their gradients as it does for forward().
    model.forward_logprobs = functools.partial(_forward_logprobs, model)
    register_fsdp_forward_method(model, "forward_logprobs")
    return model


def decoder_layers(model) -> list:
    """The repeated blocks of any transformers causal LM (Qwen2DecoderLayer, GPT2Block, ...): the classes
    it names as never to be split across devices (`_no_split_modules`), else the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")
    return layers


@contextlib.contextmanager
def gathered_params(model):
    """Keep every FSDP unit unsharded for the duration (generation): one all-gather per unit
    instead of one per decoding step, and no collective inside the decoding loop, so ranks that
    stop after different numbers of tokens cannot deadlock. Costs one full copy of the weights."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
            # back to FSDP2's training defaults: the root keeps its parameters (embeddings, final norm,
            # lm_head) from forward to backward, where they are needed at once; setting it to reshard
            # would gather them twice per micro-batch (~2.2 GB bf16 at 7B)
            m.set_reshard_after_forward(m is not model, recurse=False)


# ----------------------------------------------------------------------------------------------
# batch layouts: every tensor a batch needs, built by one padding helper


def _layout(per_sequence: list[list], fill, how: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sequence values as one packed row [1, sum of lengths] (how="pack"), or as rows [B, longest]
    filled with `fill` after ("right") or before ("left") each sequence."""
    if how == "pack":
        return torch.tensor([v for s in per_sequence for v in s], device=device)[None]
    width = max(len(s) for s in per_sequence)
    if how == "right":
        return torch.tensor([s + [fill] * (width - len(s)) for s in per_sequence], device=device)
    return torch.tensor([[fill] * (width - len(s)) + s for s in per_sequence], device=device)


def _check_sequences(sequences: list[list[int]], caller: str) -> None:
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError(f"{caller} needs at least one sequence and no empty ones")


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both LongTensor[B, T]: left padding so every prompt ends at the
    last column, where generation continues."""
    _check_sequences(seqs, "left_pad")
    return (_layout(seqs, pad_id, "left").long(), _layout([[1] * len(s) for s in seqs], 0, "left").long())


def pack(sequences: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate sequences into one row; position ids restart at 0 for each sequence.

    Called with no attention_mask and no cache, transformers turns restarting position ids into a
    block-diagonal mask (sdpa) or varlen boundaries (flash-attention); token_logprobs runs one causal
    attention per sequence on CPU (see _varlen_sdpa). So no FLOP goes to padding.
    """
    _check_sequences(sequences, "pack")
    positions = [list(range(len(s))) for s in sequences]
    return _layout(sequences, 0, "pack", device).long(), _layout(positions, 0, "pack", device).long()


def rows(sequences: list[list[int]], target_masks: list[list[bool]], pack: bool, pad_id: int,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, position_ids, attention_mask, target_mask): the batch layout of token_logprobs.

    pack=True: one row, position ids restarting per sequence, no attention mask and no padding (the
    varlen path). pack=False: right-padded rows [B, longest] with an attention mask; on CPU, rows of
    similar length can be faster than one long packed row. Either way `values[target_mask]` lists the
    target tokens' values sequence by sequence, in order, so callers never depend on the layout.
    """
    _check_sequences(sequences, "rows")
    if [len(m) for m in target_masks] != [len(s) for s in sequences]:
        raise ValueError(f"rows: target mask lengths {[len(m) for m in target_masks]} differ from sequence "
                         f"lengths {[len(s) for s in sequences]}")
    how = "pack" if pack else "right"
    positions = [list(range(len(s))) for s in sequences]
    ids = _layout(sequences, pad_id, how, device).long()
    position_ids = _layout(positions, 0, how, device).long()
    target_mask = _layout([[bool(t) for t in m] for m in target_masks], False, how, device)
    attention_mask = None if pack else _layout([[1] * len(s) for s in sequences], 0, how, device).long()
    return ids, position_ids, attention_mask, target_mask


# ----------------------------------------------------------------------------------------------
# log-probs


def _logits(h: torch.Tensor, weight: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    if softcap:  # Gemma2/3 squash the LM head's output into (-softcap, softcap), as their forward does
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                    softcap: float | None = None):
    logits = _logits(h, weight, temperature, softcap)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _chunk_entropy(h: torch.Tensor, weight: torch.Tensor, temperature: float, softcap: float | None = None):
    logits = _logits(h, weight, temperature, softcap)
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    """Attention for one packed row [1, H, T, D]: causal sdpa inside each sequence, one call per
    sequence. Exact, and unlike a block-diagonal [T, T] mask it spends no FLOP or byte across
    sequences: the varlen kernel flash-attention provides on GPU, for machines without it."""
    if kwargs.get("softcap"):
        raise ValueError(f"{type(module).__name__}: packed rows on CPU cannot softcap attention scores "
                         "(attn_logit_softcapping); use --pack false, or flash-attention on GPU")
    if position_ids is None:
        raise ValueError(f"{type(module).__name__} does not pass position ids to its attention: packed rows need them; "
                         "use --pack false")
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist() + [query.shape[2]]
    lengths = [e - s for s, e in zip(starts[:-1], starts[1:])]
    # split (not slicing) so backward concatenates instead of zero-filling a full tensor per sequence
    qs, ks, vs = query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):  # sequences of one length share one batched call
        by_length.setdefault(n, []).append(i)
    outs = [None] * len(lengths)
    for idx in by_length.values():
        o = torch.nn.functional.scaled_dot_product_attention(
            torch.cat([qs[i] for i in idx]), torch.cat([ks[i] for i in idx]), torch.cat([vs[i] for i in idx]),
            is_causal=True, scale=scaling, enable_gqa=True)
        # split, not o[j:j + 1]: a slice's backward zero-fills a whole o per sequence and autograd sums them
        # (O(sequences x o) per layer, ~5% of an update at 32 sequences); split's backward is one cat
        for i, part in zip(idx, o.split(1)):
            outs[i] = part
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _register_varlen_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("sdpa_varlen", _varlen_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_varlen", lambda *args, **kwargs: None)  # no mask: varlen


@contextlib.contextmanager
def _packed_attention(model, packed: bool):
    """Use the per-sequence sdpa for packed rows unless flash-attention (varlen natively) is active."""
    impl = model.config._attn_implementation
    if not packed or impl.startswith("flash"):
        yield
        return
    _register_varlen_sdpa()
    with _attention_kernel(model, "sdpa_varlen"):
        yield


@contextlib.contextmanager
def _attention_kernel(model, impl: str):
    before = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        yield
    finally:
        model.config._attn_implementation = before


def _recompute_as_forward(model):
    """torch.utils.checkpoint's context_fn (--activation_checkpointing): a layer's recompute in backward runs
    with the attention kernel its forward ran with. _packed_attention sets the per-sequence kernel only around
    the forward; recomputed with plain sdpa, a packed row would attend across its sequences."""
    return contextlib.nullcontext(), _attention_kernel(model, model.config._attn_implementation)


def _forward_logprobs(model, input_ids, position_ids, attention_mask, target_mask, temperature, chunk_size,
                      with_entropy, fp32_head=True):
    with _packed_attention(model, packed=attention_mask is None and input_ids.shape[0] == 1):
        # the decoder without the LM head, whatever the architecture calls it (model, transformer, ...)
        out = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                  use_cache=False)
    h = out.last_hidden_state
    # The hidden state at t predicts token t+1: select only the positions whose next token is a
    # target, so the vocabulary projection runs for response tokens only.
    sel = target_mask[:, 1:]
    flat, ent = head_logprobs(model, h[:, :-1][sel], input_ids[:, 1:][sel], temperature, chunk_size, with_entropy,
                              fp32_head)
    return _scatter(target_mask, flat), (_scatter(target_mask, ent) if ent is not None else None)


def head_logprobs(model, hs: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_size: int,
                  with_entropy: bool, fp32_head: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head on selected hidden states hs [N, hidden]: flat log p(targets) [N] float32 (and entropies),
    chunked and recomputed in backward. Shared by the packed/padded layout here and prefix_sharing.py."""
    weight = model.get_output_embeddings().weight
    if fp32_head and weight.dtype != torch.float32:
        # The output layer in float32 (an "fp32 LM head"): bf16 logits carry a relative error of 2^-9,
        # ~0.06 at a logit of 30, which moves a token's log-prob by as much and a ratio pi/pi_old by
        # ~6%. Products of bf16 numbers are exact in float32, so only float32's rounding of the sums
        # is left. Costs one float32 copy of the weight (and of its gradient) for the call.
        hs, weight = hs.float(), weight.float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    # The [chunk, vocab] float32 logits and their softmax temporaries (about 4 such blocks in backward)
    # set the peak: `chunk_size` rows per block (--logprob_chunk); bench.py measures the trade.
    logps, ents = [], []
    # split, not slices: each slice's backward would zero-fill a whole [tokens, hidden] gradient (quadratic in
    # the number of chunks); split's backward is one cat
    for hc, tc in zip(hs.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled():
            # recompute the chunk's logits in backward instead of keeping [chunk, vocab] per chunk
            logps.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, hc, weight, tc, temperature, softcap,
                                                           use_reentrant=False))
        else:
            logps.append(_chunk_logprobs(hc, weight, tc, temperature, softcap))
        if with_entropy:
            with torch.no_grad():
                ents.append(_chunk_entropy(hc.detach(), weight.detach(), temperature, softcap))
    flat = torch.cat(logps) if logps else hs.new_zeros(0, dtype=torch.float32)
    return flat, (torch.cat(ents) if with_entropy and ents else None)


def _scatter(target_mask: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Place per-target values back at the target token positions (first position is never one)."""
    out = torch.zeros(target_mask.shape, dtype=flat.dtype, device=flat.device)
    sel = torch.zeros_like(target_mask)
    sel[:, 1:] = target_mask[:, 1:]
    return out.masked_scatter(sel, flat)


def token_logprobs(model, input_ids: torch.Tensor, position_ids: torch.Tensor, target_mask: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, temperature: float = 1.0, chunk_size: int = 512,
                   with_entropy: bool = False, fp32_head: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token_t | tokens_<t) at every position where target_mask is True (0 elsewhere), and
    optionally the entropy of the predictive distribution there, as [B, T] float32 tensors.
    A target is never the first token of a sequence (in a packed row, where position_ids is 0).

    The lm_head runs only on target positions, in chunks of `chunk_size` rows, each recomputed in
    backward: peak memory is [chunk, vocab] float32 instead of [B*T, vocab] (see bench.py). With
    fp32_head, a bf16 model's output layer runs in float32 (see _forward_logprobs).
    """
    fn = getattr(model, "forward_logprobs", None) or functools.partial(_forward_logprobs, model)
    return fn(input_ids, position_ids, attention_mask, target_mask.bool(), temperature, chunk_size, with_entropy,
              fp32_head)


# ----------------------------------------------------------------------------------------------
# generation


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens a response ends at: the generation config's end-of-sequence ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, row_seeds: list[int] | None = None,
             on_token=None) -> tuple[list[list[int]], list[bool]]:
    """Sample (or, with row_seeds=None, greedily decode) one response per prompt with the KV cache
    (generation.decode: the tokens HF's generate() draws with SeededSampling, at less cost).

    Returns the response token ids (cut after the first end-of-sequence token, which is kept) and
    whether each response was truncated at max_new_tokens. on_token: see generation.decode.
    """
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    seeds = None if row_seeds is None else torch.tensor(row_seeds, dtype=torch.long)
    # the model's generation_config.json applies as generate() applies it, less its repetition penalties
    # (generation.config_processors: the sampler draws from the policy the trainer scores)
    ctx = gathered_params(model) if distributed.is_initialized() else contextlib.nullcontext()
    with ctx:
        out = generation.decode(model, ids.to(device), mask.to(device), max_new_tokens, sorted(eos),
                                tokenizer.pad_token_id, seeds, temperature, top_p, on_token=on_token)
    responses, truncated = [], []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        responses.append(row[:cut] if cut else row)
        truncated.append(cut is None)
    return responses, truncated


# ----------------------------------------------------------------------------------------------
# optimizer and learning-rate schedule (both trainers)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) as a multiple of the peak: linear warm-up
    ((step + 1) / warmup_steps, so the first step already moves), then "constant" (1) or "cosine"
    decay from 1 to `min_lr_ratio` at step `total_steps` (OpenRLHF's cosine_with_min_lr uses 0.1),
    staying at that floor after it."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule {schedule!r}: expected 'constant' or 'cosine'")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, lr: float, betas: tuple[float, float], weight_decay: float, total_steps: int,
                    warmup_ratio: float, schedule: str, min_lr_ratio: float = 0.0):
    """(AdamW, LambdaLR): the schedule of lr_factor over `total_steps` optimizer steps, the first
    ceil(warmup_ratio * total_steps) of them warm-up. Call the scheduler's step() after each
    optimizer step."""
    if total_steps < 1 or not 0.0 <= warmup_ratio <= 1.0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"build_optimizer: total_steps={total_steps} must be >= 1, warmup_ratio={warmup_ratio} "
                         f"and min_lr_ratio={min_lr_ratio} in [0, 1]")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    factor = functools.partial(lr_factor, total_steps=total_steps, warmup_steps=math.ceil(warmup_ratio * total_steps),
                               schedule=schedule, min_lr_ratio=min_lr_ratio)
    # LambdaLR evaluates the factor at step 0 now: an unknown schedule fails here, not mid-run
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
