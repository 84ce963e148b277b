"""Frozen block projections held quantized: FP8 (--precision fp8; ``Fp8Linear``, kernels/fp8.py) and NF4
(--precision nf4, QLoRA's 4-bit base; the format is kernels/nf4.py's). convert.quantize_projections puts them in a
model; an adapted projection (lora.LoRALinear) holds the same storage itself.

A projection stored as NF4 keeps its packed codes in ``weight`` (uint8 [out, in / 2], frozen: the parameter a
checkpoint's tensor is loaded into, so names, devices and DDP see it as any frozen weight) and its quantization
state in non-persistent buffers beside it, ``weight_absmax``, ``weight_nested_absmax``, ``weight_offset``,
``weight_levels`` and ``weight_nested_code`` (and, under FP8 products, ``weight_fp8_scale``: the e4m3 row scales
of the dequantized weight, computed once as it loads). ``store_nf4`` makes them (empty, on the meta device before
loading), ``set_nf4`` fills them from an ``NF4Tensor``, and ``nf4_weight`` reads them back as one for
``nf4_linear``.

Weights arrive in two ways (checkpoint.load_into): a bf16/fp16/fp32 tensor is quantized as it arrives, one tensor
at a time (QLoRA's recipe: blocks of 64, double quantization); a checkpoint that bitsandbytes quantized
(``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` saved with ``save_pretrained``) carries the
packed codes with their quant-state tensors, which ``Bnb4bitReader`` gathers and which are kept as they are, so the
model computes with exactly the weights bitsandbytes would. Into a model of another precision such a checkpoint
loads dequantized.
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn as nn

from .errors import ConfigError
from .kernels.fp8 import WEIGHT_FORMAT, fp8_linear
from .kernels.nf4 import BLOCK, NESTED_BLOCK, NF4Tensor, from_quant_state, nf4_linear

NF4_FORMAT = torch.uint8
"""The dtype of an NF4 projection's ``weight`` (its packed codes): how a loader tells one from a plain weight."""


def store_nf4(module: nn.Module, out_features: int, in_features: int, device: torch.device | str | None):
    """Replace ``module.weight`` by an empty NF4 store of an [out_features, in_features] weight, double-quantized
    (its buffers are reassigned when a checkpoint brings another layout)."""
    if in_features % 2:
        raise ConfigError(f"--precision nf4 packs two 4-bit codes a byte along each row; a projection with "
                          f"{in_features} inputs (odd) cannot be stored that way")
    blocks = math.ceil(out_features * in_features / BLOCK)
    module.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=NF4_FORMAT, device=device),
                                 requires_grad=False)
    for name, t in (("absmax", torch.empty(blocks, dtype=torch.uint8, device=device)),
                    ("nested_absmax", torch.empty(math.ceil(blocks / NESTED_BLOCK), device=device)),
                    ("offset", torch.zeros((), device=device)),
                    ("levels", torch.empty(16, device=device)),
                    ("nested_code", torch.empty(256, device=device))):
        module.register_buffer("weight_" + name, t, persistent=False)
    module.register_buffer("weight_fp8_scale", None, persistent=False)


def is_nf4(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None and module.weight.dtype == NF4_FORMAT


def set_nf4(module: nn.Module, q: NF4Tensor):
    """Fill ``module``'s NF4 store with ``q`` (moved to the store's device): the codes into ``weight`` in place, the
    quantization state into its buffers."""
    w = module.weight
    if tuple(q.shape) != (w.shape[0], w.shape[1] * 2):
        raise ValueError(f"an NF4 weight of shape {tuple(q.shape)} for a store of {(w.shape[0], w.shape[1] * 2)}")
    dev = w.device
    with torch.no_grad():
        w.copy_(q.packed.reshape(w.shape))
    module.weight_absmax = q.absmax.to(dev)
    module.weight_levels = q.levels.to(dev, torch.float32)
    if q.nested:
        module.weight_nested_absmax = q.nested_absmax.to(dev, torch.float32)
        module.weight_nested_code = q.nested_code.to(dev, torch.float32)
        module.weight_offset = torch.as_tensor(q.offset, dtype=torch.float32).to(dev)
    else:
        module.weight_nested_absmax = module.weight_nested_code = None
        module.weight_offset = torch.zeros((), device=dev)
    module.nf4_block = (q.block, q.nested_block)
    if getattr(module, "nf4_fp8_grad", None) is not None:  # FP8 products: the e4m3 row scales, once (frozen)
        module.weight_fp8_scale = nf4_weight(module).fp8_row_scales(_by_kernel(module))


def nf4_weight(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> NF4Tensor:
    """``module``'s NF4 store as an NF4Tensor (no copy) that dequantizes to ``dtype``."""
    w = module.weight
    block, nested_block = getattr(module, "nf4_block", (BLOCK, NESTED_BLOCK))
    return NF4Tensor(w, module.weight_absmax, (w.shape[0], w.shape[1] * 2), dtype, block, module.weight_levels,
                     module.weight_nested_absmax, module.weight_nested_code, module.weight_offset, nested_block,
                     getattr(module, "weight_fp8_scale", None))


NF4_DEQUANT = ("torch", "triton")
"""How an NF4 weight is dequantized for its products: PyTorch ops (fused by torch.compile into the block) or one
Triton kernel on a GPU (kernels/nf4_triton.py). A module's ``nf4_dequant`` says which."""


def nf4_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T over ``module``'s NF4 weight, in x's dtype (its bias, if any, not added); as FP8 GEMMs where the
    module's ``nf4_fp8_grad`` names the input gradient's FP8 format (--precision nf4-fp8)."""
    return nf4_linear(x, nf4_weight(module, x.dtype), _by_kernel(module), getattr(module, "nf4_fp8_grad", None))


def _by_kernel(module: nn.Module) -> bool:
    """Whether ``module`` dequantizes its NF4 weight by the Triton kernel (its ``nf4_dequant``, NF4_DEQUANT)."""
    return getattr(module, "nf4_dequant", "torch") == "triton"


class Fp8Linear(nn.Module):
    """A frozen bias-free projection stored in float8 e4m3 with one fp32 scale per output channel (all equal under
    the tensorwise recipe); forward and input gradient run as FP8 GEMMs (kernels/fp8.py). Its weights arrive
    quantized through checkpoint.load_into."""

    def __init__(self, in_features: int, out_features: int, grad_dtype: torch.dtype, device=None,
                 bias: nn.Parameter | None = None, recipe: str = "rowwise"):
        super().__init__()
        self.in_features, self.out_features, self.grad_dtype = in_features, out_features, grad_dtype
        self.fp8_recipe = recipe
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=WEIGHT_FORMAT, device=device),
                                   requires_grad=False)
        self.bias = bias  # kept in the model's dtype (Qwen2's q/k/v)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.weight_scale, self.grad_dtype, self.fp8_recipe)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3, {self.fp8_recipe} scales"


class Nf4Linear(nn.Module):
    """A frozen bias-free (or fixed-bias) projection stored as NF4; its weight arrives through
    checkpoint.load_into, quantized there or read from a bitsandbytes checkpoint."""

    def __init__(self, in_features: int, out_features: int, device=None, bias: nn.Parameter | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        store_nf4(self, out_features, in_features, device)
        self.bias = bias  # kept in the model's dtype (Qwen2's q/k/v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nf4_forward(self, x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, blocks of {BLOCK}, double-quantized absmax"


# -- bitsandbytes' 4-bit checkpoints ------------------------------------------------------------------------------

QUANT_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
"""What bitsandbytes saves beside a 4-bit ``<name>.weight`` (as ``<name>.weight.<suffix>``)."""
OTHER_QUANT = {"quant_state.bitsandbytes__fp4": "4-bit FP4 (bnb_4bit_quant_type='fp4')",
               "SCB": "8-bit (load_in_8bit)", "weight_format": "8-bit (load_in_8bit)"}


class Bnb4bitReader:
    """Gathers the tensors of bitsandbytes' NF4 weights as a checkpoint streams them (any order, any shard) and
    hands each weight over as an NF4Tensor once all of its parts have come."""

    def __init__(self, source: str):
        self.source = source
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def take(self, name: str, t: torch.Tensor) -> tuple[bool, tuple[str, NF4Tensor] | None]:
        """(whether ``name`` is part of a 4-bit weight, (weight name, NF4Tensor) when that weight is complete)."""
        for suffix, what in OTHER_QUANT.items():
            if name.endswith("." + suffix):
                raise ConfigError(f"{self.source}: {name} belongs to a bitsandbytes {what} weight; lorabench reads "
                                  "NF4 4-bit checkpoints (bnb_4bit_quant_type='nf4') or unquantized ones")
        prefix = part = None
        for suffix in QUANT_STATE:
            if name.endswith(".weight." + suffix):
                prefix, part = name[:-len(suffix) - 1], suffix
                break
        if prefix is None:
            if not (name.endswith(".weight") and t.dtype == NF4_FORMAT):
                return False, None
            prefix, part = name, "packed"
        parts = self.pending.setdefault(prefix, {})
        parts[part] = t
        try:
            if not self._complete(parts):
                return True, None
            del self.pending[prefix]
            return True, (prefix, from_quant_state(parts.pop("packed"), {f"{prefix}.{k}": v for k, v in parts.items()},
                                                   prefix))
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.source}: {prefix} is not a readable bitsandbytes NF4 weight ({e})") from None

    @staticmethod
    def _complete(parts: dict[str, torch.Tensor]) -> bool:
        if not {"packed", "absmax", "quant_map", QUANT_STATE[-1]} <= set(parts):
            return False
        meta = json.loads(bytes(parts[QUANT_STATE[-1]].tolist()).decode())
        return "nested_blocksize" not in meta or {"nested_absmax", "nested_quant_map"} <= set(parts)

    def finish(self):
        """Refuse a checkpoint that ended with a 4-bit weight incomplete."""
        if self.pending:
            prefix, parts = next(iter(self.pending.items()))
            have = ", ".join(sorted(parts))
            raise ConfigError(f"{self.source}: the 4-bit weight {prefix} is incomplete (has {have}; bitsandbytes "
                              f"saves the packed weight with {', '.join(QUANT_STATE)}); copy the checkpoint again")

