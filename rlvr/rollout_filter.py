"""DAPO dynamic sampling (--filter_groups): a step's batch keeps the prompt groups whose rewards are not
all equal (their advantage under group normalisation is 0: they teach nothing), or (--std_filter_beta,
RLPR's filter) whose reward std reaches an adaptive threshold, and refills it with
groups of newly drawn prompts, for at most --max_filter_rounds extra rounds. rollout.RolloutSource calls
filter_groups once per step; deleting this file means deleting that call and the two flags.
"""
from __future__ import annotations

import torch

from rlvr import distributed


def filter_groups(cfg, rows, more, std_filter=None) -> tuple[list, dict]:
    """Keep the groups of round 0's judged `rows` (this rank's rollout.Samples) whose rewards are not all
    equal (decided on the gathered rewards, so every rank and any world size agrees), asking `more(r)`
    for the judged rows of round r = 1, 2, ... (prompts_per_step new prompts) until prompts_per_step
    groups are kept or max_filter_rounds extra rounds are spent. The batch is the first kept groups in
    (round, global group) order; a batch still short is filled with the first dropped groups: with group
    normalisation their advantage is 0, so the update is the kept groups' (diluted by the share of
    tokens), while every rank still trains on prompts_per_step / world groups (equal forward counts under
    FSDP, --minibatches still divides). Returns this rank's slice of the batch, as parts in order, and
    the metrics. With `std_filter` (--std_filter_beta: verifier_free.StdFilter, RLPR's filter) a group is
    kept when its reward std reaches the filter's threshold instead."""
    n, world = cfg.samples_per_prompt, distributed.world_size()
    per_rank = cfg.prompts_per_step // world
    which = 0 if cfg.reward_type == "binary" else 1
    rounds, kept, dropped, number = [], [], [], 0
    while True:
        rounds.append(rows)
        local = torch.tensor([e[which] for e in rows.reward], dtype=torch.float64)
        groups = distributed.all_gather_cat(local).view(cfg.prompts_per_step, n)
        keep = std_filter.keep(groups) if std_filter is not None else (groups != groups[:, :1]).any(dim=1)
        for g, k in enumerate(keep.tolist()):
            (kept if k else dropped).append((number, g))
        if len(kept) >= cfg.prompts_per_step or number == cfg.max_filter_rounds:
            break
        number += 1
        rows = more(number)
    batch = (kept + dropped)[:cfg.prompts_per_step]
    # every rank sends the chosen groups it holds; all assemble the batch in order and take their slice
    mine = {(r, g): rounds[r].take(range((g % per_rank) * n, (g % per_rank + 1) * n))
            for r, g in batch if g // per_rank == distributed.rank()}
    held = {key: s for part in distributed.gather_objects(mine) for key, s in part.items()}
    ours = batch[distributed.rank() * per_rank:(distributed.rank() + 1) * per_rank]
    info = {"rollout/filter_rounds": float(number),
            "rollout/groups_kept_frac": len(kept) / (len(rounds) * cfg.prompts_per_step),
            "rollout/groups_padded": float(max(0, cfg.prompts_per_step - len(kept)))}
    if std_filter is not None:
        info["rollout/std_filter_threshold"] = std_filter.threshold
        std_filter.end_step()
    return [held[key] for key in ours], info
