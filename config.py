"""Config: a script's @dataclass fields are its command-line flags (transformers.HfArgumentParser,
so `--help` shows every default), and `--config FILE` (YAML or JSON) sets fields that flags then
override. Every value, from the command line or a file, is checked before any model loads: a choice
(a `Literal` field) must be one of its values, and each script adds its ranges and relations with
`require`. A bad value is one line naming the flag: `train_rl.py: error: --steps 0: must be >= 1`.
Imports none of the project's files.
"""
from __future__ import annotations

import dataclasses
import json
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


def parse_config(classes: tuple, argv: list[str] | None = None, prog: str | None = None) -> tuple:
    """Parse argv into one instance of each dataclass in `classes`; one of them has a `config` field.
    Raises ConfigError for an unknown config-file field or a value outside its choices."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(classes, prog=prog)
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
        fields = {f for cls in classes for f in cls.__dataclass_fields__}
        unknown = set(values or {}) - fields
        if unknown:
            raise ConfigError(f"--config {path}: unknown fields {sorted(unknown)}; see --help for the flags")
        parser.set_defaults(**(values or {}))
    *parsed, unknown_flags = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown_flags:
        raise ConfigError(f"unrecognised arguments: {' '.join(unknown_flags)} (see --help for the flags)")
    for instance in parsed:
        check_choices(instance)
    return tuple(parsed)


def check_choices(instance) -> None:
    """argparse checks the choices of values typed on the command line, not of defaults set from a
    config file: check every Literal field here, whatever set it."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        choices = _literal_choices(hints[f.name])
        value = getattr(instance, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"--{f.name} {value!r}: invalid choice; choose from {', '.join(map(str, choices))}")


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


def _raise(message: str) -> typing.NoReturn:
    raise ConfigError(message)


def _yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)
