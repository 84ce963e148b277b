"""``lorabench bench``'s command: its flags checked, each row's settings (every row's, the native rows', each
--variant's) and the table printed; bench.py runs the rows."""
from __future__ import annotations

import argparse
import re
import shlex
import time
from dataclasses import replace
from pathlib import Path

from .. import rundir
from ..cli import NATIVE_FLAGS, _add_native_flags, build_parser, native_options
from ..config import TRAIN_PRESETS, ConfigError

BENCH_COMMON = ("precision", "seq_len", "lora_dropout", "lora_r", "lora_alpha", "lora_targets", "lr", "attn",
                "activation_checkpointing", "memory_budget_gib", "shard")
"""bench's flags that every row takes, as run's settings of the same names."""


def run_flags(settings: dict) -> list[str]:
    """``lorabench run``'s flags for ``settings`` ({dest: value}): how a bench row's job reaches its process."""
    from .. import config_file

    return config_file.as_flags(build_parser().subcommands["run"], settings)


def bench_settings(a) -> tuple[dict, dict]:
    """The ``lorabench run`` settings ({dest: value}) bench's own overrides give every row, and those (the native
    engine's tuning) given to the native rows alone; unset ones left out."""
    common = {k: getattr(a, k) for k in BENCH_COMMON if getattr(a, k) is not None}
    native = {k: getattr(a, k) for k in NATIVE_FLAGS if getattr(a, k) is not None}
    return common, native


def check_checkpoint_blocks(a, options, model: str, variant: str | None = None):
    """A native row's ``options`` (bench's own, or --variant ``variant``'s) against bench's
    --activation-checkpointing and the model's blocks (--checkpoint-blocks), once here rather than in every native
    row's process."""
    from ..config import MODEL_PRESETS
    from ..engines.native import resolve_checkpointing

    layers = MODEL_PRESETS[model].num_hidden_layers if model in MODEL_PRESETS else None
    dropout = 0.05 if a.lora_dropout is None else a.lora_dropout  # (the presets' LoRA dropout)
    try:  # compile unset: on, as on the GPU that bench runs on
        resolve_checkpointing(a.activation_checkpointing, replace(options, compile=options.compile is not False),
                              dropout, layers)
    except ConfigError as e:
        raise ConfigError(f"{e}" if variant is None else f"--variant {variant}: {e}") from None


def cmd_bench(a) -> int:
    import torch

    from ..engines import ENGINES

    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    bad = [e for e in engines if e not in ENGINES] + [p for p in presets if p not in TRAIN_PRESETS]
    if bad or not engines or not presets:
        raise ConfigError(f"--engines/--presets: unknown {bad or 'empty list'}; engines: {', '.join(ENGINES)}; "
                          f"presets: {', '.join(TRAIN_PRESETS)}")
    if a.steps <= a.untimed_steps:
        raise ConfigError(f"--steps {a.steps} must exceed --untimed-steps {a.untimed_steps}")
    if a.rounds < 1:
        raise ConfigError(f"--rounds {a.rounds}: give 1 or more")
    if a.nproc < 1:
        raise ConfigError(f"--nproc {a.nproc}: give 1 or more")
    if not a.timeout > 0:
        raise ConfigError(f"--timeout {a.timeout}: give the seconds a row may take, more than 0")
    if a.seq_len is not None and a.seq_len < 2:
        raise ConfigError(f"--seq-len {a.seq_len}: a sequence needs at least 2 tokens (one input, one target)")
    model = a.model or ("llama2-7b" if torch.cuda.is_available() and a.device != "cpu" else "tiny")
    check_checkpoint_blocks(a, native_options(a), model)  # a bad combination fails here, not in every row
    variants = parse_variants(a.variant)
    if variants and "native" not in engines:
        raise ConfigError("--variant adds native rows beside the plain native one: put native in --engines")
    for name, settings in variants.items():  # each variant's settings over bench's own native ones
        options = native_options(argparse.Namespace(**{k: settings.get(k, getattr(a, k)) for k in NATIVE_FLAGS}))
        check_checkpoint_blocks(a, options, model, name)
    batch_sizes = [None]
    if a.batch_size is not None:
        try:
            batch_sizes = [int(x) for x in a.batch_size.split(",") if x.strip()]
        except ValueError:
            batch_sizes = []
        if not batch_sizes or min(batch_sizes) < 1:
            raise ConfigError(f"--batch-size {a.batch_size!r}: give a positive integer or a comma-separated list "
                              "of them (e.g. 4,16,32)")
    run_dir, held = rundir.claim(a.run_dir, a.overwrite, Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-bench",
                                 "bench")
    with held:
        return _bench(a, run_dir, engines, presets, model, batch_sizes, variants)


def _bench(a, run_dir, engines, presets, model, batch_sizes, variants) -> int:
    from .bench import best_lines, floor_lines, native_lines, run_bench, table

    common, native = bench_settings(a)
    rows, floors = run_bench(engines, presets, model, a.steps, a.untimed_steps, a.device, run_dir, common,
                             a.timeout, floor=not a.no_floor, batch_sizes=batch_sizes, rounds=a.rounds,
                             nproc=a.nproc, native_overrides=native, variants=variants, to_flags=run_flags)
    print(table(rows))
    versus = native_lines(rows)
    if versus:
        print(versus)
    if floors:
        print(floor_lines(floors))
    if len(batch_sizes) > 1:
        print(best_lines(rows))
    print(f"wrote {run_dir / 'bench.json'} and {run_dir / 'bench.md'}")
    return 0 if any("error" not in r for r in rows) else 1


class _Strict(argparse.ArgumentParser):
    """A parser that raises ConfigError where argparse would print usage and exit."""

    def error(self, message):
        raise ConfigError(message)


def parse_variants(specs: list[str]) -> dict[str, dict]:
    """--variant NAME:FLAGS (each) as {NAME: the native settings ({dest: value}) FLAGS set}; a bad name, a repeated
    one, a flag that is not native tuning or a bad value: ConfigError naming the --variant."""
    parser = _Strict(prog="--variant", add_help=False)
    _add_native_flags(parser)
    out: dict[str, dict] = {}
    for text in specs:
        name, colon, flags = text.partition(":")
        where = f"--variant {text!r}"
        if not colon or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"{where}: give NAME:FLAGS, NAME of letters, digits, '.', '_', '-' (e.g. "
                              "'tensorwise:--fp8-recipe tensorwise')")
        if name in out:
            raise ConfigError(f"{where}: the name {name} is given twice")
        try:
            settings = vars(parser.parse_args(shlex.split(flags)))
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{where}: {e} (a variant takes the native engine's tuning flags, as bench does)")
        settings = {k: v for k, v in settings.items() if v is not None}
        if not settings:
            raise ConfigError(f"{where}: no flags; a variant needs at least one native tuning flag")
        out[name] = settings
    return out
