"""Engines: the model stacks the training loop can drive, behind one contract (base.Engine).

``native`` is ours (model.py + lora.py, tuned by NativeOptions); ``reference`` is transformers + PEFT, the seed's
stack, with ``reference+liger`` and ``reference+compile`` as the strongest off-the-shelf variants; ``unsloth`` and
``unsloth-fp8`` are Unsloth's stack (optional, CUDA only).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ..config import ConfigError, LoRAConfig, ModelConfig
from ..precision import Precision, get_precision
from .base import Engine, canonical_adapters
from .native import NativeOptions

__all__ = ["ENGINES", "Engine", "NativeOptions", "build_engine", "canonical_adapters", "check_native_flags",
           "precision_problem"]

ENGINES = ("native", "reference", "reference+liger", "reference+compile", "unsloth", "unsloth-fp8")


def precision_problem(name: str, precision: Precision) -> str | None:
    """Why engine ``name`` cannot run ``precision`` (None if it can): FP8 weights are the native engine's and
    Unsloth's ``load_in_fp8`` (``unsloth-fp8``), which in turn runs nothing else, so a row's precision always says
    what its weights were."""
    if precision.fp8_weights and name not in ("native", "unsloth-fp8"):
        return (f"--engine {name} has no FP8 weights; --precision fp8 runs on native and unsloth-fp8 "
                "(Unsloth's load_in_fp8)")
    if name == "unsloth-fp8" and not precision.fp8_weights:
        return (f"--engine unsloth-fp8 is Unsloth's FP8 weights (load_in_fp8); run it with --precision fp8 "
                f"(preset fp8), not {precision.name}")
    return None


OTHER_ENGINE_CHECKPOINTING = {"reference": ("none", "block"), "unsloth": ("none", "block", "offload")}
"""--activation-checkpointing on the reference and Unsloth engines (by engine family), each stack's own: block is
transformers' gradient checkpointing of every decoder layer (Unsloth: ``use_gradient_checkpointing=True``),
offload Unsloth's ``"unsloth"`` mode, which keeps each layer's input in host memory."""


def check_native_flags(name: str, given: NativeOptions):
    """Refuse a native-engine tuning flag (``given``: the options as the user set them, before defaults) for
    another engine, which would run without it while the command line said otherwise."""
    if name == "native":
        return
    set_ = [f for f, v in asdict(given).items() if v is not None and f != "activation_checkpointing"]
    if set_:
        flags = ", ".join("--" + f.replace("_", "-") for f in set_)
        raise ConfigError(f"{flags}: native engine tuning; --engine {name} does not take it (drop it, or run "
                          "--engine native)")
    _check_other_checkpointing(name, given.activation_checkpointing or "none")


def _check_other_checkpointing(name: str, policy: str):
    takes = OTHER_ENGINE_CHECKPOINTING.get(name.partition("+")[0].removesuffix("-fp8"), ("none",))
    if policy not in takes:
        raise ConfigError(f"--activation-checkpointing {policy} is the native engine's; --engine {name} has "
                          f"{', '.join(takes)}")


def build_engine(name: str, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir: str | Path | None,
                 device: torch.device, precision: Precision | str, seed: int,
                 native: NativeOptions | None = None, attn: str = "eager", sharder=None) -> Engine:
    """Build engine ``name`` in ``precision`` with base weights from ``model_dir`` (None: canonical random weights
    from ``seed``) and canonical adapters from ``seed``. ``native``: the native engine's tuning (fields left None
    are resolved for the precision and device: NativeOptions.resolve); ``attn``: the plain reference engine's
    attention (eager or sdpa); ``sharder``: the native engine's model sharded on the meta device (shard.py)."""
    precision = get_precision(precision) if isinstance(precision, str) else precision
    why = precision_problem(name, precision) if name in ENGINES else None
    if why:
        raise ConfigError(why)
    checkpointing = (native.activation_checkpointing if native is not None else None) or "none"
    if name != "native":
        _check_other_checkpointing(name, checkpointing)
    if name == "native":
        from .native import NativeEngine

        options = (native or NativeOptions()).resolve(precision, device, lora.dropout)
        return NativeEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype, seed=seed,
                            options=options, sharder=sharder)
    if name == "reference" or name.startswith("reference+"):
        from .reference import ReferenceEngine

        return ReferenceEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype,
                               seed=seed, attn=attn, variant=name.partition("+")[2] or None,
                               checkpointing=checkpointing)
    if name in ("unsloth", "unsloth-fp8"):
        from .unsloth import UnslothEngine

        return UnslothEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype, seed=seed,
                             fp8=name == "unsloth-fp8", checkpointing=checkpointing)
    raise ConfigError(f"--engine: unknown {name!r}; choose from {', '.join(ENGINES)}")
