"""train_rl.py's flags: the Config dataclass (every field is a flag; `--help` shows its default;
`--config FILE` sets fields) and check_config, which checks every range and relation before any model
loads, so a bad value is one line naming its flag. The verifier's own flags are verifiers.VerifierOptions;
what a flag means to another part (a verifier spec, the policy's files, the checkpoint to resume, the
rollout's relations) is checked beside that part, and train_rl.check_config calls every check. Imports
config and rl_math (the estimators' names) only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from rlvr import config, rl_math
from rlvr.config import overwrite_field, resume_field


@dataclass
class Config:
    config: str = field(default="", metadata={"help": "YAML or JSON file of field values; command-line flags override it"})
    # models and verifiers
    policy: str = field(default="tiny", metadata={"help": "hub name or local dir; 'tiny': the offline tiny model "
                                                          "warm-started on the --data world (worlds/__init__.py)"})
    verifier: str = field(default="tiny", metadata={
        "help": "reward verifier: a model dir or hub name, http://host:port[,...] (vLLM servers), or "
                "rule:substring|rule:exact|rule:jaccard|rule:math, py:module:function or py:file.py:function (TRL "
                "reward functions fn(prompts, completions, **columns), several: py:a:f,py:b:g with --reward_weights; "
                "or a judge fn(questions, references, responses), e.g. py:worlds.freeform:teacher), hybrid:<model, http, "
                "py: or tiny verifier> (rule:math on the rows that are mathematics), policy:rlpr|policy:verifree (no verifier: the policy's own probability of the "
                "reference after its reasoning, verifier_free.py); 'tiny': the tiny verifier distilled from the "
                "--data world's teacher "
                "(worlds/__init__.py; pretrained: recipes/verifier_pretrained.yaml; built once, cached)"})
    reward_type: Literal["binary", "soft"] = field(default="soft", metadata={"help": "binary (Eq. 3) or soft (Eq. 4)"})
    reward_weights: str = field(default="", metadata={
        "help": "weights of the TRL reward functions in --verifier py:a:f,py:b:g, in their order (TRL's "
                "reward_weights), e.g. 1,0.5; '': all 1"})
    verifier_free_answer: Literal["auto", "last_line", "tags"] = field(default="auto", metadata={
        "help": "where --verifier policy:rlpr|policy:verifree find the answer the reference replaces: tags (the "
                "references': R1's <think>...</think><answer>...</answer>, 0 without them; RLPR's format reward "
                "and bf16 score, VeriFree's '> \\boxed{REFERENCE} </answer>'); last_line (ours: the response's "
                "last line, no tags needed); auto: tags where the training prompts ask for <answer> tags (as the "
                "references' prompts do), else last_line (verifier_free.answer_format)"})
    rlpr_repetition_penalty: bool = field(default=False, metadata={
        "help": "--verifier policy:rlpr: -1 added to a non-zero reward whose response repeats a 10-word window 10 "
                "times (RLPR's reward_model.repetition_penalty, on in their recipes; the std filter reads it too)"})
    eval_verifier: str = field(default="auto", metadata={
        "help": "the grader of held-out answers (the paper: a 72B judge): a verifier spec; 'auto': a demo world's "
                "teacher (--data pretrained|freeform|toy), else rule:math where the references are numbers, else refused "
                "(free-form answers need a judge); 'self': the reward verifier, greedy (it grades its own hacks)"})
    audit_verifier: str = field(default="auto", metadata={
        "help": "a stronger judge that re-grades a sample of rollouts every --audit_every steps; 'auto': as "
                "--eval_verifier auto, but no audit (said at start) where no judge is known; '': no audit"})
    audit_every: int = field(default=5, metadata={"help": "steps between audits"})
    audit_samples: int = field(default=64, metadata={"help": "rollouts re-graded per audit (over all ranks)"})
    audit_max_fpr: float = field(default=0.0, metadata={
        "help": "stop (after a checkpoint) when the audit's false-positive rate exceeds this for "
                "--audit_patience audits in a row (0: never stop)"})
    audit_patience: int = field(default=2, metadata={"help": "audits in a row above --audit_max_fpr before stopping"})
    log_verifiers: str = field(default="rule:exact,rule:substring", metadata={
        "help": "comma-separated verifiers scored for logging only, to watch reward hacking ('': none)"})
    master_key_prompts: int = field(default=64, metadata={
        "help": "(question, reference) pairs the master-key probe asks before step 1, each with every content-free "
                "answer in audit.MASTER_KEYS (17: 64 x 17 verifier calls; 0: no probe)"})
    master_key_warn: float = field(default=0.05, metadata={
        "help": "warn when the verifier says YES to more than this share of content-free answers"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub (off: safer)"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads; 0: the cores free at start-up (rlvr/threads.py, said on one line); OMP_NUM_THREADS "
                "sets it too"})
    prompt_format: Literal["chat", "plain"] = field(default="chat", metadata={
        "help": "chat: the policy's chat template; plain: for a base model without one, the system message, "
                "'Question: ...', then 'Answer:'"})
    # data
    data: str = field(default="pretrained", metadata={
        "help": "a demo world ('pretrained': the paper's setting in miniature, a pretrained base, a policy that "
                "works before it answers; 'freeform': free-form answers in five subjects; 'toy': the numeric toy; "
                "worlds.py), "
                "a .jsonl/.json/.parquet file, or a hub data set"})
    data_split: str = field(default="train", metadata={"help": "split of a data set name"})
    prompt_field: str = field(default="query", metadata={"help": "column with the chat messages or a plain question"})
    answer_field: str = field(default="label", metadata={"help": "column with the reference answer"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip malformed rows (and report them) instead of stopping"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "share of questions (by hash) held out for eval"})
    eval_data: str = field(default="", metadata={"help": "a separate eval set (e.g. the released test split); "
                                                         "its questions are removed from training"})
    eval_split: str = field(default="test", metadata={"help": "split of --eval_data"})
    exclude_hashes: str = field(default="", metadata={"help": "question hashes to keep out of training "
                                                              "(train_verifier.py label writes them)"})
    max_prompt_len: int = field(default=1024, metadata={"help": "longer prompts are dropped (and counted)"})
    # rollout
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per rollout batch, over all ranks"})
    samples_per_prompt: int = field(default=8, metadata={"help": "responses sampled per prompt"})
    max_new_tokens: int = field(default=32, metadata={"help": "generation length limit (32: the main job's working "
                                                               "and answer line)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    rollout_engine: Literal["hf", "vllm"] = field(default="hf", metadata={
        "help": "hf: transformers generate; vllm: an in-process vLLM engine per rank, weights copied in after every update"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "share of each GPU the vLLM engine keeps"})
    async_steps: int = field(default=0, metadata={
        "help": "1: a worker process generates (and this process judges) batch t+1 while step t updates, always "
                "with the weights before update t (one step off-policy; reproducible, exactly resumable); 0: on-policy"})
    rollout_device: str = field(default="", metadata={
        "help": "device of the --async_steps 1 worker: '' = the trainer's (colocated); e.g. cuda:1 with one rank "
                "(split layout). On CPU trainer and worker take half the torch threads each"})
    stream_judging: bool = field(default=False, metadata={
        "help": "hand each prompt group to the verifier, in a thread, as soon as all its responses have ended, "
                "while longer ones still generate (HF generate): for HTTP / rule verifiers and uneven lengths"})
    filter_groups: bool = field(default=False, metadata={
        "help": "DAPO dynamic sampling: drop groups whose rewards (--reward_type) are all equal and refill the "
                "batch with groups of newly drawn prompts"})
    max_filter_rounds: int = field(default=3, metadata={
        "help": "extra rounds of --prompts_per_step prompts --filter_groups may draw per step; a batch still short "
                "is filled with the first dropped groups (their advantage is 0 under --reward_norm group)"})
    std_filter_beta: float = field(default=0.0, metadata={
        "help": "RLPR's standard-deviation filter for --filter_groups: keep the groups whose reward std is >= this "
                "x an EMA (0.99) of the steps' mean group std (RLPR: 0.5 for Qwen; verifier_free.StdFilter); "
                "0: keep the groups whose rewards are not all equal (DAPO)"})
    filter_patience: int = field(default=3, metadata={
        "help": "--filter_groups: stop (after a checkpoint) when this many steps in a row keep no group (every "
                "prompt's responses rewarded alike: nothing to learn, generation wasted)"})
    # advantages, KL and loss (rl_math.py)
    reward_norm: Literal["auto", "batch", "group", "none"] = field(default="auto", metadata={
        "help": "the z-score of rewards: over the batch (the paper), per prompt group (GRPO), or none; auto: the "
                "estimator's own (group for grpo, none for dr_grpo, batch otherwise)"})
    advantage: Literal["reinforce", "grpo", "dr_grpo", "rloo", "reinforce_pp", "rloo_seq", "reinforce_pp_seq"] = field(
        default="reinforce", metadata={"help": "estimator (rl_math.ESTIMATORS): reinforce (the paper's), grpo, dr_grpo, "
                                                "rloo / reinforce_pp (per token, as OpenRLHF), *_seq (per sequence)"})
    reward_clip: float = field(default=10.0, metadata={"help": "clip shaped rewards to +-this (OpenRLHF's default; 0: off)"})
    kl_mode: Literal["none", "reward", "loss"] = field(default="none", metadata={
        "help": "none | reward (k1 in the reward, the paper) | loss (k3 in the loss, GRPO)"})
    kl_coef: Optional[float] = field(default=None, metadata={
        "help": "beta of the KL term (default: 0.01 when --kl_mode is on); given with --kl_mode none it is refused: "
                "it would do nothing"})
    clip_low: float = field(default=0.2, metadata={"help": "ratio clip below 1 - clip_low"})
    clip_high: float = field(default=0.28, metadata={"help": "ratio clip above 1 + clip_high (clip-higher)"})
    loss_agg: Literal["token_mean", "seq_mean", "seq_sum_norm"] = field(default="token_mean", metadata={
        "help": "token_mean | seq_mean (OpenRLHF) | seq_sum_norm (Dr. GRPO)"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass (OpenRLHF: rollout batch / train batch)"})
    micro_batch_size: int = field(default=32, metadata={"help": "sequences per forward/backward (gradient accumulation)"})
    max_tokens_per_micro_batch: int = field(default=0, metadata={
        "help": "if > 0: micro-batches by a token budget instead of --micro_batch_size (longest first; "
                "many short sequences or few long ones per forward)"})
    rollout_correction: Literal["none", "tis", "mask"] = field(default="none", metadata={
        "help": "when the sampler is not the trainer (vLLM, or --async_steps 1): per-token weights pi_old / pi_sampler, "
                "truncated at --correction_threshold (tis) or tokens outside [1/threshold, threshold] dropped (mask)"})
    correction_threshold: float = field(default=2.0, metadata={"help": "the cap (tis) or the band (mask)"})
    pack: bool = field(default=True, metadata={"help": "padding-free packed rows for log-probs and training, each distinct prompt run once where a group's samples share it and that saves tokens (rlvr/prefix_sharing.py); false: right-padded rows, no sharing"})
    logprob_chunk: int = field(default=1024, metadata={"help": "tokens per chunk of the vocabulary projection (float32 "
                                                               "[chunk, vocab] blocks: 0.6 GB each at 1024 x Qwen2.5's "
                                                               "151,936, ~4 alive in backward)"})
    fp32_lm_head: bool = field(default=True, metadata={"help": "log-probs' output layer in float32 on bf16 models "
                                                               "(GPU): bf16 logits err by up to ~0.06 at logit 30"})
    # optimisation
    steps: int = field(default=60, metadata={"help": "RL steps (rollout batches)"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of optimizer steps with linear warm-up"})
    lr_schedule: Literal["constant", "cosine"] = field(default="constant", metadata={"help": "after warm-up"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this share of --lr (OpenRLHF: 0.1)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    max_nonfinite_steps: int = field(default=3, metadata={
        "help": "a NaN/inf loss or gradient is never applied (the update is skipped); this many steps in a row "
                "with a skipped update stop the run"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in backward: less memory, more time"})
    seed: int = field(default=0, metadata={"help": "seeds sampling, data order and the audit's sample"})
    # eval, checkpoints, logging
    eval_every: int = field(default=20, metadata={"help": "steps between evals (also before step 1 and at the end; "
                                                          "0: only at the end)"})
    eval_prompts: int = field(default=256, metadata={"help": "held-out prompts per eval (0: all)"})
    eval_samples: int = field(default=8, metadata={
        "help": "0: one greedy answer per prompt (the paper recipes); k: k answers sampled at --temperature (the "
                "same seeds at every eval), accuracy their mean: finer-grained on a small held-out set (the toy's 17)"})
    eval_only: bool = field(default=False, metadata={
        "help": "evaluate the policy (or, with --resume, the checkpoint) and exit; the results go to out_dir/eval_only/ "
                "(metrics.jsonl, one row per evaluation): nothing of the run is rewritten"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: at the end and on SIGTERM/SIGINT)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in out_dir/checkpoints (older ones are removed)"})
    resume: str = resume_field()
    overwrite: bool = overwrite_field()
    out_dir: str = field(default="runs/demo", metadata={"help": "checkpoints, metrics.jsonl, rollouts.jsonl, audit.jsonl, final/"})
    dump_rollouts: bool = field(default=True, metadata={"help": "append every judged response to out_dir/rollouts.jsonl"})
    wandb_project: str = field(default="rlvr", metadata={"help": "wandb project"})
    wandb_run_name: str = field(default="", metadata={"help": "wandb run name ('': wandb's own)"})
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = field(default="auto", metadata={
        "help": "auto: online when logged in, else offline; disabled: metrics.jsonl only"})
    log_samples: int = field(default=8, metadata={"help": "samples per step in the wandb table"})


def check_config(cfg: Config) -> None:
    """The flags' own ranges and relations, before any model loads: a bad value is one line naming its flag.
    What a flag means to another part is checked beside that part (train_rl.check_config calls them all)."""
    req = config.require
    world = int(os.environ.get("WORLD_SIZE", 1))
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs", "minibatches",
                 "micro_batch_size", "logprob_chunk", "max_prompt_len", "max_nonfinite_steps", "audit_patience",
                 "filter_patience"):
        req(getattr(cfg, name) >= 1, name, getattr(cfg, name), "must be >= 1")
    req(cfg.temperature > 0, "temperature", cfg.temperature, "must be > 0 (sampling divides the logits by it)")
    req(0 < cfg.top_p <= 1, "top_p", cfg.top_p, "must be in (0, 1]")
    req(cfg.lr > 0, "lr", cfg.lr, "must be > 0")
    req(cfg.threads >= 0, "threads", cfg.threads, "must be >= 0 (0: chosen from the free cores)")
    req(cfg.prompts_per_step % world == 0, "prompts_per_step", cfg.prompts_per_step,
        f"must be divisible by the number of ranks ({world})")
    per_rank = cfg.prompts_per_step * cfg.samples_per_prompt // max(world, 1)
    req(per_rank % cfg.minibatches == 0, "minibatches", cfg.minibatches,
        f"must divide each rank's {per_rank} responses, or some would never be trained on")
    req(cfg.samples_per_prompt >= 2 or cfg.advantage not in ("rloo", "rloo_seq"), "advantage", cfg.advantage,
        "needs --samples_per_prompt >= 2 (the baseline is the other samples' mean)")
    try:
        norm = rl_math.estimator_norm(cfg.advantage, cfg.reward_norm)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    req(cfg.samples_per_prompt >= 2 or (norm != "group" and cfg.advantage != "dr_grpo"), "advantage", cfg.advantage,
        f"with --reward_norm {norm} needs --samples_per_prompt >= 2 (a group of one has no spread)")
    req(cfg.kl_coef is None or cfg.kl_mode != "none", "kl_coef", cfg.kl_coef,
        "does nothing with --kl_mode none (the default): add --kl_mode reward (k1 in the reward, the paper's) or "
        "--kl_mode loss (k3 in the loss: TRL's beta, GRPO)")
    req(cfg.kl_coef is None or cfg.kl_coef > 0, "kl_coef", cfg.kl_coef, f"must be > 0 with --kl_mode {cfg.kl_mode}")
    req(0 < cfg.clip_low < 1, "clip_low", cfg.clip_low, "must be in (0, 1)")
    req(cfg.clip_high > 0, "clip_high", cfg.clip_high, "must be > 0")
    req(cfg.reward_clip >= 0, "reward_clip", cfg.reward_clip, "must be >= 0 (0: off)")
    req(cfg.max_tokens_per_micro_batch >= 0, "max_tokens_per_micro_batch", cfg.max_tokens_per_micro_batch, "must be >= 0")
    req(cfg.correction_threshold > 1, "correction_threshold", cfg.correction_threshold, "must be > 1")
    req(cfg.rollout_correction == "none" or cfg.rollout_engine == "vllm" or cfg.async_steps, "rollout_correction",
        cfg.rollout_correction, "needs a sampler other than the trainer (--rollout_engine vllm or --async_steps 1)")
    req(cfg.std_filter_beta >= 0, "std_filter_beta", cfg.std_filter_beta, "must be >= 0 (0: off)")
    req(cfg.std_filter_beta == 0 or cfg.filter_groups, "std_filter_beta", cfg.std_filter_beta,
        "filters the groups of --filter_groups: add --filter_groups true")
    req(0 <= cfg.warmup_ratio < 1, "warmup_ratio", cfg.warmup_ratio, "must be in [0, 1)")
    req(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", cfg.min_lr_ratio, "must be in [0, 1]")
    req(cfg.max_grad_norm > 0, "max_grad_norm", cfg.max_grad_norm, "must be > 0")
    req(0 <= cfg.heldout_fraction < 1, "heldout_fraction", cfg.heldout_fraction, "must be in [0, 1)")
    for name in ("eval_every", "eval_prompts", "eval_samples", "save_every", "audit_every", "log_samples",
                 "master_key_prompts"):
        req(getattr(cfg, name) >= 0, name, getattr(cfg, name), "must be >= 0")
    req(cfg.keep_checkpoints >= 1, "keep_checkpoints", cfg.keep_checkpoints, "must be >= 1")
    req(cfg.audit_samples >= 1 or not cfg.audit_verifier, "audit_samples", cfg.audit_samples, "must be >= 1")
    req(0 <= cfg.audit_max_fpr <= 1, "audit_max_fpr", cfg.audit_max_fpr, "must be in [0, 1]")
    req(0 <= cfg.master_key_warn <= 1, "master_key_warn", cfg.master_key_warn, "must be in [0, 1]")
    req(cfg.verifier.strip() != "", "verifier", cfg.verifier, "is required")
    req(cfg.eval_verifier.strip() != "", "eval_verifier", cfg.eval_verifier,
        "is required: a judge's spec, 'auto' (chosen from the data) or 'self' (the reward verifier grades itself)")
    req(cfg.audit_verifier != "self", "audit_verifier", cfg.audit_verifier,
        "cannot be the reward verifier: an audit needs another judge ('' for none)")
    req(not cfg.overwrite or (cfg.resume == "no" and not cfg.eval_only), "overwrite", cfg.overwrite,
        "contradicts --resume and --eval_only (they keep the run's files)")


# --help's headings: (title, the first flag under it), in the fields' order
HELP_GROUPS = [("models and verifiers", "policy"), ("data", "data"), ("rollout", "prompts_per_step"),
               ("advantages, KL and loss (rl_math.py)", "reward_norm"), ("optimisation", "steps"),
               ("eval, checkpoints, logging", "eval_every"),
               ("how the reward verifier is asked, read and reached (verifiers.VerifierOptions)", "verifier_template")]
