"""The verifier's life: `label` (a teacher judges rows), `sft` (a student learns the judgement token),
`eval` (agreement, calibration, master keys, speed). How the paper built RM-7B: a large judge labels
responses sampled during RL, and a compact model is fine-tuned to say YES or NO.

    python train_verifier.py sft --config recipes/verifier_toy_digits.yaml  # CPU demo, stage 1: ~1 minute
    python train_verifier.py sft --config recipes/verifier_cpu_demo.yaml    # stage 2, from stage 1: ~2 minutes
    python train_verifier.py label --data runs/demo/rollouts.jsonl --teacher http://judge:8000 --out labels.jsonl
    python train_verifier.py label --data multi_subject_rlvr.jsonl --question_field query --reference_field label \
        --policy Qwen/Qwen2.5-7B-Instruct --policy_samples 4 --teacher http://judge:8000 --out labels.jsonl
    torchrun --nproc_per_node 8 train_verifier.py sft --config recipes/verifier_paper.yaml
    python train_verifier.py eval --verifier runs/verifier/final --data labelled.jsonl

Data: rows with question, reference, response (and, for sft and eval, a 0/1 label) under those names or
the columns the --*_field flags name. The released sets (`query`: chat messages, the last the question;
`label`: the reference answer) have no responses: `label --policy` samples them from a policy, and the
teacher judges them. `label` always writes question, reference, response, label (0/1): what sft and
eval read with no field flags.

A verifier is its weights and its settings (template, system prompt, judgement tokens, what of the
response it reads). `sft` trains the student on verifier_prompt.py's prompt and saves the settings beside the
weights, so verifiers.build_verifier(dir), train_rl.py, `eval` and `label` ask it exactly as it learned.
`sft --verifier_family compass|xverify|master-rm` trains the teacher's label as that family's tokens
(A / B, Correct / Incorrect, YES / NO) after its published prompt (verifier_families.py) and saves the family.
`sft` can also add the negatives that make a student hard to fool (Master-RM, arXiv 2507.08794):
content-free "master key" answers, truncated responses, and a policy's own responses judged by the
teacher; it reports the student's master-key false-positive rate beside its held-out agreement.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

import data
import worlds
from rlvr import (audit, checkpoint, config, distributed, metrics, model, remote, rules, rundir, threads, verifier_data,
                  verifier_families, verifier_prompt, verifier_spec, verifiers)
from rlvr.config import overwrite_field, resume_field

def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class Common:
    config: str = field(default="", metadata=_help("YAML or JSON file of field values; flags override it"))
    trust_remote_code: bool = field(default=False, metadata=_help("allow model code from the hub (off: safer)"))
    threads: int = field(default=0, metadata=_help("torch CPU threads; 0: the cores free at start-up (rlvr/threads.py); "
                                                   "OMP_NUM_THREADS sets it too"))
    # the columns of --data (the released sets: --question_field query --reference_field label)
    question_field: str = field(default="question", metadata=_help(
        "column of the question: text, or chat messages whose last (the user's) is the question"))
    reference_field: str = field(default="reference", metadata=_help("column of the reference answer"))
    response_field: str = field(default="response", metadata=_help("column of the response judged"))
    label_field: str = field(default="label", metadata=_help("column of the 0/1 judgement (sft, eval)"))


@dataclass
class PolicySamples:
    policy: str = field(default="", metadata=_help(
        "a policy (dir, hub name, 'tiny') whose sampled responses --teacher labels: label: to the --data "
        "questions (in place of a response column); sft: to training questions, added to training"))
    policy_samples: int = field(default=0, metadata=_help("responses sampled from --policy per question"))
    policy_system_prompt: Optional[str] = field(default=None, metadata=_help(
        "system message of --policy where a prompt has none (default: the demo world's with --data toy|freeform, "
        "else the released sets' prompt)"))
    policy_max_new_tokens: int = field(default=64, metadata=_help("length limit of a --policy response"))
    policy_temperature: float = field(default=1.0, metadata=_help("sampling temperature of --policy (> 0)"))
    policy_prompt_format: Literal["chat", "plain"] = field(default="chat", metadata=_help(
        "how --policy is prompted: its chat template, or plain text for a base model without one (train_rl.py's "
        "--prompt_format)"))


@dataclass
class LabelConfig(Common, PolicySamples):
    data: str = field(default="toy", metadata=_help(
        "rows with question, reference, response (e.g. train_rl.py's rollouts.jsonl), or, with --policy, questions "
        "and references (the released sets); 'toy' or 'freeform': the demo world's rows (worlds.py: toy.judge_rows, "
        "freeform.judge_rows; with --policy: the world's questions)"))
    split: str = field(default="train", metadata=_help("split of a data set name"))
    toy_mix: str = field(default="near:2000", metadata=_help(
        "demo-world rows by kind when --data toy|freeform (toy.judge_rows, freeform.judge_rows)"))
    teacher: str = field(default="rule:math", metadata=_help(
        "rule:math|rule:substring|rule:jaccard, a model dir or hub name, or http://host:port[,...]"))
    out: str = field(default="runs/verifier/labels.jsonl", metadata=_help(
        "labelled rows, appended; a rerun labels only the rows not there yet"))
    hashes_out: str = field(default="", metadata=_help(
        "question hashes of the labelled rows, for train_rl.py --exclude_hashes (default: OUT with .hashes.txt)"))
    rows_per_write: int = field(default=64, metadata=_help("rows per teacher call; the output is fsynced after each"))
    max_len: int = field(default=4096, metadata=_help("with --policy: longer prompts are dropped (and counted)"))
    seed: int = field(default=0, metadata=_help("seed of the toy rows and of --policy's samples"))


@dataclass
class Logged(Common):
    wandb_project: str = "rlvr"
    wandb_run_name: str = ""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class SftConfig(Logged, PolicySamples):
    student: str = field(default="tiny", metadata=_help(
        "model dir or hub name (a saved verifier keeps its settings); 'tiny': the tiny policy of the --data world"))
    data: str = field(default="toy", metadata=_help(
        "labelled rows (`label` output: question, reference, response, label); 'toy' or 'freeform': a demo "
        "world's rows (worlds.py) --teacher labels"))
    split: str = field(default="train", metadata=_help("split of a data set name"))
    toy_mix: str = field(default="near:2000", metadata=_help(
        "demo-world rows to label when --data toy|freeform, kind:count,... (toy: digit near far perturb garbage; "
        "freeform: other near hedge copy garbage)"))
    teacher: str = field(default="rule:math", metadata=_help(
        "labels --data toy and the policy's responses (the --verifier_* prompt flags are the student's)"))
    heldout_fraction: float = field(default=verifier_data.HELDOUT_FRACTION, metadata=_help("share of questions (by hash) held out for eval"))
    max_len: int = field(default=4096, metadata=_help("longer rows are dropped (and counted); the paper's max length"))
    balance: Literal["none", "oversample", "weight"] = field(default="none", metadata=_help(
        "oversample: draw the minority class up to the majority's count; weight: loss weight n / (2 n_class)"))
    # negatives that make the student harder to fool (Master-RM); added to the training split only
    master_key_negatives: float = field(default=0.0, metadata=_help(
        "add this share of the training rows as content-free answers (audit.TRAINING_KEYS: 'Let me think.', "
        "'Final answer:', '所以答案是'...) to training questions, labelled NO; the probe's keys stay unseen"))
    truncated_negatives: float = field(default=0.0, metadata=_help(
        "add this share of the training rows as responses cut before their answer (the first sentence of a "
        "longer response, a prefix of a one-line one), labelled NO"))
    policy_rollouts: str = field(default="", metadata=_help(
        "a policy's rollouts.jsonl (train_rl.py): its responses to training-split questions, labelled and added"))
    master_key_prompts: int = field(default=64, metadata=_help("held-out questions the master-key probe asks"))
    # optimisation: OpenRLHF 0.6.0 train_sft defaults (the framework the paper ran on) unless noted
    epochs: float = field(default=1.0, metadata=_help("passes over the training rows (the paper: 1)"))
    batch_size: int = field(default=128, metadata=_help("sequences per optimizer step over all ranks"))
    micro_batch_size: int = field(default=4, metadata=_help("sequences per forward/backward per rank (the paper: 4)"))
    pack: bool = field(default=True, metadata=_help("one row per micro-batch, no padding (GPU); false: padded rows"))
    lr: float = field(default=5e-6, metadata=_help("peak AdamW learning rate"))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = field(default="cosine", metadata=_help("after warm-up"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("cosine decays to this share of --lr"))
    warmup_ratio: float = field(default=0.03, metadata=_help("share of steps with linear warm-up"))
    max_grad_norm: float = 1.0
    activation_checkpointing: bool = False
    seed: int = 0
    eval_every: int = field(default=0, metadata=_help("steps between held-out evals (0: only before and after)"))
    save_every: int = field(default=0, metadata=_help("steps between checkpoints (0: at the end and on SIGTERM/INT)"))
    keep_checkpoints: int = 2
    resume: str = resume_field()
    overwrite: bool = overwrite_field()
    out_dir: str = field(default="runs/verifier", metadata=_help(
        "labels (toy), policy_labels.jsonl, checkpoints, metrics.jsonl, final/ (weights + verifier_settings.json)"))


@dataclass
class EvalConfig(Logged):
    verifier: str = field(default="rule:substring", metadata=_help(
        "rule:substring|rule:jaccard|rule:math, a model dir or hub name (asked as saved), or http://host:port[,...]"))
    data: str = field(default="", metadata=_help("labelled rows: question, reference, response, label (0/1)"))
    split: str = field(default="test", metadata=_help("split of a data set name"))
    master_key_prompts: int = field(default=64, metadata=_help("(question, reference) pairs per master key"))
    seed: int = field(default=0, metadata=_help("which pairs the master-key probe draws"))
    out_dir: str = field(default="runs/verifier_eval", metadata=_help("eval.json, reliability.png, metrics.jsonl"))
    out: str = field(default="", metadata=_help("write the JSON report here too (it always goes to stdout)"))
    overwrite: bool = overwrite_field()


def check_config(cfg, vopts: verifiers.VerifierOptions) -> None:
    """Every range and relation, before any model loads: a bad value is one line naming its flag."""
    req = config.require
    vopts.check()
    req(cfg.threads >= 0, "threads", cfg.threads, "must be >= 0 (0: chosen from the free cores)")
    for name in ("student", "policy", "teacher", "verifier"):  # a model path: one line now, not a traceback later
        asked = verifier_spec.parse(getattr(cfg, name, "")).model_verifier  # a student or policy parses as a model
        if asked.kind == "model" and asked.target:
            # cot is sent as raw text; a policy as its --policy_prompt_format says
            chat = verifier_families.family(asked.family).chat if asked.family else \
                name != "policy" or cfg.policy_prompt_format == "chat"
            problem = model.source_problem(asked.target, chat, cfg.trust_remote_code,
                                           "--policy_prompt_format" if name == "policy" else "")
            req(problem is None, name, getattr(cfg, name), str(problem))
    for name in ("verifier", "teacher"):
        refused = remote.url_credentials(getattr(cfg, name, ""))
        req(refused is None, name, remote.redact(getattr(cfg, name, "")), refused)
    # the eval verifier and label's teacher are asked with the prompt flags; sft's teacher is not
    verifiers.check_saved_settings(getattr(cfg, "verifier", ""), vopts, from_flags=True)
    verifiers.check_saved_settings(getattr(cfg, "teacher", ""), vopts, from_flags=not isinstance(cfg, SftConfig))
    # sft trains one judgement token after the prompt (the teacher's label mapped to the family's tokens)
    req(not (isinstance(cfg, SftConfig) and vopts.verifier_family and
             verifier_families.family(vopts.verifier_family).decision), "verifier_family", vopts.verifier_family,
        "sft distils a first-token judgement; a generating verifier would need the teacher's reasoning as targets")
    for name in verifier_data.FIELD_FLAGS:
        req(getattr(cfg, name).strip() != "", name, getattr(cfg, name), "must name a column")
    # label writes the judgement; sft and eval read it from a column of its own
    twin = next((n for n in verifier_data.FIELD_FLAGS[:3] if getattr(cfg, n) == cfg.label_field), None)
    req(twin is None or isinstance(cfg, LabelConfig), str(twin), cfg.label_field, "is also --label_field" + (
        "; the released sets' 'label' is the reference answer, not a judgement: judge responses to their "
        "questions with `train_verifier.py label --policy ...` first" if twin == "reference_field" else ""))
    if isinstance(cfg, EvalConfig):
        req(cfg.data.strip() != "", "data", cfg.data, "is required (rows with question, reference, response, label)")
        req(cfg.verifier.strip() != "", "verifier", cfg.verifier, "is required")
        req(cfg.master_key_prompts >= 1, "master_key_prompts", cfg.master_key_prompts, "must be >= 1")
        return
    req(cfg.teacher.strip() != "", "teacher", cfg.teacher, "is required")
    req(not getattr(cfg, "overwrite", False) or cfg.resume == "no", "overwrite", True,
        "contradicts --resume (it keeps the run's files)")
    try:
        worlds.of(cfg.data).parse_mix(cfg.toy_mix)
    except ValueError as e:
        req(False, "toy_mix", cfg.toy_mix, str(e))
    req(cfg.policy_max_new_tokens >= 1, "policy_max_new_tokens", cfg.policy_max_new_tokens, "must be >= 1")
    req(cfg.policy_temperature > 0, "policy_temperature", cfg.policy_temperature, "must be > 0")
    req(bool(cfg.policy) == (cfg.policy_samples > 0), "policy_samples", cfg.policy_samples,
        "must be >= 1 with --policy, and 0 without it" if cfg.policy else "needs --policy (the model to sample from)")
    req(cfg.max_len >= 3, "max_len", cfg.max_len, "must be >= 3 (a prompt, the judgement and the end of turn)")
    if isinstance(cfg, LabelConfig):
        req(cfg.rows_per_write >= 1, "rows_per_write", cfg.rows_per_write, "must be >= 1")
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    for name in ("batch_size", "micro_batch_size", "keep_checkpoints", "master_key_prompts"):
        req(getattr(cfg, name) >= 1, name, getattr(cfg, name), "must be >= 1")
    for name in ("eval_every", "save_every", "policy_samples", "master_key_negatives", "truncated_negatives",
                 "weight_decay"):
        req(getattr(cfg, name) >= 0, name, getattr(cfg, name), "must be >= 0")
    req(cfg.batch_size % world == 0 and (cfg.batch_size // world) % cfg.micro_batch_size == 0, "batch_size",
        cfg.batch_size, f"must split into {world} ranks x whole micro-batches of --micro_batch_size "
        f"{cfg.micro_batch_size}")
    for name in ("epochs", "lr", "max_grad_norm"):
        req(getattr(cfg, name) > 0, name, getattr(cfg, name), "must be > 0")
    for name in ("adam_beta1", "adam_beta2", "warmup_ratio", "heldout_fraction"):
        req(0 <= getattr(cfg, name) < 1, name, getattr(cfg, name), "must be in [0, 1)")
    req(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", cfg.min_lr_ratio, "must be in [0, 1]")
    req(not cfg.policy_rollouts or Path(cfg.policy_rollouts).is_file(), "policy_rollouts", cfg.policy_rollouts,
        "no such file")


# ----------------------------------------------------------------------------------------------
# label: a teacher judges rows (verifier_data.label_rows: append-only, resumable)


def label(cfg: LabelConfig, vopts: verifiers.VerifierOptions) -> dict:
    """The `label` command: the teacher (asked with the --verifier_* flags) judges every row of --data, or,
    with --policy, the policy's sampled responses to the --data questions."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.policy:
        rows = verifier_data.sample_responses(cfg, verifier_data.policy_path(cfg), verifier_data.prompt_records(cfg), device)
    elif cfg.data in worlds.WORLDS:  # the world's rows' own labels (the truth) are not read: the teacher's replace them
        rows = worlds.WORLDS[cfg.data].judge_rows(cfg.toy_mix, cfg.seed)
    else:
        try:
            rows = verifier_data.read_rows(cfg, cfg.data, cfg.split)
        except data.DataError as e:
            if f"field '{cfg.response_field}' is missing" not in str(e):
                raise
            raise data.DataError(f"{e}: to judge a policy's answers to these questions, add --policy DIR "
                                 "--policy_samples N") from None
    share = rules.math_reference_share([r.reference for r in rows])
    config.require(cfg.teacher != "rule:math" or share >= 0.5, "teacher", cfg.teacher,  # as train_rl.py refuses it
                   f"{share:.0%} of --data {cfg.data}'s references are numbers or math: rule:math scores every answer "
                   "to a word 0; use a model judge, a py: judge or rule:substring")
    get_teacher = functools.cache(lambda: verifiers.build_verifier(cfg.teacher, vopts, device=device,
                                                                trust_remote_code=cfg.trust_remote_code))
    start = time.perf_counter()
    labelled = verifier_data.label_rows(get_teacher, rows, Path(cfg.out), cfg.rows_per_write, cfg.teacher)
    hashes = Path(cfg.hashes_out) if cfg.hashes_out else Path(cfg.out).with_suffix(".hashes.txt")
    n_hashes = data.write_hashes(hashes, [r.question for r in labelled])
    positives = sum(r.label for r in labelled)
    print(f"[label] {len(labelled)} rows ({positives} YES) by {cfg.teacher} in {cfg.out} "
          f"({time.perf_counter() - start:.1f}s); {n_hashes} question hashes in {hashes} "
          f"(train_rl.py --exclude_hashes {hashes})\n[label] next: python train_verifier.py sft --data "
          f"{shlex.quote(cfg.out)} --student MODEL --out_dir DIR")
    return {"rows": len(labelled), "positives": positives, "out": cfg.out, "hashes": str(hashes)}


# ----------------------------------------------------------------------------------------------
# the figures: a verifier against labelled rows (agreement is audit.agreement), and master keys


def score(verifier, rows: list[data.JudgedRow]) -> dict:
    """The verifier's judgements of labelled rows against the labels: audit.agreement, calibration
    (ece, brier, bins), the share of first tokens that were neither judgement token, judgements per second."""
    preds, p_yes, unjudged, start = [], [], 0, time.perf_counter()
    for batch in metrics.progress(list(verifier_data.chunks(rows, 256)), desc="judge", disable=len(rows) <= 256):
        j = verifier([r.question for r in batch], [r.reference for r in batch], [r.response for r in batch])
        preds += [int(b) for b in j.binary.tolist()]
        p_yes += j.p_yes.tolist()
        unjudged += int((~j.judged).sum())
    labels, seconds = [r.label for r in rows], time.perf_counter() - start
    return {**audit.agreement(labels, preds), **audit.calibration(labels, p_yes), "unjudged": unjudged / len(rows),
            "judgements_per_s": len(rows) / max(seconds, 1e-9), "seconds": seconds}


def master_key_rate(verifier, rows: list[data.JudgedRow], n: int, seed: int) -> dict:
    """audit.master_key_probe on the rows' distinct (question, reference) pairs."""
    pairs = sorted({(r.question, r.reference) for r in rows})
    return audit.master_key_probe(verifier, [q for q, _ in pairs], [a for _, a in pairs], n=n, seed=seed)


def eval_verifier(cfg: EvalConfig, vopts: verifiers.VerifierOptions) -> dict:
    """The `eval` command. A saved verifier is asked with its saved settings (a contradicting flag is an
    error unless --verifier_force_settings), as train_rl.py asks it."""
    rows = verifier_data.read_rows(cfg, cfg.data, cfg.split, labelled=True)
    verifier = verifiers.build_verifier(cfg.verifier, vopts, device="cuda" if torch.cuda.is_available() else "cpu",
                                     trust_remote_code=cfg.trust_remote_code)
    report = {"verifier": cfg.verifier, "data": cfg.data, **score(verifier, rows)}
    probe = master_key_rate(verifier, rows, cfg.master_key_prompts, cfg.seed)
    report.update(master_key_fpr=probe["fpr"], master_key_unjudged=probe["unjudged"],
                  master_key_per_key=probe["per_key"], reliability=report.pop("bins"))
    if probe["warn"]:
        report["notes"].append(f"master-key false-positive rate {probe['fpr']:.1%} is above "
                               f"{audit.MASTER_KEY_WARN:.0%}: a policy trained on this verifier may learn to hack it")
    out_dir = Path(cfg.out_dir)
    log = metrics.Metrics(str(out_dir), {**asdict(cfg), **asdict(vopts)}, cfg.wandb_project,
                          cfg.wandb_run_name or None, cfg.wandb_mode)
    report["reliability_png"] = metrics.reliability_plot(out_dir / "reliability.png", report["reliability"])
    text = json.dumps(report, indent=1, ensure_ascii=False)
    for path in {out_dir / "eval.json", Path(cfg.out) if cfg.out else out_dir / "eval.json"}:
        rundir.note(path)
        path.write_text(text + "\n")
    log.log(0, {f"verifier_eval/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
    log.close()
    print(text)
    print(eval_summary(report, out_dir))
    return report


def eval_summary(report: dict, out_dir: Path) -> str:
    """The eval's one line, after the JSON: what was judged, how well, and where the report is."""
    def f(key, fmt=".3f"):
        return "n/a" if report.get(key) is None else format(report[key], fmt)
    return (f"{report['verifier']} on {report['n']} rows of {report['data']}: accuracy {f('accuracy')}, kappa "
            f"{f('kappa')}, F1 {f('f1')}, ECE {f('ece')}, unjudged {f('unjudged', '.1%')}, master-key false "
            f"positives {f('master_key_fpr', '.1%')}" + (f" ({len(report['notes'])} notes)" if report.get("notes") else "")
            + f"; report {out_dir / 'eval.json'}")


# ----------------------------------------------------------------------------------------------
# sft: the student learns prompt -> judgement token (+ end of turn)


def encode(prompt: verifier_prompt.VerifierPrompt, eos_id: int, rows: list, max_len: int) -> tuple[list, list]:
    """(sequence ids, prompt length) per row: prompt + [judgement token, end of turn], and the rows kept;
    rows longer than max_len are dropped rather than cut (a cut prompt loses the answer or the header)."""
    out, kept = [], []
    for r in rows:
        ids = prompt.prompt_ids(r.question, r.reference, r.response)
        target = prompt.positive_ids[0] if r.label else prompt.negative_ids[0]
        if len(ids) + 2 <= max_len:
            out.append((ids + [target, eos_id], len(ids)))
            kept.append(r)
    return out, kept


def balanced_pool(labels: list[int], balance: str, seed: int) -> tuple[list[int], list[float]]:
    """(indices one epoch draws from, loss weight per row). oversample: the minority class is drawn
    (with replacement, fixed by seed) up to the majority's count; weight: n / (2 n_class), so both
    classes weigh the same in total and the mean weight stays 1."""
    n, n_pos = len(labels), sum(labels)
    counts = {1: n_pos, 0: n - n_pos}
    if balance == "none":
        return list(range(n)), [1.0] * n
    if 0 in counts.values():
        raise ValueError(f"--balance {balance}: all {n} training rows have label {int(n_pos > 0)}; nothing to balance")
    if balance == "weight":
        return list(range(n)), [n / (2 * counts[y]) for y in labels]
    minority = min(counts, key=counts.get)
    pool = [i for i, y in enumerate(labels) if y == minority]
    extra = random.Random(f"oversample:{seed}").choices(pool, k=abs(counts[1] - counts[0]))
    return list(range(n)) + extra, [1.0] * n


def micro_loss(student, batch: list[tuple[list[int], int]], weights: list[float], n_targets: int, pack: bool,
               pad_id: int, device):
    """Weighted sum of -log p over the judgement and end-of-turn tokens, divided by the global number of
    target tokens; also (sum of p(judgement), judgements with p > 1/2) for logging. pack: one row without
    padding (flash-attention varlen on GPU); else right-padded rows, faster on CPU for rows of similar
    length (all the toy's)."""
    ids, pos, att, target = model.rows([s for s, _ in batch], [[i >= plen for i in range(len(s))] for s, plen in batch],
                                       pack, pad_id, device)
    logp, _ = model.token_logprobs(student, ids, pos, target, att)
    flat = logp[target]  # sequence by sequence: judgement token, end of turn
    loss = -(flat * torch.tensor(weights, device=flat.device).repeat_interleave(2)).sum() / n_targets
    p = flat.detach()[0::2].exp()
    return loss, p.sum().item(), (p > 0.5).sum().item()


def train_step(student, optimizer, scheduler, batch: list, weights: list[float], cfg: SftConfig, pad_id: int,
               device, step: int) -> dict:
    """One optimizer step on the global batch (this rank's share, in micro-batches). A NaN/inf loss or
    gradient norm stops the run before the update is applied: the checkpoints hold only finite weights."""
    student.train()
    lr = scheduler.get_last_lr()[0]
    totals = torch.zeros(3, dtype=torch.float64)  # loss, sum of p(judgement), judgements with p > 1/2
    for mb in verifier_data.chunks(list(range(len(batch))), cfg.micro_batch_size):
        loss, p_sum, right = micro_loss(student, [batch[i] for i in mb], [weights[i] for i in mb],
                                        2 * cfg.batch_size, cfg.pack, pad_id, device)
        (loss * distributed.world_size()).backward()  # FSDP averages over ranks; the denominator is already global
        totals += torch.tensor([loss.item(), p_sum, right], dtype=torch.float64)
    grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)))
    totals = distributed.all_sum(totals)
    if not (math.isfinite(grad_norm) and math.isfinite(totals[0].item())):
        raise model.NonFiniteError(f"sft step {step}: loss {totals[0].item()}, gradient norm {grad_norm}; the update was "
                                 f"not applied. Lower --lr (now {cfg.lr}) or check the data")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": totals[0].item(), "train/p_judgement": totals[1].item() / cfg.batch_size,
            "train/accuracy": totals[2].item() / cfg.batch_size, "grad_norm": grad_norm, "lr": lr}


EVAL_FIGURES = ("accuracy", "precision", "recall", "f1", "kappa", "ece", "brier", "unjudged")


def heldout_eval(student, judge, rows: list[data.JudgedRow], probe_keys: int = 0, seed: int = 0) -> tuple[dict, dict]:
    """The student, as verifiers.py's local verifier, against the teacher's labels of held-out rows; with
    probe_keys, also its master-key false-positive rate on `probe_keys` held-out questions. Returns
    (figures, master-key rate per key)."""
    student.eval()
    figures = score(judge, rows)
    out = {f"eval/{k}": figures[k] for k in EVAL_FIGURES}
    if not probe_keys:
        return out, {}
    probe = master_key_rate(judge, rows, probe_keys, seed)
    return out | {"master_key/fpr": probe["fpr"], "master_key/unjudged": probe["unjudged"],
                  "master_key/questions": probe["n"]}, probe["per_key"]


# --resume may change these (applied from the step it resumes at); the others are the run's (train_rl.RESUME_MAY_CHANGE)
SFT_RESUME_MAY_CHANGE = {"eval_every", "save_every", "keep_checkpoints", "master_key_prompts", "wandb_project",
                         "wandb_run_name", "wandb_mode", "resume", "overwrite", "config", "out_dir",
                         "verifier_batch_size", "verifier_timeout", "verifier_retries", "verifier_concurrency",
                         "math_timeout"}


def sft(cfg: SftConfig, vopts: verifiers.VerifierOptions) -> dict:
    """The `sft` command: distil the teacher's labels into the student, export it with its settings."""
    rank, world, device = distributed.init()
    torch.manual_seed(cfg.seed)
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    if cfg.resume == "yes" and checkpoint.latest_checkpoint(str(ckpt_dir)) is None:
        raise config.ConfigError(f"--resume: no checkpoint in {ckpt_dir}; --resume auto starts fresh when there "
                                 "is none")
    if cfg.resume != "no" and checkpoint.latest_checkpoint(str(ckpt_dir)) is not None:  # before anything loads
        now = json.loads(remote.redact(json.dumps({**asdict(cfg), **asdict(vopts)}, default=str)))  # as config.json
        config.check_resumed_flags(out_dir / "config.json", now, SFT_RESUME_MAY_CHANGE)
    student_path = worlds.of(cfg.data).tiny_policy(cfg.heldout_fraction) if cfg.student == "tiny" else cfg.student
    # what the student reads and answers: a verifier fine-tuned again keeps its saved settings
    settings = verifier_prompt.resolve_settings(verifier_prompt.load_settings(student_path), vopts.settings_overrides(),
                                       vopts.verifier_force_settings, student_path)
    labelled, heldout, added = verifier_data.training_rows(cfg, vopts, device)
    tokenizer = model.load_tokenizer(student_path, cfg.trust_remote_code)
    prompt = verifier_prompt.VerifierPrompt(tokenizer, settings, student_path)
    seqs, train_rows = encode(prompt, tokenizer.eos_token_id, labelled + sum(added.values(), []), cfg.max_len)
    heldout_rows = encode(prompt, tokenizer.eos_token_id, heldout, cfg.max_len)[1]
    counts = {"data/train_rows": len(labelled), "data/train_yes": sum(r.label for r in labelled),
              "data/heldout_rows": len(heldout_rows), **{f"data/{kind}_rows": len(r) for kind, r in added.items()},
              "data/policy_yes": sum(r.label for r in added.get("policy", [])),
              "data/too_long": len(labelled) + len(heldout) + sum(map(len, added.values())) - len(seqs)
              - len(heldout_rows)}
    if rank == 0:  # master_key, truncated, policy: rows added to training
        print("[sft] rows: " + ", ".join(f"{k.removeprefix('data/')} {v}" for k, v in counts.items()))
    if not train_rows:
        raise data.DataError(f"--data {cfg.data}: no training rows left after the held-out split and --max_len")
    pool, weights = balanced_pool([r.label for r in train_rows], cfg.balance, cfg.seed)
    steps = max(1, math.ceil(cfg.epochs * len(pool) / cfg.batch_size))

    student = model.load_sharded(student_path, device, torch.float32, cfg.trust_remote_code, model.compute_dtype(),
                                 mixed_precision=distributed.gpu_path(),
                                 activation_checkpointing=cfg.activation_checkpointing)
    optimizer, scheduler = model.build_optimizer(student, cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay,
                                                 steps, cfg.warmup_ratio, cfg.lr_schedule, cfg.min_lr_ratio)
    sampler = data.PromptSampler(len(pool), cfg.batch_size, cfg.seed, rank, world)
    state = checkpoint.load_checkpoint(str(ckpt_dir), student, optimizer, scheduler) if cfg.resume != "no" else None
    start, before = (state["step"], state["before"]) if state else (0, None)
    if state:
        sampler.load_state_dict(state["sampler"])
    if state and rank == 0:
        print(f"[sft] resumed from step {start} ({ckpt_dir})")
    log = metrics.Metrics(str(out_dir), {**asdict(cfg), **asdict(vopts), "student_path": student_path,
                                         "settings": asdict(settings)}, cfg.wandb_project, cfg.wandb_run_name or None,
                          cfg.wandb_mode, rank, resume_step=start)
    # max_unjudged 1: an untrained student's first token is anything; its share is a figure here (eval/unjudged)
    judge = verifiers.LocalVerifier(student, tokenizer, settings, name="student", batch_size=vopts.verifier_batch_size,
                                 max_unjudged=1.0)
    if before is None:  # the untrained student: the baseline the distillation must beat
        before = heldout_eval(student, judge, heldout_rows)[0] if heldout_rows else {}
        log.log(0, before | counts)

    stop, timer, t_start, after, per_key = checkpoint.StopSignal(), metrics.PhaseTimer(device), time.time(), {}, {}
    bar = metrics.progress(range(start + 1, steps + 1), desc="sft", disable=rank != 0, initial=start, total=steps)
    every = max(1, steps // 20)  # without a bar (a log file): a line every 5% of the run
    for step in bar:
        with timer("train"):
            batch = [pool[i] for i in sampler.next()]
            m = train_step(student, optimizer, scheduler, [seqs[i] for i in batch], [weights[i] for i in batch], cfg,
                           tokenizer.pad_token_id, device, step)
        if heldout_rows and (step == steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            with timer("eval"):  # after the last step, also: does it say YES to content-free answers?
                after, per_key = heldout_eval(student, judge, heldout_rows,
                                              cfg.master_key_prompts if step == steps else 0, cfg.seed)
                m.update(after)
        log.log(step, m | timer.pop() | {"epoch": sampler.epoch} | metrics.peak_memory(device))
        line = metrics.Metrics.summary(step, m, ["loss", "train/accuracy", "eval/kappa"])
        bar.set_postfix_str(line)
        if rank == 0 and bar.disable and (step % every == 0 or step == steps or "eval/kappa" in m):
            print(f"[sft] {line} (of {steps})", flush=True)
        stopping = stop.should_stop() and step < steps  # a signal in the last step: finish instead
        if step == steps or stopping or (cfg.save_every and step % cfg.save_every == 0):
            checkpoint.save_checkpoint(str(ckpt_dir), step, student, optimizer, scheduler,
                                       {"sampler": sampler.state_dict(), "before": before}, keep=cfg.keep_checkpoints)
        if stopping:
            stop.restore()
            log.close()
            if rank == 0:
                print(f"[sft] stopped by {signal.Signals(stop.received).name} after step {step}; checkpoint in "
                      f"{ckpt_dir}. Continue with the same command and --resume", file=sys.stderr, flush=True)
            return {"stopped": stop.received, "step": step, "before": before}
    stop.restore()

    if heldout_rows and start == steps:  # resumed after the last step: its figures are logged already
        after, per_key = heldout_eval(student, judge, heldout_rows, cfg.master_key_prompts, cfg.seed)
    final = checkpoint.export_hf(student, tokenizer, str(out_dir / "final"))
    if rank == 0:
        verifier_prompt.save_settings(final, settings)
        print(summary(before, after, len(heldout_rows), steps - start, time.time() - t_start, final)
              + summary_warnings(after, counts, vopts.verifier_max_unjudged, settings, before, steps - start, cfg.lr))
    log.close()
    return {"before": before, "after": after, "master_key_per_key": per_key, "rows": counts, "steps": steps,
            "seconds": time.time() - t_start, "final": final, "settings": asdict(settings)}


def summary(before: dict, after: dict, n_heldout: int, steps: int, seconds: float, final: str) -> str:
    def fmt(m: dict, key: str) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.3f}"
    text = f"[sft] {steps} steps in {seconds:.0f}s; verifier: {final}, with its settings ({verifier_prompt.SETTINGS_FILE})"
    if after:
        text += (f"\n[sft] held-out vs the teacher ({n_heldout} rows): kappa {fmt(before, 'eval/kappa')} -> "
                 f"{fmt(after, 'eval/kappa')}, accuracy {fmt(before, 'eval/accuracy')} -> {fmt(after, 'eval/accuracy')}"
                 f"; master-key false-positive rate {after['master_key/fpr']:.1%} ({len(audit.MASTER_KEYS)} keys x "
                 f"{after['master_key/questions']} questions)")
    if after.get("master_key/fpr", 0) > audit.MASTER_KEY_WARN:
        text += (f"\n[sft] WARNING: above {audit.MASTER_KEY_WARN:.0%}, a policy trained on this verifier may learn "
                 "to hack it; see --master_key_negatives, --truncated_negatives, --policy")
    return text


def summary_warnings(after: dict, counts: dict, max_unjudged: float, settings: verifier_prompt.VerifierSettings,
                     before: dict | None = None, steps: int = 0, lr: float = 0.0) -> str:
    """Lines that say a distillation failed where its figures alone look fine: a student that does not
    answer in its judgement tokens (its accuracy is then the share of NO labels), labels of one class, and
    training that did not move the student (its held-out probabilities, Brier score and ECE, unchanged)."""
    text = ""
    probs = [k for k in ("eval/brier", "eval/ece") if k in after and k in (before or {})]
    # float32 probabilities averaged over the held-out rows: any update moves them by far more than 1e-7
    if steps and probs and all(abs(after[k] - before[k]) <= 1e-7 for k in probs):
        text += (f"\n[sft] WARNING: {steps} steps did not move the student: its held-out Brier score and ECE are "
                 f"those it started with; --lr {lr:g} is too small for it (or every update was skipped)")
    unjudged = after.get("eval/unjudged")
    if unjudged is not None and unjudged > max_unjudged:
        text += (f"\n[sft] WARNING: {unjudged:.0%} of the student's held-out first tokens were neither "
                 f"{settings.positive!r} nor {settings.negative!r} (eval/unjudged): it has not learned to answer in its "
                 f"judgement tokens, so its accuracy and kappa mean nothing, and train_rl.py and eval refuse it "
                 f"(--verifier_max_unjudged {max_unjudged}); train longer (--epochs) or with a higher --lr")
    n, yes = counts.get("data/train_rows", 0), counts.get("data/train_yes", 0)
    if n and min(yes, n - yes) / n < 0.05:
        text += (f"\n[sft] WARNING: {yes} {settings.positive} in {n} training labels ({yes / n:.1%}): nearly all one "
                 "class, so always answering the majority scores well; label more of the other class, or --balance "
                 "oversample|weight")
    return text


# ----------------------------------------------------------------------------------------------
# command line

COMMANDS = {"label": (LabelConfig, label), "sft": (SftConfig, sft), "eval": (EvalConfig, eval_verifier)}
USAGE = f"usage: python train_verifier.py {{{','.join(COMMANDS)}}} [--help] [flags]"


def parse_config(command: str, argv: list[str]) -> tuple:
    """(the command's config, verifiers.VerifierOptions), checked: dataclass fields are the flags."""
    cfg, vopts = config.parse_config((COMMANDS[command][0], verifiers.VerifierOptions), argv,
                                     prog=f"train_verifier.py {command}")
    check_config(cfg, vopts)
    return cfg, vopts


def run(argv: list[str]) -> dict:
    """Parse and run one command. A bad flag (or --resume with no checkpoint, or a flag that contradicts
    a verifier's saved settings) raises config.ConfigError; main() prints it as one line."""
    if not argv or argv[0] not in COMMANDS:
        raise config.ConfigError(f"unknown command {argv[0] if argv else ''!r}; choose from {', '.join(COMMANDS)}")
    cfg, vopts = parse_config(argv[0], argv[1:])
    lock = claim_out_dir(cfg)
    n_threads, why = threads.choose(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    threads.apply(n_threads)
    if int(os.environ.get("RANK", 0)) == 0:
        print(threads.start_up_line(n_threads, why), flush=True)
    try:
        return COMMANDS[argv[0]][1](cfg, vopts)
    finally:
        distributed.shutdown()
        if lock is not None:
            rundir.release(lock)


EVAL_OUTPUTS = {"eval.json", "reliability.png", "metrics.jsonl", "config.json", "wandb", "wandb_run_id"}


def claim_out_dir(cfg) -> int | None:
    """sft and eval: rank 0 locks --out_dir for the run (rundir.py) and refuses one that holds an earlier
    run's files unless --resume (sft) continues it or --overwrite empties it. label appends by design, and
    locks its --out (OUT.lock) so that two label runs never append to one file at once."""
    if isinstance(cfg, LabelConfig):  # label appends to --out: one label run at a time
        return rundir.lock_output(cfg.out, "out")
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    if isinstance(cfg, EvalConfig):  # an eval is repeated into its out_dir without --overwrite
        fd = rundir.lock(cfg.out_dir)
        if set(rundir.entries(cfg.out_dir)) <= EVAL_OUTPUTS:  # nothing but an earlier eval's files: replaced
            (Path(cfg.out_dir) / "metrics.jsonl").unlink(missing_ok=True)  # this eval's row alone
            return fd
        rundir.release(fd)  # another kind of run's files: refused as for any run (or --overwrite)
    ckpts = str(Path(cfg.out_dir) / "checkpoints")
    return rundir.claim(cfg.out_dir, getattr(cfg, "resume", "no"), cfg.overwrite,
                        lambda: checkpoint.latest_checkpoint(ckpts) is not None,
                        inputs=(cfg.data, getattr(cfg, "policy_rollouts", "")))  # what it reads is never removed


def main(argv: list[str] | None = None) -> dict:
    """Exit status: 2 for a bad flag; 1, in one line, for bad data, a verifier that cannot judge, no loadable
    checkpoint or a NaN loss; 128 + signum for a run stopped by SIGTERM/SIGINT (after a checkpoint)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n{__doc__}")
        sys.exit(0 if argv else 2)
    prog = f"train_verifier.py {argv[0]}" if argv[0] in COMMANDS else "train_verifier.py"
    with config.one_line_errors(prog, (data.DataError, remote.VerifierError, checkpoint.CheckpointError,
                                       model.NonFiniteError)):
        result = run(argv)
    if result.get("stopped"):
        sys.exit(128 + result["stopped"])
    return result


if __name__ == "__main__":
    main()
