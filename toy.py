"""The offline demo in one place: a byte-level BPE tokenizer and tiny Qwen2-architecture models built
from code, a supervised warm start, and the toy task they learn on a CPU in minutes (prompts for RL,
warm-start pairs, and judged rows for verifier distillation).

Imports data, model and distributed. `python toy.py tiny --out DIR` builds a tiny model.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import data
import distributed
from model import rows, token_logprobs

# ----------------------------------------------------------------------------------------------
# tiny offline models: a random Qwen2-architecture LM and a byte-level BPE tokenizer, from code

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# What the tokenizer's merges are learned from: the phrases the demo, the verifier template and the
# chat format use most. Byte-level BPE encodes any other text too, only in more tokens.
_CORPUS = """You are a helpful assistant. You are a chatbot who can solve problems. Please solve the following
problem and give your thought process. Before giving the final result, you should output "Therefore, the answer is",
and then give your final answer. What is 3 + 4? What is 9 - 5? Therefore, the answer is 7. The answer is 12.
Given a problem, determine whether the final answer in the provided (incomplete) solution process matches the
reference answer. The reference answer may be one single option character (e.g., A, B, C, D), a numerical value,
an expression, or a list of answers if multiple questions are involved. **The reference answer may be in Chinese or
another language, but your evaluation should be language-agnostic.** Your task: - Compare the final output of the
solution process with the reference answer. - If they **match exactly**, output **YES**. - If they **do not match**,
output **NO**. - If the solution process is unclear, incomplete, or ambiguous, assume it is incorrect and output
**NO**. Your output must be strictly **'YES'** or **'NO'**, with no additional words, punctuation, or explanation.
--- **Question:** **Solution Process (Final Step Only):** **Reference Answer:** **Output:** YES NO Yes No yes no
Correct Incorrect True False A B C D 0 1 2 3 4 5 6 7 8 9 10 + - * / = . , ; : ! ? ( ) user assistant system
"""


def build_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # digits split one by one (as Qwen does), then GPT-2 style byte-level words
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator([_CORPUS] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=4096)
    for word in ("YES", "NO", " YES", " NO"):  # the verifier's judgement tokens must be single tokens
        if len(fast.encode(word, add_special_tokens=False)) != 1:
            raise RuntimeError(f"the tiny tokenizer splits the judgement word {word!r}: change _CORPUS")
    return fast


def cache_root() -> Path:
    """Where built models are kept: $RLVR_CACHE, else ~/.cache/rlvr_recipe."""
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr_recipe"))


def build_tiny_model(out_dir: str | None = None, seed: int = 0, sft_pairs: list | None = None,
                     sft_steps: int = 0, hidden_size: int = 128, num_layers: int = 4, vocab_size: int = 1024) -> str:
    """Build (once; cached on disk) a tiny Qwen2-architecture causal LM and its tokenizer in Hugging
    Face format (safetensors), deterministic from `seed`. head_dim is 64 so vLLM's CPU backend
    serves it. With `sft_pairs` [(messages, response), ...] it is warm-started by `sft_steps` of
    supervised fine-tuning: a random model trained by RL alone collapses onto one answer.
    Returns the directory. Deterministic content means concurrent builders (ranks, tests) race
    harmlessly: each writes a private temp dir and the first rename wins.
    """
    spec = dict(seed=seed, hidden=hidden_size, layers=num_layers, vocab=vocab_size, sft_steps=sft_steps,
                sft=hashlib.sha256(json.dumps(sft_pairs or [], sort_keys=True).encode()).hexdigest()[:12], v=1)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(out_dir) if out_dir else cache_root() / f"tiny-{key}"
    if (out / "config.json").exists() and json.loads((out / "rlvr_tiny.json").read_text()) == spec:
        return str(out)

    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = build_tokenizer(vocab_size)
    config = Qwen2Config(
        vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lm = Qwen2ForCausalLM(config).float()
        if sft_pairs:
            supervised_warm_start(lm, tok, sft_pairs, sft_steps, seed)
    lm.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    lm.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "rlvr_tiny.json").write_text(json.dumps(spec, sort_keys=True))
    try:
        if out.exists():  # a stale build with another spec at an explicit path
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race with the same content
    return str(out)


def supervised_warm_start(lm, tokenizer, pairs: list, steps: int, seed: int, batch_size: int = 32,
                          lr: float = 1e-3) -> list[float]:
    """A few steps of next-token SFT on (messages, response) pairs, loss on the response (and its
    end-of-turn token) only, on packed rows. Returns the losses."""
    generator = torch.Generator().manual_seed(seed)
    seqs, masks = [], []
    for messages, response in pairs:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(p + r)
        masks.append([False] * len(p) + [True] * len(r))
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    lm.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(seqs), (batch_size,), generator=generator).tolist()
        ids, pos, _, target = rows([seqs[i] for i in idx], [masks[i] for i in idx], True, tokenizer.pad_token_id)
        logp, _ = token_logprobs(lm, ids, pos, target)
        loss = -logp.sum() / target[:, 1:].sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    lm.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# the toy task: which of two different digits is larger (or smaller), learnable by a tiny model on a
# CPU in minutes (one-digit addition is not: a random tiny model trained on it stays at chance for
# thousands of SFT steps, and GRPO alone collapses onto one answer). Answers come in equivalent surface
# forms ("7", "7.0", "14/2"): substring matching misses "14/2" and is fooled by "17", while a verifier
# that knows equivalence (rule:math, or a distilled one) is not.

SYSTEM_PROMPT = "Answer with: Therefore, the answer is N."  # short: the demo's cost is its prompt


def _problems() -> list[tuple[str, int, str]]:
    problems = []
    for a in range(10):
        for b in range(10):
            if a != b:
                problems.append((f"Which is larger, {a} or {b}?", max(a, b), "larger"))
                problems.append((f"Which is smaller, {a} or {b}?", min(a, b), "smaller"))
    return problems


PROBLEMS = 180


def records(n: int, seed: int, system_prompt: str = SYSTEM_PROMPT) -> list[data.Record]:
    """`n` comparison problems ("Which is larger, 3 or 7?", reference "7"). The 180 problems are
    shuffled by `seed` and dealt without repeats until all are used, so split_heldout() on
    records(180, s) gives disjoint train and eval questions."""
    problems = _problems()
    rng = random.Random(f"toy:{seed}")
    out: list[data.Record] = []
    while len(out) < n:
        deck = problems[:]
        rng.shuffle(deck)
        for question, value, subject in deck[:n - len(out)]:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
            messages.append({"role": "user", "content": question})
            out.append(data.make_record(question, str(value), messages,
                                        {"subject": subject, "source": "toy", "row": len(out) + 1}))
    return out


def answer_forms(value: int) -> list[str]:
    """Surface forms math-verify judges equal to str(value): plain, decimal and an unreduced fraction."""
    return [str(value), f"{value}.0", f"{2 * value}/2"]


def response(value_form: str) -> str:
    return f"Therefore, the answer is {value_form}."


WARM_START_STEPS = 200  # supervised steps that take the random tiny model to ~50% on the task


def sft_pairs(n: int, seed: int, heldout_fraction: float = 0.0) -> list[tuple[list[dict], str]]:
    """(messages, response) pairs for the tiny model's warm start: correct answers, mostly the plain
    integer (70%), else "7.0" or "14/2" (15% each); questions in the hash-held-out share are left out,
    so the warm start never sees what eval grades."""
    rng = random.Random(f"toy-sft:{seed}")
    pairs = []
    problems = records(n, seed)
    if heldout_fraction:
        heldout = {r.question for r in data.split_heldout(problems, heldout_fraction)[1]}
        problems = [r for r in problems if r.question not in heldout]
    for r in problems:
        form = rng.choices(answer_forms(int(r.reference)), weights=(0.7, 0.15, 0.15))[0]
        pairs.append((r.messages, response(form)))
    return pairs


def judge_rows(n: int, seed: int) -> list[data.JudgedRow]:
    """Rows for verifier distillation, labelled with the truth by construction: half correct answers
    in any equivalent form, half wrong values (off by 1 to 3, or +10 so that "17" contains the
    reference "7") in any form, shuffled."""
    rng = random.Random(f"toy-judge:{seed}")
    correct = [i % 2 == 0 for i in range(n)]
    rng.shuffle(correct)
    out = []
    for r, ok in zip(records(n, seed), correct):
        value = int(r.reference)
        if not ok:
            value = rng.choice([value + d for d in (1, 2, 3, 10)] + [value - d for d in (1, 2, 3) if value >= d])
        out.append(data.JudgedRow(r.question, r.reference, response(rng.choice(answer_forms(value))), label=int(ok)))
    return out


def tiny_policy(seed: int, heldout_fraction: float) -> str:
    """The demo policy (train_rl.py --policy tiny, train_verifier.py --student tiny): the tiny model
    warm-started on the toy task's training questions (never the held-out ones eval grades), so it can
    already read the digits, as the paper's policies start from instruct models. Call it on every
    rank: rank 0 builds it (once; cached), the others wait for its path."""
    path = None
    if distributed.rank() == 0:
        pairs = sft_pairs(400, seed=1, heldout_fraction=heldout_fraction)
        path = build_tiny_model(seed=seed, sft_pairs=pairs, sft_steps=WARM_START_STEPS)
    return distributed.broadcast_object(path)


VERIFIER_RECIPE = Path(__file__).resolve().parent / "recipes" / "verifier_cpu_demo.yaml"
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_")


def tiny_verifier(seed: int) -> str:
    """The main job's reward verifier: the tiny student distilled from the rule:math teacher by
    `train_verifier.py sft --config recipes/verifier_cpu_demo.yaml` (how the paper built RM-7B, in
    miniature), run as its own process (the trainers never import each other). Built once per recipe
    and seed, cached; call it on every rank: rank 0 builds, the others wait for its path."""
    path = None
    if distributed.rank() == 0:
        recipe = VERIFIER_RECIPE.read_text()
        key = hashlib.sha256(f"{recipe}\nseed={seed}".encode()).hexdigest()[:12]
        out = cache_root() / f"verifier-{key}"
        if not (out / "final" / "config.json").exists():
            script = VERIFIER_RECIPE.parent.parent / "train_verifier.py"
            cmd = [sys.executable, str(script), "sft", "--config", str(VERIFIER_RECIPE), "--out_dir", str(out),
                   "--seed", str(seed), "--wandb_mode", "disabled"]
            print(f"[toy] distilling the tiny verifier (once; cached in {out}):\n  {' '.join(cmd)}", flush=True)
            # a process of its own, not a rank of this run's process group
            env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV)}
            if subprocess.run(cmd, env=env, cwd=script.parent).returncode != 0:  # the recipe names repo files
                raise RuntimeError(f"distilling the tiny verifier failed (see above); command: {' '.join(cmd)}")
        path = str(out / "final")
    return distributed.broadcast_object(path)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build the tiny offline model (Qwen2 architecture + tokenizer).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="random-initialised tiny model, saved in Hugging Face format")
    t.add_argument("--out", default=None, help="directory (default: a cache dir keyed by the settings)")
    t.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(build_tiny_model(args.out, seed=args.seed))
