"""Helpers and processes for tests/test_rollout.py.

    python tests/rollout_worker.py orphan MODEL_DIR
        a trainer with an async rollout worker: prints "WORKER <pid>", then waits for SIGTERM/SIGINT
        (checkpoint.StopSignal, as train_rl.py), then runs one more step and saves the source's state,
        prints "DONE <json>" (the signal and that step's seeds) and exits without closing the source
    [torchrun --nproc_per_node 2] tests/rollout_worker.py batches MODEL_DIR OUT.json OPTIONS_JSON A:B CKPT
        steps A..B-1 of the rollout source of rl_config.Config(**OPTIONS_JSON), the policy FSDP-sharded
        under torchrun, a stand-in update after every step; resumes from the checkpoint CKPT when A > 0, saves
        one there when B < steps; rank 0 writes every step's global batch to OUT.json
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import reward  # noqa: E402
from rlvr import checkpoint, distributed, model, rl_config, rollout, rollout_async, verifiers  # noqa: E402
from worlds import toy  # noqa: E402


class ParityVerifier:
    """Reward 1 for a response text of odd length: deterministic, and it varies within groups."""
    name = "parity"

    def __init__(self):
        self.threads: list[str] = []   # the thread of each call
        self.calls: list[float] = []   # when each call started

    def __call__(self, questions, references, responses, seeds=None):
        import threading

        self.threads.append(threading.current_thread().name)
        self.calls.append(time.perf_counter())
        s = torch.tensor([float(len(t) % 2) for t in responses])
        return reward.Judgement(s, s.clone(), s.clone(), torch.ones(len(s), dtype=torch.bool))


def records() -> list:
    return toy.records(60, seed=0)


def update(policy, step: int) -> None:
    """The stand-in for update `step`: each weight moves by a function of its own value, so a sharded
    policy moves exactly as a whole one; ~20% of the sampled tokens change after each."""
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.sin(p * 1000 + step))


def source(cfg, model_dir, policy, verifier, sampler=None):
    tok = model.load_tokenizer(model_dir)
    sampler = sampler or data.PromptSampler(len(records()), cfg.prompts_per_step, cfg.seed, distributed.rank(),
                                            distributed.world_size())
    common = (cfg, policy, tok, records(), sampler, verifier, {"rule:substring": verifiers.build_verifier("rule:substring")})
    return rollout_async.AsyncSource(*common, model_dir) if cfg.async_steps else rollout.RolloutSource(*common)


def batch_json(ro, judged, logged, info) -> dict:
    """This rank's batch as JSON values."""
    return {"seeds": ro.seeds, "responses": ro.responses, "reward": judged.soft.tolist(),
            "logged": logged["rule:substring"].soft.tolist(), "staleness": ro.staleness,
            "logp": None if ro.behaviour_logp is None else ro.behaviour_logp.tolist(),
            "info": {k: v for k, v in info.items() if not k.startswith("time/")}}


def orphan(model_dir: str) -> None:
    cfg = rl_config.Config(seed=1, steps=4, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, async_steps=1)
    src = source(cfg, model_dir, model.load_model(model_dir), ParityVerifier())
    src.next(0)  # the worker now generates step 1's batch
    stop = checkpoint.StopSignal()  # before the parent learns it may signal us
    print(f"WORKER {src.worker.process.pid}", flush=True)
    deadline = time.time() + 120
    while stop.received is None and time.time() < deadline:
        time.sleep(0.05)
    ro, *_ = src.next(1)  # the worker ignored the signal: its batch is there
    src.state_dict()
    # no src.close(): rollout's exit handler must stop the worker before multiprocessing's would wait for it
    print("DONE " + json.dumps({"signal": stop.received, "seeds": ro.seeds}), flush=True)


def batches(model_dir: str, out: str, options: str, span: str, ckpt: str) -> None:
    distributed.init()
    cfg = rl_config.Config(**json.loads(options))
    first, last = map(int, span.split(":"))
    policy = model.shard_model(model.load_model(model_dir), mixed_precision=False)
    optimizer = torch.optim.AdamW(policy.parameters())  # never steps: the checkpoint needs one
    src = source(cfg, model_dir, policy, ParityVerifier())
    if first:
        src.load_state_dict(checkpoint.load_checkpoint(ckpt, policy, optimizer)["rollout"])
    steps = []
    for step in range(first, last):
        part = batch_json(*src.next(step))
        update(policy, step)
        parts = distributed.gather_objects(part)
        steps.append({k: [x for p in parts for x in p[k]] if isinstance(part[k], list) else part[k] for k in part})
    if last < cfg.steps:
        checkpoint.save_checkpoint(ckpt, last, policy, optimizer, extra={"rollout": src.state_dict()})
    src.close()
    if distributed.rank() == 0:
        with open(out, "w") as f:
            json.dump(steps, f)
    distributed.shutdown()


if __name__ == "__main__":
    {"orphan": orphan, "batches": batches}[sys.argv[1]](*sys.argv[2:])
