"""Our LoRA: a frozen base Linear plus a trainable low-rank update, injected by projection name.

y = x W^T + (dropout(x) A^T B^T) * alpha / r, with A [r, in] initialised kaiming-uniform (a = sqrt 5, i.e.
U(-1/sqrt(in), 1/sqrt(in)), as PEFT does) and B [out, r] zero, so training starts from the base model. The adapter
weights stay fp32 whatever the base dtype (master weights, as PEFT keeps them); the adapter path is computed in
the activations' dtype, as autocast would (PEFT upcasts the activations to fp32 instead: an fp32 copy of every
adapted input, saved for the backward, and FFMA matmuls; in fp32 both are the same computation, and in bf16 the
loss curves agree within rounding, checked by tests/test_engines.py and the GPU benchmark). Adapters save and
load in PEFT's format: adapter_io.py.
"""
from __future__ import annotations

import abc
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from .config import ConfigError, LoRAConfig
from .kernels.dropout import keep_mask, unpack_mask
from .kernels.fp8 import WEIGHT_FORMAT, dequantize, frozen_linear
from .quantized import is_nf4, nf4_forward, nf4_weight, store_nf4


class Adapter(abc.ABC):
    """What a model needs from an adapted projection, whatever its kind: its trainable weights, its contribution
    alone (a fused base GEMM adds it to its own output), the merged weight, and a switch to turn it off."""

    enabled: bool = True
    """False: the projection computes its frozen base alone (``adapters_disabled``)."""

    @abc.abstractmethod
    def adapter_params(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The trainable (A, B) in PEFT's layout: A [r, in], B [out, r]."""

    @abc.abstractmethod
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the projection's output for input ``x`` (whether or not it is enabled:
        callers check ``enabled``)."""

    @abc.abstractmethod
    def merged_weight(self) -> torch.Tensor:
        """The frozen weight with the adapter folded in, in the base dtype (bf16 for an FP8 weight)."""


class LoRALinear(Adapter, nn.Module):
    """A Linear whose ``weight`` (and ``bias``, where it has one) is frozen, with ``lora_A``/``lora_B`` trainable."""

    mask_impl = "philox16"
    """How dropout masks are drawn (kernels.dropout.MASK_IMPLS); set per model by set_mask_impl."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, salt: int = 0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.data, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.data, requires_grad=False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        self.r, self.scale, self.dropout = r, alpha / r, dropout
        self.salt = salt  # distinct for adapters of one block that read the same input (kernels/dropout.py)
        self.fresh_input = False
        """True (--activation-checkpointing adapter-inputs): the backward reads the input through ``fresh``."""
        self.register_buffer("weight_scale", None, persistent=False)  # per-channel scales of an FP8 weight
        self.grad_dtype = WEIGHT_FORMAT  # the FP8 format of the input gradient of an FP8 weight
        self.fp8_recipe = "rowwise"  # how an FP8 weight's products are scaled (kernels.fp8.FP8_RECIPES)
        if dev.type != "meta":
            self.reset_adapter()

    def reset_adapter(self):
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()

    def store_fp8(self, grad_dtype: torch.dtype, recipe: str = "rowwise"):
        """Hold the frozen weight in FP8 with per-channel scales (kernels/fp8.py), filled when it is loaded."""
        w = self.weight
        self.weight = nn.Parameter(torch.empty(w.shape, dtype=WEIGHT_FORMAT, device=w.device), requires_grad=False)
        self.weight_scale = torch.ones(self.out_features, dtype=torch.float32, device=w.device)
        self.grad_dtype, self.fp8_recipe = grad_dtype, recipe

    def store_nf4(self):
        """Hold the frozen weight as NF4 (quantized.py), filled when it is loaded."""
        store_nf4(self, self.out_features, self.in_features, self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        return y + self.delta(x) if self.enabled else y

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen projection alone (its bias included)."""
        if is_nf4(self):
            y = nf4_forward(self, x)
        else:
            y = frozen_linear(x, self.weight, self.weight_scale, self.grad_dtype, self.fp8_recipe)
        return y if self.bias is None else y + self.bias

    @property
    def drops(self) -> bool:
        """Whether the adapter's input is dropped out in this mode (dropout > 0, training)."""
        return bool(self.dropout) and self.training

    def adapter_params(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_A, self.lora_B

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """dropout(x) A^T B^T * scale (callers skip it while the adapter is disabled)."""
        mask = None
        if self.drops:
            mask = keep_mask(x, self.dropout, self.mask_impl, self.salt)  # kept with probability 1 - p
        return adapter_delta(x, self.lora_A.to(x.dtype), self.lora_B.to(x.dtype), mask, self.dropout, self.scale,
                             self.fresh_input)

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A in the base dtype (for export and the merge invariant); bf16 for a quantized weight."""
        if is_nf4(self):
            return (nf4_weight(self, torch.float32).dequantize() + self.scale * (self.lora_B @ self.lora_A)).bfloat16()
        if self.weight_scale is None:
            return (self.weight.float() + self.scale * (self.lora_B @ self.lora_A)).to(self.weight.dtype)
        return (dequantize(self.weight, self.weight_scale) + self.scale * (self.lora_B @ self.lora_A)).bfloat16()

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale}, dropout={self.dropout}"


def adapter_delta(x, a, b, mask, p: float, scale: float, fresh_input: bool = False) -> torch.Tensor:
    """``(x * mask / (1 - p)) a^T b^T * scale``; ``mask`` (kernels.dropout.keep_mask's: packed or bool) or None for
    no dropout; ``fresh_input``: the backward's product reads x through ``fresh``."""
    return _AdapterDelta.apply(x, a, b, mask, p, scale, fresh_input)


def fresh(x: torch.Tensor) -> torch.Tensor:
    """x again as a new tensor made in the backward. A compiled block's partitioner saves a tensor that a
    backward matrix product reads as it is, but recomputes one that a backward elementwise op makes from it; so
    an adapter's input without dropout (an RMSNorm's output, SwiGLU's) read through this is recomputed from what
    the block keeps anyway (the norm's input and rsqrt, gate and up) instead of being kept: on a CPU trace of a
    Llama block with adapters on all seven projections and no dropout, 27% fewer saved bytes (the dropout path's
    ``where`` does the same)."""
    return x * 1.0


class _AdapterDelta(torch.autograd.Function):
    """The adapter path, saving its input x and the dropout mask, not the dropped copy of x that autograd keeps
    for the gradient of A: x is the RMSNorm's output, which a compiled block recomputes from what the norm keeps
    anyway, so each adapted projection saves one [tokens, hidden] tensor fewer (2 per layer at r8 on q/v:
    32 KB a token and layer in fp32, 16 KB in bf16). The backward writes the dropped x afresh with ``where``
    (a different op from the forward's multiply, so the joint graph's CSE does not merge the two and save it)."""

    @staticmethod
    def forward(ctx, x, a, b, mask, p, scale, fresh_input):
        d = x if mask is None else x * unpack_mask(mask, x.shape) * (1.0 / (1.0 - p))
        xa = d @ a.t()
        ctx.save_for_backward(x, mask, xa, a, b)
        ctx.p, ctx.scale, ctx.fresh_input = p, scale, fresh_input
        return (xa @ b.t()) * scale

    @staticmethod
    def backward(ctx, grad):
        x, mask, xa, a, b = ctx.saved_tensors
        g = grad * ctx.scale
        gxa = g @ b  # [..., r]
        if mask is not None:
            mask = unpack_mask(mask, x.shape, backward=True)
            d = torch.where(mask, x * (1.0 / (1.0 - ctx.p)), 0)
        else:
            d = fresh(x) if ctx.fresh_input else x
        grad_a = _rows(gxa).t() @ _rows(d)
        grad_b = _rows(g).t() @ _rows(xa)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gxa @ a
            if mask is not None:
                grad_x = torch.where(mask, grad_x * (1.0 / (1.0 - ctx.p)), 0)
        return grad_x, grad_a, grad_b, None, None, None, None


def shared_input_deltas(x: torch.Tensor, adapters: list[LoRALinear]) -> tuple[torch.Tensor, ...]:
    """The deltas of several adapters that read the same ``x`` without dropout (q/k/v, gate/up), as one product
    of x with their A matrices stacked ([sum r, in]): x is read once for the forward's x A^T, once for the
    gradient of the stacked A and the input gradient is one product (instead of one of each per adapter). With
    dropout each adapter drops its own mask (as PEFT's do), so their inputs differ: ``LoRALinear.delta`` each."""
    a = torch.cat([m.lora_A for m in adapters]).to(x.dtype)
    bs = [m.lora_B.to(x.dtype) for m in adapters]
    ranks, scales = tuple(m.r for m in adapters), tuple(m.scale for m in adapters)
    if not torch.is_grad_enabled():  # evaluation: the same products without the autograd.Function, which
        return _stacked_products(x, a, ranks, scales, bs)[1]  # torch.compile breaks its graph on under no_grad
    return _StackedDelta.apply(x, a, ranks, scales, any(m.fresh_input for m in adapters), *bs)


def _stacked_products(x, a, ranks, scales, bs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(``x a^T``, each adapter's slice of it times its own B^T and scale)."""
    xa = x @ a.t()
    return xa, tuple((p @ b.t()) * s for p, b, s in zip(xa.split(ranks, dim=-1), bs, scales))


class _StackedDelta(torch.autograd.Function):
    """``x a^T`` once ([..., sum r]), then each adapter's slice times its own B^T and scale."""

    @staticmethod
    def forward(ctx, x, a, ranks, scales, fresh_input, *bs):
        xa, deltas = _stacked_products(x, a, ranks, scales, bs)
        ctx.save_for_backward(x, xa, a, *bs)
        ctx.ranks, ctx.scales, ctx.fresh_input = ranks, scales, fresh_input
        return deltas

    @staticmethod
    def backward(ctx, *grads):
        x, xa, a, *bs = ctx.saved_tensors
        gxas, grad_bs = [], []
        for g, b, s, p in zip(grads, bs, ctx.scales, xa.split(ctx.ranks, dim=-1)):
            g = g * s
            gxas.append(g @ b)
            grad_bs.append(_rows(g).t() @ _rows(p))
        gxa = torch.cat(gxas, dim=-1)
        grad_a = _rows(gxa).t() @ _rows(fresh(x) if ctx.fresh_input else x)
        grad_x = gxa @ a if ctx.needs_input_grad[0] else None
        return (grad_x, grad_a, None, None, None, *grad_bs)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every Linear whose attribute name is in cfg.targets by a LoRALinear; freeze everything else.
    Returns the qualified names of the wrapped modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in cfg.targets and isinstance(child, nn.Linear):
                salt = cfg.targets.index(child_name)
                setattr(mod, child_name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout, salt))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ConfigError(f"--lora-targets {','.join(cfg.targets)} matched no Linear layer in the model")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, Adapter]:
    """{qualified module name: adapter} of every adapted projection of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter)}


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its frozen base alone (e.g. to evaluate the base model); the adapters come back after."""
    mods = list(lora_modules(model).values())
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def set_mask_impl(model: nn.Module, impl: str):
    """How every adapter of ``model`` draws its dropout masks (one of kernels.dropout.MASK_IMPLS)."""
    from .kernels.dropout import MASK_IMPLS

    if impl not in MASK_IMPLS:
        raise ConfigError(f"dropout mask {impl!r}: choose from {', '.join(MASK_IMPLS)}")
    for m in lora_modules(model).values():
        m.mask_impl = impl  # a LoRALinear attribute: every adapter kind here draws masks this way
