"""Engines: the model stacks the training loop can drive, behind one contract (base.Engine), each declared with
what it can do in registry.SPECS.

``native`` is ours (model.py + lora.py, tuned by NativeOptions); ``reference`` is transformers + PEFT, the stack
FlagPerf's case runs, with ``reference+liger`` and ``reference+compile`` as the strongest off-the-shelf variants;
``unsloth``, ``unsloth-fp8`` and ``unsloth-4bit`` are Unsloth's stack (optional, CUDA only).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ..config import ConfigError, LoRAConfig, ModelConfig
from ..precision import Precision, get_precision
from .base import Engine, canonical_adapters
from .native import NativeOptions, resolve_checkpointing
from .registry import OURS, SPECS, EngineSpec, either, spec

__all__ = ["ENGINES", "OURS", "SPECS", "Engine", "EngineSpec", "NativeOptions", "build_engine", "canonical_adapters",
           "check_native_flags", "checkpointing_policy", "precision_problem", "spec"]

ENGINES = tuple(SPECS)


def precision_problem(name: str, precision: Precision) -> str | None:
    """Why engine ``name`` cannot run ``precision`` (None if it can), so a row's precision always says what its
    weights were: FP8 (NF4) weights only under --precision fp8 (nf4), and --precision fp8 (nf4) only on an engine
    with such weights."""
    s = spec(name)
    if precision.name in s.precisions:
        return None
    if precision.weights:
        able = [e.name for e in SPECS.values() if precision.name in e.precisions]
        what = "no " + precision.weights.upper() + " weights" if not s.can(f"{precision.weights}-weights") \
            else f"{precision.weights.upper()} weights but not --precision {precision.name}'s products"
        return f"--engine {name} has {what}; --precision {precision.name} runs on {either(able)}"
    held = s.precisions[0]
    if len(s.precisions) == 1 and get_precision(held).weights:
        from ..config import TRAIN_PRESETS

        preset = next(n for n, p in TRAIN_PRESETS.items() if p.train.precision == held)
        return (f"--engine {name} holds {get_precision(held).weights.upper()} weights; run it with --precision "
                f"{held} (preset {preset}), not {precision.name}")
    return f"--engine {name} runs {', '.join(s.precisions)}, not --precision {precision.name}"


def check_native_flags(name: str, given: NativeOptions):
    """Refuse a native-engine tuning flag (``given``: the options as the user set them, before defaults) for an
    engine without that tuning, which would run without it while the command line said otherwise."""
    s = spec(name)
    if not s.can("native-options"):
        set_ = [f for f, v in asdict(given).items() if v is not None]
        if set_:
            flags = ", ".join("--" + f.replace("_", "-") for f in set_)
            raise ConfigError(f"{flags}: native engine tuning; --engine {name} does not take it (drop it, or run "
                              "--engine native)")


def checkpointing_policy(name: str, policy: str | None, native: NativeOptions, lora_dropout: float,
                        layers: int | None = None) -> str:
    """The activation-checkpointing policy engine ``name`` runs: ``policy`` as given (refused where the engine
    lacks it), else the engine's default (the native engine's follows its resolved ``native`` options and the
    adapters' dropout, and checks them against the model's ``layers``: native.resolve_checkpointing; the
    others', "none")."""
    s = spec(name)
    policy = (resolve_checkpointing(policy, native, lora_dropout, layers) if s.can("native-options")
              else policy or "none")
    s.check_checkpointing(policy)
    return policy


def build_engine(name: str, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir: str | Path | None,
                 device: torch.device, precision: Precision | str, seed: int,
                 native: NativeOptions | None = None, attn: str = "eager", checkpointing: str | None = None,
                 sharder=None) -> Engine:
    """Build engine ``name`` (its spec's builder) in ``precision`` with base weights from ``model_dir`` (None:
    canonical random weights from ``seed``) and canonical adapters from ``seed``. ``native``: the native engine's
    tuning, as ``NativeOptions.resolve`` made it (a job resolves it once: runner.resolve; fields left None are
    resolved here for the precision and device); ``attn``: the plain reference engine's attention (eager or sdpa);
    ``checkpointing``: the activation-checkpointing policy (None: the engine's default, checkpointing_policy);
    ``sharder``: the native engine's model sharded on the meta device (shard.py)."""
    import importlib

    s = spec(name)
    precision = get_precision(precision) if isinstance(precision, str) else precision
    why = precision_problem(name, precision)
    if why:
        raise ConfigError(why)
    native = native or NativeOptions()
    if checkpointing is not None:
        s.check_checkpointing(checkpointing)
    module, function = s.builder.split(":")
    build = getattr(importlib.import_module(f".{module}", __name__), function)
    return build(s, model_cfg, lora, model_dir=model_dir, device=device, precision=precision, seed=seed,
                 native=native, attn=attn, checkpointing=checkpointing, sharder=sharder)
