"""Worker for tests/test_vllm_engine.py, run in its own process with a Python that has vLLM:

    python tests/vllm_engine_worker.py MODEL_DIR OUT_DIR

An in-process vLLM engine creates a torch.distributed group and patches process-wide torch state, so
it runs here and not inside pytest. It samples from the tiny model A, then follows weight changes made
in memory: model B (A after a few optimizer steps of supervised training towards "7<|im_end|>", saved
to OUT_DIR/model_b for the parent to score), back to A, and B again from an FSDP2-sharded copy. Writes
OUT_DIR/runs.json: {name: {"responses", "truncated", "logprobs", "temperature", "seconds"}}, and the
prompts, seeds, eos ids and vocabulary size. The parent computes the trainer's log-probs itself.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAX_NEW_TOKENS = 16
QUESTIONS = ["What is 3 + 4?", "Which is larger, 2 or 9?", "What is 9 - 5?", "Name a colour."]
SAMPLES = 3  # per prompt, with distinct seeds


def main(model_dir: str, out_dir: str) -> None:
    from rlvr import model as M
    from worlds import toy
    from rlvr.vllm_engine import VLLMEngine

    tok = M.load_tokenizer(model_dir)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [tok.encode(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for c in chats]
    prompts = [p for p in prompts for _ in range(SAMPLES)]
    seeds = [hash((0, 0, i)) & 0x7FFFFFFFFFFF for i in range(len(prompts))]
    other_seeds = [hash((0, 1, i)) & 0x7FFFFFFFFFFF for i in range(len(prompts))]

    engine = VLLMEngine(model_dir, seed=0, max_model_len=256, dtype="float32")
    runs = {}

    def run(name, temperature, row_seeds):
        t = time.perf_counter()
        r, tr, lp = engine.generate(prompts, MAX_NEW_TOKENS, temperature, 1.0, row_seeds)
        runs[name] = {"responses": r, "truncated": tr, "logprobs": lp, "temperature": temperature,
                      "seconds": time.perf_counter() - t}

    run("a1", 1.0, seeds)
    run("a2", 1.0, seeds)
    run("a_other_seeds", 1.0, other_seeds)
    run("a_t07", 0.7, seeds)

    # model B: a few optimizer steps on the policy in memory, then pushed into the engine
    policy = M.load_model(model_dir)
    pairs = [(c, "7") for c in chats]
    toy.supervised_warm_start(policy, tok, pairs, steps=25, seed=0, batch_size=8, lr=3e-3)
    policy.save_pretrained(os.path.join(out_dir, "model_b"), safe_serialization=True)  # for the parent only
    t = time.perf_counter()
    engine.load_weights(policy)
    load_s = time.perf_counter() - t
    run("b", 0.7, seeds)

    # back to A: every parameter (tied embedding / lm_head included) and the prompt cache must follow
    engine.load_weights(M.load_model(model_dir))
    run("a3", 1.0, seeds)

    # B again, gathered from an FSDP2-sharded copy (the engine made a one-process group): DTensor path
    sharded = M.shard_model(M.load_model(os.path.join(out_dir, "model_b")), mixed_precision=False)
    dtensor = type(next(sharded.parameters())).__name__
    engine.load_weights(sharded)
    run("b_fsdp", 0.7, seeds)

    with open(os.path.join(out_dir, "runs.json"), "w") as f:
        json.dump({"prompts": prompts, "seeds": seeds, "eos": engine.eos, "vocab_size": policy.config.vocab_size,
                   "max_new_tokens": MAX_NEW_TOKENS, "startup_s": engine.startup_s, "load_weights_s": load_s,
                   "fsdp_param_type": dtensor, "runs": runs}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
