"""Who judges an RL run, besides the reward verifier's own flags: the graders chosen before any model
loads (a demo world's teacher, a math rule where the references are numbers, a refusal to grade
free-form answers with a rule), TRL reward functions tried on real rows and given the data set's
columns, the master-key probe before step 1, and the live audit of a step's rollouts. train_rl.py's
set-up calls these; the verifiers themselves are verifiers.py's. Imports audit, config, distributed,
reward_functions, rollout, rules and verifiers, and worlds (a demo world's teacher).
"""
from __future__ import annotations

import dataclasses

import reward
import worlds
from rlvr import audit, config, distributed, reward_functions, rollout, rules, verifiers


def choose_graders(cfg, references: list[str]):
    """The eval and audit judges, fixed before any model loads. 'auto' picks a demo world's teacher
    (worlds.py), else rule:math where the references are numbers, and otherwise refuses to grade
    free-form answers with a rule (eval) or turns the audit off, saying so. Any role given rule:math on
    data whose references are mostly not numbers is refused: it would score every correct answer 0 (and
    count every YES as a false positive)."""
    share = rules.math_reference_share(references)
    numeric = share >= 0.5
    say = print if distributed.rank() == 0 else (lambda *a, **k: None)
    why = f"{share:.0%} of --data {cfg.data}'s references are numbers or math"
    eval_spec, audit_spec = cfg.eval_verifier, cfg.audit_verifier
    if cfg.data in worlds.WORLDS:  # a demo world knows its truth: its teacher grades and audits
        teacher = worlds.WORLDS[cfg.data].teacher
        for flag, spec in (("eval", eval_spec), ("audit", audit_spec)):
            if spec == "auto":
                say(f"{flag}: by {teacher}, the --data {cfg.data} world's teacher (--{flag}_verifier auto)")
        eval_spec, audit_spec = (teacher if s == "auto" else s for s in (eval_spec, audit_spec))
    if eval_spec == "auto":
        config.require(numeric, "eval_verifier", "auto", f"{why}: free-form answers need a judge; pass "
                       "--eval_verifier <judge: a model dir or http://host:port>, or 'self' to let the reward "
                       "verifier grade its own policy")
        eval_spec = "rule:math"
        say(f"eval: graded by rule:math (--eval_verifier auto: {why})")
    if audit_spec == "auto":
        audit_spec = "rule:math" if numeric else ""
        say(f"audit: {'by rule:math' if numeric else 'off'} (--audit_verifier auto: {why}"
            + ("" if numeric else "; pass --audit_verifier <judge> to audit the reward verifier") + ")")
    if not numeric:
        roles = {"verifier": cfg.verifier, "eval_verifier": eval_spec, "audit_verifier": audit_spec,
                 "log_verifiers": cfg.log_verifiers}
        for flag, spec in roles.items():
            config.require("rule:math" not in spec.split(","), flag, spec,
                           f"{why}: rule:math scores every answer to a word 0; use a model judge or rule:substring")
    if audit_spec and not cfg.eval_only and (not cfg.audit_every or cfg.steps < cfg.audit_every):
        say(f"WARNING: audit: {audit_spec} never runs: it re-grades every --audit_every {cfg.audit_every} steps and "
            f"the run has --steps {cfg.steps}; lower --audit_every to audit it")
    if eval_spec == "self":
        say(f"eval: graded by the reward verifier itself ({cfg.verifier}, greedy): a policy that fools it scores well")
    return dataclasses.replace(cfg, eval_verifier=eval_spec, audit_verifier=audit_spec)


def check_reward_functions(cfg, records: list) -> None:
    """Every role's TRL reward functions (reward_functions.py) called on real rows of --data, before any
    model loads: a wrong signature, a missing column or a NaN is one line naming the flag."""
    conversational = cfg.data not in worlds.WORLDS and reward_functions.is_conversational(cfg.data, cfg.data_split,
                                                                                        cfg.prompt_field)
    for flag in ("verifier", "eval_verifier", "audit_verifier", "log_verifiers"):
        for spec in cfg.log_verifiers.split(",") if flag == "log_verifiers" else [getattr(cfg, flag)]:
            spec = spec.strip().removeprefix("hybrid:")
            if spec.startswith("py:") and reward_functions.is_trl(spec):
                n = len(reward_functions.split_specs(spec))
                weights = reward_functions.parse_weights(cfg.reward_weights, n) if flag == "verifier" else None
                reward_functions.check_on_rows(spec, weights, records, cfg.answer_field, conversational, flag)


def give_columns(cfg, judges: dict, records: list) -> None:
    """TRL reward functions get the data set's columns (looked up by question and reference) and, for the
    reward, --reward_weights; several reward functions are each logged too (reward/<spec>/soft_mean, TRL's
    rewards/<function>/mean), from the scores the reward call computed."""
    conversational = cfg.data not in worlds.WORLDS and reward_functions.is_conversational(cfg.data, cfg.data_split,
                                                                                        cfg.prompt_field)
    for role, judge in [(k, v) for k, v in judges.items() if k != "logged"] + list(judges["logged"].items()):
        fns = reward_functions.find(judge)
        if fns is not None:
            fns.rows(records, cfg.answer_field, conversational)
            if role == "reward":
                fns.weights = reward_functions.parse_weights(cfg.reward_weights, len(fns.fns))
                if len(fns.specs) > 1 and judge is fns:  # not inside hybrid: (the rule takes some rows)
                    judges["logged"].update({s: verifiers.RewardFunctionPart(fns, i) for i, s in enumerate(fns.specs)})


def probe_master_keys(verifier, train_set, cfg) -> dict:
    """Does the reward verifier say YES to content-free answers ("Thought process:")? Warn loudly if so."""
    n = cfg.master_key_prompts
    probe = audit.master_key_probe(verifier, [r.question for r in train_set[:n]], [r.reference for r in train_set[:n]],
                                   n=n, warn=cfg.master_key_warn)
    if distributed.rank() == 0:
        worst = sorted(probe["per_key"].items(), key=lambda kv: -kv[1])[:3]
        line = f"master-key probe: the verifier says YES to {probe['fpr']:.1%} of content-free answers"
        print(f"\n{'!' * 100}\nWARNING: {line} (> {cfg.master_key_warn:.0%}); the policy may learn to hack it; "
              f"worst: {worst}. Watch audit/false_positive_rate.\n{'!' * 100}\n" if probe["warn"] else line)
    return {"verifier/master_key_fpr": probe["fpr"]}


def audit_rollout(judge, ro: rollout.Rollout, judged: reward.Judgement, step: int, cfg, n_global: int):
    """The judge re-grades a seeded sample of the global batch; each rank re-grades its own members."""
    chosen = audit.sample_indices(n_global, cfg.audit_samples, rollout.sample_seed(cfg.seed, step, 0, "audit"))
    first = distributed.rank() * len(ro.responses)
    mine = [i for i in range(len(ro.responses)) if first + i in chosen]
    return audit.regrade(judge, [ro.records[i].question for i in mine], [ro.records[i].reference for i in mine],
                         [ro.texts[i] for i in mine], judged.select(mine), step, [ro.seeds[i] for i in mine])
