"""The verifier's rows: labelled rows read by their columns, the teacher's labels appended and resumable
(label_rows), and the sft data: rows split by question hash, the policy's own sampled answers labelled by
the teacher, and negatives added to the training split only (master keys, answers cut short, duplicates
dropped). train_verifier.py's commands call these. Imports data, metrics, model, rollout, rundir and
worlds (a demo world's rows).
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import random
import re
from pathlib import Path

import data
import worlds
from rlvr import audit, distributed, metrics, model, rollout, verifiers

HELDOUT_FRACTION = 0.1  # sft's --heldout_fraction default: the share of questions (by hash) held out for eval

FIELD_FLAGS = ("question_field", "reference_field", "response_field", "label_field")


def read_rows(cfg, source: str, split: str, labelled: bool = False) -> list[data.JudgedRow]:
    """The rows of --data, its columns named by the --*_field flags."""
    return data.read_judged_rows(source, split, labelled, **{name: getattr(cfg, name) for name in FIELD_FLAGS})


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def label_rows(get_teacher, rows: list[data.JudgedRow], out: Path, rows_per_write: int,
               teacher: str) -> list[data.JudgedRow]:
    """Ask the teacher (`teacher`, built by `get_teacher()` if any row needs it) about every row whose id is
    not yet in `out`, appending {id, question, reference, response, label, teacher_p_yes, teacher} lines
    (a file holds one teacher's labels: rows of another, or of an unrecorded one, are a DataError), one fsynced write per
    call. Returns the distinct rows, labelled. A crash tears at most the last line, which
    metrics.read_jsonl cuts off, so a rerun labels exactly the rows missing. The teacher's own checks
    hold: a model teacher that answers neither judgement token raises VerifierError (no all-NO labels)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    known = {}
    for n, line in enumerate(metrics.read_jsonl(out) if out.exists() else [], 1):
        if not isinstance(line.get("id"), str) or "label" not in line:
            raise data.DataError(f"{out}, row {n}: not a labelled row (needs 'id' and 'label'); fix or remove the file")
        if line.get("teacher") != teacher:  # one file, one teacher: sft would learn a mix, summarised as one
            raise data.DataError(f"{out}, row {n}: labelled by {line.get('teacher') or 'an unrecorded teacher'}, not "
                                 f"by this run's {teacher}; label into another --out (a file holds one teacher's labels)")
        known[line["id"]] = line
    distinct = list({r.id: r for r in rows}.values())
    todo = [r for r in distinct if r.id not in known]
    print(f"[label] {len(distinct)} distinct rows, {len(todo)} to label, the others already in {out}", flush=True)
    for batch in metrics.progress(list(chunks(todo, rows_per_write)), desc="label", disable=not todo):
        j = get_teacher()([r.question for r in batch], [r.reference for r in batch], [r.response for r in batch])
        lines = [r.to_json() | {"label": int(b), "teacher_p_yes": p, "teacher": teacher} for r, b, p in
                 zip(batch, j.binary.tolist(), j.p_yes.tolist())]
        metrics.append_jsonl(out, lines)
        known.update((line["id"], line) for line in lines)
    return [dataclasses.replace(r, label=data.parse_label(known[r.id]["label"], str(out)),
                                teacher_p_yes=known[r.id].get("teacher_p_yes")) for r in distinct]


# ----------------------------------------------------------------------------------------------
# sft data: the labelled rows split by question hash, and negatives added to the training split only


def master_key_rows(train: list[data.JudgedRow], share: float, seed: int) -> list[data.JudgedRow]:
    """round(share * len(train)) rows: a training question and its reference with a content-free answer
    drawn from audit.TRAINING_KEYS, labelled NO (Master-RM's answer to "one token fools the judge"). The
    probe asks audit.MASTER_KEYS, none of them trained on, so its false-positive rate measures generalisation."""
    rng = random.Random(f"master-key-negatives:{seed}")
    picks = [(rng.choice(train), rng.choice(audit.TRAINING_KEYS)) for _ in range(round(share * len(train)))]
    return [data.JudgedRow(r.question, r.reference, key, label=0) for r, key in picks]


_SENTENCE_END = re.compile(r"[.!?。！？:：](?=\s|$)")


def opening(response: str, rng: random.Random) -> str | None:
    """A response cut before its final answer: the first sentence of its first line when it has several
    lines (Master-RM's reasoning opener), else a random prefix of its one line's words that stops before
    the last word (where the answer sits). None when nothing would be left."""
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    if len(lines) > 1:
        end = _SENTENCE_END.search(lines[0])
        return lines[0][:end.end()] if end else lines[0]
    words = lines[0].split() if lines else []
    return " ".join(words[:rng.randrange(1, len(words))]) if len(words) >= 2 else None


def truncated_rows(train: list[data.JudgedRow], share: float, seed: int) -> list[data.JudgedRow]:
    """round(share * len(train)) draws of a training row with its response cut before its answer
    (`opening`), labelled NO: an unfinished solution is not a match. A response too short to cut adds none."""
    rng = random.Random(f"truncated-negatives:{seed}")
    out = []
    for _ in range(round(share * len(train))):
        r = rng.choice(train)
        cut = opening(r.response, rng)
        if cut is not None:
            out.append(data.JudgedRow(r.question, r.reference, cut, label=0))
    return out


def policy_path(cfg) -> str:
    """--policy, with 'tiny' the demo world's policy train_rl.py --policy tiny trains (warm-started without
    the questions --heldout_fraction holds out; label has no split: the default share)."""
    if cfg.policy != "tiny":
        return cfg.policy
    return worlds.of(cfg.data).tiny_policy(getattr(cfg, "heldout_fraction", HELDOUT_FRACTION))


def system_prompt(cfg) -> str:
    return cfg.policy_system_prompt if cfg.policy_system_prompt is not None else \
        worlds.WORLDS[cfg.data].system_prompt if cfg.data in worlds.WORLDS else data.PAPER_SYSTEM_PROMPT


def prompt_records(cfg) -> list[data.Record]:
    """label --policy: the questions of --data as train_rl.py reads them (chat messages kept, the system
    prompt added where a row has none), or every question of a demo world."""
    if cfg.data in worlds.WORLDS:
        system = system_prompt(cfg)
        return [data.make_record(r.question, r.reference, [{"role": "system", "content": system}] * bool(system)
                                 + [{"role": "user", "content": r.question}], r.meta)
                for r in worlds.WORLDS[cfg.data].records(cfg.seed)]
    return data.load_records(cfg.data, cfg.split, cfg.question_field, cfg.reference_field, system_prompt(cfg))[0]


def sample_responses(cfg, path: str, records: list[data.Record], device) -> list[data.JudgedRow]:
    """--policy_samples responses per record from the policy at `path`, drawn as train_rl.py draws rollouts
    (rollout.generate, a seed per sample): a rerun draws the same ones and finds their labels. Prompts
    longer than --max_len are dropped (and counted)."""
    tokenizer = model.load_tokenizer(path, cfg.trust_remote_code, cfg.policy_prompt_format)
    records, n_long = data.drop_long(records, tokenizer, cfg.max_len)
    if n_long:
        print(f"[policy] {n_long} prompts longer than --max_len {cfg.max_len} tokens dropped", flush=True)
    policy = model.load_model(path, device, model.compute_dtype(), cfg.trust_remote_code)
    # the policy samples as an RL run draws rollouts (rollout.generate, a seed per sample)
    sampling = rollout.Sampling(samples_per_prompt=cfg.policy_samples, max_prompt_len=cfg.max_len, seed=cfg.seed,
                                max_new_tokens=cfg.policy_max_new_tokens, temperature=cfg.policy_temperature, top_p=1.0)
    rows = []
    for step, batch in enumerate(metrics.progress(list(chunks(records, 32)), desc="policy samples")):
        drawn = rollout.generate(policy, None, tokenizer, batch, step, sampling)
        rows += [data.JudgedRow(r.question, r.reference, text) for r, text in zip(drawn.records, drawn.texts)]
    del policy
    gc.collect()
    return rows


def policy_rows(cfg, path: str, train: list[data.JudgedRow], get_teacher, device) -> list[data.JudgedRow]:
    """Rank 0: the policy's responses to training questions (sample_responses), labelled by the teacher into
    OUT_DIR/policy_labels.jsonl: wrong answers in the policy's own style. --policy_rollouts rows of held-out
    questions (by hash) are left out."""
    rows = []
    if path:
        system = system_prompt(cfg)
        records = [data.make_record(q, ref, [{"role": "system", "content": system}] * bool(system)
                                    + [{"role": "user", "content": q}], {})
                   for q, ref in dict.fromkeys((r.question, r.reference) for r in train)]
        rows += sample_responses(cfg, path, records, device)
    if cfg.policy_rollouts:
        found, held_out = data.split_heldout(data.read_judged_rows(cfg.policy_rollouts), cfg.heldout_fraction)
        print(f"[sft] {cfg.policy_rollouts}: {len(found)} responses to training-split questions; "
              f"{len(held_out)} to held-out questions left out")
        rows += found
    return label_rows(get_teacher, rows, Path(cfg.out_dir) / "policy_labels.jsonl", 256, cfg.teacher)


def drop_duplicates(rows: list[data.JudgedRow], source: str) -> list[data.JudgedRow]:
    """Each (question, reference, response) once, saying how many repeats were dropped (a row seen twice
    would weigh twice); the same row labelled both ways is a DataError naming the rows."""
    first: dict[str, int] = {}
    for n, r in enumerate(rows, 1):
        if r.id in first and rows[first[r.id] - 1].label != r.label:
            raise data.DataError(f"{source}, rows {first[r.id]} and {n}: the same question, reference and response "
                                 f"labelled {rows[first[r.id] - 1].label} and {r.label}; keep one")
        first.setdefault(r.id, n)
    if len(first) < len(rows):
        say = print if distributed.rank() == 0 else (lambda *a, **k: None)
        say(f"[sft] {source}: dropped {len(rows) - len(first)} duplicate rows (the same question, reference and "
            f"response again); {len(first)} distinct rows")
    return [rows[n - 1] for n in sorted(first.values())]


def training_rows(cfg, vopts: verifiers.VerifierOptions, device) -> tuple[list, list, dict]:
    """(labelled training rows, held-out rows, {kind: rows added to training}). Rank 0 does what needs
    the teacher (asked with its own settings: the prompt flags are the student's); every rank gets the
    same rows. Added rows come from training questions only, so held-out figures stay honest."""
    get_teacher = functools.cache(lambda: verifiers.build_verifier(cfg.teacher, vopts, settings_from_flags=False,
                                                                device=device, trust_remote_code=cfg.trust_remote_code))
    source = cfg.data
    if cfg.data in worlds.WORLDS:
        source = str(Path(cfg.out_dir) / "labels.jsonl")
        if distributed.rank() == 0:  # the world's rows' own labels (the truth) are replaced by the teacher's
            label_rows(get_teacher, worlds.WORLDS[cfg.data].judge_rows(cfg.toy_mix, cfg.seed), Path(source), 256,
                       cfg.teacher)
        distributed.barrier()
    rows = data.read_judged_rows(source, labelled=True) if cfg.data in worlds.WORLDS else \
        read_rows(cfg, source, cfg.split, True)
    rows = drop_duplicates(rows, source)
    train, heldout = data.split_heldout(rows, cfg.heldout_fraction)
    added = {"master_key": master_key_rows(train, cfg.master_key_negatives, cfg.seed),
             "truncated": truncated_rows(train, cfg.truncated_negatives, cfg.seed)}
    if cfg.policy or cfg.policy_rollouts:
        path = policy_path(cfg) if cfg.policy else ""
        found = policy_rows(cfg, path, train, get_teacher, device) if distributed.rank() == 0 else None
        added["policy"] = distributed.broadcast_object(found)
    return train, heldout, added
