"""The adapter's rank-r products with the dropout mask applied as they read their input (Triton, CUDA).

The plain path (lora.py) writes the dropped input ``d = x * mask / (1 - p)`` ([tokens, in] in the activations'
dtype) for ``d A^T`` in the forward, writes it again in the backward for ``grad_A = gxa^T d``, and writes
``gxa A`` before masking it: at the Llama-2-7B shape (bf16 LBS 16, 8,192 x 4,096) each of those is a 64 MB pass,
and the rank-8 GEMMs that read them are 2.7% of the step's GEMM time (benchmarks/NOTES.md item 27). Two kernels
read x and the mask directly instead:

- ``xa(x, mask, a, p)``: ``(x * mask / (1 - p)) a^T`` [tokens, r], accumulated in fp32 over ``in``.
- ``grad_x_and_a(x, mask, gxa, a, p)``: ``(gxa a) * mask / (1 - p)`` [tokens, in] (the input's gradient) and
  ``gxa^T (x * mask / (1 - p))`` [r, in] (A's), one pass over x and the mask; the second is summed over token
  splits (fp32 partial sums, added by torch: the same order every run).

The masked input is rounded to the activations' dtype before its products, as the plain path's ``d`` is; the
products are accumulated in fp32 and rounded once. ``available(x, r)`` says where they run (CUDA tensors, Triton,
r <= 64); elsewhere lora.py keeps its plain expression, which the tests use as the reference (and run the kernels
themselves in Triton's CPU interpreter).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

BLOCK_T, BLOCK_IN = 32, 64
"""Tile of the forward kernel (tokens x input features); the backward's is 64 x 64."""

MAX_RANK = 64


def _rank_tile(r: int) -> int:
    """r padded to a power of two >= 16 (the smallest dot tile)."""
    return max(16, 1 << (r - 1).bit_length())


@functools.cache
def _kernels():
    """(forward kernel, backward kernel), made once; None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def xa_kernel(x_ptr, m_ptr, a_ptr, out_ptr, T, C, R, inv_keep, HAS_MASK: tl.constexpr, BT: tl.constexpr,
                  BC: tl.constexpr, RP: tl.constexpr):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        ranks = tl.arange(0, RP)
        acc = tl.zeros((BT, RP), dtype=tl.float32)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            inside = (rows[:, None] < T) & (cols[None, :] < C)
            offs = rows[:, None].to(tl.int64) * C + cols[None, :]
            x = tl.load(x_ptr + offs, mask=inside, other=0.0)
            if HAS_MASK:
                keep = tl.load(m_ptr + offs, mask=inside, other=0) != 0
                x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(x_ptr.dtype.element_ty)
            a_t = tl.load(a_ptr + ranks[None, :] * C + cols[:, None],
                          mask=(ranks[None, :] < R) & (cols[:, None] < C), other=0.0)  # [BC, RP] = A^T tile
            acc += tl.dot(x, a_t)
        tl.store(out_ptr + rows[:, None] * R + ranks[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < T) & (ranks[None, :] < R))

    @triton.jit
    def grad_kernel(x_ptr, m_ptr, gxa_ptr, a_ptr, gx_ptr, ga_ptr, T, C, R, inv_keep, rows_per_split,
                    HAS_MASK: tl.constexpr, NEED_GX: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    RP: tl.constexpr):
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        split = tl.program_id(1)
        ranks = tl.arange(0, RP)
        a = tl.load(a_ptr + ranks[:, None] * C + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < C),
                    other=0.0)  # [RP, BC]
        acc = tl.zeros((RP, BC), dtype=tl.float32)
        first = split * rows_per_split
        for t0 in range(first, first + rows_per_split, BT):
            rows = t0 + tl.arange(0, BT)
            in_rows = rows < T
            inside = in_rows[:, None] & (cols[None, :] < C)
            offs = rows[:, None].to(tl.int64) * C + cols[None, :]
            gxa = tl.load(gxa_ptr + rows[:, None] * R + ranks[None, :], mask=in_rows[:, None] & (ranks[None, :] < R),
                          other=0.0)  # [BT, RP]
            x = tl.load(x_ptr + offs, mask=inside, other=0.0)
            if HAS_MASK:
                keep = tl.load(m_ptr + offs, mask=inside, other=0) != 0
                x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(x_ptr.dtype.element_ty)
            acc += tl.dot(tl.trans(gxa), x)
            if NEED_GX:
                gx = tl.dot(gxa, a)  # [BT, BC]
                if HAS_MASK:
                    gx = tl.where(keep, gx * inv_keep, 0.0)
                tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=inside)
        tl.store(ga_ptr + split.to(tl.int64) * R * C + ranks[:, None] * C + cols[None, :], acc,
                 mask=(ranks[:, None] < R) & (cols[None, :] < C))

    return xa_kernel, grad_kernel


def available(x: torch.Tensor, r: int) -> bool:
    """Whether the kernels run for input ``x`` and rank ``r`` (else the caller keeps the plain expression): CUDA,
    fp16/bf16 (fp32 would get TF32 products where the plain path may not), Triton, torch with custom ops."""
    return (x.is_cuda and r <= MAX_RANK and x.dtype in (torch.float16, torch.bfloat16) and _OPS is not None
            and _kernels() is not None)


def launch_xa(x: torch.Tensor, mask: torch.Tensor | None, a: torch.Tensor, p: float) -> torch.Tensor:
    """``(x * mask / (1 - p)) a^T`` of contiguous 2-D x [T, C], mask (bool, like x, or None) and a [R, C]."""
    T, C = x.shape
    R = a.shape[0]
    out = torch.empty(T, R, dtype=x.dtype, device=x.device)
    kernel = _kernels()[0]
    kernel[(_cdiv(T, BLOCK_T),)](x, x if mask is None else mask, a, out, T, C, R, 1.0 / (1.0 - p),
                                 HAS_MASK=mask is not None, BT=BLOCK_T, BC=BLOCK_IN, RP=_rank_tile(R))
    return out


def launch_grads(x: torch.Tensor, mask: torch.Tensor | None, gxa: torch.Tensor, a: torch.Tensor, p: float,
                 need_x: bool = True, splits: int = 4) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(``(gxa a) * mask / (1 - p)`` or None, ``gxa^T (x * mask / (1 - p))`` in fp32) of contiguous 2-D x [T, C],
    gxa [T, R] and a [R, C]; tokens split into ``splits`` ranges whose partial sums torch adds."""
    T, C = x.shape
    R = a.shape[0]
    block_t = 64
    rows_per_split = _cdiv(_cdiv(T, splits), block_t) * block_t
    splits = _cdiv(T, rows_per_split)
    gx = torch.empty_like(x) if need_x else None
    partial = torch.empty(splits, R, C, dtype=torch.float32, device=x.device)
    kernel = _kernels()[1]
    kernel[(_cdiv(C, BLOCK_IN), splits)](x, x if mask is None else mask, gxa, a, x if gx is None else gx, partial,
                                         T, C, R, 1.0 / (1.0 - p), rows_per_split, HAS_MASK=mask is not None,
                                         NEED_GX=need_x, BT=block_t, BC=BLOCK_IN, RP=_rank_tile(R))
    return gx, partial.sum(0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _on(x: torch.Tensor):
    """Launch on x's GPU (on a CPU tensor, only Triton's interpreter can run the kernels: the tests)."""
    import contextlib

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _define_ops():
    """The two launches as custom ops (opaque to Inductor, which sees their output shapes only)."""
    if not hasattr(torch.library, "custom_op"):
        return None

    @torch.library.custom_op("lorabench::adapter_xa", mutates_args=())
    def xa_op(x: torch.Tensor, mask: Optional[torch.Tensor], a: torch.Tensor, p: float) -> torch.Tensor:
        with _on(x):
            return launch_xa(x, mask, a, p)

    @xa_op.register_fake
    def _(x, mask, a, p):
        return x.new_empty(x.shape[0], a.shape[0])

    @torch.library.custom_op("lorabench::adapter_grads", mutates_args=())
    def grads_op(x: torch.Tensor, mask: Optional[torch.Tensor], gxa: torch.Tensor, a: torch.Tensor,
                 p: float) -> tuple[torch.Tensor, torch.Tensor]:
        with _on(x):
            gx, ga = launch_grads(x, mask, gxa, a, p)
        return gx, ga

    @grads_op.register_fake
    def _(x, mask, gxa, a, p):
        return torch.empty_like(x), x.new_empty(a.shape, dtype=torch.float32)

    return xa_op, grads_op


_OPS = _define_ops()


def xa(x: torch.Tensor, mask: torch.Tensor | None, a: torch.Tensor, p: float) -> torch.Tensor:
    """``(x * mask / (1 - p)) a^T`` for x [..., C] (see ``available``)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = _OPS[0](flat, None if mask is None else mask.reshape(flat.shape).contiguous(), a.contiguous(), p)
    return out.view(*x.shape[:-1], a.shape[0])


def grad_x_and_a(x: torch.Tensor, mask: torch.Tensor | None, gxa: torch.Tensor, a: torch.Tensor, p: float):
    """(x's gradient, like x; A's gradient [R, C] in fp32) from gxa [..., R] (see ``available``)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    gx, ga = _OPS[1](flat, None if mask is None else mask.reshape(flat.shape).contiguous(),
                     gxa.reshape(-1, gxa.shape[-1]).contiguous(), a.contiguous(), p)
    return gx.view(x.shape), ga
