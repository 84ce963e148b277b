"""The reference engine: transformers ``LlamaForCausalLM`` + PEFT ``LoraConfig``, the stack FlagPerf's case runs.

Attention is ``eager`` by default, as the case's transformers 4.31 ran it; ``attn="sdpa"`` is available. Two
variants stand for the strongest off-the-shelf stacks (Liger-Kernel's Llama patch; torch.compile), both with SDPA
attention: ``reference+liger`` (Liger kernels patched into transformers' Llama: RoPE, RMSNorm, SwiGLU, fused linear
cross-entropy; needs liger-kernel) and ``reference+compile`` (torch.compile of the PEFT model). ``reference+bnb``
is QLoRA's own stack, PEFT over bitsandbytes' Linear4bit (NF4, double quantization, bf16 compute: what
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16)`` loads), the row --precision nf4 is set against. Base
weights come from the same stream as the native engine's (a checkpoint folder or the canonical random weights),
and the adapters start from the same canonical values, so both engines train the same thing.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..checkpoint import iter_checkpoint, load_into, random_hf_weights
from ..config import ConfigError, LoRAConfig, ModelConfig
from .base import Engine, canonical_adapters


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build HF modules directly in ``dtype`` (no fp32 copy of a 7B model on the way)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _require():
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--engine reference needs transformers and peft ({e.name} is missing): "
                          "pip install 'lorabench[reference]'") from None


class PeftEngine(Engine):
    """The calls every engine over a PEFT-wrapped HF causal LM shares (reference, Unsloth): the loss through the
    model's own forward (``self._fwd``, the compiled one where there is one), logits, hidden states and head for
    MMLU, and the adapters read from and written to PEFT's LoRA layers."""

    def loss(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            return self._fwd(input_ids=ids, labels=labels, use_cache=False).loss
        # packed documents: transformers' mask builder reads the document boundaries from position_ids (a
        # restart) and keeps attention within each document
        return self._fwd(input_ids=ids, labels=labels, position_ids=positions.long(), use_cache=False).loss

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits.float()

    def forward_hidden(self, ids: torch.Tensor, kv_caches=None, position_offset: int = 0,
                       attn_mask=None) -> torch.Tensor:
        if kv_caches is not None or position_offset or attn_mask is not None:
            raise NotImplementedError(f"engine {self.name} has no prefix cache (supports_prefix_cache is False)")
        return self.model.get_base_model().model(input_ids=ids, use_cache=False).last_hidden_state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.get_base_model().lm_head(h).float()

    def _lora_layers(self) -> dict:
        from peft.tuners.lora import LoraLayer

        out = {}
        for name, mod in self.model.named_modules():
            if isinstance(mod, LoraLayer):
                out[name.removeprefix("base_model.model.")] = mod
        return out

    def adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {k: (m.lora_A["default"].weight, m.lora_B["default"].weight) for k, m in self._lora_layers().items()}

    def set_adapters(self, adapters: dict, source: str):
        layers = self._lora_layers()
        if set(layers) != set(adapters):
            raise ConfigError(f"{source}: adapter modules do not match the model "
                              f"(extra {sorted(set(adapters) - set(layers))[:3]}, "
                              f"missing {sorted(set(layers) - set(adapters))[:3]})")
        with torch.no_grad():
            for k, (a, b) in adapters.items():
                layers[k].lora_A["default"].weight.copy_(a)
                layers[k].lora_B["default"].weight.copy_(b)


def build(spec, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir, device, precision, seed: int,
          native, attn: str, checkpointing: str | None, sharder=None) -> "ReferenceEngine":
    """The reference engines (engines.build_engine): plain, +liger or +compile as ``spec`` names them."""
    return ReferenceEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype, seed=seed,
                           attn=attn, variant=spec.name.partition("+")[2] or None,
                           checkpointing=checkpointing or "none")


class ReferenceEngine(PeftEngine):
    name = "reference"

    def __init__(self, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir, device, dtype, seed: int,
                 attn: str = "eager", variant: str | None = None, checkpointing: str = "none"):
        """``checkpointing`` "block": transformers' gradient checkpointing of every decoder layer (non-reentrant,
        so the frozen embeddings need no gradient; dropout masks replayed from the saved RNG state)."""
        _require()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        if attn not in ("eager", "sdpa"):
            raise ConfigError(f"--attn must be eager or sdpa, got {attn!r}")
        if variant not in (None, "liger", "compile", "bnb"):
            raise ConfigError(f"--engine reference+{variant}: unknown variant; use reference+liger, "
                              "reference+compile or reference+bnb")
        if variant:
            attn = "sdpa"
            self.name = f"reference+{variant}"
        if variant == "bnb":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError("--engine reference+bnb needs bitsandbytes: pip install 'lorabench[qlora]'") from None
        if variant == "liger":
            try:
                from liger_kernel.transformers import apply_liger_kernel_to_llama
            except ImportError:
                raise ConfigError("--engine reference+liger needs liger-kernel (pip install liger-kernel)") from None
            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                        cross_entropy=False)
        self.model_cfg, self.lora_cfg, self.model_dir, self.attn = model_cfg, lora, model_dir, attn
        hf_cfg = model_cfg.hf_config()  # LlamaConfig, or Qwen2Config for q/k/v biases
        hf_cfg._attn_implementation = attn
        with torch.device(device), _default_dtype(dtype):
            base = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
        if hasattr(base, "set_attn_implementation"):
            base.set_attn_implementation(attn)
        stream = random_hf_weights(model_cfg, seed, device, dtype) if model_dir is None else iter_checkpoint(model_dir)
        load_into(base, stream, False, "random init" if model_dir is None else str(model_dir))
        if variant == "bnb":
            to_bnb_4bit(base, device)
        self.checkpointing = checkpointing
        if checkpointing == "block":  # transformers 5.2x's name, and the older one
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, peft_cfg)
        # fp16 is FlagPerf's fp16 row (its training/benchmarks/llama2_7b_finetune/pytorch): get_peft_model, then
        # model.half() (the adapters too), the loss under autocast, GradScaler, fused AdamW (train.py); other
        # dtypes keep PEFT's fp32 adapters
        self.half = dtype == torch.float16
        if self.half:
            self.model.half()
        self._device = torch.device(device)
        self.set_adapters(canonical_adapters(model_cfg, lora, seed), source="canonical init")
        self._fwd = torch.compile(self.model) if variant == "compile" else self.model

    def autocast(self):
        if self.half:
            return torch.autocast(self._device.type, dtype=torch.float16)
        return super().autocast()

    def describe(self) -> dict:
        numerics = ("FlagPerf's fp16: model.half() after get_peft_model (fp16 adapters), autocast, GradScaler, "
                    "fused AdamW" if self.half else "PEFT: adapters in fp32, no autocast")
        if self.name == "reference+bnb":
            import bitsandbytes

            numerics += (f"; block projections bitsandbytes {bitsandbytes.__version__} Linear4bit: NF4, double "
                         "quantization, bf16 compute")
        return {"attn": self.attn, "numerics": numerics, "activation_checkpointing": self.checkpointing}


def to_bnb_4bit(model, device):
    """Every decoder block projection of the HF ``model`` replaced by bitsandbytes' Linear4bit holding its weight as
    NF4 (blocks of 64, double quantization, bf16 compute), quantized by bitsandbytes on ``device`` one projection at
    a time; embeddings, norms and lm_head as they were."""
    import bitsandbytes as bnb
    import torch.nn as nn

    from ..shapes import PROJECTIONS

    for layer in model.model.layers:
        for part in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                lin = getattr(part, name, None)
                if not isinstance(lin, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if lin.bias is not None:
                    q.bias = lin.bias
                setattr(part, name, q.to(device))
