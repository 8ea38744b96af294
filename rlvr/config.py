"""Config: a script's @dataclass fields are its command-line flags (transformers.HfArgumentParser,
so `--help` shows every default), and `--config FILE` (YAML or JSON) sets fields that flags then
override. Every value, from the command line or a file, is checked before any model loads: a choice
(a `Literal` field) must be one of its values, and each script adds its ranges and relations with
`require`. A bad value is one line naming the flag: `train_rl.py: error: --steps 0: must be >= 1`.
A config file's values are typed as the flags are (`steps: 2.7` or `resume: maybe` is an error, not a
guess); flags are never abbreviated (`--step` is not `--steps`), and an unknown name gets a "did you
mean" (close spellings, and the TRL / OpenRLHF names of the same setting: ALIASES).
Imports none of the project's files.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import json
import math
import sys
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A flag (or config-file field) whose value cannot run. The message starts with the flag."""


def require(ok: bool, flag: str, value, why: str) -> None:
    """Raise ConfigError("--flag value: why") unless `ok`."""
    if not ok:
        raise ConfigError(f"--{flag} {value!r}: {why}")


def resume_field():
    """The --resume flag of both trainers: a bare --resume continues from the latest checkpoint (an error
    when there is none), --resume auto continues if there is one and starts fresh if not (job scripts)."""
    return dataclasses.field(default="no", metadata={
        "choices": ["no", "yes", "auto"], "nargs": "?", "const": "yes",
        "help": "--resume: continue from the latest checkpoint in out_dir (an error if there is none); "
                "--resume auto: continue if there is one, else start fresh (for job scripts)"})


def overwrite_field():
    """The --overwrite flag of both trainers."""
    return dataclasses.field(default=False, metadata={
        "help": "start over in an out_dir that holds an earlier run's files: remove them first (they are listed)"})


# Names other trainers give a setting -> ours: an unknown flag or config field named here is answered with
# "did you mean --ours" (when the script has that flag). TRL (GRPOConfig, TrainingArguments), OpenRLHF
# (train_ppo_ray / train_sft) and verl (ppo_trainer.yaml, last path component).
ALIASES = {
    "learning_rate": "lr", "actor_learning_rate": "lr", "num_generations": "samples_per_prompt",
    "n_samples_per_prompt": "samples_per_prompt", "rollout_n": "samples_per_prompt",
    "output_dir": "out_dir", "save_path": "out_dir", "ckpt_path": "out_dir", "max_steps": "steps",
    "num_train_epochs": "epochs", "max_epochs": ("ppo_epochs", "epochs"),
    "max_completion_length": "max_new_tokens", "generate_max_len": "max_new_tokens", "response_length": "max_new_tokens",
    "max_prompt_length": "max_prompt_len", "prompt_max_len": "max_prompt_len", "max_length": "max_len",
    "beta": "kl_coef", "init_kl_coef": "kl_coef", "kl_loss_coef": "kl_coef",
    "use_kl_loss": "kl_mode", "epsilon": "clip_low", "eps_clip": "clip_low", "clip_ratio_low": "clip_low",
    "epsilon_high": "clip_high", "clip_ratio_high": "clip_high", "loss_type": "loss_agg", "loss_agg_mode": "loss_agg",
    "advantage_estimator": "advantage", "adv_estimator": "advantage", "scale_rewards": "reward_norm",
    "rollout_batch_size": "prompts_per_step", "train_batch_size": "batch_size", "micro_train_batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "gradient_checkpointing": "activation_checkpointing",
    "lr_scheduler_type": "lr_schedule", "lr_scheduler": "lr_schedule", "lr_warmup_ratio": "warmup_ratio",
    "model_name_or_path": "policy", "pretrain": "policy", "reward_pretrain": "verifier", "reward_model": "verifier",
    "prompt_data": "data", "dataset": "data", "dataset_name": "data", "input_key": "prompt_field",
    "label_key": "answer_field", "save_steps": "save_every", "eval_steps": "eval_every", "packing_samples": "pack",
    "use_wandb": "wandb_mode", "report_to": "wandb_mode", "run_name": "wandb_run_name",
    "resume_from_checkpoint": "resume", "load_checkpoint": "resume", "max_norm": "max_grad_norm",
    "num_iterations": "ppo_epochs", "total_training_steps": "steps", "use_vllm": "rollout_engine",
}

# Another trainer's value of a setting -> the flags that say it here (TRL loss_type and verl loss_agg_mode:
# which denominator the loss is averaged over; rl_math.policy_loss). A value not listed gets the alias alone.
ALIAS_VALUES = {
    "loss_type": {"dapo": "--loss_agg token_mean", "bnpo": "--loss_agg token_mean", "grpo": "--loss_agg seq_mean",
                  "dr_grpo": "--loss_agg seq_sum_norm (and --advantage dr_grpo)"},
    "loss_agg_mode": {"token-mean": "--loss_agg token_mean", "seq-mean-token-mean": "--loss_agg seq_mean",
                      "seq-mean-token-sum-norm": "--loss_agg seq_sum_norm"},
    "use_vllm": {"true": "--rollout_engine vllm", "True": "--rollout_engine vllm", "1": "--rollout_engine vllm"},
    "beta": {"*": "--kl_mode loss --kl_coef {value} (TRL's beta is k3 in the loss)"},
}

# Settings of other trainers with no flag of the same meaning here: what to do instead, in one line.
NOTES = {
    "gradient_accumulation_steps": "no such flag: gradient accumulation is automatic here: each optimizer step's "
                                   "responses (--prompts_per_step x --samples_per_prompt / --minibatches) are cut into "
                                   "--micro_batch_size micro-batches (or --max_tokens_per_micro_batch)",
    "logging_steps": "no such flag: every step is logged (metrics.jsonl, wandb); --log_samples sets the samples table",
    "ppo_mini_batch_size": "verl's mini-batch (in prompts) is --minibatches here: optimizer steps per rollout batch, "
                           "--prompts_per_step / ppo_mini_batch_size",
    "entropy_coeff": "no entropy bonus here (verl's default is 0 too); the policy's entropy is logged as 'entropy'",
}


def did_you_mean(name: str, known: list[str], value=None) -> str:
    """' (did you mean --x?)' for an unknown name: the setting's name here when another trainer's name was
    used (ALIASES; with `value`, the exact flags for it: ALIAS_VALUES), what to do instead where nothing
    here means the same (NOTES), else the closest spelling, else ''."""
    ours = ALIASES.get(name, ())
    for alias in (ours,) if isinstance(ours, str) else ours:  # the first that this script has
        if alias in known:
            values = ALIAS_VALUES.get(name, {})
            exact = values.get(str(value), values.get("*")) if value is not None else None
            if exact:
                return f" (did you mean {exact.format(value=value)}? that is its name here)"
            return f" (did you mean --{alias}? that is its name here)"
    if name in NOTES:
        return f" ({NOTES[name]})"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean --{close[0]}?)" if close else ""


class CompactHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with one name per flag (not also its --dashed-twin), a short metavar (its type), and every
    flag's default, documented or not."""

    def __init__(self, prog, **kwargs):
        import shutil

        super().__init__(prog, max_help_position=36, width=max(100, min(shutil.get_terminal_size().columns, 140)))

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(action.option_strings)
        if action.choices:
            return f"{action.option_strings[0]} {{{','.join(map(str, action.choices))}}}"
        kind = {int: "INT", float: "FLOAT"}.get(action.type, "BOOL" if getattr(action.type, "__name__", "") ==
                                                "string_to_bool" else "VALUE")
        return f"{action.option_strings[0]} {kind}"

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):  # the help says its default in words
            return action.help
        if action.default == "" and action.option_strings:
            return (action.help or "") + " (default: '')"
        if action.help is None:
            action.help = ""
        return super()._get_help_string(action)


def group_help(parser, groups: list[tuple[str, str]]) -> None:
    """Put --help's flags under headings: `groups` is [(title, first field), ...] in field order; each
    heading holds the flags from its first field to the next heading's."""
    starts = {first: title for title, first in groups}
    current = None
    for action in list(parser._actions):
        if action.dest in starts and (current is None or current.title != starts[action.dest]):
            current = parser.add_argument_group(starts[action.dest])
        if action.option_strings and action.option_strings[0].startswith("--no_") and action.const is False:
            action.help = argparse.SUPPRESS  # HfArgumentParser's --no_X twin of a true-by-default --X: --X false
        if current is None or not action.option_strings or action.dest == "help":
            continue
        for group in parser._action_groups:
            if action in group._group_actions and group is not current:
                group._group_actions.remove(action)
        current._group_actions.append(action)


def parse_config(classes: tuple, argv: list[str] | None = None, prog: str | None = None,
                 groups: list[tuple[str, str]] = ()) -> tuple:
    """Parse argv into one instance of each dataclass in `classes`; one of them has a `config` field.
    Raises ConfigError for an unknown flag or config-file field, a value of the wrong type, or a value
    outside its choices. `groups`: --help's headings (group_help)."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: (f, cls) for cls in classes for f in dataclasses.fields(cls)}
    # allow_abbrev off: `--step 0` is an unknown flag (with a "did you mean"), never --steps
    parser = HfArgumentParser(classes, prog=prog, allow_abbrev=False, formatter_class=CompactHelp,
                              usage=f"{prog or '%(prog)s'} [--config FILE] [--flag VALUE ...]  (every flag below; "
                                    "a config file's fields are the same names)")
    group_help(parser, list(groups))
    parser.error = _raise  # argparse would print the whole usage first: one line is enough
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "config", ""):
        path = Path(known.config)
        try:
            text = path.read_text()
            values = json.loads(text) if path.suffix == ".json" else _yaml(text)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--config {path}: {e}") from e
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
        for name in sorted(values or {}, key=str):
            if name not in fields:
                raise ConfigError(f"--config {path}: unknown field {name!r}"
                                  f"{did_you_mean(str(name), sorted(fields), values[name])}; "
                                  "see --help for the flags")
        parser.set_defaults(**{name: typed_value(*fields[name], value, f"--config {path}: ")
                               for name, value in (values or {}).items()})
    *parsed, unknown_flags = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown_flags:
        at = next((i for i, a in enumerate(unknown_flags) if a.startswith("-")), None)
        flag = unknown_flags[at] if at is not None else ""
        first = flag.lstrip("-").split("=")[0].replace("-", "_")
        value = flag.split("=", 1)[1] if "=" in flag else next(
            (a for a in unknown_flags[at + 1:at + 2] if not a.startswith("-")), None) if at is not None else None
        raise ConfigError(f"unrecognised arguments: {' '.join(unknown_flags)}{did_you_mean(first, sorted(fields), value)} "
                          "(see --help for the flags)")
    for instance in parsed:
        check_choices(instance)
        check_finite(instance)
    return tuple(parsed)


def typed_value(f: dataclasses.Field, cls, value, where: str = ""):
    """A config file's value for field `f`, checked against the field's type as argparse checks a flag:
    an int field takes an integer (7, not 2.7 or true), a float field a number, a bool field true/false,
    a string field a string; None only where the field is Optional; a field with `choices` (--resume)
    one of them (YAML reads `resume: yes` as true: a bool there means "yes"/"no"). Returns the value."""
    tp = typing.get_type_hints(cls)[f.name]
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    choices = f.metadata.get("choices")
    if choices and isinstance(value, bool) and {"yes", "no"} <= set(choices):
        value = "yes" if value else "no"

    def bad(expected: str):
        return ConfigError(f"{where}--{f.name} {value!r}: expected {expected}, got {type(value).__name__}")
    if value is None:
        if optional:
            return None
        raise bad("a value")
    if typing.get_origin(tp) is typing.Literal:
        return value  # check_choices names the choices
    if isinstance(value, str) and tp in (int, float, bool):  # as argparse reads the flag (YAML reads 1e-5 as text)
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        try:
            value = words[value.strip().lower()] if tp is bool else tp(value)
        except (KeyError, ValueError):
            raise bad("true or false" if tp is bool else "an integer" if tp is int else "a number") from None
    if tp is bool and not isinstance(value, bool):
        raise bad("true or false")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad("an integer")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    if tp is str and not isinstance(value, str):
        raise bad("a string" + (" (a comma-separated list is one string: 'a,b')" if isinstance(value, list) else
                                " (quote it)"))
    if choices and value not in choices:
        raise ConfigError(f"{where}--{f.name} {value!r}: invalid choice; choose from {', '.join(map(str, choices))}")
    return value


def check_choices(instance) -> None:
    """argparse checks the choices of values typed on the command line, not of defaults set from a
    config file: check every Literal field here, whatever set it."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        choices = _literal_choices(hints[f.name])
        value = getattr(instance, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"--{f.name} {value!r}: invalid choice; choose from {', '.join(map(str, choices))}")


def check_finite(instance) -> None:
    """Every number flag is finite: inf passes `> 0` (--temperature inf samples uniformly, --kl_coef inf
    turns every update into NaN) and NaN fails every comparison but `!=`; no flag means either."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} {value!r}: must be a finite number")


def check_resumed_flags(saved_file, now: dict, may_change: set[str]) -> None:
    """--resume: ConfigError naming every flag in `now` (the run's flags as config.json writes them) whose
    value differs from `saved_file`'s (the config.json of the run being resumed), except those in
    `may_change`, which the resumed run applies. A checkpoint restores the optimizer, scheduler and
    sampler: a changed --lr or --seed would not be applied while config.json said it was."""
    try:
        saved = json.loads(Path(saved_file).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {saved_file} unreadable ({e}): the run's flags cannot be compared with "
                          "these; restore it, or start over with --overwrite") from None
    changed = [f"--{k} {v!r} (the run's: {saved[k]!r})" for k, v in now.items()
               if k in saved and k not in may_change and saved[k] != v]
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)}: a resumed run keeps the flags it started with "
                          f"({saved_file}); drop the change, or start a new run (--overwrite or another --out_dir)")


def _literal_choices(tp) -> tuple | None:
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:  # Optional[Literal[...]]: None is allowed too
        for arg in typing.get_args(tp):
            choices = _literal_choices(arg)
            if choices is not None:
                return choices + (None,)
    return None


def exit_on_error(prog: str, error: Exception) -> typing.NoReturn:
    """The one-line message a user sees for a bad flag, with argparse's exit status (2)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors(prog: str, known: tuple[type[BaseException], ...]):
    """Around a command's run: a bad flag exits 2, an error of the `known` kinds (their messages name
    the file, row, endpoint or step: a traceback would only bury it) and a full disk (the message names
    the file) exit 1, each as one line `prog: error: ...`. Anything else keeps its traceback."""
    try:
        yield
    except ConfigError as e:
        exit_on_error(prog, e)
    except known as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(f"{prog}: error: {e}{file_size_limit() if e.errno == errno.EFBIG else ''}", file=sys.stderr)
        sys.exit(1)


def file_size_limit() -> str:
    """' (files may hold at most N bytes here: ulimit -f)' where the process has a file size limit, else ''.
    Writing past it fails with EFBIG (Python ignores SIGXFSZ), which names no limit."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return "" if limit == resource.RLIM_INFINITY else f" (files may hold at most {limit} bytes here: ulimit -f)"


def _raise(message: str) -> typing.NoReturn:
    raise ConfigError(message)


def _yaml(text: str) -> dict:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:  # a ScannerError's text spans 5 lines: one, with the line it points at
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(x) for x in (getattr(e, "problem", None), getattr(e, "context", None)) if x)
        raise ValueError(f"not valid YAML: {where}{what or type(e).__name__}") from None
