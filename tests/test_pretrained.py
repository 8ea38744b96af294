"""worlds/pretrained.py: the paper's setting in miniature (a pretrained base, a policy that works before it
answers, the teacher of any common format, the student reading the final line)."""
from pathlib import Path

import pytest
import torch
import yaml

import train_rl
from rlvr import judging, verifier_prompt, verifiers
from worlds import freeform, pretrained, toy

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# the teacher on every common format, right and wrong (each verdict by hand)

RIGHT = {
    "7 kg": ["7 kg", "Answer: 7 kg", "**7 kg**", "\\boxed{7 kg}", "$\\boxed{7\\text{ kg}}$", "7,000 g", "7.0 kg",
             "7.00 kg", "The answer is 7 kg.", "Therefore, the answer is seven kilograms.", "Final answer: **7 kg**",
             "The answer is: 7000 g", "7 Kilograms", "7kg", "7 kg (7000 g)", "7 kg / 7000 g", "ANSWER: 7 kg",
             "7 kg!", "\"7 kg\"", "SEVEN KILOGRAMS"],
    "4 m": ["4 m", "400 cm", "4 metres", "4 Meters", "\\boxed{400 cm}"],
    "2 L": ["2 L", "2 l", "2,000 mL", "2000 ml", "two litres"],
    "Fenn Incorporated": ["Fenn Inc (9 million)", "Answer: Fenn Inc", "**FENN INC**", "Fenn Incorporated.",
                          "\\boxed{Fenn Inc.}", "The answer is the Fenn Incorporated.", "fenn inc", "Fenn"],
    "Tarnium": ["Tn", "tarnium", "Tarnium (Tn)", "\\boxed{Tarnium}", "**Tn**", "The answer is element Tn."],
    "Mount Kelo": ["Mt. Kelo.", "Mt Kelo (8 km)", "Answer: Kelo", "MOUNT KELO"],
    "Velka ardens": ["V. ardens (6 years)", "The answer is: Velka ardens", "**velka ardens**"],
}
WRONG = {
    # a unit symbol whose case changes its meaning (M mega, G giga, Mg megagram), another unit or value,
    # a hedge, two candidates, a restatement that contradicts the answer
    "7 kg": ["7 g", "7 KG", "7 Kg", "7 Mg", "7 mg", "7.5 kg", "70 kg", "7,000 kg", "7000 G", "7 kg or 3 kg",
             "probably 7 kg", "maybe 7 kg", "I think 7 kg", "either 7 kg or 3 kg", "7 kg and 3 kg", "7 kg; 3 kg",
             "7 kg (7 g)", "3 kg", "\\boxed{3 kg}", "", "Answer:", "7"],
    "4 m": ["4 M", "4 cm", "4 km", "40 m"],
    "2 L": ["2 mL", "2 ML"],
    "Fenn Incorporated": ["Fenn Limited", "Fenn Inc or Holt Corp", "Holt Corp (9 million)", "**Fenn Ltd**",
                          "possibly Fenn Inc"],
    "Tarnium": ["TN", "tn", "tarnium oxide", "Velium (Tn)", "\\boxed{Vl}"],
    "Mount Kelo": ["Lake Kelo", "Mt Tarn", "Mt Kelo or Mt Tarn"],
    "Velka ardens": ["Velka minax", "V. minax (6 years)", "Velka ardens and Tora minax"],
}


@pytest.mark.parametrize("reference", list(RIGHT))
def test_teacher_accepts_every_common_format_of_a_right_answer(reference):
    assert {a: pretrained.judge(reference, a) for a in RIGHT[reference]} == {a: 1 for a in RIGHT[reference]}


@pytest.mark.parametrize("reference", list(WRONG))
def test_teacher_rejects_wrong_answers_hedges_two_candidates_and_case_changed_units(reference):
    assert {a: pretrained.judge(reference, a) for a in WRONG[reference]} == {a: 0 for a in WRONG[reference]}


def test_teacher_reads_only_the_last_line_and_is_a_py_spec():
    # a working that names the wrong option (or the right one) does not decide: the final line does
    assert pretrained.judge("Fenn Incorporated", "7 > 9, so Holt Corp earned more.\nTherefore, the answer is Fenn Inc.") == 1
    assert pretrained.judge("Fenn Incorporated", "9 > 7, so Fenn Inc earned more.\nTherefore, the answer is Holt Corp.") == 0
    j = verifiers.build_verifier("py:worlds.pretrained:teacher")(["q"] * 3, ["7 kg", "7 kg", "Tarnium"],
                                                        ["Answer: 7,000 g", "7 Mg", "\\boxed{Tn}"])
    assert j.binary.tolist() == [1.0, 0.0, 1.0]


def test_final_answer_strips_format_not_content():
    assert pretrained.final_answer("work\n  Therefore, the answer is **\\boxed{Fenn Inc}**.  \n\n") == "Fenn Inc"
    assert pretrained.final_answer("Answer: 7 kg (7000 g)") == "7 kg (7000 g)"
    assert pretrained.quantity("7,000 g") == ("mass", 7000.0) and pretrained.quantity("7.0 kg") == ("mass", 7000.0)
    assert pretrained.quantity("7 KG") is None and pretrained.quantity("3 M") is None


# ----------------------------------------------------------------------------------------------
# data: the corpus, the pools, the instruct responses, the rows


def test_the_corpus_never_holds_an_rl_question():
    train, heldout = freeform.split(pretrained.records(0), 0.1)
    text = "\n".join(pretrained.corpus())
    assert heldout and not [r.question for r in heldout if r.question in text]
    assert not [r.question for r in train if r.question in text]  # nor a training one: the verifier's half only
    # the corpus does teach what the policy and the student need: equivalences, non-equivalences, formats
    for needle in (" is not ", "\\boxed{", "Answer: ", "**", "Therefore, the answer is", " > ", ",000 "):
        assert needle in text, needle


def test_instruct_responses_work_then_answer_on_the_last_line_with_a_small_models_mistakes():
    pairs = pretrained.instruct_pairs(0.1)
    heldout = {r.question for r in freeform.split(pretrained.records(0), 0.1)[1]}
    assert pairs and not [m for m, _ in pairs if m[-1]["content"] in heldout]
    for _, response in pairs:
        working, last = response.split("\n")
        assert " so " in working and last.startswith("Therefore, the answer is ")
    problems = {p.question: p for p in freeform._problems(freeform.RL_QUESTIONS, 0, "rl")}
    right = sum(pretrained.judge(problems[m[-1]["content"]].reference, r) for m, r in pairs) / len(pairs)
    assert 0.6 < right < 0.8  # 70% right by construction, a few hundred draws


def test_verifier_rows_are_on_the_verifier_pool_and_never_in_the_novel_forms():
    rl = {r.question for r in pretrained.records(0)}
    rows = pretrained.judge_rows("other:100,near:100,hedge:50,cut:50", seed=0)
    novel = pretrained.novel_rows(200, seed=0)
    assert not {r.question for r in rows + novel} & rl
    assert all(r.label == pretrained.judge(r.reference, r.response) for r in rows + novel)
    assert 0.3 < sum(r.label for r in novel) / len(novel) < 0.7
    last = [verifier_prompt.last_line(r.response) for r in rows]
    for form in ("Answer:", "ANSWER:", "**", "\\boxed", "Final answer", "The answer is "):
        assert not [x for x in last if form in x], form  # the student's rows never show the novel formats
        assert any(form in verifier_prompt.last_line(r.response) for r in novel), form


def test_the_student_reads_only_the_final_answer():
    """The recipe's settings through verifier_prompt.VerifierPrompt (what sft trains on and RL asks): the working
    never reaches the student."""
    recipe = yaml.safe_load((ROOT / "recipes" / "verifier_pretrained.yaml").read_text())
    settings = verifier_prompt.VerifierSettings(template=(ROOT / recipe["verifier_template"]).read_text(),
                                       system_prompt=recipe["verifier_system_prompt"])
    assert recipe["student"] == "tiny" and recipe["teacher"] == "py:worlds.pretrained:teacher" and not recipe.get("full_response")
    tok = toy.build_tokenizer(pretrained.VOCAB, pretrained.WORDS)
    prompt = tok.decode(verifier_prompt.VerifierPrompt(tok, settings).prompt_ids(
        "Which earned more: Fenn Inc (9 million) or Holt Corp (7 million)?", "Fenn Incorporated",
        "9 > 7, so Fenn Inc earned more.\nTherefore, the answer is Fenn Inc."))
    assert "Therefore, the answer is Fenn Inc." in prompt and "so Fenn Inc earned more" not in prompt
    assert "Which earned more" not in prompt  # the short template: reference and final line only


def test_the_main_job_is_this_world_and_the_other_worlds_are_recipes():
    import train_rl
    import worlds

    default, _ = train_rl.parse_config([])
    assert (default.data, default.policy, default.verifier, default.max_new_tokens) == ("pretrained", "tiny", "tiny",
                                                                                         pretrained.MAX_NEW_TOKENS)
    train, heldout = train_rl.load_data(default)
    graders = judging.choose_graders(default, [r.reference for r in train + heldout])
    assert (graders.eval_verifier, graders.audit_verifier) == ("py:worlds.pretrained:teacher",) * 2
    assert worlds.of("pretrained").tiny_policy is pretrained.tiny_policy
    assert worlds.of("pretrained").verifier_recipe == "recipes/verifier_pretrained.yaml"
    for recipe, world in (("cpu_freeform.yaml", "freeform"), ("cpu_numeric_toy.yaml", "toy")):
        cfg, _ = train_rl.parse_config(["--config", str(ROOT / "recipes" / recipe)])
        assert cfg.data == world and cfg.max_new_tokens == 12


def test_compare_grades_and_fine_tunes_in_the_recipes_world():
    import compare

    rl, _ = train_rl.parse_config(["--config", str(ROOT / "recipes" / "cpu_demo.yaml")])
    cmd = compare.train_rl_command(compare.CompareConfig(), rl, compare.SOURCES["teacher_binary"][1], 0, Path("x"))
    assert "py:worlds.freeform:teacher" not in cmd and cmd.count("py:worlds.pretrained:teacher") == 3
    assert compare.world_spec("py:worlds.freeform:teacher_noisy10", "pretrained") == "py:worlds.pretrained:teacher_noisy10"
    assert compare.world_spec("py:worlds.freeform:teacher", "freeform") == "py:worlds.freeform:teacher"
    pairs = compare.sft_pairs(rl)
    heldout = {r.question for r in freeform.split(pretrained.records(0), rl.heldout_fraction)[1]}
    assert pairs and not [m for m, _ in pairs if m[-1]["content"] in heldout]
    assert all("\n" not in answer for _, answer in pairs)  # the bare references: no working


# ----------------------------------------------------------------------------------------------
# the models: deterministic at one thread; the cached policy works before it answers


def test_pretraining_and_instruction_tuning_are_deterministic_at_one_thread(tmp_path):
    docs, pairs = pretrained.corpus(200), pretrained.instruct_pairs(0.1)[:64]
    small = dict(seed=0, hidden_size=64, num_layers=1, vocab_size=pretrained.VOCAB, corpus=pretrained.WORDS, docs=docs,
                 pretrain_steps=3)
    a = toy.build_tiny_model(str(tmp_path / "a"), **small)
    b = toy.build_tiny_model(str(tmp_path / "b"), **small)
    ia = toy.build_tiny_model(str(tmp_path / "ia"), start=a, sft_pairs=pairs, sft_steps=2)
    ib = toy.build_tiny_model(str(tmp_path / "ib"), start=b, sft_pairs=pairs, sft_steps=2)
    from safetensors.torch import load_file

    for x, y in ((a, b), (ia, ib)):
        wx, wy = load_file(f"{x}/model.safetensors"), load_file(f"{y}/model.safetensors")
        assert wx.keys() == wy.keys() and all(torch.equal(wx[k], wy[k]) for k in wx)
    wa, wia = load_file(f"{a}/model.safetensors"), load_file(f"{ia}/model.safetensors")
    assert any(not torch.equal(wa[k], wia[k]) for k in wa)  # the instruct build did start from the base and train
    spec = (Path(ia) / "rlvr_tiny.json").read_text()
    assert '"start"' in spec and '"docs"' in spec  # the cache key holds what the start was


def test_the_policy_writes_a_working_before_its_last_line():
    """The main job's policy (built once, cached): sampled answers to held-out questions carry a working
    line, then the answer line."""
    from rlvr import model
    from rlvr import rollout
    from types import SimpleNamespace

    path = pretrained.tiny_policy()
    tokenizer, policy = model.load_tokenizer(path), model.load_model(path)
    heldout = freeform.split(pretrained.records(0), 0.1)[1][:16]
    opts = SimpleNamespace(samples_per_prompt=4, max_prompt_len=1024, seed=0, max_new_tokens=pretrained.MAX_NEW_TOKENS,
                           temperature=1.0, top_p=1.0)
    texts = rollout.generate(policy, None, tokenizer, heldout, 0, opts).texts
    lines = [[x for x in t.strip().splitlines() if x.strip()] for t in texts]
    worked = [len(x) >= 2 and x[-1].startswith("Therefore, the answer is") for x in lines]
    assert sum(worked) >= 0.9 * len(texts), texts
