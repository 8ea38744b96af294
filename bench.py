"""The performance table: train_rl.py's rollout modes side by side with TRL's GRPOTrainer, and the parts of a step.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt
    .venv-bench/bin/python bench.py                       # the whole table (~15 minutes on 2 idle CPU cores)
    .venv-bench/bin/python bench.py --quick               # shorter responses, one repeat
    .venv-bench/bin/python bench.py --sections rl,curves --out bench.json

Sections (--sections, comma-separated):
  rl           one RL step, at identical settings: sync, sync + streamed judging, async (one step off-policy),
               async + streamed judging, sync with activation checkpointing (TRL's default, which its arm runs
               with: the like-for-like memory comparison), and TRL's GRPOTrainer; equal and uneven response
               lengths; plus the time split of a sync step (generate / reward / log-probs / update)
  curves       the CPU demo (recipes/cpu_demo.yaml) trained sync and async: both reward curves (a PNG beside --out)
  verifier     verifiers.py's local verifier (one forward, last position) vs a generate()-based judge
  logprob_mem  peak memory of log-probs + backward at Qwen2.5's vocabulary (151,936), ours vs full fp32 log-softmax
  packing      training tokens/s, packed rows vs padded batches, on lognormal response lengths
  scaling      step time vs response length and vs responses per prompt (should be linear in tokens)
  lm_head      the fp32 LM head's price: log-probs fwd+bwd of a bf16 model, output layer in float32 vs bf16
               (on the GPU where there is one: both arms on the same device)
  threads      the thread policies (1 thread, every core, every core with OpenMP's passive wait, the start-up
               choice of rlvr/threads.py) on one RL step, idle and beside 1 and 3 busy processes (not in the default
               sections: it loads the machine on purpose)

Every run is a subprocess of this script (`--worker NAME`), on the CPU even on a GPU machine (TRL's arm is set up for
the CPU: like is compared with like; lm_head alone runs on the GPU), so peak memory (peak RSS) is per run, and
uses `--threads` torch threads (an async run: that many in the trainer and that many in its rollout worker).
Compared arms run interleaved (A B C A B C ...); the table shows medians and ratios: on a shared machine
absolute times are noise, ratios taken side by side are not. Only public functions are used: our arms run
train_rl.train() and read metrics.jsonl. Response lengths are set through the bench model's
generation_config.json, which every arm's generate() reads (min_new_tokens for equal lengths; a bias on the
end-of-sequence token for uneven, geometric lengths), so no arm is patched. The policy is the tiny random
model; the reward verifier is rule:math (--judge policy: that same model asked with the verifier template, an
LLM judge in the loop). Step times are the least-disturbed timed step (the first is warm-up, the last holds
the eval).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SECTIONS = ("rl", "curves", "verifier", "logprob_mem", "packing", "scaling", "lm_head", "threads")
# arm: (--async_steps, --stream_judging, --activation_checkpointing). sync+ckpt recomputes activations in backward
# as TRL's arm does (GRPOConfig's gradient_checkpointing defaults to True): the like-for-like memory comparison
ARMS = {"sync": (0, False, False), "sync+stream": (0, True, False), "async": (1, False, False),
        "async+stream": (1, True, False), "sync+ckpt": (0, False, True)}


@dataclass
class BenchConfig:
    sections: str = field(default=",".join(s for s in SECTIONS if s != "threads"),
                          metadata={"help": "comma-separated: " + ", ".join(SECTIONS)})
    quick: bool = field(default=False, metadata={"help": "shorter responses, one repeat, fewer curve steps"})
    out: str = field(default="bench.json", metadata={"help": "where the JSON results go"})
    # 1 thread: on a shared or busy CPU, more threads than free cores make every op wait at barriers (5-50x
    # slower, at random), which drowns any difference between the arms
    threads: int = field(default=1, metadata={"help": "torch threads of every process, all arms alike"})
    repeats: int = field(default=2, metadata={"help": "interleaved repeats of each compared arm"})
    arms: str = field(default=",".join(ARMS) + ",trl", metadata={"help": "the rl section's arms (sync is the baseline; "
                                                                       "trl runs where it is installed)"})
    rl_lengths: str = field(default="equal,uneven", metadata={"help": "the rl section's response lengths"})
    # the RL step (rl, scaling)
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = field(default=128, metadata={"help": "the longest response; equal lengths: all of them"})
    micro_batch_size: int = field(default=32, metadata={"help": "sequences per forward/backward, all arms"})
    steps: int = field(default=4, metadata={"help": "RL steps per run; the first (warm-up) and last (eval) are "
                                                    "not timed"})
    judge: str = field(default="rule:math", metadata={"help": "reward verifier: any train_rl --verifier, or 'policy' "
                                                              "(the bench model asked with the verifier template)"})
    curve_steps: int = field(default=60, metadata={"help": "steps of each demo run in the curves section"})
    # scaling
    lengths: str = field(default="256,512,1024", metadata={"help": "response lengths for the scaling rows"})
    samples: str = field(default="4,8,16", metadata={"help": "responses per prompt for the scaling rows"})
    scaling_prompts: int = field(default=2, metadata={"help": "prompts per step in the scaling rows"})
    scaling_length: int = field(default=256, metadata={"help": "response length of the responses-per-prompt rows"})
    scaling_samples: int = field(default=8, metadata={"help": "responses per prompt of the length rows"})
    # packing
    pack_sequences: int = 64
    pack_min_len: int = 50
    pack_max_len: int = 1024
    # log-prob memory
    logprob_vocab: int = 151936
    logprob_tokens: int = 1024
    # the fp32 LM head
    head_shape: str = field(default="small", metadata={"help": "lm_head model: small (vocab 32,768, hidden 256, 2 "
                                                               "layers: the output layer is 45%% of the weights) or "
                                                               "qwen2.5-7b (its shape, random bf16 weights: a GPU)"})
    head_tokens: int = field(default=512, metadata={"help": "response tokens per lm_head pass (8 rows)"})
    # verifier
    verifier_rows: int = 256
    verifier_batch_size: int = 16
    # internal: one measurement in a subprocess
    worker: str = field(default="", metadata={"help": "internal: run one measurement (used by the parent)"})
    worker_args: str = field(default="{}", metadata={"help": "internal: JSON arguments of --worker"})


# ----------------------------------------------------------------------------------------------
# workers: each runs in its own process and prints one JSON line


def _setup(threads: int):
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    import torch

    if threads > 0:  # 0: train() chooses (rlvr/threads.py), as a user's run does
        torch.set_num_threads(threads)
    return torch


def _train(argv: list[str], async_steps: int, stream: bool, ckpt: bool) -> tuple[list[dict], float]:
    """train_rl.train() with these flags: (metrics.jsonl rows of steps 0..N, peak GB)."""
    from rlvr import metrics
    import train_rl

    cfg, vopts = train_rl.parse_config(argv + [f"--async_steps={async_steps}", f"--stream_judging={stream}",
                                              f"--activation_checkpointing={ckpt}"])
    hist = train_rl.train(cfg, vopts)["history"]
    rows = metrics.read_jsonl(Path(cfg.out_dir) / "metrics.jsonl")
    return rows, max(h["memory/peak_gb"] for h in hist)


def worker_ours(a: dict) -> dict:
    """train_rl's loop with train_rl flags `a["argv"]`, in rollout mode `a["arm"]`: wall time per step
    between consecutive metrics rows (everything the loop does), phases, reward per step."""
    _setup(a["threads"])
    rows, peak = _train(a["argv"], *ARMS[a["arm"]])
    steps = [r for r in rows if "reward/mean" in r and r["step"] > 0]
    walls = [steps[i]["time"] - steps[i - 1]["time"] for i in range(1, len(steps) - 1)]  # steps 2..N-1
    best = min(range(len(walls)), key=walls.__getitem__) + 1 if walls else 0
    n = a["responses"]
    return {"step_s": walls[best - 1] if walls else None, "wall_steps": walls, "peak_gb": peak,
            "tokens_per_step": statistics.mean(r["response/length_mean"] * n for r in steps[1:-1] or steps),
            "phases": {k[5:]: v for k, v in steps[best].items() if k.startswith("time/")},
            "rewards": [r["reward/mean"] for r in steps]}


def worker_trl(a: dict) -> dict:
    """TRL's GRPOTrainer with the same model, prompts, reward, batch shape, lengths and loss as worker_ours."""
    torch = _setup(a["threads"])
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlvr import model as M
    from rlvr import verifiers
    from worlds import toy
    from rlvr.metrics import peak_memory_gb

    options = verifiers.VerifierOptions(soft_mode="ratio", verifier_max_unjudged=1.0, verifier_paper_defaults=True)
    verifier = verifiers.build_verifier(a["verifier"], options)
    tokens: list[int] = []

    def judge(prompts, completions, completion_ids, question, reference, **kwargs):
        tokens.append(sum(map(len, completion_ids)))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return verifier(list(question), list(reference), texts).soft.tolist()

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    n_seq, micro = a["responses"], min(a["micro"], a["responses"])
    if n_seq % micro:
        raise ValueError(f"bench: prompts*samples={n_seq} must be a multiple of --micro_batch_size={micro} for TRL")
    policy = M.load_model(a["policy"], dtype=torch.float32)
    # TRL passes its own GenerationConfig, which replaces the model's: hand it the bench model's length settings
    lengths = {k: v for k, v in policy.generation_config.to_dict().items() if k in ("min_new_tokens", "sequence_bias")}
    args = GRPOConfig(
        output_dir=a["out_dir"], per_device_train_batch_size=micro, gradient_accumulation_steps=n_seq // micro,
        num_generations=a["samples"], max_completion_length=a["length"], temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs=lengths, beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", learning_rate=2e-4, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, max_steps=a["steps"], use_cpu=True,
        gradient_checkpointing=True,  # TRL's default, said here: our sync+ckpt arm is its like for memory
        bf16=False, fp16=False, report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, seed=0)
    tok = M.load_tokenizer(a["policy"])
    ds = Dataset.from_list([{"prompt": r.messages, "question": r.question, "reference": r.reference}
                            for r in toy.records(toy.PROBLEMS, seed=0)])
    GRPOTrainer(model=policy, reward_funcs=[judge], args=args, train_dataset=ds, processing_class=tok,
                callbacks=[Clock()]).train()
    walls = [stamps[i + 1] - stamps[i] for i in range(len(stamps) - 1)][:max(1, a["steps"] - 2)]
    return {"step_s": min(walls), "tokens_per_step": statistics.mean(tokens[1:] or tokens),
            "wall_steps": walls, "peak_gb": peak_memory_gb("cpu")}


def worker_logprob_mem(a: dict) -> dict:
    """Peak RSS above the loaded model of one forward + backward through the log-probs of `tokens`
    response tokens, at vocabulary `vocab`: ours (model.token_logprobs) or a full fp32 log-softmax."""
    torch = _setup(a["threads"])
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlvr import model as M
    from rlvr.metrics import peak_memory_gb, reset_peak_memory

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=a["vocab"], hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).float().train()
    prompt = 64
    ids = torch.randint(3, a["vocab"], (1, prompt + a["tokens"]))
    pos = torch.arange(ids.shape[1])[None]
    tmask = torch.zeros_like(ids, dtype=torch.bool)
    tmask[:, prompt:] = True

    def run(ids, pos, tmask):
        if a["mode"] == "naive":  # what a plain implementation does: all logits, fp32 log-softmax, gather
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            loss = -(logp * tmask[:, 1:]).sum()
        else:
            lp, _ = M.token_logprobs(model, ids, pos, tmask, chunk_size=a["chunk"])
            loss = -lp.sum()
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: both arms hold them at the peak

    run(ids[:, :prompt + 8], pos[:, :prompt + 8], tmask[:, :prompt + 8])  # warm-up: allocator, grads, threads
    with open("/proc/self/statm") as f:
        base_gb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    exact = reset_peak_memory("cpu")  # False where the peak cannot be reset: then it is the whole run's
    t = time.perf_counter()
    run(ids, pos, tmask)
    return {"peak_over_model_gb": peak_memory_gb("cpu") - base_gb, "seconds": time.perf_counter() - t, "exact": exact}


def worker_packing(a: dict) -> dict:
    """Training tokens/s (forward + backward of the log-probs) of the same micro-batches packed or padded,
    alternating the two arms `repeats` times."""
    torch = _setup(a["threads"])
    import data
    from rlvr import model as M
    from worlds import toy

    policy = M.load_model(a["policy"], dtype=torch.float32).train()
    tok = M.load_tokenizer(a["policy"])
    recs = toy.records(toy.PROBLEMS, seed=0)
    prompts = data.tokenize_prompts(tok, [recs[i % len(recs)] for i in range(a["n"])], 1024)
    rng = random.Random(1)
    lengths = _lognormal_lengths(a["n"], a["lo"], a["hi"])
    responses = [[rng.randrange(3, policy.config.vocab_size) for _ in range(n)] for n in lengths]
    real = sum(len(p) + len(r) for p, r in zip(prompts, responses))

    def epoch(pack):
        seen, t = 0, time.perf_counter()
        for s in range(0, a["n"], a["micro"]):
            idx = range(s, min(s + a["micro"], a["n"]))
            ids, pos, att, tmask = M.rows([prompts[i] + responses[i] for i in idx],
                                          [[False] * len(prompts[i]) + [True] * len(responses[i]) for i in idx],
                                          pack, tok.pad_token_id)
            lp, _ = M.token_logprobs(policy, ids, pos, tmask, att, chunk_size=1024)
            (-lp.sum()).backward()
            seen += ids.numel()
        policy.zero_grad(set_to_none=True)
        return time.perf_counter() - t, seen

    epoch(True), epoch(False)  # warm-up
    times, seen = {True: [], False: []}, {}
    for _ in range(a["repeats"]):
        for pack in (True, False):
            dt, seen[pack] = epoch(pack)
            times[pack].append(dt)
    out = {name: {"tokens_per_s": real / statistics.median(times[pack]), "seconds": times[pack],
                  "row_tokens": seen[pack]}
           for pack, name in ((True, "packed"), (False, "padded"))}
    return out | {"real_tokens": real, "length_mean": statistics.mean(lengths)}


def worker_verifier(a: dict) -> dict:
    """Judgements/s of verifiers.LocalVerifier (one forward, lm_head at the last position, length-sorted
    batches) vs the common generate()-based judge (generate 1 token with scores, batches in data order)."""
    torch = _setup(a["threads"])
    from rlvr import model as M
    from rlvr import verifiers
    from worlds import toy

    m = M.load_model(a["policy"]).eval()
    tok = M.load_tokenizer(a["policy"])
    v = verifiers.LocalVerifier(m, tok, batch_size=a["batch"], max_unjudged=1.0)
    rng = random.Random(0)
    recs = toy.records(toy.PROBLEMS, seed=0)
    rows = [recs[i % len(recs)] for i in range(a["rows"])]
    qs, refs = [r.question for r in rows], [r.reference for r in rows]
    resps = [" ".join(["Let us think about the problem step by step."] * rng.randint(1, 20))
             + f"\nTherefore, the answer is {rng.choice([r.reference, '42'])}." for r in rows]

    @torch.inference_mode()
    def naive(qs, refs, resps):
        p_yes = []
        for i in range(0, len(qs), a["batch"]):
            seqs = [v.prompt.prompt_ids(q, r, x) for q, r, x in zip(qs[i:i + a["batch"]], refs[i:i + a["batch"]],
                                                                    resps[i:i + a["batch"]])]
            ids, mask = M.left_pad(seqs, tok.pad_token_id)
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            p_yes.append(out.scores[0].float().softmax(-1)[:, v.prompt.positive_ids[0]])
        return torch.cat(p_yes)

    v(qs[:16], refs[:16], resps[:16]), naive(qs[:16], refs[:16], resps[:16])  # warm-up
    times = {"local": [], "naive_generate": []}
    for _ in range(a["repeats"]):
        t = time.perf_counter()
        j = v(qs, refs, resps)
        times["local"].append(time.perf_counter() - t)
        t = time.perf_counter()
        p = naive(qs, refs, resps)
        times["naive_generate"].append(time.perf_counter() - t)
    out = {k: {"judgements_per_s": len(qs) / statistics.median(ts)} for k, ts in times.items()}
    out["max_abs_p_yes_gap"] = (p - j.p_yes).abs().max().item()
    out["prompt_tokens_mean"] = statistics.mean(len(v.prompt.prompt_ids(q, r, x)) for q, r, x in zip(qs, refs, resps))
    return out


HEAD_SHAPES = {"small": dict(vocab_size=32768, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1),
               "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                  num_attention_heads=28, num_key_value_heads=4)}


def worker_lm_head(a: dict) -> dict:
    """Time of model.token_logprobs forward + backward on a bf16 model, fp32_head True over False,
    the two arms alternating (ABBA) `repeats` times; on CUDA when there is one."""
    torch = _setup(a["threads"])
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlvr import model as M

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = Qwen2Config(**HEAD_SHAPES[a["shape"]], tie_word_embeddings=False, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with device:  # built in place: 7B random float32 weights on the CPU first would take minutes and 30 GB
        lm = Qwen2ForCausalLM(cfg).train()
    torch.set_default_dtype(torch.float32)
    rows, prompt = 8, 64
    length = prompt + a["tokens"] // rows
    ids = torch.randint(3, cfg.vocab_size, (rows, length), device=device)
    pos = torch.arange(length, device=device).expand(rows, length)
    tmask = torch.zeros_like(ids, dtype=torch.bool)
    tmask[:, prompt:] = True

    def once(fp32_head):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        lp, _ = M.token_logprobs(lm, ids, pos, tmask, fp32_head=fp32_head, chunk_size=1024)
        lp.sum().backward()
        lm.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once(True), once(False)  # warm-up
    ratios = []
    for r in range(a["repeats"]):
        order = (True, False) if r % 2 == 0 else (False, True)  # ABBA: a drift in load hits both arms alike
        t = {flag: once(flag) for flag in order}
        ratios.append(t[True] / t[False])
    head = cfg.vocab_size * cfg.hidden_size
    return {"device": str(device), "ratio_median": statistics.median(ratios), "ratios": ratios,
            "head_share_of_weights": head / sum(p.numel() for p in lm.parameters())}


WORKERS = {"ours": worker_ours, "lm_head": worker_lm_head, "trl": worker_trl, "logprob_mem": worker_logprob_mem, "packing": worker_packing,
           "verifier": worker_verifier}


# ----------------------------------------------------------------------------------------------
# the parent: build the inputs, run the workers interleaved, print the table


def worker_env(threads: int, gpu: bool = False) -> dict:
    """Every arm on the CPU path, on any machine: TRL's arm runs with use_cpu, so ours must not take a
    GPU (nor the GPU path's bf16 and process group), and peak memory is then peak RSS for every arm.
    gpu: a worker whose arms all share whatever device there is (lm_head)."""
    env = {k: v for k, v in os.environ.items() if k != "RLVR_GPU_PATH"}
    return env | {"OMP_NUM_THREADS": str(threads)} | ({} if gpu else {"CUDA_VISIBLE_DEVICES": ""})


def spawn(name: str, args: dict, timeout: float = 1800, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker_args", json.dumps(args)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                          env=env or worker_env(args["threads"], gpu=name == "lm_head"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"bench worker {name} {args} failed (exit {proc.returncode}):\n{tail}")
    shown = {k: v for k, v in args.items() if k not in ("policy", "out_dir", "argv")}
    print(f"  {name} {json.dumps(shown)}: {time.perf_counter() - t:.0f}s", flush=True)
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def _lognormal_lengths(n, lo, hi, median=250.0, seed=0):
    rng = random.Random(seed)
    return [min(hi, max(lo, int(rng.lognormvariate(math.log(median), 0.8)))) for _ in range(n)]


def bench_model(out: Path, length: int, uneven: bool) -> str:
    """The tiny random model with a generation_config that sets the response lengths for every arm: all
    exactly `length` (end-of-sequence suppressed until then), or uneven: an end-of-sequence bias that makes
    lengths roughly geometric with median ~length/4 (about 1 in 16 runs to `length`), at least length/16."""
    from worlds import toy

    src = toy.build_tiny_model()
    shutil.copytree(src, out)
    gen = json.loads((out / "generation_config.json").read_text())
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    if uneven:  # p(eos) per token ~ e^b / vocab = ln 2 / median
        gen.update(min_new_tokens=max(1, length // 16),
                   sequence_bias=[[[gen["eos_token_id"]], math.log(vocab * math.log(2) / (length / 4))]])
    else:
        gen.update(min_new_tokens=length)
    (out / "generation_config.json").write_text(json.dumps(gen))
    return str(out)


def rl_flags(policy: str, judge: str, prompts: int, samples: int, length: int, micro: int, steps: int,
             out_dir: str) -> list[str]:
    """train_rl flags of the bench step: TRL's settings (one update per batch, group-normalised rewards, token-mean
    clipped loss, no KL), no eval, audit or log-only verifiers (TRL has none), on the numeric toy's questions
    (numbers: the references rule:math grades, whatever the main job's world is)."""
    flags = dict(data="toy", policy=policy, verifier=policy if judge == "policy" else judge, soft_mode="ratio",
                 verifier_max_unjudged=1.0, reward_type="soft", prompts_per_step=prompts, samples_per_prompt=samples,
                 max_new_tokens=length, micro_batch_size=micro, steps=steps, reward_norm="group", advantage="reinforce",
                 kl_mode="none", loss_agg="token_mean", warmup_ratio=0.0, eval_every=0, eval_prompts=1,
                 eval_verifier="rule:substring", audit_verifier="", log_verifiers="", log_samples=0,
                 out_dir=out_dir, wandb_mode="disabled")
    if judge == "policy":  # a model without verifier_settings.json, asked as TRL's arm asks it (verifier_paper_defaults)
        flags["verifier_paper_defaults"] = True
    return [f"--{k}={v}" for k, v in flags.items()]


def _trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def section_rl(cfg: BenchConfig, tmp: Path) -> dict:
    asked = [a.strip() for a in cfg.arms.split(",") if a.strip()]
    arms = [a for a in asked if a in ARMS or a == "trl" and _trl_available()]
    out = {} if "trl" in arms or "trl" not in asked else {
        "trl_skipped": f"trl is not installed in {sys.executable}; pip install -r requirements-bench.txt"}
    n = cfg.prompts_per_step * cfg.samples_per_prompt
    for name in [x.strip() for x in cfg.rl_lengths.split(",") if x.strip()]:
        uneven = name == "uneven"
        print(f"RL step, {name} response lengths: {', '.join(arms)}", flush=True)
        policy = bench_model(tmp / f"model-{name}", cfg.max_new_tokens, uneven)
        judge = policy if cfg.judge == "policy" else cfg.judge
        runs: dict[str, list] = {arm: [] for arm in arms}
        for r in range(cfg.repeats):
            for arm in arms:
                common = dict(threads=cfg.threads, responses=n, out_dir=str(tmp / f"{arm}-{name}-{r}"))
                if arm == "trl":
                    args = dict(common, policy=policy, verifier=judge, samples=cfg.samples_per_prompt,
                                length=cfg.max_new_tokens, micro=cfg.micro_batch_size, steps=cfg.steps)
                else:
                    args = dict(common, arm=arm, argv=rl_flags(
                        policy, cfg.judge, cfg.prompts_per_step, cfg.samples_per_prompt, cfg.max_new_tokens,
                        cfg.micro_batch_size, cfg.steps, common["out_dir"]))
                runs[arm].append(spawn("trl" if arm == "trl" else "ours", args))
        out[name] = runs
    return out


# policy: (--threads, OMP_NUM_THREADS, OMP_WAIT_POLICY); 0 / None: not set (the start-up choice, OpenMP's default)
THREAD_POLICIES = {"1 thread": ("1", "1", None), "every core": ("cores", None, "ACTIVE"),
                   "every core, passive wait": ("cores", None, "PASSIVE"), "start-up choice": ("0", None, None)}


def section_threads(cfg: BenchConfig, tmp: Path) -> dict:
    """The same sync RL step under each thread policy, idle and beside 1 and 3 CPU-bound processes (started
    here, stopped after), interleaved within each load."""
    from rlvr import threads

    policy = bench_model(tmp / "model-threads", cfg.max_new_tokens, uneven=False)
    out = {"cores": threads.cores()}
    for burners in (0, 1, 3):
        print(f"thread policies beside {burners} busy processes", flush=True)
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)]
        try:
            runs: dict[str, list] = {name: [] for name in THREAD_POLICIES}
            for r in range(cfg.repeats):
                for name, (n, omp, wait) in THREAD_POLICIES.items():
                    n = str(threads.cores()) if n == "cores" else n
                    env = {k: v for k, v in os.environ.items() if k not in ("RLVR_GPU_PATH", "OMP_NUM_THREADS",
                                                                            "OMP_WAIT_POLICY")}
                    env |= {"CUDA_VISIBLE_DEVICES": ""} | ({"OMP_NUM_THREADS": omp} if omp else {}) \
                        | ({"OMP_WAIT_POLICY": wait} if wait else {})
                    d = str(tmp / f"threads-{burners}-{r}-{len(runs[name])}-{n}")
                    argv = rl_flags(policy, cfg.judge, cfg.prompts_per_step, cfg.samples_per_prompt,
                                    cfg.max_new_tokens, cfg.micro_batch_size, cfg.steps, d) + [f"--threads={n}"]
                    runs[name].append(spawn("ours", dict(threads=int(n), arm="sync", argv=argv,
                                                         responses=cfg.prompts_per_step * cfg.samples_per_prompt),
                                            env=env))
            out[f"busy {burners}"] = runs
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return out


def section_curves(cfg: BenchConfig, tmp: Path) -> dict:
    """The demo, sync and async, interleaved: the reward per step of each."""
    print("the CPU demo's reward curve, sync vs async", flush=True)
    out = {}
    for arm in ("sync", "async"):
        argv = ["--config", str(ROOT / "recipes" / "cpu_demo.yaml"), f"--steps={cfg.curve_steps}",
                f"--out_dir={tmp / ('curve-' + arm)}", "--wandb_mode=disabled"]
        out[arm] = spawn("ours", dict(threads=cfg.threads, arm=arm, argv=argv, responses=16 * 8))
    from rlvr import metrics

    steps = list(range(1, cfg.curve_steps + 1))
    out["plot"] = metrics.plot_curves(Path(cfg.out).with_suffix(".curves.png"),
                                      {arm: (steps, out[arm]["rewards"]) for arm in ("sync", "async")},
                                      "step", "reward/mean", "CPU demo: sync vs async (one step off-policy)")
    return out


def run_all(cfg: BenchConfig) -> dict:
    sys.path.insert(0, str(ROOT))
    sections = [s.strip() for s in cfg.sections.split(",") if s.strip()]
    bad = set(sections) - set(SECTIONS)
    if bad:
        raise ValueError(f"--sections: unknown {sorted(bad)}; valid: {', '.join(SECTIONS)}")
    arms = {a.strip() for a in cfg.arms.split(",") if a.strip()}
    if "sync" not in arms or arms - set(ARMS) - {"trl"}:
        raise ValueError(f"--arms {cfg.arms}: sync (the baseline) and any of {', '.join([*ARMS, 'trl'])}")
    if {x.strip() for x in cfg.rl_lengths.split(",") if x.strip()} - {"equal", "uneven"} or not cfg.rl_lengths.strip():
        raise ValueError(f"--rl_lengths {cfg.rl_lengths}: equal, uneven or both")
    if cfg.quick:
        cfg.repeats, cfg.max_new_tokens, cfg.curve_steps = 1, 64, 20
        cfg.lengths, cfg.samples, cfg.scaling_length = "128,256,512", "4,8,16", 128
        cfg.pack_sequences, cfg.verifier_rows = 32, 64
    res: dict = {"config": asdict(cfg), "sections": {}}
    tmp = Path(tempfile.mkdtemp(prefix="rlvr-bench-"))
    try:
        if "rl" in sections:
            res["sections"]["rl"] = section_rl(cfg, tmp)
        if "curves" in sections:
            res["sections"]["curves"] = section_curves(cfg, tmp)
        if "threads" in sections:
            res["sections"]["threads"] = section_threads(cfg, tmp)
        if "verifier" in sections:
            from worlds import toy

            print("local verifier vs generate()-based judge", flush=True)
            res["sections"]["verifier"] = spawn("verifier", {"threads": cfg.threads, "rows": cfg.verifier_rows,
                                                             "policy": toy.build_tiny_model(),
                                                             "batch": cfg.verifier_batch_size, "repeats": cfg.repeats})
        if "logprob_mem" in sections:
            print("log-prob peak memory", flush=True)
            arms = {"ours (chunk 1024)": dict(mode="ours", chunk=1024),
                    "ours (chunk 128)": dict(mode="ours", chunk=128),
                    "naive fp32 log-softmax": dict(mode="naive", chunk=0)}
            res["sections"]["logprob_mem"] = {
                name: spawn("logprob_mem", {**kw, "threads": cfg.threads, "vocab": cfg.logprob_vocab,
                                            "tokens": cfg.logprob_tokens}) for name, kw in arms.items()}
        if "packing" in sections:
            from worlds import toy

            print("packed vs padded training", flush=True)
            res["sections"]["packing"] = spawn("packing", {
                "threads": cfg.threads, "policy": toy.build_tiny_model(), "n": cfg.pack_sequences,
                "micro": cfg.micro_batch_size, "lo": cfg.pack_min_len, "hi": cfg.pack_max_len,
                "repeats": max(2, cfg.repeats + 1)})
        if "lm_head" in sections:
            print("the fp32 LM head's price", flush=True)
            res["sections"]["lm_head"] = spawn("lm_head", {"threads": cfg.threads, "shape": cfg.head_shape,
                                                           "tokens": cfg.head_tokens, "repeats": 4 * cfg.repeats + 2})
        if "scaling" in sections:
            print("scaling with response length and responses per prompt", flush=True)
            rows = [("length", int(L), cfg.scaling_samples) for L in cfg.lengths.split(",")]
            rows += [("samples", cfg.scaling_length, int(k)) for k in cfg.samples.split(",")]
            out = []
            for kind, L, k in rows:
                name = f"scale-{kind}-{L}-{k}"
                policy = bench_model(tmp / f"model-{name}", L, uneven=False)
                argv = rl_flags(policy, cfg.judge, cfg.scaling_prompts, k, L, min(cfg.micro_batch_size,
                                cfg.scaling_prompts * k), 4, str(tmp / name))
                r = spawn("ours", dict(threads=cfg.threads, arm="sync", argv=argv,
                                       responses=cfg.scaling_prompts * k))
                out.append({"kind": kind, "length": L, "samples": k, **r})
            res["sections"]["scaling"] = out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------------------------
# the table


def _med(xs):
    return statistics.median(xs)


def _rl_rows(s: dict) -> list[str]:
    lines = []
    for name in [k for k in ("equal", "uneven") if k in s]:
        runs = s[name]
        speed = {arm: _med([r["tokens_per_step"] / r["step_s"] for r in rs]) for arm, rs in runs.items()}  # tokens/s
        steps = {arm: _med([1 / r["step_s"] for r in rs]) for arm, rs in runs.items()}
        tokens = _med([r["tokens_per_step"] for r in runs["sync"]])
        goals = {("equal", "sync"): ">= 1.5x", ("uneven", "sync"): ">= 2x", ("equal", "async"): ">= 2.5x"}  # issue 33
        for arm in [a for a in ARMS if a in runs]:
            tag = f"RL step, {name} lengths ({tokens:.0f} tokens/step), {arm}"
            lines.append(f"| {tag}: steps/s vs sync | {steps[arm]:.3f} | {steps['sync']:.3f} | "
                         f"{steps[arm] / steps['sync']:.2f}x | |")
            if "trl" in runs:
                lines.append(f"| {tag}: generated tokens/s vs TRL | {speed[arm]:.0f} | {speed['trl']:.0f} | "
                             f"{speed[arm] / speed['trl']:.2f}x | {goals.get((name, arm), '')} |")
        peaks = {arm: max(r["peak_gb"] for r in rs) for arm, rs in runs.items()}
        for arm in [a for a in ("sync", "sync+ckpt") if a in runs and "trl" in runs]:
            lines.append(f"| RL step, {name} lengths: peak RSS GB, {arm} vs TRL | "
                         f"{peaks[arm]:.2f} | {peaks['trl']:.2f} | {peaks[arm] / peaks['trl']:.2f} | <= 1 |")
    sync = s["equal" if "equal" in s else "uneven"]["sync"]
    phases = {k: _med([r["phases"].get(k, 0.0) for r in sync]) for k in sync[0]["phases"]}
    wall = _med([r["step_s"] for r in sync])
    for k in ("rollout", "generate", "reward", "logprobs", "update"):
        if k in phases:
            lines.append(f"| step split (sync, equal lengths): {k} | {phases[k]:.3f}s ({phases[k] / wall:.1%}) | | | |")
    return lines


def table(res: dict) -> str:
    s = res["sections"]
    lines = ["| measurement | ours | reference | ratio | goal |", "|---|---|---|---|---|"]
    if "rl" in s:
        if "trl_skipped" in s["rl"]:
            lines.append(f"| RL step vs TRL | skipped: {s['rl']['trl_skipped']} | | | |")
        lines += _rl_rows(s["rl"])
    if "curves" in s:
        c = s["curves"]
        k = max(1, len(c["sync"]["rewards"]) // 5)
        for arm in ("sync", "async"):
            r = c[arm]["rewards"]
            lines.append(f"| demo reward/mean, {arm}: first {k} steps -> last {k} steps | {_med(r[:k]):.3f} -> "
                         f"{_med(r[-k:]):.3f} | | | async within noise of sync |")
        sync_s, async_s = _med(c["sync"]["wall_steps"]), _med(c["async"]["wall_steps"])
        lines.append(f"| demo steps/s, async vs sync | {1 / async_s:.2f} | {1 / sync_s:.2f} | "
                     f"{sync_s / async_s:.2f}x | |")
        lines.append(f"| demo reward curves | {c['plot']} | | | |")
    if "verifier" in s:
        v = s["verifier"]
        a, b = v["local"]["judgements_per_s"], v["naive_generate"]["judgements_per_s"]
        lines.append(f"| verifier: judgements/s (local vs generate-based) | {a:.0f} | {b:.0f} | {a / b:.2f}x | |")
    if "logprob_mem" in s:
        m = s["logprob_mem"]
        naive = m["naive fp32 log-softmax"]["peak_over_model_gb"]
        for name, r in m.items():
            if name.startswith("ours"):
                lines.append(f"| log-prob fwd+bwd peak GB, {name} vs naive | {r['peak_over_model_gb']:.3f} | "
                             f"{naive:.3f} | {r['peak_over_model_gb'] / naive:.2f} | <= 0.25 |")
    if "packing" in s:
        p = s["packing"]
        a, b = p["packed"]["tokens_per_s"], p["padded"]["tokens_per_s"]
        lines.append(f"| training tokens/s, packed vs padded (lognormal lengths, mean {p['length_mean']:.0f}) | "
                     f"{a:.0f} | {b:.0f} | {a / b:.2f}x | >= 1.3x |")
    if "lm_head" in s:
        h = s["lm_head"]
        lines.append(f"| log-probs fwd+bwd time, fp32 LM head / bf16 ({h['device']}, output layer "
                     f"{h['head_share_of_weights']:.0%} of the weights) | | | {h['ratio_median']:.2f} | small |")
    if "threads" in s:
        t = s["threads"]
        best = min(_med([r["step_s"] for r in rs]) for rs in t["busy 0"].values())
        for load in [k for k in t if k.startswith("busy ")]:
            for name, rs in t[load].items():
                step = _med([r["step_s"] for r in rs])
                lines.append(f"| threads ({t['cores']} cores), {name}, {load} processes beside: s/step | {step:.3f} "
                             f"| {best:.3f} (best idle) | {step / best:.2f}x | idle <= 1.1x, 1 busy <= 2x |")
    for kind in ("length", "samples"):
        rs = [r for r in s.get("scaling", []) if r["kind"] == kind]
        for r in rs:
            per_k = (r["step_s"] / r["tokens_per_step"]) / (rs[0]["step_s"] / rs[0]["tokens_per_step"])
            lines.append(f"| scaling: {r['length']} tokens x {r['samples']} per prompt | {r['step_s']:.2f} s/step "
                         f"| {r['tokens_per_step']:.0f} tokens | {per_k:.2f} (s/token vs first) | ~1 |")
    return "\n".join(lines)


def main() -> None:
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(BenchConfig).parse_args_into_dataclasses()
    if cfg.worker:
        result = WORKERS[cfg.worker](json.loads(cfg.worker_args))
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return
    t = time.perf_counter()
    res = run_all(cfg)
    res["seconds"] = time.perf_counter() - t
    res["table"] = table(res)
    print("\n" + res["table"])
    Path(cfg.out).write_text(json.dumps(res, indent=1))
    print(f"\n{res['seconds']:.0f}s; results: {cfg.out}")


if __name__ == "__main__":
    main()
