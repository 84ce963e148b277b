"""Run modes applied to a plain model (model.Llama), each a function that converts or wraps it, so the model's own
code is the computation alone: the blocks' frozen projections held quantized (FP8 or NF4, before the weights
load), q/k/v and gate/up fused into one GEMM each (after they load), the blocks compiled. engines/native.py applies
what NativeOptions and the precision say, in this order: quantize, load, checkpointing, fuse, compile.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .kernels.nf4 import define_ops
from .lora import LoRALinear, lora_modules
from .model import Llama
from .quantized import Fp8Linear, Nf4Linear
from .shapes import PROJECTIONS


def quantize_projections(model: Llama, weights: str, grad_dtype: torch.dtype | None = None,
                         skip: tuple[str, ...] = (), nf4_dequant: str = "torch", fp8_recipe: str = "rowwise"):
    """Every decoder block's seven projections but those named in ``skip`` held as ``weights`` ("fp8": float8
    e4m3 scaled as ``fp8_recipe`` says (kernels.fp8.FP8_RECIPES), input gradients in ``grad_dtype``; "nf4":
    QLoRA's 4-bit NormalFloat, dequantized as ``nf4_dequant`` says, one of quantized.NF4_DEQUANT, its products FP8
    GEMMs with input gradients in ``grad_dtype`` where one is given, else in the activations' dtype); adapted ones
    keep their adapters; embeddings, norms, lm_head and the skipped projections stay in the model's dtype.
    Call on the meta device, before the weights are loaded, so the full-precision model never exists
    (checkpoint.load_into quantizes each tensor as it arrives)."""
    if model.compiled_layers is not None or model.layers[0].attn.qkv_weight is not None:
        raise RuntimeError("quantized projections go before fuse_projections and compile_blocks")
    if weights == "fp8":
        def adapted(c):
            c.store_fp8(grad_dtype, fp8_recipe)

        def plain(c):
            return Fp8Linear(c.in_features, c.out_features, grad_dtype, device=c.weight.device, bias=c.bias,
                             recipe=fp8_recipe)
    elif weights == "nf4":
        if nf4_dequant == "triton":
            define_ops()  # before anything is compiled

        def adapted(c):
            c.store_nf4()
            c.nf4_dequant, c.nf4_fp8_grad = nf4_dequant, grad_dtype

        def plain(c):
            q = Nf4Linear(c.in_features, c.out_features, device=c.weight.device, bias=c.bias)
            q.nf4_dequant, q.nf4_fp8_grad = nf4_dequant, grad_dtype
            return q
    else:
        raise ValueError(f"quantized weights are fp8 or nf4, not {weights!r}")
    for layer in model.layers:
        for mod in (layer.attn, layer.mlp):
            for name in PROJECTIONS:
                child = getattr(mod, name, None) if name not in skip else None
                if isinstance(child, LoRALinear):
                    adapted(child)
                elif isinstance(child, nn.Linear):
                    setattr(mod, name, plain(child))


def fuse_projections(model: Llama):
    """One GEMM for q/k/v and one for gate/up in every layer (frozen weights concatenated; adapters stay per
    projection). Call after the weights are loaded (engines.native.NativeOptions says when it pays)."""
    for layer in model.layers:
        fuse_weights(layer.attn, ("q_proj", "k_proj", "v_proj"), "qkv_weight")
        fuse_weights(layer.mlp, ("gate_proj", "up_proj"), "gate_up_weight", interleave=True)


def fuse_weights(module: nn.Module, names: tuple[str, ...], buffer: str, interleave: bool = False):
    """Concatenate the frozen weights of ``module``'s projections ``names`` into one non-persistent buffer and
    make each projection's weight a view of its rows (loading, export and merging still see the parts).
    ``interleave`` (parts of one size): row j of every part side by side, so the fused output holds each
    position's parts next to each other and the backward writes their gradients in one pass over adjacent
    elements (concatenated halves made the SwiGLU backward read its inputs twice; benchmarks/NOTES.md item 20)."""
    parts = [getattr(module, n) for n in names]
    weights = [p.weight.detach() for p in parts]
    if interleave:
        fused = torch.stack(weights, dim=1).reshape(-1, weights[0].shape[1])
        views = [fused[i::len(parts)] for i in range(len(parts))]
    else:
        fused = torch.cat(weights)
        views = list(fused.split([w.shape[0] for w in weights]))
    setattr(module, buffer, fused)  # registered (as None, non-persistent) by the module
    for p, view in zip(parts, views):
        p.weight = nn.Parameter(view, requires_grad=False)
    if parts[0].bias is not None:  # q/k/v biases (Qwen2): one fused bias beside the fused weight
        biases = [p.bias.detach() for p in parts]
        fused_b = torch.stack(biases, dim=1).reshape(-1) if interleave else torch.cat(biases)
        module.register_buffer(buffer + "_bias", fused_b, persistent=False)


def compile_blocks(model: Llama, mode: str | None = None):
    """Compile each decoder block (one graph serves all blocks): for training, shape-specialised (a run has one
    shape; ``mode`` is torch.compile's, e.g. reduce-overhead for CUDA graphs); for evaluation with prefix caches
    (batch and length vary), shape-generic from the start, so a whole MMLU run compiles one graph for its batches
    (its per-subject prefixes run eagerly). The model's forward picks between them and the plain blocks."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(model.layers))
    model.compiled_layers = tuple(torch.compile(layer, mode=mode) for layer in model.layers)
    model.eval_layers = tuple(torch.compile(layer, dynamic=True) for layer in model.layers)


def apply_checkpointing(model: Llama, policy: str, blocks: int | None = None):
    """What the training forward keeps for the backward (config.ACTIVATION_CHECKPOINTING; recompute.py has the
    policies): the model's forward reads its ``activation_checkpointing`` and, for a recomputing policy, runs the
    first ``blocks`` decoder blocks under it (None: all); under "adapter-inputs" each adapter reads its input
    through lora.fresh in the backward."""
    model.activation_checkpointing = policy
    model.checkpoint_blocks = blocks
    for m in lora_modules(model).values():
        m.fresh_input = policy == "adapter-inputs"
