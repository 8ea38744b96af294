"""The demo worlds in one table: what `--data toy` and `--data freeform` mean to the trainers, and
what `tiny` (the policy, the distilled verifier) is in each. The trainers ask here, nowhere else.

    toy       the numeric toy (worlds/toy.py): "Which is larger, 3 or 7?", graded by rule:math
    freeform  the free-form world (worlds/freeform.py): five subjects, answers a rule cannot grade, graded by
              its teacher py:worlds.freeform:teacher
    pretrained  the paper's setting in miniature (worlds/pretrained.py, the main job): the free-form world's
              questions, one pretrained base for the policy (which writes a working, then its answer)
              and the student verifier, graded by py:worlds.pretrained:teacher (any common answer format)

Imports toy, freeform and pretrained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from worlds import freeform, pretrained, toy


@dataclass(frozen=True)
class World:
    records: Callable[[int], list]            # (run seed) -> every RL question of the world
    system_prompt: str                        # what its policy is asked with
    judge_rows: Callable[[str, int], list]    # (mix "kind:count,...", seed) -> rows for verifier distillation
    parse_mix: Callable[[str], list]          # the mix's check: ValueError naming the bad part
    tiny_policy: Callable[[float], str]       # (heldout_fraction) -> the warm-started tiny policy's directory
    tiny_verifier: Callable[[], str]          # -> the student distilled from the teacher (built once, cached)
    teacher: str                              # the verifier spec that knows the truth
    verifier_recipe: str                      # the distillation recipe a next round fine-tunes with


WORLDS = {
    "toy": World(lambda seed: toy.records(toy.PROBLEMS, seed=seed), toy.SYSTEM_PROMPT, toy.judge_rows, toy.parse_mix,
                 toy.tiny_policy, toy.tiny_verifier, "rule:math", "recipes/verifier_cpu_demo.yaml"),
    # one fixed data set whatever the run's seed, like a released one: every seed holds out the same questions
    "freeform": World(lambda seed: freeform.records(), freeform.SYSTEM_PROMPT, freeform.judge_rows, freeform.parse_mix,
                      freeform.tiny_policy, freeform.tiny_verifier, "py:worlds.freeform:teacher",
                      "recipes/verifier_freeform.yaml"),
    "pretrained": World(pretrained.records, pretrained.SYSTEM_PROMPT, pretrained.judge_rows, pretrained.parse_mix,
                        pretrained.tiny_policy, pretrained.tiny_verifier, "py:worlds.pretrained:teacher",
                        "recipes/verifier_pretrained.yaml"),
}


def check(cfg) -> None:
    """--verifier tiny (or hybrid:tiny) is a demo world's distilled student: it knows nothing of a user's data."""
    from rlvr import config

    config.require(cfg.verifier not in ("tiny", "hybrid:tiny") or cfg.data in WORLDS, "verifier", cfg.verifier,
                   f"is the tiny verifier distilled from a demo world's teacher (--data {'|'.join(WORLDS)}); it knows "
                   f"nothing of --data {cfg.data}: name a judge (a model dir, http://host:port, rule:..., py:module:fn)")


def of(data: str) -> World:
    """The world of `--data`; a file or hub data set uses the numeric toy's tiny models for 'tiny'."""
    return WORLDS.get(data, WORLDS["toy"])
