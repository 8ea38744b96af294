"""toy.py: the tiny offline models, the warm start, the toy task and its judged rows, the demo policy."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from rlvr import model
from worlds import toy


# ----------------------------------------------------------------------------------------- models

def test_tiny_model_loads_with_plain_transformers_and_generates(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["head_dim"] == 64
    assert (Path(tiny_model_dir) / "model.safetensors").exists()
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    for word in ("YES", "NO"):  # the verifier's judgement tokens are single tokens
        assert len(tok.encode(word, add_special_tokens=False)) == 1
    # any text encodes (byte-level), including the real data's Chinese
    assert tok.decode(tok.encode("答案是 Western blot", add_special_tokens=False)) == "答案是 Western blot"


def test_tiny_model_is_deterministic_and_cached(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    again = toy.build_tiny_model(str(tmp_path / "again"), seed=0)
    a, b = load_file(Path(tiny_model_dir) / "model.safetensors"), load_file(Path(again) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(Path(toy.build_tiny_model(str(tmp_path / "other"), seed=1)) / "model.safetensors")
    assert not all(torch.equal(a[k], other[k]) for k in a)
    mtime = (Path(again) / "model.safetensors").stat().st_mtime
    assert toy.build_tiny_model(str(tmp_path / "again"), seed=0) == again  # cached: not rebuilt
    assert (Path(again) / "model.safetensors").stat().st_mtime == mtime


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    assert toy.cache_root() == tmp_path
    monkeypatch.delenv("RLVR_CACHE")
    assert toy.cache_root() == Path.home() / ".cache" / "rlvr_recipe"


def test_cli_builds_a_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "worlds", "toy", "tiny", "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=120, cwd=Path(toy.__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "config.json").exists() and out.stdout.strip().endswith("m")


def test_warm_start_lowers_the_loss(tiny_model_dir):
    tok, lm = model.load_tokenizer(tiny_model_dir), model.load_model(tiny_model_dir)
    pairs = [([{"role": "user", "content": f"What is {a} + 1?"}], f"Therefore, the answer is {a + 1}.")
             for a in range(8)]
    losses = toy.supervised_warm_start(lm, tok, pairs, steps=30, seed=0, batch_size=8, lr=3e-3)
    assert math.isfinite(losses[-1]) and sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_tiny_policy_keeps_the_demo_settings(monkeypatch, tmp_path):
    # Pinned: the cache directory of train_rl's default demo policy (seed 0, 10% held out) is a hash of
    # its settings (warm-start pairs, 200 steps, sizes), so a change here would silently change the demo.
    spec = {"hidden": 128, "layers": 4, "seed": 0, "sft": "29152cc848e9", "sft_steps": 200, "v": 1, "vocab": 1024}
    cached = tmp_path / "tiny-83f4a09174e9"
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    (cached / "rlvr_tiny.json").write_text(json.dumps(spec))
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    assert toy.tiny_policy(heldout_fraction=0.1) == str(cached)  # found in the cache: nothing built
    calls = []
    monkeypatch.setattr(toy, "build_tiny_model", lambda **kw: calls.append(kw) or "built")
    assert toy.tiny_policy(heldout_fraction=0.2) == "built"  # one fixed start (seed 0) whatever the run's seed
    assert calls == [{"seed": 0, "sft_pairs": toy.sft_pairs(400, seed=1, heldout_fraction=0.2),
                      "sft_steps": toy.WARM_START_STEPS}]


# --------------------------------------------------------------------------------------- the task

def test_records():
    a = toy.records(toy.PROBLEMS, seed=0)
    assert a == toy.records(180, seed=0) and a != toy.records(180, seed=1)
    assert len({r.question for r in a}) == 180  # every problem once before any repeats
    assert {r.meta["subject"] for r in a} == {"larger", "smaller"}
    for r in a:
        x, y = (int(t) for t in r.question.rstrip("?").split(", ")[1].split(" or "))
        assert x != y and int(r.reference) == (max(x, y) if "larger" in r.question else min(x, y))
        assert r.messages == [{"role": "system", "content": toy.SYSTEM_PROMPT},
                              {"role": "user", "content": r.question}]
    assert len(toy.records(400, seed=0)) == 400
    assert toy.records(2, seed=0, system_prompt="")[0].messages == [{"role": "user", "content": a[0].question}]


def test_answer_forms_equivalent_under_math_verify():
    from math_verify import parse, verify

    assert toy.answer_forms(7) == ["7", "7.0", "14/2"]
    assert toy.response("14/2") == "Therefore, the answer is 14/2."
    for value in range(19):
        for form in toy.answer_forms(value):
            assert verify(parse(str(value)), parse(toy.response(form))), (value, form)
        assert not verify(parse(str(value)), parse(toy.response(str(value + 1))))


def test_sft_pairs():
    pairs = toy.sft_pairs(200, seed=0)
    assert pairs == toy.sft_pairs(200, seed=0)
    records = toy.records(200, seed=0)
    forms = {"plain": 0, "other": 0}
    for (messages, response), r in zip(pairs, records):
        assert messages == r.messages
        answer = response.removeprefix("Therefore, the answer is ").removesuffix(".")
        assert answer in toy.answer_forms(int(r.reference))
        forms["plain" if answer == r.reference else "other"] += 1
    assert forms["plain"] > forms["other"] > 20


def test_sft_pairs_leave_out_the_heldout_questions():
    heldout = {r.question for r in data.split_heldout(toy.records(400, seed=1), 0.1)[1]}
    pairs = toy.sft_pairs(400, seed=1, heldout_fraction=0.1)
    assert heldout and len(pairs) == 400 - sum(r.question in heldout for r in toy.records(400, seed=1))
    assert not {m[-1]["content"] for m, _ in pairs} & heldout


def test_judge_rows_label_the_truth_of_every_kind():
    from math_verify import parse, verify

    rows = toy.judge_rows("near:200", seed=0)
    assert rows == toy.judge_rows("near:200", seed=0) != toy.judge_rows("near:200", seed=1)
    assert all(isinstance(r, data.JudgedRow) and r.teacher_p_yes is None for r in rows)
    assert 70 <= sum(r.label for r in rows) <= 130  # half right, drawn
    for r in rows:  # an independent reference: Math-Verify on the number after "is"
        assert verify(parse(r.reference), parse(r.response.rsplit(" ", 1)[1].rstrip("."))) == bool(r.label)
    # the traps that separate verifiers: correct but not a substring, wrong but a substring
    assert any(r.label and r.reference not in r.response for r in rows)
    assert any(not r.label and r.reference in r.response for r in rows)
    mix = toy.judge_rows("digit:50,far:50,perturb:100,garbage:100", seed=0)
    assert len(mix) == 300
    assert all(toy.toy_truth(r.response, r.reference) == r.label for r in mix)
    perturbed = [r.response for r in mix[100:200]]
    assert all(t.startswith("Therefore, the answer is ") for t in perturbed) and 0 < sum(r.label for r in mix[100:200]) < 30
    assert sum(r.label for r in mix[200:]) < 20  # garbage is mostly wrong, by construction of the truth
    with pytest.raises(ValueError, match="'digit' is not kind:count"):
        toy.parse_mix("digit")
    with pytest.raises(ValueError, match="'nearr:3' is not kind:count"):
        toy.parse_mix("near:3,nearr:3")


def test_toy_truth_by_hand():
    assert [toy.toy_truth(t, "7") for t in ("Therefore, the answer is 7.", "Therefore, the answer is 14/2.",
                                            "Therefore, the answer is 7.0.", "x\nTherefore, the answer is 7.")] == [1, 1, 1, 1]
    assert [toy.toy_truth(t, "7") for t in ("Therefore, the answer is 17.", "Therefore, the answer is 7", "7",
                                            "Therefore, the answer is 7/0.", "Therefore, the answer is 14/24.",
                                            "Therefore, the answer is 7.09.", "", "Therefore, the answer is .")] == [0] * 8


def test_tiny_verifier_chains_its_stages_and_is_cached_by_recipe_text(monkeypatch, tmp_path):
    # stage 2 starts from stage 1's student; nothing reruns once built; an edited recipe builds anew
    runs = []

    def fake_run(cmd, env, cwd):
        out = Path(cmd[cmd.index("--out_dir") + 1])
        (out / "final").mkdir(parents=True)
        (out / "final" / "config.json").write_text("{}")
        runs.append((cmd[cmd.index("--config") + 1], cmd[cmd.index("--student") + 1], str(out), env))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setenv("RLVR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOCAL_RANK", "0")  # a launcher's variable: the distillation must not inherit it
    monkeypatch.setattr(toy.subprocess, "run", fake_run)
    recipes = []
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(f"# {name}\n")
        recipes.append(tmp_path / name)
    monkeypatch.setattr(toy, "VERIFIER_RECIPES", recipes)
    path = toy.tiny_verifier()
    assert [(c, s) for c, s, _, _ in runs] == [(str(recipes[0]), "tiny"), (str(recipes[1]), runs[0][2] + "/final")]
    assert path == runs[1][2] + "/final" and "LOCAL_RANK" not in runs[0][3]
    assert toy.tiny_verifier() == path and len(runs) == 2  # cached
    recipes[1].write_text("# b.yaml, edited\n")
    assert toy.tiny_verifier() != path and len(runs) == 4


def test_a_model_another_process_is_building_is_waited_for_not_built_twice(tmp_path, capsys):
    """Two runs (or suite workers) on one cold cache: the second waits on the first's lock, then finds the
    model built; it builds only where the first left nothing (here the holder builds nothing)."""
    import threading

    out = tmp_path / "m"
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, %r); from worlds import toy; from pathlib import Path\n"
        "with toy.build_lock(Path(%r)):\n    print('held', flush=True); sys.stdin.readline()")
        % (str(root), str(tmp_path / ".m.build"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    got = []
    t = threading.Thread(target=lambda: got.append(toy.build_tiny_model(str(out), hidden_size=64, num_layers=1,
                                                                        name="small")))
    t.start()
    t.join(timeout=3)
    assert t.is_alive() and not (out / "config.json").exists()  # waiting: nothing built while the lock is held
    holder.stdin.write("\n")
    holder.stdin.flush()
    t.join(timeout=120)
    assert holder.wait(timeout=60) == 0 and got == [str(out)] and (out / "config.json").exists()
    printed = capsys.readouterr().out
    assert "waiting for it" in printed and printed.count("[small] building") == 1
