"""The native engine: our Llama (model.py) with our LoRA (lora.py)."""
from __future__ import annotations

import torch

from ..checkpoint import hf_to_native, iter_checkpoint, load_into, native_to_hf, random_hf_weights
from ..config import ConfigError, LoRAConfig, ModelConfig
from ..lora import inject_lora, lora_modules, set_mask_impl
from ..model import Llama
from . import Engine, canonical_adapters


class NativeEngine(Engine):
    name = "native"

    def __init__(self, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir, device, dtype, seed: int,
                 compile: bool = False, attention: str = "sdpa", fuse: bool = False,
                 compile_mode: str | None = None, dropout_mask: str = "philox16"):
        self.model_cfg, self.lora_cfg, self.model_dir = model_cfg, lora, model_dir
        with torch.device("meta"):
            model = Llama(model_cfg).to(dtype)
        inject_lora(model, lora)
        set_mask_impl(model, dropout_mask)
        model.to_empty(device=device)
        if model_cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
        if model_dir is None:
            load_into(model, random_hf_weights(model_cfg, seed, device, dtype), True, "random init")
        else:
            load_into(model, iter_checkpoint(model_dir), True, str(model_dir))
        model.set_attention(attention)
        self.model = model
        self.set_adapters(canonical_adapters(model_cfg, lora, seed), source="canonical init")
        if fuse:
            model.fuse_projections()
        if compile:
            model.compile_blocks(compile_mode)

    # -- the engine interface -------------------------------------------------------------------------------
    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss(ids, labels)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    supports_prefix_cache = True

    def forward_hidden(self, ids, kv_caches=None, position_offset: int = 0, attn_mask=None):
        return self.model.hidden(ids, attn_mask=attn_mask, kv_caches=kv_caches, position_offset=position_offset)

    def prefix_kv(self, ids: torch.Tensor):
        """Per-layer (k, v) of a prefix [1, T], for reuse by forward_hidden(kv_caches=..., position_offset=T)."""
        return self.model.hidden(ids, return_kv=True)[1]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()

    def adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {native_to_hf(n): (m.lora_A, m.lora_B) for n, m in lora_modules(self.model).items()}

    def set_adapters(self, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], source: str):
        mods = lora_modules(self.model)
        native = {}
        for k in adapters:
            try:
                native[k] = hf_to_native(k)
            except KeyError:
                native[k] = None
        unknown = [k for k, n in native.items() if n not in mods]
        missing = set(mods) - set(native.values())
        if unknown or missing:
            raise ConfigError(f"{source}: adapter does not fit the model "
                              f"(unexpected: {unknown[:3]}, missing: {sorted(missing)[:3]})")
        with torch.no_grad():
            for k, (a, b) in adapters.items():
                m = mods[native[k]]
                if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
                    raise ConfigError(f"{source}: {k} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                      f"expected {tuple(m.lora_A.shape)}, {tuple(m.lora_B.shape)}")
                m.lora_A.copy_(a)
                m.lora_B.copy_(b)

