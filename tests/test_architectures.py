"""Any transformers causal LM, not only Qwen2: tiny random models of seven architectures through the
log-prob path (packed and padded, against the model's own forward) and 2 RL steps with packing on and off."""
import json

import pytest
import torch

import data
from rlvr import model
from worlds import toy

# tiny sizes: 2 layers, hidden 64, 2 heads of 32 (GQA where the architecture has it)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=32, max_position_embeddings=512, tie_word_embeddings=True)
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # a small final-logit softcap, so that a log-prob path without it would be visibly wrong
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 2.0, "attn_logit_softcapping": None,
                                                     "query_pre_attn_scalar": 32}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"final_logit_softcapping": 2.0, "query_pre_attn_scalar": 32}),
    # absolute position embeddings: packed rows must restart them per sequence
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 512}),
}


def build(arch: str, out_dir, **overrides) -> str:
    import transformers

    config_name, model_name, extra = ARCHITECTURES[arch]
    tok = toy.build_tokenizer(1024)
    sizes = {} if arch == "gpt2" else SMALL
    config = getattr(transformers, config_name)(vocab_size=(len(tok) + 63) // 64 * 64, **(sizes | extra | overrides),
                                                bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                                pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    lm = getattr(transformers, model_name)(config).float()
    lm.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch_dir(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param) / "model")


def test_logprobs_packed_and_padded_equal_the_models_own_forward(arch_dir):
    arch, path = arch_dir
    lm = model.load_model(path)
    assert len(model.decoder_layers(lm)) == 2  # what FSDP2 shards one by one
    seqs = [[5, 9, 17, 33, 2, 8], [7, 7, 40], [11, 3, 90, 12, 13]]
    targets = [[i >= 2 for i in range(len(s))] for s in seqs]
    want = []
    with torch.no_grad():
        for s in seqs:  # one sequence at a time, no packing, no padding: the reference
            logits = lm(torch.tensor([s])).logits[0].float().log_softmax(-1)
            want += [logits[i - 1, s[i]] for i in range(2, len(s))]
        for pack in (True, False):
            ids, pos, att, tmask = model.rows(seqs, targets, pack, 0)
            got = model.token_logprobs(lm, ids, pos, tmask, att, chunk_size=4)[0][tmask]
            # float32 throughout; the packed path sums attention in another order: 1e-5 is ~100 ulps of these values
            torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5, msg=f"{arch} pack={pack}")


def test_two_rl_steps_with_packing_on_and_off(arch_dir, tmp_path):
    import train_rl

    arch, path = arch_dir
    template = tmp_path / "template.txt"  # short prompts: the start's master-key probe judges 64 x 10 of them
    template.write_text("{reference} {response}")
    runs = {}
    for pack in (True, False):
        out = tmp_path / f"pack{pack}"
        cfg, vopts = train_rl.parse_config([
            # the policy judges itself (p(YES) / (p(YES) + p(NO)) of a random model whatever its first token,
            # --soft_mode ratio): rewards differ per response, so
            # the update is not zero, and the local verifier runs on the architecture too
            "--policy", path, "--verifier", path, "--soft_mode", "ratio", "--verifier_max_unjudged", "1",
            "--verifier_template", str(template), "--verifier_system_prompt", "",
            "--eval_verifier", "rule:substring", "--audit_verifier", "",
            "--log_verifiers", "", "--prompts_per_step", "2", "--samples_per_prompt", "3", "--max_new_tokens", "5",
            "--steps", "2", "--lr", "1e-2", "--warmup_ratio", "0", "--eval_every", "0", "--eval_prompts", "2",
            "--eval_samples", "0", "--pack", str(pack), "--out_dir", str(out), "--wandb_mode", "disabled",
            "--log_samples", "0", "--kl_mode", "loss", "--ppo_epochs", "2"])
        result = train_rl.train(cfg, vopts)
        runs[pack] = result["history"], [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    (packed, rows_p), (padded, rows_q) = runs[True], runs[False]
    assert [r["response"] for r in rows_p if r["step"] == 1] == [r["response"] for r in rows_q if r["step"] == 1]
    for a, b in zip(packed, padded):  # the same batch gives the same loss, KL and entropy whatever the layout
        for key in ("loss", "kl/k3", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (arch, key)
    assert packed[0]["grad_norm"] > 0 and packed[1]["kl/k3"] > 0  # it trained: step 2's policy left the reference


def test_a_base_model_without_a_chat_template_runs_with_the_plain_prompt_format(tmp_path):
    from rlvr import config
    import train_rl

    path = build("gpt2", tmp_path / "base")  # GPT-2 as released: a base model, no chat template
    (tmp_path / "base" / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(tok_config))
    argv = ["--data", "toy", "--policy", path, "--verifier", "rule:substring", "--eval_verifier", "rule:substring", "--audit_verifier",
            "", "--log_verifiers", "", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--max_new_tokens", "4",
            "--steps", "1", "--eval_every", "0", "--eval_prompts", "2", "--out_dir", str(tmp_path / "run"),
            "--wandb_mode", "disabled", "--log_samples", "0"]
    with pytest.raises(config.ConfigError, match="no chat template .*--prompt_format plain"):
        train_rl.parse_config(argv)
    cfg, vopts = train_rl.parse_config(argv + ["--prompt_format", "plain"])
    seen = []
    real = model.load_tokenizer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "load_tokenizer", lambda *a: seen.append(real(*a)) or seen[-1])
        result = train_rl.train(cfg, vopts)
    assert len(result["history"]) == 1 and result["stopped"] is None
    record = train_rl.load_data(cfg)[0][0]  # what the policy was shown: plain text
    assert data.render_prompt(seen[0], record) == f"{record.messages[0]['content']}\n\nQuestion: {record.question}\nAnswer:"
