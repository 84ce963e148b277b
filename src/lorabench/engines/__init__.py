"""Engines: the model stacks the training loop can drive, behind one contract (base.Engine).

``native`` is ours (model.py + lora.py, tuned by NativeOptions); ``reference`` is transformers + PEFT, the seed's
stack, with ``reference+liger`` and ``reference+compile`` as the strongest off-the-shelf variants; ``unsloth`` and
``unsloth-fp8`` are Unsloth's stack (optional, CUDA only).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, LoRAConfig, ModelConfig
from ..precision import Precision, get_precision
from .base import Engine, canonical_adapters
from .native import NativeOptions

__all__ = ["ENGINES", "Engine", "NativeOptions", "build_engine", "canonical_adapters"]

ENGINES = ("native", "reference", "reference+liger", "reference+compile", "unsloth", "unsloth-fp8")


def build_engine(name: str, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir: str | Path | None,
                 device: torch.device, precision: Precision | str, seed: int,
                 native: NativeOptions | None = None, attn: str = "eager") -> Engine:
    """Build engine ``name`` in ``precision`` with base weights from ``model_dir`` (None: canonical random weights
    from ``seed``) and canonical adapters from ``seed``. ``native``: the native engine's tuning (fields left None
    are resolved for the precision and device: NativeOptions.resolve); ``attn``: the plain reference engine's
    attention (eager or sdpa)."""
    precision = get_precision(precision) if isinstance(precision, str) else precision
    if name == "native":
        from .native import NativeEngine

        options = (native or NativeOptions()).resolve(precision, device)
        return NativeEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype, seed=seed,
                            options=options)
    if name == "reference" or name.startswith("reference+"):
        from .reference import ReferenceEngine

        return ReferenceEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype,
                               seed=seed, attn=attn, variant=name.partition("+")[2] or None)
    if name in ("unsloth", "unsloth-fp8"):
        from .unsloth import UnslothEngine

        return UnslothEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype, seed=seed,
                             fp8=name == "unsloth-fp8")
    raise ConfigError(f"--engine: unknown {name!r}; choose from {', '.join(ENGINES)}")
