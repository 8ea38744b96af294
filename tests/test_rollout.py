"""rollout.py: the sync source is generate + judge; streamed groups are what one call draws and are judged
while the others generate; the async worker samples batch t+1 with the weights before update t,
returns the trainer's log-probs of them, resumes exactly through a checkpoint, dies with its trainer and
ignores the trainer's signals; dynamic sampling keeps the groups a hand-run keeps, refills, resumes, and
2 ranks keep what 1 rank keeps."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
from rlvr import checkpoint, config, model, rl_config, rollout, rollout_stream
import rollout_worker as W

ROOT = Path(__file__).resolve().parents[1]
RECORDS = W.records()


@pytest.fixture(scope="session")
def policy_dir(tiny_model_dir, tmp_path_factory):
    """The tiny random model with its (tied) embeddings x3: logits peaked enough that the stand-in
    update (W.update) changes ~20% of the sampled tokens, so sampling with the wrong weights shows."""
    out = tmp_path_factory.mktemp("policy")
    lm = model.load_model(tiny_model_dir)
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(3.0)
    lm.save_pretrained(out)
    model.load_tokenizer(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def uneven_dir(policy_dir, tmp_path_factory):
    """policy_dir whose generation config biases the end-of-sequence token: responses end at different steps."""
    out = tmp_path_factory.mktemp("uneven")
    shutil.copytree(policy_dir, out, dirs_exist_ok=True)
    gen = json.loads((out / "generation_config.json").read_text())
    gen["sequence_bias"] = [[[gen["eos_token_id"]], 4.5]]
    (out / "generation_config.json").write_text(json.dumps(gen))
    return str(out)


def opts(**kw) -> rl_config.Config:
    return rl_config.Config(**{**dict(seed=1, steps=4, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6),
                               **kw})


def same_batch(a, b):
    (ra, ja, la, _), (rb, jb, lb, _) = a, b
    assert ra.seeds == rb.seeds and ra.responses == rb.responses and ra.texts == rb.texts
    assert ra.truncated == rb.truncated and [r.id for r in ra.records] == [r.id for r in rb.records]
    assert torch.equal(ja.soft, jb.soft) and torch.equal(la["rule:substring"].soft, lb["rule:substring"].soft)


def trainer_logprobs(policy, ro, temperature):
    """What train_rl computes for the same responses: packed rows through model.token_logprobs."""
    seqs = [p + r for p, r in zip(ro.prompts, ro.responses)]
    targets = [[False] * len(p) + [True] * len(r) for p, r in zip(ro.prompts, ro.responses)]
    ids, pos, att, tmask = model.rows(seqs, targets, True, 0, "cpu")
    with torch.no_grad():
        return model.token_logprobs(policy, ids, pos, tmask, att, temperature)[0][tmask]


def test_sync_source_is_generate_then_judge(policy_dir):
    cfg = opts()
    policy, tok = model.load_model(policy_dir), model.load_tokenizer(policy_dir)
    src = W.source(cfg, policy_dir, policy, W.ParityVerifier())
    sampler = data.PromptSampler(len(RECORDS), cfg.prompts_per_step, cfg.seed)
    parity, substring = W.ParityVerifier(), src.logged["rule:substring"]
    for step in range(2):
        got = src.next(step)
        ro = rollout.generate(policy, None, tok, [RECORDS[i] for i in sampler.next()], step, cfg)
        judged = {"rule:substring": rollout.judge(substring, ro, step, cfg)}
        same_batch(got, (ro, rollout.judge(parity, ro, step, cfg), judged, {}))
        assert got[0].behaviour_logp is None and got[0].staleness == 0 and got[3]["rollout/staleness"] == 0
        W.update(policy, step)
    assert src.state_dict() == {"sampler": sampler.state_dict(), "pending": None}
    src.close()


class TimedTokenizer:
    """The tokenizer, noting when each group of responses is decoded (when it is handed over)."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def batch_decode(self, *args, **kwargs):
        self.decoded.append(time.perf_counter())
        return self.tok.batch_decode(*args, **kwargs)


def test_streamed_groups_are_what_one_call_draws_and_are_judged_while_others_generate(uneven_dir):
    policy, tok = model.load_model(uneven_dir), model.load_tokenizer(uneven_dir)
    # per-sample seeds: groups generated apart draw what they draw together (the source's ranks and rounds)
    prompts = [p for p in data.tokenize_prompts(tok, RECORDS[:4], 1024) for _ in range(3)]
    seeds = [rollout.sample_seed(0, 0, i) for i in range(len(prompts))]
    whole, _ = model.generate(policy, tok, prompts, 8, 1.0, 1.0, seeds)
    apart = [model.generate(policy, tok, prompts[a:a + 3], 8, 1.0, 1.0, seeds[a:a + 3])[0] for a in range(0, 12, 3)]
    assert whole == [r for part in apart for r in part]
    # handed over group by group as each ends, with the behaviour log-probs recorded so far: what the whole
    # batch handed over at the end has
    by_group, at_end = {}, {}
    for group, out in ((3, by_group), (12, at_end)):
        rollout_stream.sample_groups(policy, tok, prompts, seeds, opts(max_new_tokens=8), group,
                                     lambda first, *rows, out=out: out.update({first: rows}), record=True)
    assert [r for f in sorted(by_group) for r in by_group[f][0]] == at_end[0][0] == whole
    assert torch.equal(torch.cat([x for f in sorted(by_group) for x in by_group[f][2]]), torch.cat(at_end[0][2]))

    cfg = opts(max_new_tokens=24, prompts_per_step=6, samples_per_prompt=3)
    plain = W.source(cfg, uneven_dir, policy, W.ParityVerifier())
    verifier, timed = W.ParityVerifier(), TimedTokenizer(tok)
    streamed = rollout.RolloutSource(dataclasses.replace(cfg, stream_judging=True), policy, timed, RECORDS,
                                     data.PromptSampler(len(RECORDS), 6, 1), verifier,
                                     {"rule:substring": plain.logged["rule:substring"]})
    want, got = plain.next(0), streamed.next(0)
    same_batch(want, got)
    assert len(verifier.calls) == len(timed.decoded) == 6  # one judgement per group, as it is handed over
    assert all(t != "MainThread" for t in verifier.threads)
    ended = [not any(got[0].truncated[g * 3:g * 3 + 3]) for g in range(6)]
    assert any(ended) and not all(ended), "need groups that end early and groups cut at max_new_tokens"
    assert verifier.calls[0] < timed.decoded[-1]  # a group was judged before generation was over
    plain.close()
    streamed.close()


def test_async_samples_with_the_weights_before_the_previous_update(policy_dir):
    # stream_judging: the worker returns each group as it ends; temperature 0.7 must reach its log-probs
    cfg = opts(async_steps=1, steps=6, stream_judging=True, temperature=0.7)
    policy, verifier = model.load_model(policy_dir), W.ParityVerifier()
    src = W.source(cfg, policy_dir, policy, verifier)
    weights, got = [], []
    for step in range(4):
        weights.append({k: v.clone() for k, v in policy.state_dict().items()})  # what next(step) sees
        got.append(src.next(step))
        W.update(policy, step)
        deadline = time.time() + 60  # a long "update": batch step+1 is generated and judged meanwhile
        while not src.inflight[1].done() and time.time() < deadline:
            time.sleep(0.05)
    assert len(verifier.threads) == 5 * 4 and "MainThread" not in verifier.threads  # batches 0-4, group by group
    # the reference: a sync source whose policy holds the weights each batch should have been sampled with
    sync_cfg = opts(steps=6, stream_judging=True, temperature=0.7)
    stale, fresh = model.load_model(policy_dir), model.load_model(policy_dir)
    ref_stale, ref_fresh = (W.source(sync_cfg, policy_dir, p, W.ParityVerifier()) for p in (stale, fresh))
    differs = []
    for step, batch in enumerate(got):
        ro, info = batch[0], batch[3]
        assert ro.staleness == info["rollout/staleness"] == min(step, 1)
        stale.load_state_dict(weights[max(0, step - 1)])
        same_batch(batch, ref_stale.next(step))
        gap = (ro.behaviour_logp - trainer_logprobs(stale, ro, cfg.temperature)).abs().max().item()
        assert gap < 1e-5, f"step {step}: behaviour log-probs differ from the trainer's by {gap}"
        fresh.load_state_dict(weights[step])
        differs.append(ro.responses != ref_fresh.next(step)[0].responses)
    assert any(differs[1:])  # the current weights would have drawn other responses: staleness shows
    # a worker that dies is an error naming it, not a hang: batch 4 is done; batch 5 is asked of a dead worker
    os.kill(src.worker.process.pid, signal.SIGKILL)
    src.next(4)
    with pytest.raises(RuntimeError, match=r"rollout worker of rank 0 \(pid \d+, cpu\) died \(signal SIGKILL\)"):
        src.next(5)
    src.close()
    ref_stale.close()
    ref_fresh.close()


def run_steps(src, policy, steps):
    out = []
    for step in steps:
        out.append(W.batch_json(*src.next(step)))
        W.update(policy, step)
    return out


def test_async_resume_through_a_checkpoint_equals_the_uninterrupted_run(policy_dir, tmp_path):
    cfg = opts(async_steps=1, filter_groups=True, max_filter_rounds=2, stream_judging=True)
    policy = model.load_model(policy_dir)
    src = W.source(cfg, policy_dir, policy, W.ParityVerifier())
    straight = run_steps(src, policy, range(4))
    src.close()

    policy = model.load_model(policy_dir)
    optimizer = torch.optim.AdamW(policy.parameters())
    src = W.source(cfg, policy_dir, policy, W.ParityVerifier())
    resumed = run_steps(src, policy, range(2))
    # the checkpoint after step 2 carries batch 3, sampled (and filtered) with the weights before update 2
    checkpoint.save_checkpoint(str(tmp_path), 2, policy, optimizer, extra={"rollout": src.state_dict()})
    src.close()
    policy = model.load_model(policy_dir)  # the weights of policy_dir, until the checkpoint loads
    state = checkpoint.load_checkpoint(str(tmp_path), policy, torch.optim.AdamW(policy.parameters()))
    src = W.source(cfg, policy_dir, policy, W.ParityVerifier())
    src.load_state_dict(state["rollout"])
    resumed += run_steps(src, policy, range(2, 4))
    src.close()
    assert resumed == straight
    assert [b["staleness"] for b in straight] == [0, 1, 1, 1]
    assert any(b["info"]["rollout/filter_rounds"] > 0 for b in straight)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # an orphan nobody reaps is a zombie: dead
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def start_trainer(policy_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "rollout_worker.py"), "orphan", policy_dir],
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("WORKER "):
            return proc, int(line.split()[1])
    raise AssertionError(f"the trainer exited ({proc.wait()}) before starting its worker")


def test_the_worker_ignores_the_trainers_signals_and_dies_with_it(policy_dir):
    # SIGTERM to the whole process group (what a scheduler sends): the trainer stops after its step and
    # checkpoint; the worker keeps generating the batch that checkpoint needs; at exit it is stopped, even
    # by a trainer that forgot close()
    proc, worker = start_trainer(policy_dir)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    done = json.loads(out.split("DONE ", 1)[1])
    assert done["signal"] == signal.SIGTERM and len(done["seeds"]) == 4
    assert not alive(worker)
    # a trainer killed outright runs no clean-up: the worker notices and exits by itself
    proc, worker = start_trainer(policy_dir)
    proc.kill()
    proc.wait()
    deadline = time.time() + 300  # a hang detector: the worker polls its parent, which a busy machine delays
    while alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(worker)


def test_dynamic_sampling_keeps_what_a_hand_run_keeps_refills_and_resumes(policy_dir):
    cfg = opts(filter_groups=True, max_filter_rounds=3)
    policy, tok = model.load_model(policy_dir), model.load_tokenizer(policy_dir)
    src = W.source(cfg, policy_dir, policy, W.ParityVerifier())
    ro, judged, _, info = src.next(0)
    # by hand: rounds of 4 prompts x 2 samples, named by the global slots after the previous round's
    sampler, kept, dropped, P, n = data.PromptSampler(len(RECORDS), 4, 1), [], [], 4, 2
    for number in range(cfg.max_filter_rounds + 1):
        prompts = [p for p in data.tokenize_prompts(tok, [RECORDS[i] for i in sampler.next()], 1024) for _ in range(n)]
        seeds = [rollout.sample_seed(1, 0, number * P * n + i) for i in range(P * n)]
        responses, _ = model.generate(policy, tok, prompts, cfg.max_new_tokens, 1.0, 1.0, seeds)
        odd = [len(t) % 2 for t in tok.batch_decode(responses, skip_special_tokens=True)]
        for g in range(P):
            group = (number, seeds[g * n:g * n + n], odd[g * n:g * n + n])
            (kept if odd[g * n] != odd[g * n + 1] else dropped).append(group)
        if len(kept) >= P:
            break
    assert number >= 1, "round 0 kept every group: pick a seed that exercises a refill"
    assert ro.seeds == [s for _, seeds, _ in kept[:P] for s in seeds]
    assert judged.soft.tolist() == [float(x) for _, _, odd in kept[:P] for x in odd]
    assert info["rollout/filter_rounds"] == number and info["rollout/groups_padded"] == 0
    assert info["rollout/groups_kept_frac"] == len(kept) / ((number + 1) * P)
    # the sampler's position (past the refill rounds) resumes exactly
    state = src.state_dict()
    assert state["sampler"] == sampler.state_dict() and state["pending"] is None
    resumed = W.source(cfg, policy_dir, policy, W.ParityVerifier())
    resumed.load_state_dict(state)
    same_batch(src.next(1), resumed.next(1))
    # no refill allowed: round 0's kept groups, then its dropped ones fill the batch
    short = W.source(opts(filter_groups=True, max_filter_rounds=0), policy_dir, policy, W.ParityVerifier())
    ro, _, _, info = short.next(0)
    keep0, drop0 = ([g for g in groups if g[0] == 0] for groups in (kept, dropped))
    assert ro.seeds == [s for _, seeds, _ in keep0 + drop0 for s in seeds]
    assert info["rollout/groups_padded"] == len(drop0) > 0 and info["rollout/filter_rounds"] == 0
    for s in (src, resumed, short):
        s.close()


def test_two_ranks_keep_and_sample_what_one_rank_does_and_resume_on_one(policy_dir, tmp_path):
    # async + streaming + dynamic sampling, the policy FSDP-sharded over 2 ranks (gloo): the worker of each
    # rank gets the gathered weights. The 2-rank run stops after step 2; its checkpoint (with batch 3, from
    # both ranks) resumes on 1 rank.
    options = json.dumps(dict(seed=1, steps=4, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6,
                              async_steps=1, stream_judging=True, filter_groups=True, max_filter_rounds=2))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script, ckpt = str(ROOT / "tests" / "rollout_worker.py"), str(tmp_path / "ckpt")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, launcher, steps in (("one", [sys.executable], "0:4"), ("two", torchrun, "0:2"),
                                  ("resumed", [sys.executable], "2:4")):
        out = subprocess.run([*launcher, script, "batches", policy_dir, str(tmp_path / name), options, steps, ckpt],
                             capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    one, two, resumed = (json.loads((tmp_path / name).read_text()) for name in ("one", "two", "resumed"))
    # Seeds, sampled tokens, rewards and counts are discrete: equal exactly. Behaviour log-probs are float32
    # forwards over other batch shapes (each rank runs half the rows), so BLAS sums in another order: they
    # agree to a few hundred ulps of the log-softmax (measured 1.4e-6), never exactly. 1e-4 is ~800 float32
    # eps, far below what one stand-in update moves a log-prob (> 1e-2).
    def discrete(b):
        return {k: v for k, v in b.items() if k != "logp"}
    assert [discrete(b) for b in two + resumed] == [discrete(b) for b in one]
    for got, want in zip(two + resumed, one):
        assert (got["logp"] is None) == (want["logp"] is None)
        if want["logp"] is not None:
            torch.testing.assert_close(torch.tensor(got["logp"]), torch.tensor(want["logp"]), atol=1e-4, rtol=0)
    assert [b["staleness"] for b in one] == [0, 1, 1, 1] and any(b["info"]["rollout/filter_rounds"] for b in one)


@pytest.mark.parametrize("fields, message", [
    (dict(async_steps=2), "--async_steps 2: must be 0 (on-policy) or 1"),
    (dict(async_steps=1, rollout_engine="vllm"), "--async_steps 1: is for --rollout_engine hf"),
    (dict(filter_groups=True, samples_per_prompt=1), "--filter_groups True: needs --samples_per_prompt >= 2"),
    (dict(rollout_device="cuda:1"), "--rollout_device 'cuda:1': is where the --async_steps 1 worker generates"),
    (dict(rollout_device="gpu"), "--rollout_device 'gpu'"),
])
def test_bad_options_name_their_flag(fields, message):
    with pytest.raises(config.ConfigError) as e:
        rollout.check(rl_config.Config(**fields))
    assert message in str(e.value)


def test_the_rollout_settings_are_the_trainer_configs_fields():
    # one source of truth: the rollout code reads its settings from rl_config.Config by name (cfg.<field>,
    # self.cfg.<field>), and no dataclass of the rollout code declares a setting (a field with a default)
    # under a Config field's name, as RolloutOptions once repeated 15 of them
    import ast

    fields, read, repeated = set(rl_config.Config.__dataclass_fields__), {}, []
    for path in sorted(ROOT.glob("rlvr/rollout*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            owner = getattr(node, "value", None)
            if isinstance(node, ast.Attribute) and (isinstance(owner, ast.Name) and owner.id == "cfg" or
                                                    isinstance(owner, ast.Attribute) and owner.attr == "cfg"):
                read.setdefault(node.attr, f"{path.name}:{node.lineno}")
            if isinstance(node, ast.ClassDef):
                repeated += [f"{path.name}: {node.name}.{x.target.id}" for x in node.body if isinstance(x, ast.AnnAssign)
                             and x.value is not None and isinstance(x.target, ast.Name) and x.target.id in fields]
    assert {name: at for name, at in read.items() if name not in fields} == {}
    assert repeated == []
    # the walk sees every feature's settings (it would pass vacuously if it saw none)
    assert {"seed", "prompts_per_step", "samples_per_prompt", "max_prompt_len", "max_new_tokens", "temperature",
            "top_p", "reward_type", "rollout_engine", "async_steps", "rollout_device", "stream_judging",
            "filter_groups", "max_filter_rounds", "steps", "trust_remote_code"} <= set(read)
