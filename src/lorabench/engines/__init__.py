"""Engines: the model stacks the training loop can drive, behind one small interface.

An engine is built with ``build_engine(name, ...)`` and offers:
``loss(ids, labels)`` (mean next-token cross-entropy, fp32 scalar), ``logits(ids)`` (fp32 [B, T, V]),
``trainable_params()``, ``save_adapter(dir)``, ``load_adapter(dir)``, ``train()``/``eval()``, plus
``model`` (the nn.Module) and ``name``. ``native`` is ours; ``reference`` is transformers + PEFT, the seed's stack.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, LoRAConfig, ModelConfig
from ..lora import read_adapter, save_adapter

ENGINES = ("native", "reference", "reference+liger", "reference+compile")


class Engine:
    """What every engine shares. Subclasses set ``model``, ``lora_cfg``, ``model_dir`` and implement ``loss``,
    ``logits``, ``adapters()`` ({HF module name: (A, B)}) and ``set_adapters(adapters, source)``."""

    name = "engine"
    supports_prefix_cache = False
    """Whether forward_hidden takes kv_caches/position_offset/attn_mask and prefix_kv exists (MMLU reuse)."""

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self):
        self.model.train()

    def eval(self):
        self.model.eval()

    def save_adapter(self, out_dir: str | Path):
        save_adapter(self.adapters(), self.lora_cfg, out_dir,
                     base_model=None if self.model_dir is None else str(self.model_dir))

    def load_adapter(self, adapter_dir: str | Path):
        cfg, adapters = read_adapter(adapter_dir)
        if (cfg.r, cfg.alpha, set(cfg.targets)) != (self.lora_cfg.r, self.lora_cfg.alpha, set(self.lora_cfg.targets)):
            raise ConfigError(f"{adapter_dir}: adapter has r={cfg.r}, alpha={cfg.alpha}, targets={cfg.targets}; "
                              "build the engine with the same LoRA settings")
        self.set_adapters(adapters, source=str(adapter_dir))


def canonical_adapters(cfg: ModelConfig, lora: LoRAConfig, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Initial adapter weights as {HF module name: (A, B)}, drawn from one seed in HF module order:
    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a = sqrt 5), B = 0. Every engine starts here."""
    from ..checkpoint import hf_param_names, hf_param_shape

    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name in hf_param_names(cfg):
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in lora.targets:
            fan_out, fan_in = hf_param_shape(cfg, name)
            bound = fan_in ** -0.5
            a = torch.empty(lora.r, fan_in).uniform_(-bound, bound, generator=g)
            out[module] = (a, torch.zeros(fan_out, lora.r))
    return out


def build_engine(name: str, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir: str | Path | None,
                 device: torch.device, dtype: torch.dtype, seed: int, attn: str = "eager", compile: bool = False,
                 attention: str = "sdpa", fuse: bool = False, compile_mode: str | None = None,
                 dropout_mask: str = "philox16"):
    """Build engine ``name`` with base weights from ``model_dir`` (None: canonical random weights from ``seed``)
    and canonical adapters from ``seed``. ``compile``: torch.compile the native engine's blocks; ``attention``:
    its training attention (model.ATTENTION_IMPLS); ``fuse``: its q/k/v and gate/up GEMMs fused;
    ``compile_mode``: torch.compile's mode for its training blocks; ``dropout_mask``: how its adapters draw
    dropout masks (kernels.dropout.MASK_IMPLS)."""
    if name == "native":
        from .native import NativeEngine

        return NativeEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=dtype, seed=seed,
                            compile=compile, attention=attention, fuse=fuse, compile_mode=compile_mode,
                            dropout_mask=dropout_mask)
    if name == "reference" or name.startswith("reference+"):
        from .reference import ReferenceEngine

        return ReferenceEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=dtype, seed=seed,
                               attn=attn, variant=name.partition("+")[2] or None)
    raise ConfigError(f"--engine: unknown {name!r}; choose from {', '.join(ENGINES)}")
