"""Where a step's rollouts come from: prompts -> sampled responses (HF generate, or the vLLM engine)
-> judgements of the reward verifier. Every sample is named by a global seed, so one rank and N ranks,
and a resumed run, draw and judge the same responses.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

import data
import distributed
import model
import reward


# ----------------------------------------------------------------------------------------------
# each rank samples responses for its slice of the global prompt batch


@dataclass
class Rollout:
    """One step's responses on this rank, laid out once for every later phase (one entry per response)."""
    records: list            # the data.Record each response answers
    prompts: list[list[int]]
    responses: list[list[int]]   # cut after the end-of-sequence token, which is kept
    texts: list[str]
    truncated: list[bool]
    seeds: list[int]         # the sample's global name: any world size and a resumed run draw the same
    behaviour_logp: torch.Tensor | None = None   # the vLLM engine's log-probs of its samples (flat)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.responses]


def sample_seed(seed: int, step: int, slot: int, salt: str = "rollout") -> int:
    """A 47-bit seed named by (run seed, step, global sample slot): the same on every machine and rank."""
    digest = hashlib.sha256(f"{salt}:{seed}:{step}:{slot}".encode()).digest()
    return int.from_bytes(digest[:6], "big") >> 1


def generate(policy, engine, tokenizer, records, step: int, cfg) -> Rollout:
    """This rank's responses for its slice of the global prompt batch, `cfg.samples_per_prompt` each."""
    n = cfg.samples_per_prompt
    prompt_ids = data.tokenize_prompts(tokenizer, records, cfg.max_prompt_len)
    prompts = [p for p in prompt_ids for _ in range(n)]
    first = distributed.rank() * len(prompts)
    seeds = [sample_seed(cfg.seed, step, first + i) for i in range(len(prompts))]
    policy.eval()
    behaviour = None
    if engine is not None:
        responses, truncated, engine_lp = engine.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seeds)
        behaviour = torch.tensor([x for lp in engine_lp for x in lp], dtype=torch.float32)
    else:
        responses, truncated = model.generate(policy, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature,
                                              cfg.top_p, seeds)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Rollout([r for r in records for _ in range(n)], prompts, responses, texts, truncated, seeds, behaviour)


# ----------------------------------------------------------------------------------------------
# judging: (question, reference, last line of the response) -> Eq. 3 / Eq. 4


def judge(verifier, ro: Rollout, step: int, cfg) -> reward.Judgement:
    seeds = [sample_seed(cfg.seed, step, s, "verifier") for s in ro.seeds]  # used when the verifier samples c
    return verifier([r.question for r in ro.records], [r.reference for r in ro.records], ro.texts, seeds=seeds)
