"""HF generate, handing over each group of responses as soon as all of them have ended, while the other
groups go on generating: what --stream_judging judges group by group, and what the --async_steps 1 worker
samples with (recording the behaviour log-probs; one group, the whole batch, without --stream_judging).
The tokens are model.generate's: the same seeds draw the same responses, handed over whole or by group.
"""
from __future__ import annotations

import torch

from rlvr import model


class _Scores:
    """A logits processor that only looks: the first one keeps the scores sampling starts from (the raw
    logits, after any processors of the model's generation config); the last one takes the token greedy
    search will pick from the perturbed scores, and records its log-prob under the first scores / T."""

    def __init__(self, watch, last: bool):
        self.watch, self.last = watch, last

    def __call__(self, input_ids, scores):
        if not self.last:
            self.watch.start = scores
        else:
            token = scores.argmax(-1)  # what generate's greedy step picks (model.SeededSampling added the noise)
            lp = (self.watch.start.float() / self.watch.temperature).log_softmax(-1)
            self.watch.logp.append(lp.gather(-1, token[:, None]).squeeze(-1).cpu())
        return scores


class _Ended:
    """A stopping criterion that stops nothing: after each token it hands over every group of rows whose
    responses have all ended (an end-of-sequence token), while the others go on generating."""

    def __init__(self, watch):
        self.watch = watch

    def __call__(self, input_ids, scores, **kwargs):
        w = self.watch
        w.ended |= torch.isin(input_ids[:, -1].cpu(), w.eos)  # once ended, a row only gets padding
        for g in range(len(w.ended) // w.group):
            rows = range(g * w.group, (g + 1) * w.group)
            if g not in w.sent and bool(w.ended[rows.start:rows.stop].all()):
                new = input_ids[rows.start:rows.stop, w.width:].tolist()
                w.hand_over(g, [r[:next(i + 1 for i, t in enumerate(r) if t in w.eos_set)] for r in new],
                            [False] * w.group)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _Watch:
    """Stands in for the HF model inside model.generate, which builds the sampler: its generate() runs the
    model's with _Scores around the sampler (record: every token's behaviour log-prob, [B] per step, where
    output_logits would keep [steps, B, vocab]) and _Ended (each group handed over once it has ended)."""

    def __init__(self, lm, temperature: float, record: bool, group: int, on_group):
        self.lm, self.temperature, self.record, self.group, self.on_group = lm, temperature, record, group, on_group
        self.start, self.logp, self.sent = None, [], set()

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def generate(self, *, input_ids, logits_processor, generation_config, **kwargs):
        from transformers import LogitsProcessorList, StoppingCriteriaList

        eos_token_id = generation_config.eos_token_id
        self.width, self.eos, self.eos_set = input_ids.shape[1], torch.tensor(eos_token_id), set(eos_token_id)
        self.ended = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if self.record:
            logits_processor = LogitsProcessorList([_Scores(self, False), *logits_processor, _Scores(self, True)])
        return self.lm.generate(input_ids=input_ids, logits_processor=logits_processor, generation_config=generation_config,
                                stopping_criteria=StoppingCriteriaList([_Ended(self)]), **kwargs)

    def hand_over(self, g: int, responses: list[list[int]], truncated: list[bool]) -> None:
        self.sent.add(g)
        logp = None
        if self.record:
            steps = torch.stack(self.logp, 1)  # [B, tokens so far]
            logp = [steps[g * self.group + i, :len(r)].clone() for i, r in enumerate(responses)]
        self.on_group(g * self.group, responses, truncated, logp)


def sample_groups(lm, tokenizer, prompts, seeds, cfg, group: int, on_group, record: bool) -> None:
    """model.generate's samples (the same tokens), handed over group by group (`group` consecutive rows)
    as on_group(first row, responses, truncated, logp) as soon as each group's responses have all ended;
    groups with a response cut at max_new_tokens when generate returns. logp (record=True): per response,
    the float32 log-probs of its tokens under log_softmax(logits / temperature), what the trainer's
    model.token_logprobs computes for the same weights (with top_p < 1 the nucleus is sampled, but the
    log-prob is of the untruncated softmax); else None."""
    w = _Watch(lm, cfg.temperature, record, group, on_group)
    responses, truncated = model.generate(w, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                          seeds)
    for g in range(len(prompts) // group):
        if g not in w.sent:
            w.hand_over(g, responses[g * group:(g + 1) * group], truncated[g * group:(g + 1) * group])
