"""Dropout keep-masks drawn by torch's Bernoulli kernel, also inside compiled blocks.

``rand_like(x) >= p`` inside a compiled block becomes part of an Inductor kernel that runs one Philox call per
element and keeps one of the four 32-bit words it yields. At the Llama-2-7B shape that made the RMSNorm kernel the
masks are fused into compute-bound (10.4 ms of a 404 ms step at bf16 LBS 16 on an H200, benchmarks/NOTES.md item
12). ``keep_mask`` is a custom op: a compiled graph calls it as an opaque kernel (torch's CUDA Bernoulli kernel,
which unrolls over the words of each Philox call on large tensors and writes the bool mask directly), and it is
tagged as a seeded random op (the partitioner saves its output for the backward rather than drawing it again: it
recomputes no op outside its allowlist). The joint graph's common-subexpression elimination, though, merges calls
with equal arguments unless the op is one of torch's own random ops, so two adapters reading the same input (q_proj
and v_proj both read the attention norm's output) pass different ``salt`` values, or they would share one mask.

Where torch has no ``torch.library.custom_op`` (before 2.4), or impl 'inline' asks for it (A/B benchmarks), the
mask is ``rand_like(x, float32) >= p``, which Inductor fuses into its kernels.
"""
from __future__ import annotations

import torch

MASK_IMPLS = ("op", "inline")
"""How a keep-mask is drawn: ``op`` the custom op below, ``inline`` rand_like where it is needed."""


def _define_op():
    if not hasattr(torch.library, "custom_op"):
        return None

    def impl(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)

    try:
        op = torch.library.custom_op("lorabench::keep_mask", impl, mutates_args=(),
                                     tags=(torch.Tag.nondeterministic_seeded,))
    except TypeError:  # torch without the tags argument: the op would be recomputable, so do without it
        return None

    @op.register_fake
    def _(x, p, salt):
        return torch.empty_like(x, dtype=torch.bool)

    return op


_KEEP_MASK = _define_op()


def keep_mask(x: torch.Tensor, p: float, impl: str = "op", salt: int = 0) -> torch.Tensor:
    """A bool tensor like ``x``, each element True (kept) with probability 1 - p, independently. Masks drawn from
    the same ``x`` in one compiled graph need different ``salt`` values (see above); the draw ignores it."""
    if impl == "op" and _KEEP_MASK is not None:
        return _KEEP_MASK(x, p, salt)
    return torch.rand_like(x, dtype=torch.float32) >= p
