"""The offline demo in one place: a byte-level BPE tokenizer and tiny Qwen2-architecture models built
from code, a supervised warm start, and the toy task they learn on a CPU in minutes (prompts for RL,
warm-start pairs, and judged rows for verifier distillation).

Imports data, model and distributed. `python -m worlds toy tiny --out DIR` builds a tiny model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
from rlvr import distributed
from rlvr.model import rows, token_logprobs

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


def build_tokenizer(vocab_size: int, corpus: str = ""):
    """The byte-level BPE tokenizer; `corpus` adds text its merges are learned from (a demo world's words)."""
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
    tok.train_from_iterator([_CORPUS + corpus] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=4096)
    for word in ("YES", "NO", " YES", " NO"):  # the verifier's judgement tokens must be single tokens
        if len(fast.encode(word, add_special_tokens=False)) != 1:
            raise RuntimeError(f"the tiny tokenizer splits the judgement word {word!r}: change _CORPUS")
    return fast


def cache_root() -> Path:
    """Where built models are kept: $RLVR_CACHE, else ~/.cache/rlvr_recipe."""
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr_recipe"))


# The demo's models are built with one torch thread wherever they are built: float sums are ordered by
# the thread count, so this makes a build (and the figures of runs on it) the same on any machine, and a
# tiny model gains little from a second thread (on a busy machine it loses).
BUILD_THREADS = 1


def build_tiny_model(out_dir: str | None = None, seed: int = 0, sft_pairs: list | None = None,
                     sft_steps: int = 0, hidden_size: int = 128, num_layers: int = 4, vocab_size: int = 1024,
                     corpus: str = "", start: str = "", docs: list[str] | None = None, pretrain_steps: int = 0,
                     name: str = "") -> str:
    """Build (once; cached on disk) a tiny Qwen2-architecture causal LM and its tokenizer in Hugging
    Face format (safetensors), deterministic from `seed`. head_dim is 64 so vLLM's CPU backend
    serves it. With `sft_pairs` [(messages, response), ...] it is warm-started by `sft_steps` of
    supervised fine-tuning: a random model trained by RL alone collapses onto one answer. `corpus`:
    more text the tokenizer's merges are learned from (build_tokenizer). `docs` [text, ...]: pretrained
    next-token for `pretrain_steps` first (pretrain). `start`: a built model's directory to fine-tune
    instead of a random init (its tokenizer and shape; the size arguments are then unused). `name`: the
    stage's name in the two lines a build prints (its start and its end), so a cold start is not silent.
    Returns the directory. Concurrent builders (ranks, tests, runs on one cache) build once: the others
    wait on a lock beside `out` (build_lock), then find it built.
    """
    spec = dict(seed=seed, hidden=hidden_size, layers=num_layers, vocab=vocab_size, sft_steps=sft_steps,
                sft=hashlib.sha256(json.dumps(sft_pairs or [], sort_keys=True).encode()).hexdigest()[:12], v=1)
    if corpus:  # only then: the numeric toy's cached models keep their keys
        spec["corpus"] = hashlib.sha256(corpus.encode()).hexdigest()[:12]
    if docs:
        spec |= {"docs": hashlib.sha256(json.dumps(docs).encode()).hexdigest()[:12], "pretrain_steps": pretrain_steps}
    if start:  # what the start was, not where it is
        spec["start"] = json.loads((Path(start) / "rlvr_tiny.json").read_text())
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(out_dir) if out_dir else cache_root() / f"tiny-{key}"
    if _built(out, spec):
        return str(out)
    with build_lock(out.parent / f".{out.name}.build"):  # a concurrent builder waits, then finds it built
        if _built(out, spec):
            return str(out)
        return _build(out, spec, seed=seed, sft_pairs=sft_pairs, sft_steps=sft_steps, hidden_size=hidden_size,
                      num_layers=num_layers, vocab_size=vocab_size, corpus=corpus, start=start, docs=docs,
                      pretrain_steps=pretrain_steps, name=name)


def _built(out: Path, spec: dict) -> bool:
    return (out / "config.json").exists() and json.loads((out / "rlvr_tiny.json").read_text()) == spec


def _build(out: Path, spec: dict, *, seed: int, sft_pairs: list | None, sft_steps: int, hidden_size: int,
           num_layers: int, vocab_size: int, corpus: str, start: str, docs: list[str] | None, pretrain_steps: int,
           name: str) -> str:
    """build_tiny_model's build, under its lock: the model trained in one thread, saved to a private temp
    directory, renamed to `out`."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    began = time.time()
    if name:
        print(f"[{name}] building (once; cached in {out}): " + (f"{pretrain_steps} pretraining steps on "
              f"{len(docs)} documents" if docs else "") + (", " if docs and sft_pairs else "")
              + (f"{sft_steps} supervised steps on {len(sft_pairs)} pairs" if sft_pairs else ""), flush=True)
    tok = PreTrainedTokenizerFast.from_pretrained(start) if start else build_tokenizer(vocab_size, corpus)
    config = Qwen2Config(
        vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            lm = Qwen2ForCausalLM.from_pretrained(start).float() if start else Qwen2ForCausalLM(config).float()
            if docs:
                losses = pretrain(lm, tok, docs, pretrain_steps, seed)
            if sft_pairs:
                supervised_warm_start(lm, tok, sft_pairs, sft_steps, seed)
    finally:
        torch.set_num_threads(threads)
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
    if name:
        print(f"[{name}] built in {time.time() - began:.0f} s" + (f" (training loss {losses[0]:.2f} -> "
              f"{sum(losses[-20:]) / len(losses[-20:]):.2f} over the last 20 steps)" if docs else "") + f": {out}",
              flush=True)
    return str(out)


def pretrain(lm, tokenizer, docs: list[str], steps: int, seed: int, batch_size: int = 32, lr: float = 2e-3) -> list[float]:
    """Next-token pretraining on documents (each ends with the end-of-text token), `batch_size` random
    documents a step packed in one row, loss on every token but each document's first; AdamW, the
    learning rate decayed linearly to a tenth. Returns the losses."""
    seqs = [tokenizer.encode(d, add_special_tokens=False) + [tokenizer.pad_token_id] for d in docs]
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / max(1, steps))
    return next_token_steps(lm, seqs, [[False] + [True] * (len(s) - 1) for s in seqs], steps, seed, batch_size,
                            tokenizer.pad_token_id, opt, sched)


def supervised_warm_start(lm, tokenizer, pairs: list, steps: int, seed: int, batch_size: int = 32,
                          lr: float = 1e-3) -> list[float]:
    """A few steps of next-token SFT on (messages, response) pairs, loss on the response (and its
    end-of-turn token) only, on packed rows. Returns the losses."""
    seqs, masks = [], []
    for messages, response in pairs:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(p + r)
        masks.append([False] * len(p) + [True] * len(r))
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    return next_token_steps(lm, seqs, masks, steps, seed, batch_size, tokenizer.pad_token_id, opt)


def next_token_steps(lm, seqs: list[list[int]], masks: list[list[bool]], steps: int, seed: int, batch_size: int,
                     pad_id: int, opt, sched=None) -> list[float]:
    """`steps` optimizer steps of next-token loss on the masked tokens of `batch_size` random sequences a
    step (seeded), packed in one row; the loss of each step. Pretraining and the warm start share it."""
    generator = torch.Generator().manual_seed(seed)
    lm.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(seqs), (batch_size,), generator=generator).tolist()
        ids, pos, _, target = rows([seqs[i] for i in idx], [masks[i] for i in idx], True, pad_id)
        logp, _ = token_logprobs(lm, ids, pos, target)
        loss = -logp.sum() / target.sum()  # a sequence's first token is never a target: every masked token counts
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
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


JUDGE_KINDS = ("digit", "near", "far", "perturb", "garbage")


def _wrong_or_right(reference: int, wrong: list[int], rng: random.Random) -> str:
    """A response with the reference (half the time) or one of `wrong`, in any equivalent form."""
    value = reference if rng.random() < 0.5 else rng.choice(wrong)
    return response(rng.choice(answer_forms(value)))


def _perturb(number: str, rng: random.Random) -> str:
    """One edit of a number's text: insert, delete, replace or append a digit, '/' or '.', append '/d'
    or '.d', or prepend a digit ("14/2" -> "14/24", "7" -> "27", "7.0" -> "7.09")."""
    op, i, c = rng.choice(("ins", "del", "rep", "app", "app2", "pre")), rng.randrange(len(number) + 1), \
        rng.choice("0123456789/.")
    j = rng.randrange(len(number))
    if op == "ins":
        return number[:i] + c + number[i:]
    if op == "del" and len(number) > 1:
        return number[:j] + number[j + 1:]
    if op == "rep":
        return number[:j] + c + number[j + 1:]
    if op == "app2":
        return number + rng.choice("/.") + str(rng.randrange(10))
    if op == "pre":
        return str(rng.randrange(1, 10)) + number
    return number + c


def toy_truth(text: str, reference: str) -> int:
    """1 if the response's last line is "Therefore, the answer is N." with N equal to the reference
    (7, 7.0, 14/2 alike), else 0: the truth of a toy answer, by construction."""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    prefix = "Therefore, the answer is "
    if not (line.startswith(prefix) and line.endswith(".")):
        return 0
    number = line[len(prefix):-1]
    try:
        top, _, bottom = number.partition("/")
        value = int(top) / int(bottom) if bottom else float(number)
    except (ValueError, ZeroDivisionError):
        return 0
    return int(value == int(reference))


def parse_mix(mix: str, kinds: tuple[str, ...] = JUDGE_KINDS) -> list[tuple[str, int]]:
    """"digit:2000,far:300" -> [("digit", 2000), ("far", 300)]; ValueError naming the bad part."""
    out = []
    for part in mix.split(","):
        kind, _, count = part.strip().partition(":")
        if kind not in kinds or not count.isdigit():
            raise ValueError(f"{part!r} is not kind:count with kind one of {', '.join(kinds)}")
        out.append((kind, int(count)))
    return out


def judge_rows(mix: str, seed: int) -> list[data.JudgedRow]:
    """Rows for verifier distillation, `mix` = "kind:count,...", labelled with the truth (toy_truth):
      digit    the reference or another single digit (half each), any form: the equality a student
               learns first (a tiny student fed everything at once stays at "any digit is right")
      near     the reference or a value off by 1-3 or by +10 ("17" contains the reference "7")
      far      the reference or any value up to 30
      perturb  one character edit of a correct answer's number: "14/24", "27", "7.09" (mostly wrong)
      garbage  fragments of the answer sentence and digits in a row: the stutters a policy drifts into
    Questions come from the 180 problems; split them by question hash downstream."""
    rng = random.Random(f"toy-judge:{seed}")
    problems = records(PROBLEMS, seed)
    out = []
    for kind, count in parse_mix(mix):
        for _ in range(count):
            r = rng.choice(problems)
            ref = int(r.reference)
            if kind == "digit":
                text = _wrong_or_right(ref, [v for v in range(10) if v != ref], rng)
            elif kind == "near":
                text = _wrong_or_right(ref, [ref + d for d in (1, 2, 3, 10)] + [ref - d for d in (1, 2, 3) if ref >= d], rng)
            elif kind == "far":
                text = _wrong_or_right(ref, [v for v in range(31) if v != ref], rng)
            elif kind == "perturb":
                text = response(_perturb(rng.choice(answer_forms(ref)), rng))
            else:
                pieces = ["Therefore", ",", " the", " answer", " is", " ", ".", "/", str(ref), str(rng.randrange(10)),
                          "Therefore, the answer is", " answer is", " the answer is "]
                text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 9)))
            out.append(data.JudgedRow(r.question, r.reference, text, label=toy_truth(text, r.reference)))
    return out


def tiny_policy(heldout_fraction: float) -> str:
    """The numeric toy's policy (--policy tiny or --student tiny with --data toy; worlds.py): the tiny model
    warm-started on the toy task's training questions (never the held-out ones eval grades), so it can
    already read the digits, as the paper's policies start from instruct models. One fixed model, like
    a released checkpoint: a run's --seed varies the RL, not the starting point (some seeds' warm starts
    are weaker than chance). Call it on every rank: rank 0 builds it (once; cached), the others wait."""
    path = None
    if distributed.rank() == 0:
        pairs = sft_pairs(400, seed=1, heldout_fraction=heldout_fraction)
        path = build_tiny_model(seed=0, sft_pairs=pairs, sft_steps=WARM_START_STEPS)
    return distributed.broadcast_object(path)


# The main job's verifier, distilled in two stages (a curriculum: the tiny student fed the whole mix at
# once stays at "any digit is right"); stage 2 fine-tunes stage 1's student, which keeps its settings.
VERIFIER_RECIPES = [Path(__file__).resolve().parents[1] / "recipes" / name
                    for name in ("verifier_toy_digits.yaml", "verifier_cpu_demo.yaml")]
VERIFIER_DATA_VERSION = 1  # bump when judge_rows or the training keys change: the cache key holds only the files
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_")


def tiny_verifier(recipes: list[Path] | None = None, extra: str = "", student: str = "tiny") -> str:
    """The main job's reward verifier: the tiny student distilled from the rule:math teacher by
    `train_verifier.py sft --config recipes/verifier_toy_digits.yaml`, then `--config
    recipes/verifier_cpu_demo.yaml --student <stage 1>` (how the paper built RM-7B, in miniature), each
    run as its own process (the trainers never import each other). One fixed verifier, built once per
    recipe text (+ `extra`, e.g. the source of a world's rows) and cached, like the tiny policy; call it
    on every rank: rank 0 builds, the others wait. Another world passes its own `recipes` (and the
    model stage 1 starts from, `student`: 'tiny' is the world's policy)."""
    path = None
    if distributed.rank() == 0:
        repo = Path(__file__).resolve().parents[1]
        recipes = recipes or VERIFIER_RECIPES
        text = "".join(p.read_text() for p in recipes + [repo / "recipes" / "toy_verifier_template.txt"])
        text += f"data-version={VERIFIER_DATA_VERSION}" + extra
        out = cache_root() / f"verifier-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        built = all((out / f"stage{k}" / "final" / "config.json").exists() for k in range(1, len(recipes) + 1))
        lock = contextlib.nullcontext() if built else build_lock(out)  # a second run on a cold cache waits
        with lock:
            path = _distil_stages(recipes, out, repo, student)
    return distributed.broadcast_object(path)


@contextlib.contextmanager
def build_lock(out: Path):
    """Hold an exclusive lock (flock on out/.build.lock; the kernel drops it when a builder dies) while
    building into `out`: a second run on a cold cache waits for the first build, saying so, and then
    finds it built, instead of failing on the build's own out_dir lock."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".build.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            print(f"[toy] another run (pid {holder}) is building {out}; waiting for it", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _distil_stages(recipes: list[Path], out: Path, repo: Path, student: str) -> str:
    """tiny_verifier's stages, each skipped when already built; returns the last stage's final model."""
    for stage, recipe in enumerate(recipes, 1):
        stage_dir = out / f"stage{stage}"
        if not (stage_dir / "final" / "config.json").exists():
            cmd = [sys.executable, str(repo / "train_verifier.py"), "sft", "--config", str(recipe), "--student",
                   student, "--out_dir", str(stage_dir), "--wandb_mode", "disabled"]
            # continue a stage a crash interrupted after a checkpoint, else start it over
            cmd += ["--resume", "auto"] if (stage_dir / "checkpoints" / "latest").exists() else ["--overwrite"]
            print(f"[toy] distilling the tiny verifier, stage {stage} of {len(recipes)} (once; cached "
                  f"in {out}):\n  {' '.join(cmd)}", flush=True)
            # a process of its own, not a rank of this run's process group
            env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV)}
            env["OMP_NUM_THREADS"] = str(BUILD_THREADS)  # one build on any machine (see BUILD_THREADS)
            began = time.time()
            if subprocess.run(cmd, env=env, cwd=repo).returncode != 0:  # the recipes name repo files
                raise RuntimeError(f"distilling the tiny verifier failed (see above); command: {' '.join(cmd)}")
            print(f"[toy] stage {stage} of the tiny verifier distilled in {time.time() - began:.0f} s", flush=True)
        student = str(stage_dir / "final")
    return student


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m worlds toy",
                                 description="Build the tiny offline model (Qwen2 architecture + tokenizer).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="random-initialised tiny model, saved in Hugging Face format")
    t.add_argument("--out", default=None, help="directory (default: a cache dir keyed by the settings)")
    t.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_tiny_model(args.out, seed=args.seed))
