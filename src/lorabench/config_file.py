"""``lorabench run --config FILE``: a TOML file of the same settings as the flags, and the file a run writes back.

A config file is a flat TOML table whose keys are the flags' names without the dashes (``batch-size = 16`` or
``batch_size = 16``), values of the flag's kind (a list or a comma-separated string for ``lora-targets`` and
``fp8-skip``). Flags on the command line win over the file; a key that is no flag of ``run``, or a value of the wrong
kind, is an error naming the file and the key. Every run writes ``config.toml`` beside ``result.json``: every setting
it ran with, so ``lorabench run --config <run dir>/config.toml`` runs it again (into a new folder).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from .config import ConfigError

NOT_WRITTEN = ("cmd", "config", "run_dir", "overwrite", "resume")
"""Settings a config file neither needs nor should carry over (where the results go, which run to resume)."""


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def read(path: Path) -> dict:
    """The TOML table in ``path``; a ConfigError naming the file otherwise."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None


def defaults_from(parser: argparse.ArgumentParser, table: dict, path: Path) -> dict:
    """{dest: value} for ``parser``'s set_defaults from a config ``table``, each checked against its flag."""
    actions = _actions(parser)
    out, keys = {}, {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest in NOT_WRITTEN:
            raise ConfigError(f"--config {path}: {key!r} is not a setting of lorabench run (see run --help)")
        if dest in keys:
            raise ConfigError(f"--config {path}: {keys[dest]!r} and {key!r} are the same setting; keep one")
        keys[dest] = key
        action = actions[dest]
        flag = action.option_strings[0]
        if isinstance(value, dict):
            raise ConfigError(f"--config {path}: {key} is a table; settings are flat key = value pairs")
        flag_kind = isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        if flag_kind:
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} = {value!r}; {flag} takes true or false")
            out[dest] = value
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif action.type in (None, str, Path) and not isinstance(value, str):
            raise ConfigError(f"--config {path}: {key} = {value!r}; {flag} takes text (in quotes)")
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"--config {path}: {key} = {value!r}; choose from {', '.join(map(str, action.choices))}")
        if action.type is int and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"--config {path}: {key} = {value!r}; {flag} takes a whole number")
            value = int(value)
        if action.type is not None:
            try:
                value = action.type(value if not isinstance(value, bool) else str(value))
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise ConfigError(f"--config {path}: {key} = {value!r} is not what {flag} takes") from None
        out[dest] = value
    return out


def _toml_value(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) or '""' for x in v) + "]"
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


PATH_SETTINGS = ("data", "mmlu")
"""Settings of text that may name a path (else a dataset name or 'synthetic'), besides the flags of type Path."""


def render(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The run's settings as a config file (unset optional values left out: they take their defaults again). A
    path that exists is written absolute, so the file reads the same from any folder (``--resume`` from another)."""
    lines = ["# lorabench run settings; rerun with: lorabench run --config THIS_FILE [--run-dir NEW]"]
    for dest, action in _actions(parser).items():
        if dest in NOT_WRITTEN or isinstance(action, (argparse._VersionAction, argparse._HelpAction)):
            continue
        value = getattr(args, dest, None)
        if value is not None and (action.type is Path or dest in PATH_SETTINGS) and Path(value).exists():
            value = str(Path(value).resolve())
        text = _toml_value(value)
        if text is not None:
            lines.append(f"{dest.replace('_', '-')} = {text}")
    return "\n".join(lines) + "\n"


def as_flags(parser: argparse.ArgumentParser, settings: dict) -> list[str]:
    """``settings`` ({dest: value}) as ``parser``'s command-line flags, in their order: the one way a job's settings
    cross into another process (bench rows). A value of None is left out; a list or tuple is comma-separated."""
    actions, out = _actions(parser), []
    for dest, value in settings.items():
        if value is None:
            continue
        if dest not in actions:
            raise ConfigError(f"{dest.replace('_', '-')} is not a setting of lorabench {parser.prog.split()[-1]}")
        action = actions[dest]
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(action.option_strings[0 if value else 1])
        elif isinstance(action, argparse._StoreTrueAction):
            out += [action.option_strings[0]] if value else []
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            out += [action.option_strings[0], text]
    return out
