"""Where prompts come from: one record type, loaders, hash splits, the resumable sampler, and the
judged-row format ((question, reference, response) with an optional 0/1 label) both trainers share.

Imports none of the project's files, and nothing heavy at import time: datasets and pyarrow are
imported inside the functions that need them. The offline demo's toy task is in toy.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

# The system prompt stored in the released Multi-subject-RLVR / Math-RLVR rows: it makes the policy
# end with "Therefore, the answer is ...", so the last line (all the verifier reads) carries the answer.
PAPER_SYSTEM_PROMPT = (
    "You are a chatbot who can solve problems. Please solve the following problem and give your thought "
    'process. Before giving the final result, you should output "Therefore, the answer is", and then give '
    "your final answer.")


class DataError(ValueError):
    """A source or row that cannot be used. The message names the file (or data set), row and field."""


@dataclass(frozen=True)
class Record:
    id: str                 # stable: a hash of question + reference unless the row has one
    messages: list[dict]    # the chat the policy sees (system prompt included)
    question: str           # the bare user question: what the verifier sees
    reference: str
    meta: dict              # subject, source file and row, ...


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_record(question: str, reference: str, messages: list[dict], meta: dict, id: str | None = None) -> Record:
    return Record(id=id or _sha16(question + "\n" + reference), messages=messages, question=question,
                  reference=reference, meta=meta)


# ----------------------------------------------------------------------------------------------
# loading

_FILE_TYPES = (".jsonl", ".json", ".parquet")
_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors write


def load_records(source: str, split: str = "train", prompt_field: str = "query", answer_field: str = "label",
                 system_prompt: str = PAPER_SYSTEM_PROMPT, skip_bad: bool = False) -> tuple[list[Record], list[str]]:
    """Load prompts with reference answers. Returns (records, skipped): `skipped` holds one reason per
    bad row that `skip_bad` dropped (always empty without it), so the caller decides who prints it.

    source:        a local .jsonl, .json (a list of objects, or JSON lines) or .parquet file, a local
                   data set folder, or a Hugging Face data set name such as virtuoussy/Multi-subject-RLVR.
    split:         the split of a data set name or folder (a single file is its own split).
    prompt_field:  the column holding the prompt: a list of chat messages ({"role", "content"}, the
                   released sets' `query`), or a plain question string.
    answer_field:  the column holding the reference answer (a string; numbers are written with str()).
    system_prompt: the system message put before prompts that carry none ("" for none).
    skip_bad:      drop rows that cannot be used instead of raising DataError on the first one.

    The bare question (what the verifier sees) is the last message, which must be the user's. The row's
    own `id` is kept when present; other scalar columns (subject, ...) go into `meta` together with
    "source" and "row" (1-based; the line number in JSON lines files). A column already named "source"
    or "row" is kept as "data_source" / "data_row".
    """
    where, rows = iter_rows(str(source), split)
    records, skipped = [], []
    for row_number, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            records.append(_to_record(row, f"{where}, row {row_number}", prompt_field, answer_field, system_prompt,
                                      {"source": where, "row": row_number}))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    if not records:
        raise DataError(f"{where}: no usable rows ({len(skipped)} bad rows skipped)"
                        + (f", first: {skipped[0]}" if skipped else ""))
    return records, skipped


def iter_rows(source: str, split: str) -> tuple[str, Iterator[tuple[int, object]]]:
    """(label for messages and meta, iterator of (1-based row number, row dict or DataError))."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir() or not (suffix in _FILE_TYPES or path.exists() or source.startswith(("/", ".", "~"))):
        where = f"{source}[{split}]"
        return where, _dataset_rows(source, split, where)
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    if suffix not in _FILE_TYPES:
        raise DataError(f"{source}: unknown file type '{suffix}' (expected one of {', '.join(_FILE_TYPES)})")
    if suffix == ".parquet":
        return source, _parquet_rows(path, source)
    return source, _json_rows(path, source, may_be_list=suffix == ".json")


def _json_rows(path: Path, where: str, may_be_list: bool) -> Iterator[tuple[int, object]]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{where}: cannot read the file ({e})") from e
    with f:
        if may_be_list and f.read(1 << 16).removeprefix(_BOM).lstrip()[:1] == b"[":
            f.seek(0)
            try:
                rows = json.loads(f.read().removeprefix(_BOM))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: not valid JSON ({e})") from e
            yield from enumerate(rows, 1)
            return
        f.seek(0)
        # JSON lines, streamed line by line so that a bad row is reported with its exact line number
        for line_number, line in enumerate(f, 1):
            line = line.removeprefix(_BOM) if line_number == 1 else line
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if not line.endswith(b"\n"):  # the last line, torn by a crash of the writer: not a row yet
                    print(f"[data] warning: {where}, row {line_number}: skipping a last line torn by a crash "
                          f"({line[:60]!r})", file=sys.stderr)
                    return
                yield line_number, DataError(f"{where}, row {line_number}: not valid JSON ({e})")


def _parquet_rows(path: Path, where: str) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{where}: not a readable parquet file ({e})") from e
    row_number = 0
    for batch in batches:
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row


def _dataset_rows(name: str, split: str, where: str) -> Iterator[tuple[int, object]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # hub, network and format errors all mean the same here
        raise DataError(f"{where}: cannot load the data set ({type(e).__name__}: {e})") from e
    yield from enumerate(ds, 1)


def _to_record(row: object, at: str, prompt_field: str, answer_field: str, system_prompt: str,
               provenance: dict) -> Record:
    _require_object(row, at)
    prompt = _field(row, prompt_field, at)
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt.strip()}]
    elif isinstance(prompt, list):
        messages = _messages(prompt, at, prompt_field)
    else:
        raise DataError(f"{at}: field '{prompt_field}' must be a list of chat messages or a string, "
                        f"got {type(prompt).__name__}")
    question = _unicode(messages[-1]["content"], at, f"field '{prompt_field}'").strip()
    if not question:
        raise DataError(f"{at}: field '{prompt_field}' has an empty question")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})

    reference = _text(row, answer_field, at, required=True).strip()

    row_id = row.get("id")
    row_id = str(row_id) if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) and row_id != "" else None
    meta = {}
    for key, value in row.items():
        if key in (prompt_field, answer_field, "id") or not isinstance(value, (str, int, float, bool)):
            continue
        meta[f"data_{key}" if key in provenance else key] = value
    meta.update(provenance)
    return make_record(question, reference, messages, meta, id=row_id)


def _require_object(row: object, at: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{at}: expected an object with fields, got {type(row).__name__}")


def _field(row: dict, field: str, at: str):
    if field not in row:
        raise DataError(f"{at}: field '{field}' is missing")
    if row[field] is None:
        raise DataError(f"{at}: field '{field}' is null")
    return row[field]


def _text(row: dict, field: str, at: str, required: bool = False) -> str:
    """A string field, as stored (not stripped); a finite number is written with str() (the numeric
    answers of math sets; a class *index*, as in MMLU, would need mapping). `required`: not blank."""
    value = _field(row, field, at)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{at}: field '{field}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{at}: field '{field}' is empty")
    return _unicode(value, at, f"field '{field}'")


def _unicode(value: str, at: str, what: str) -> str:
    """`value`, or a DataError if it holds a lone surrogate (JSON "\\ud800" without its pair): such text
    cannot be encoded (row ids hash its UTF-8), tokenized or written back."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{at}: {what} holds a lone surrogate ({value[e.start]!r} at character "
                        f"{e.start + 1}), not valid Unicode text") from None
    return value


def _messages(messages: list, at: str, field: str) -> list[dict]:
    if not messages:
        raise DataError(f"{at}: field '{field}' is an empty list of messages")
    out = []
    for i, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{at}: field '{field}', message {i}: expected {{'role': str, 'content': str}}, "
                            f"got {str(m)[:80]}")
        # only role and content: parquet fills absent struct keys with None, which chat templates mis-render
        out.append({"role": m["role"], "content": _unicode(m["content"], at, f"field '{field}', message {i}")})
    if out[-1]["role"] != "user":
        # e.g. an SFT set whose chat ends with the answer: the policy would be shown the reference
        raise DataError(f"{at}: field '{field}': the last message must be the user's question, "
                        f"got role '{out[-1]['role']}'")
    return out


# ----------------------------------------------------------------------------------------------
# hash splits: by question, so the same question never lands on both sides, whatever the order or machine

def question_hash(question: str) -> str:
    """16 hex digits of the sha256 of the question with whitespace stripped and collapsed."""
    return _sha16(" ".join(question.split()))


def split_heldout(records: list[Record], heldout_fraction: float, salt: str = "") -> tuple[list[Record], list[Record]]:
    """(train, heldout): a record is held out when its question hash falls below `heldout_fraction`.
    A different `salt` draws a different, equally deterministic split. Order is preserved."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1]")
    train, heldout = [], []
    for r in records:
        u = int(question_hash(f"{salt} {r.question}" if salt else r.question), 16) / 16 ** 16
        (heldout if u < heldout_fraction else train).append(r)
    return train, heldout


def write_hashes(path: str | Path, items: Iterable[Record | str]) -> int:
    """Write the question hashes of records (or of question strings), sorted, one per line; returns
    how many. Used to exclude the verifier-distillation prompts from RL data."""
    hashes = sorted({question_hash(x.question if isinstance(x, Record) else x) for x in items})
    Path(path).write_text("".join(h + "\n" for h in hashes))
    return len(hashes)


def read_hashes(path: str | Path) -> set[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the hash file ({e})") from e
    hashes = set()
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if len(line) != 16 or any(c not in "0123456789abcdef" for c in line):
            raise DataError(f"{path}, row {i}: expected a 16-digit hex question hash, got {line[:40]!r}")
        hashes.add(line)
    return hashes


def drop_hashes(records: list[Record], hashes: set[str]) -> tuple[list[Record], int]:
    """(records whose question hash is not in `hashes`, how many were dropped)."""
    kept = [r for r in records if question_hash(r.question) not in hashes]
    return kept, len(records) - len(kept)


# ----------------------------------------------------------------------------------------------
# prompts as tokens

def render_prompt(tokenizer, record: Record) -> str:
    return tokenizer.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, record: Record) -> list[int]:
    # the chat template already writes every special token (BOS included where the model has one)
    return tokenizer.encode(render_prompt(tokenizer, record), add_special_tokens=False)


def drop_long(records: list[Record], tokenizer, max_prompt_len: int) -> tuple[list[Record], int]:
    """(records whose rendered prompt fits in `max_prompt_len` tokens, how many were dropped)."""
    kept = [r for r in records if len(_encode(tokenizer, r)) <= max_prompt_len]
    return kept, len(records) - len(kept)


def tokenize_prompts(tokenizer, records: list[Record], max_prompt_len: int) -> list[list[int]]:
    """Token ids of each rendered prompt. Raises on a prompt longer than `max_prompt_len` instead of
    cutting it (a cut prompt loses the question's end or the assistant header)."""
    out = []
    for r in records:
        ids = _encode(tokenizer, r)
        if len(ids) > max_prompt_len:
            raise ValueError(f"record {r.id} ({r.meta.get('source')}, row {r.meta.get('row')}): prompt has "
                             f"{len(ids)} tokens > max_prompt_len={max_prompt_len}; filter with drop_long() "
                             f"at load time or raise max_prompt_len")
        out.append(ids)
    return out


# ----------------------------------------------------------------------------------------------
# the sampler

class PromptSampler:
    """Which prompts each step trains on. Every epoch is a fresh shuffle seeded by (seed, epoch); a
    step that runs past the end of an epoch takes the rest from the next epoch's shuffle, so within an
    epoch no prompt is dropped or repeated. All ranks draw the same global batch of `prompts_per_step`
    indices and each takes its contiguous slice, so the union over ranks does not depend on the number
    of ranks, and a run can resume on another world size.
    """

    def __init__(self, num_records: int, prompts_per_step: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_records < 1:
            raise ValueError(f"PromptSampler needs at least one record, got num_records={num_records}")
        if prompts_per_step < 1 or prompts_per_step % world_size:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be a positive multiple of the number "
                             f"of ranks ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        self.num_records, self.prompts_per_step, self.seed = num_records, prompts_per_step, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0          # completed passes over the data
        self.position = 0       # prompts already taken from the current epoch's shuffle
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(self.num_records))
        # a string seed goes through sha512: the same shuffle on every machine and Python version
        random.Random(f"prompt-sampler:{self.seed}:{epoch}").shuffle(order)
        return order

    def next(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.prompts_per_step:
            take = min(self.prompts_per_step - len(batch), self.num_records - self.position)
            batch += self._order[self.position:self.position + take]
            self.position += take
            if self.position == self.num_records:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
        per_rank = self.prompts_per_step // self.world_size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_records": self.num_records, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_records"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the sampler state was saved with {key}={state[key]} but this run has "
                                 f"{key}={getattr(self, key)}: resuming would repeat or skip prompts")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)


# ----------------------------------------------------------------------------------------------
# judged rows: (question, reference, response) and, once judged, a 0/1 label. What the verifier
# trainer labels, trains on and evaluates, and what the RL trainer's rollouts.jsonl holds.

@dataclass
class JudgedRow:
    question: str
    reference: str
    response: str
    label: int | None = None            # 1: the response's answer matches the reference
    teacher_p_yes: float | None = None  # the labelling verifier's p(positive token)

    @property
    def id(self) -> str:
        """Stable: the same (question, reference, response) has the same id on every machine and run,
        so a label file made by an earlier run still matches its rows."""
        key = json.dumps([self.question, self.reference, self.response], ensure_ascii=False)
        return _sha16(key)

    def to_json(self, **extra) -> dict:
        return {"id": self.id, "question": self.question, "reference": self.reference, "response": self.response,
                "label": self.label, "teacher_p_yes": self.teacher_p_yes, **extra}


def parse_label(value, at: str, field: str = "label") -> int:
    """0/1, true/false (JSON booleans or strings, any case) as 0 or 1; `at` names the file and row."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise DataError(f"{at}: field '{field}' must be 0/1 or true/false, got {value!r}"
                    + (" (the released sets' 'label' is the reference answer: --reference_field label)"
                       if field == "label" else ""))


def read_judged_rows(source: str, split: str = "train", labelled: bool = False, question_field: str = "question",
                     reference_field: str = "reference", response_field: str = "response",
                     label_field: str = "label") -> list[JudgedRow]:
    """Rows from a .jsonl/.json/.parquet file or a data set name (the loaders above). A question or
    reference that is blank, and with `labelled` a missing or unreadable label, is a DataError naming
    the file, row and field. Values are kept as stored (not stripped): the row id hashes them.

    The *_field arguments name the columns (the released sets: `query` holds the question as chat
    messages, whose last, the user's, is the question; `label` holds the reference answer)."""
    where, raw_rows = iter_rows(str(source), split)
    rows = []
    for n, raw in raw_rows:
        at = f"{where}, row {n}"
        if isinstance(raw, DataError):
            raise raw
        _require_object(raw, at)
        row = JudgedRow(_question(raw, question_field, at), _text(raw, reference_field, at, required=True),
                        _text(raw, response_field, at))
        if labelled:
            row.label = parse_label(_field(raw, label_field, at), at, label_field)
        if isinstance(raw.get("teacher_p_yes"), (int, float)):
            row.teacher_p_yes = float(raw["teacher_p_yes"])
        rows.append(row)
    if not rows:
        raise DataError(f"{where}: no rows")
    return rows


def _question(row: dict, field: str, at: str) -> str:
    """A question field: a string, or chat messages whose last (the user's) content is the question."""
    value = _field(row, field, at)
    if isinstance(value, list):
        value = _messages(value, at, field)[-1]["content"]
    elif not isinstance(value, str):
        raise DataError(f"{at}: field '{field}' must be a string or a list of chat messages, got {type(value).__name__}")
    _unicode(value, at, f"field '{field}'")
    if not value.strip():
        raise DataError(f"{at}: field '{field}' is empty")
    return value
