"""model.generate, handing over each group of responses as soon as all of them have ended, while the other
groups go on generating: what --stream_judging judges group by group, and what the --async_steps 1 worker
samples with (recording the behaviour log-probs; one group, the whole batch, without --stream_judging).
The tokens are model.generate's: the same seeds draw the same responses, handed over whole or by group.
"""
from __future__ import annotations

import torch

from rlvr import model


class _Watch:
    """generate's on_token hook (generation.decode): after each token it keeps every live row's token and,
    with `record`, its log-prob under the scores sampling started from / T (the raw logits after the model's
    generation-config processors), and hands over every group of rows whose responses have all ended."""

    def __init__(self, batch: int, eos: set, temperature: float, record: bool, group: int, on_group):
        self.eos, self.temperature, self.record, self.group, self.on_group = eos, temperature, record, group, on_group
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.logp: list[list[float]] = [[] for _ in range(batch)]
        self.ended, self.sent = [False] * batch, set()

    def __call__(self, rows: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> None:
        if self.record:
            lp = (scores.float() / self.temperature).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
            for r, x in zip(rows.tolist(), lp.tolist()):
                self.logp[r].append(x)  # a float32 value, exact as a Python float
        groups = set()
        for r, t in zip(rows.tolist(), tokens.tolist()):
            self.tokens[r].append(t)
            if t in self.eos:
                self.ended[r] = True
                groups.add(r // self.group)
        for g in sorted(groups):
            rows_g = range(g * self.group, (g + 1) * self.group)
            if g not in self.sent and all(self.ended[r] for r in rows_g):
                self.hand_over(g, [self.tokens[r] for r in rows_g], [False] * self.group)

    def hand_over(self, g: int, responses: list[list[int]], truncated: list[bool]) -> None:
        self.sent.add(g)
        logp = None
        if self.record:
            logp = [torch.tensor(self.logp[g * self.group + i][:len(r)], dtype=torch.float32)
                    for i, r in enumerate(responses)]
        self.on_group(g * self.group, responses, truncated, logp)


def sample_groups(lm, tokenizer, prompts, seeds, cfg, group: int, on_group, record: bool) -> None:
    """model.generate's samples (the same tokens), handed over group by group (`group` consecutive rows)
    as on_group(first row, responses, truncated, logp) as soon as each group's responses have all ended;
    groups with a response cut at max_new_tokens when generate returns. logp (record=True): per response,
    the float32 log-probs of its tokens under log_softmax(logits / temperature), what the trainer's
    model.token_logprobs computes for the same weights (with top_p < 1 the nucleus is sampled, but the
    log-prob is of the untruncated softmax); else None."""
    w = _Watch(len(prompts), model.eos_ids(lm, tokenizer), cfg.temperature, record, group, on_group)
    responses, truncated = model.generate(lm, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                          seeds, on_token=w)
    for g in range(len(prompts) // group):
        if g not in w.sent:
            w.hand_over(g, responses[g * group:(g + 1) * group], truncated[g * group:(g + 1) * group])
