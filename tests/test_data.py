import json
import random
from pathlib import Path

import pytest

import data
from data import DataError, PromptSampler

SAMPLE = Path(__file__).resolve().parent / "data" / "multi_subject_rlvr_sample.jsonl"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _records(n):
    """Records of distinct questions (the loaders' own output, without a file)."""
    return [data.make_record(f"What is {i} + 1?", str(i + 1), [{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": f"What is {i} + 1?"}],
                             {"source": "test", "row": i + 1}) for i in range(n)]


def _rows(n=3):
    return [{"query": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"Question {i}?"}],
             "label": f"answer {i}", "subject": "physics"} for i in range(n)]


# ---------------------------------------------------------------------------------------- loading

def test_sample_loads_with_no_flags():
    records, skipped = data.load_records(str(SAMPLE))
    assert len(records) == 2058 and skipped == []
    first_line = json.loads(SAMPLE.open().readline())
    r = records[0]
    assert r.messages == first_line["query"]
    assert r.question == first_line["query"][-1]["content"] and r.reference == first_line["label"] == "Western blot"
    assert r.meta == {"source": str(SAMPLE), "row": 1}
    assert r.id == data._sha16(r.question + "\n" + r.reference)
    assert data.PAPER_SYSTEM_PROMPT == first_line["query"][0]["content"]
    assert all(x.messages[0]["content"] == data.PAPER_SYSTEM_PROMPT for x in records)


def test_missing_label_names_file_row_field_and_skip_bad(tmp_path):
    lines = SAMPLE.read_text().splitlines()
    row = json.loads(lines[16])
    del row["label"]
    lines[16] = json.dumps(row)
    bad = tmp_path / "multi.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        data.load_records(str(bad))
    assert str(e.value) == f"{bad}, row 17: field 'label' is missing"
    records, skipped = data.load_records(str(bad), skip_bad=True)
    assert len(records) == 2057 and len(skipped) == 1 and "row 17" in skipped[0]
    assert records[16].meta["row"] == 18  # row numbers stay the file's own


def test_plain_question_layout(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "  What is 2 + 2? ", "answer": "4", "id": "q-1",
                                                 "category": "math", "level": 2, "tags": ["x"]},
                                                {"question": "Capital of France?", "answer": 7}])
    records, _ = data.load_records(str(path), prompt_field="question", answer_field="answer")
    a, b = records
    assert a.messages == [{"role": "system", "content": data.PAPER_SYSTEM_PROMPT},
                          {"role": "user", "content": "What is 2 + 2?"}]
    assert (a.id, a.question, a.reference) == ("q-1", "What is 2 + 2?", "4")
    assert a.meta == {"category": "math", "level": 2, "source": str(path), "row": 1}  # lists are not meta
    assert b.reference == "7" and b.id == data._sha16("Capital of France?\n7")
    records, _ = data.load_records(str(path), prompt_field="question", answer_field="answer", system_prompt="")
    assert records[0].messages == [{"role": "user", "content": "What is 2 + 2?"}]


def test_messages_layout_and_provenance_collision(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Why?"}], "label": "because", "source": "forum", "row": 9},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name?"}],
             "label": "Bob"}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    a, b = data.load_records(str(path), prompt_field="messages", system_prompt="SYS")[0]
    assert a.messages == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Why?"}]
    assert a.meta == {"data_source": "forum", "data_row": 9, "source": str(path), "row": 1}
    assert b.messages == rows[1]["messages"] and b.question == "Name?"  # own system message kept


def test_json_list_and_json_lines(tmp_path):
    rows = _rows(3)
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows, indent=2))
    as_lines = _write_jsonl(tmp_path / "lines.json", rows)
    a, _ = data.load_records(str(as_list))
    b, _ = data.load_records(str(as_lines))
    assert [r.reference for r in a] == [r.reference for r in b] == ["answer 0", "answer 1", "answer 2"]
    assert [r.meta["row"] for r in a] == [1, 2, 3] and a[0].meta["subject"] == "physics"


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(3)
    rows[1]["query"][0]["name"] = "extra"  # parquet gives every message every key, None where absent
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, _ = data.load_records(str(path))
    assert [r.question for r in records] == ["Question 0?", "Question 1?", "Question 2?"]
    assert records[0].messages == _rows(1)[0]["query"]  # only role and content survive
    assert records[2].meta == {"subject": "physics", "source": str(path), "row": 3}


@pytest.mark.parametrize("row,message", [
    ({"query": "x", "label": ["a"]}, "field 'label' must be a string, got list"),
    ({"query": "x", "label": True}, "field 'label' must be a string, got bool"),
    ({"query": "x", "label": "  "}, "field 'label' is empty"),
    ({"query": "x", "label": None}, "field 'label' is null"),
    ({"query": 5, "label": "a"}, "field 'query' must be a list of chat messages or a string, got int"),
    ({"query": [], "label": "a"}, "field 'query' is an empty list of messages"),
    ({"query": [{"role": "user"}], "label": "a"}, "field 'query', message 1: expected"),
    ({"query": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "a"},
     "the last message must be the user's question, got role 'assistant'"),
    ({"query": [{"role": "user", "content": " "}], "label": "a"}, "field 'query' has an empty question"),
    ({"label": "a"}, "field 'query' is missing"),
    ([1, 2], "expected an object with fields, got list"),
])
def test_wrong_rows_raise_naming_row_and_field(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", _rows(2) + [row])
    with pytest.raises(DataError, match="bad.jsonl, row 3: ") as e:
        data.load_records(str(path))
    assert message in str(e.value)
    records, skipped = data.load_records(str(path), skip_bad=True)
    assert len(records) == 2 and len(skipped) == 1


def test_unparseable_line_and_blank_lines(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = [json.dumps(r) for r in _rows(2)]
    path.write_text(good[0] + "\n\n{not json\n" + good[1] + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl, row 3: not valid JSON"):
        data.load_records(str(path))
    records, skipped = data.load_records(str(path), skip_bad=True)
    assert [r.meta["row"] for r in records] == [1, 4] and len(skipped) == 1


def test_bom_and_crlf(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in _rows(2)))
    assert [r.reference for r in data.load_records(str(path))[0]] == ["answer 0", "answer 1"]


def test_hub_names_go_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name != "owner/set":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return _rows(2) + [{"query": "q"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records, skipped = data.load_records("owner/set", split="test", skip_bad=True)
    assert calls == [("owner/set", "test")] and len(records) == 2
    assert records[1].meta == {"subject": "physics", "source": "owner/set[test]", "row": 2}
    assert skipped == ["owner/set[test], row 3: field 'label' is missing"]
    with pytest.raises(DataError, match=r"owner/nope\[train\]: cannot load the data set \(FileNotFoundError"):
        data.load_records("owner/nope")


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        data.load_records(str(tmp_path / "nope.jsonl"), skip_bad=True)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d.csv: unknown file type '.csv'"):
        data.load_records(str(tmp_path / "d.csv"))
    (tmp_path / "x.json").write_text("[{\"a\": 1},")
    with pytest.raises(DataError, match="x.json: not valid JSON"):
        data.load_records(str(tmp_path / "x.json"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="x.parquet: not a readable parquet file"):
        data.load_records(str(tmp_path / "x.parquet"))
    path = _write_jsonl(tmp_path / "all_bad.jsonl", [{"query": "q"}])
    with pytest.raises(DataError, match="all_bad.jsonl: no usable rows"):
        data.load_records(str(path), skip_bad=True)
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------- hash splits

def test_question_hash_is_pinned_and_normalised():
    # pinned: changing the hash would silently move questions across the train/held-out line
    assert data.question_hash("What is 3 + 4?") == "89359e5423b7bf6d"
    assert data.question_hash("  What is 3 +\n\t4? ") == "89359e5423b7bf6d"
    assert data.question_hash("What is 3 + 5?") != "89359e5423b7bf6d"


def test_split_heldout():
    records, _ = data.load_records(str(SAMPLE))
    train, heldout = data.split_heldout(records, 0.1)
    assert len(train) + len(heldout) == len(records)
    assert 0.07 * len(records) < len(heldout) < 0.13 * len(records)
    assert not {r.question for r in train} & {r.question for r in heldout}
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    train2, heldout2 = data.split_heldout(shuffled, 0.1)
    assert {r.id for r in heldout2} == {r.id for r in heldout}
    _, other = data.split_heldout(records, 0.1, salt="b")
    assert {r.id for r in other} != {r.id for r in heldout}
    assert data.split_heldout(records, 0.0)[1] == [] and data.split_heldout(records, 1.0)[0] == []
    with pytest.raises(ValueError, match="heldout_fraction"):
        data.split_heldout(records, 1.5)


def test_hash_files_and_drop(tmp_path):
    records = _records(180)
    used = records[:40]
    path = tmp_path / "verifier_prompts.txt"
    assert data.write_hashes(path, used) == 40
    hashes = data.read_hashes(path)
    assert hashes == {data.question_hash(r.question) for r in used}
    kept, dropped = data.drop_hashes(records, hashes)
    assert dropped == 40 and kept == records[40:]
    # a question differing only in whitespace is the same question
    data.write_hashes(path, ["What  is 3 + 4?"])
    assert data.read_hashes(path) == {"89359e5423b7bf6d"}
    path.write_text("89359e5423b7bf6d\nnot-a-hash\n")
    with pytest.raises(DataError, match="verifier_prompts.txt, row 2"):
        data.read_hashes(path)


# ------------------------------------------------------------------------------------ tokens

@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 3 + 4? Therefore, the answer is 7. system user assistant"] * 10, trainer)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template)


def test_render_and_tokenize(tokenizer):
    records = _records(3)
    text = data.render_prompt(tokenizer, records[0])
    assert text == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{records[0].question}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = data.tokenize_prompts(tokenizer, records, max_prompt_len=1000)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0][0] == start and ids[0].count(start) == 3 and ids[0].count(end) == 2
    assert tokenizer.decode(ids[0]) == text
    n = len(ids[0])
    kept, dropped = data.drop_long(records, tokenizer, max_prompt_len=n)
    assert all(len(x) <= n for x in data.tokenize_prompts(tokenizer, kept, n))
    assert dropped == sum(len(x) > n for x in ids)
    with pytest.raises(ValueError, match=f"record {records[0].id} .*max_prompt_len={n - 1}"):
        data.tokenize_prompts(tokenizer, records, max_prompt_len=n - 1)


# ---------------------------------------------------------------------------------------- sampler

def test_sampler_deterministic_and_no_repeats_within_epoch():
    a, b = PromptSampler(10, 4, seed=3), PromptSampler(10, 4, seed=3)
    steps = [a.next() for _ in range(5)]  # 20 prompts = exactly 2 epochs; step 3 straddles epochs 0 and 1
    assert steps == [b.next() for _ in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch reshuffles
    assert a.epoch == 2 and a.position == 0
    assert [PromptSampler(10, 4, seed=4).next() for _ in range(1)] != steps[:1]


def test_sampler_ranks_union_equals_single_rank():
    single = PromptSampler(23, 8, seed=1)
    ranks = [PromptSampler(23, 8, seed=1, rank=r, world_size=4) for r in range(4)]
    for _ in range(7):
        parts = [s.next() for s in ranks]
        assert all(len(p) == 2 for p in parts)
        assert [i for p in parts for i in p] == single.next()
    with pytest.raises(ValueError, match="prompts_per_step=6"):
        PromptSampler(23, 6, seed=1, world_size=4)


def test_sampler_resume():
    run = PromptSampler(13, 5, seed=7)
    for _ in range(4):
        run.next()
    state = json.loads(json.dumps(run.state_dict()))  # survives a round trip through a checkpoint
    resumed = PromptSampler(13, 5, seed=7, rank=1, world_size=5)  # even on another world size
    resumed.load_state_dict(state)
    assert resumed.epoch == run.epoch == 1
    for _ in range(6):
        assert resumed.next() == run.next()[1:2]
    with pytest.raises(ValueError, match="num_records=13"):
        PromptSampler(14, 5, seed=7).load_state_dict(state)


# ----------------------------------------------------------------------------------- judged rows

def test_judged_row_id_is_pinned_and_to_json():
    # pinned: the ids of train_verifier.py's former Row, so label files written before still match
    row = data.JudgedRow("Which is larger, 3 or 7?", "7", "Therefore, the answer is 14/2.")
    assert row.id == "7d6abd20556141ea"
    assert data.JudgedRow("答案 x", " 7 ", "y\n").id == "4ab64c433da15287"  # unstripped, non-ASCII as is
    assert data.JudgedRow(row.question, row.reference, row.response, label=1).id == row.id  # the label is no part
    assert row.to_json(step=3) == {"id": "7d6abd20556141ea", "question": row.question, "reference": "7",
                                   "response": row.response, "label": None, "teacher_p_yes": None, "step": 3}


def test_read_judged_rows_round_trip(tmp_path):
    rows = [data.JudgedRow("Q1?", "7", "Therefore, the answer is 7.", label=1, teacher_p_yes=0.9),
            data.JudgedRow(" Q2? ", "x", "", label=0)]
    path = _write_jsonl(tmp_path / "labels.jsonl", [r.to_json() for r in rows] + [
        {"question": "Q3?", "reference": 12, "response": "12", "label": "TRUE", "extra": [1]}])
    got = data.read_judged_rows(str(path), labelled=True)
    assert got[:2] == rows  # kept as stored: the id hashes the stored text
    assert (got[2].reference, got[2].label, got[2].teacher_p_yes) == ("12", 1, None)
    unlabelled = data.read_judged_rows(str(path))
    assert [r.label for r in unlabelled] == [None] * 3 and [r.id for r in unlabelled] == [r.id for r in got]


@pytest.mark.parametrize("value,want", [(True, 1), (False, 0), (1, 1), (0.0, 0), ("1", 1), (" false ", 0),
                                        ("True", 1), ("maybe", None), (2, None), (0.5, None), ([1], None)])
def test_parse_label(value, want):
    if want is None:
        with pytest.raises(DataError, match=r"^f.jsonl, row 4: field 'label' must be 0/1 or true/false, got "):
            data.parse_label(value, "f.jsonl, row 4")
    else:
        assert data.parse_label(value, "f.jsonl, row 4") == want


@pytest.mark.parametrize("row,message", [
    ({"question": " \n", "reference": "r", "response": "a", "label": 1}, "field 'question' is empty"),
    ({"question": "q", "reference": "", "response": "a", "label": 1}, "field 'reference' is empty"),
    ({"question": "q", "reference": None, "response": "a", "label": 1}, "field 'reference' is null"),
    ({"question": "q", "reference": "r", "label": 1}, "field 'response' is missing"),
    ({"question": 3, "reference": "r", "response": "a", "label": 1},
     "field 'question' must be a string or a list of chat messages, got int"),
    ({"question": ["q"], "reference": "r", "response": "a", "label": 1}, "field 'question', message 1: expected"),
    ({"question": [{"role": "user", "content": " "}], "reference": "r", "response": "a", "label": 1},
     "field 'question' is empty"),
    ({"question": "q", "reference": "r", "response": "a", "label": "maybe"}, "field 'label' must be 0/1 or true/false"),
    ({"question": "q", "reference": "r", "response": "a"}, "field 'label' is missing"),
    ("text", "expected an object with fields, got str"),
])
def test_bad_judged_rows_name_file_row_and_field(tmp_path, row, message):
    good = {"question": "q", "reference": "r", "response": "a", "label": 0}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match="bad.jsonl, row 2: ") as e:
        data.read_judged_rows(str(path), labelled=True)
    assert message in str(e.value)


def test_judged_rows_file_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        data.read_judged_rows(str(tmp_path / "empty.jsonl"))
    # a last line torn by a crash of the writer (rollouts.jsonl of a killed run) is skipped, not an error...
    (tmp_path / "torn.jsonl").write_text('{"question": "q", "reference": "r", "response": "a"}\n{"quest')
    assert [r.question for r in data.read_judged_rows(str(tmp_path / "torn.jsonl"))] == ["q"]
    # ... but a bad line with a newline after it is damage, named by its row
    (tmp_path / "bad.jsonl").write_text('{"quest\n{"question": "q", "reference": "r", "response": "a"}\n')
    with pytest.raises(DataError, match="bad.jsonl, row 1: not valid JSON"):
        data.read_judged_rows(str(tmp_path / "bad.jsonl"))


def test_read_judged_rows_maps_fields_and_reads_chat_questions(tmp_path):
    # the released sets' row: `query` (system + user messages), `label` the reference; a judgement elsewhere
    rows = [{"query": [{"role": "system", "content": "S"}, {"role": "user", "content": "Capital of France?"}],
             "label": "Paris", "answer": "It is Paris.", "correct": True},
            {"query": "2 + 2?", "label": 4, "answer": "5", "correct": 0}]
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    got = data.read_judged_rows(str(path), labelled=True, question_field="query", reference_field="label",
                                response_field="answer", label_field="correct")
    assert got == [data.JudgedRow("Capital of France?", "Paris", "It is Paris.", label=1),
                   data.JudgedRow("2 + 2?", "4", "5", label=0)]
    # the same question as train_rl.py's record of that row: the hashes that keep it out of training agree
    records, _ = data.load_records(str(path), prompt_field="query", answer_field="label")
    assert [data.question_hash(r.question) for r in records] == [data.question_hash(r.question) for r in got]
    with pytest.raises(DataError, match=r"mine.jsonl, row 1: field 'label' must be 0/1 or true/false, got 'Paris' "
                                        r"\(the released sets' 'label' is the reference answer: --reference_field label\)"):
        data.read_judged_rows(str(path), labelled=True, question_field="query", reference_field="label",
                              response_field="answer")


def test_the_released_sample_reads_as_questions_and_references():
    rows = data.read_judged_rows(str(SAMPLE), question_field="query", reference_field="label",
                                 response_field="label")  # no responses in it: any text column stands in
    raw = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert len(rows) == len(raw) == 2058
    assert all(r.question == x["query"][-1]["content"] and r.reference == x["label"] for r, x in zip(rows, raw))
