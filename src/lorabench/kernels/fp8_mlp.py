"""A frozen FP8 SwiGLU MLP, y = down(silu(gate(x)) * up(x)), as one autograd function whose two SwiGLU passes are
Triton kernels that also quantize their output rows.

In a block whose three MLP projections are FP8 and have no adapters, everything between the GEMMs is a row-wise
job: the forward's SwiGLU h = silu(g) * u and the per-row quantize of h for the down GEMM; the backward's SwiGLU
backward (dg, du from dh, g, u) and the per-row quantizes of dg * s_gate and du * s_up for the two input-gradient
GEMMs (kernels/fp8.py says why the weight's scales go into the gradient). Each quantize needs its row's amax before
it can write a value, and Inductor makes a reduction over more than 1,024 columns a loop: it computes the row's
elementwise chain once for the amax and again for the values, reading its inputs twice (the largest kernel of the
fp8 step, 17.6 of 290 ms at Llama-2-7B LBS 16 on an H200, benchmarks/NOTES.md item 61). The kernels here hold a
whole row in registers (up to ``MAX_COLS`` columns: 16,384 fp32 values a program, 32 warps) and read each input
once.

The numbers are defined by the plain-PyTorch references below (which also run on a CPU, without Triton, and for
wider rows): h, dg and du are computed in fp32 from the bf16 inputs and rounded once to the activations' dtype
(eager PyTorch would round silu(g) on its own first: one bf16 rounding more), then scaled and quantized exactly as
``kernels.fp8.quantize_rows`` does. The tests run the kernels in Triton's CPU interpreter against the references
(fp32 / fp16 in and out: the interpreter rounds bf16 and FP8 wrongly); benchmarks/gpu_check.py compares the
compiled kernels with them on a GPU, FP8 output included.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from .fp8 import fp8_max, quantize_rows, scaled_mm

MAX_COLS = 16384
"""The widest MLP row (intermediate size) the kernels take; wider ones run the plain-PyTorch references."""
NUM_WARPS = 32
"""Warps of a kernel program (one row): 16 or 32 values of each tensor a thread at 8,193-16,384 columns."""


def swiglu_quantize_reference(g: torch.Tensor, u: torch.Tensor):
    """silu(g) * u for g, u [M, I], computed in fp32 and rounded to g's dtype, then quantized per row to e4m3:
    (q [M, I], scale [M, 1])."""
    gf = g.float()
    h = (gf * torch.sigmoid(gf) * u.float()).to(g.dtype)
    return quantize_rows(h)


def swiglu_backward_quantize_reference(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, gate_scale: torch.Tensor,
                                       up_scale: torch.Tensor, grad_dtype: torch.dtype):
    """SwiGLU's backward for h = silu(g) * u: dg = dh u s (1 + g (1 - s)) with s = sigmoid(g), du = dh silu(g),
    each computed in fp32 and rounded to dh's dtype, then multiplied by the gate's / up's weight scales (along the
    row) and quantized per row to ``grad_dtype``: (dg_q, dg_scale, du_q, du_scale)."""
    gf, uf, dhf = g.float(), u.float(), dh.float()
    s = torch.sigmoid(gf)
    du = (dhf * (gf * s)).to(dh.dtype)
    dg = (dhf * uf * s * (1 + gf * (1 - s))).to(dh.dtype)
    dg_q, dg_s = quantize_rows(dg, grad_dtype, multiplier=gate_scale)
    du_q, du_s = quantize_rows(du, grad_dtype, multiplier=up_scale)
    return dg_q, dg_s, du_q, du_s


@functools.cache
def _triton_kernels():
    """The two Triton kernels (their module imported once, on first use: it imports Triton)."""
    from . import fp8_mlp_triton

    return fp8_mlp_triton.swiglu_quantize_kernel, fp8_mlp_triton.swiglu_backward_quantize_kernel


def _block(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launch_swiglu_quantize(g, u, q, scale, top: float):
    """Run the forward kernel: g, u [M, I] contiguous in, q [M, I] (e4m3 on a GPU; any float dtype in the
    interpreter) and scale [M] fp32 out."""
    fwd, _ = _triton_kernels()
    fwd[(g.shape[0],)](g, u, q, scale, g.shape[1], top, BLOCK=_block(g.shape[1]), num_warps=NUM_WARPS)


def launch_swiglu_backward_quantize(dh, g, u, gate_scale, up_scale, dg_q, dg_scale, du_q, du_scale, top: float):
    """Run the backward kernel: dh, g, u [M, I] contiguous and the weights' scales [I] in; dg_q, du_q [M, I] and
    their row scales [M] out."""
    _, bwd = _triton_kernels()
    bwd[(g.shape[0],)](dh, g, u, gate_scale, up_scale, dg_q, dg_scale, du_q, du_scale, g.shape[1], top,
                       BLOCK=_block(g.shape[1]), num_warps=NUM_WARPS)


def _define_ops():
    """Custom ops around the kernels, so a compiled graph calls them as opaque kernels; None on torch without
    ``torch.library.custom_op`` (before 2.4)."""
    if not hasattr(torch.library, "custom_op"):
        return None, None

    @torch.library.custom_op("lorabench::swiglu_quantize", mutates_args=())
    def swiglu_quantize_op(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.empty(g.shape, dtype=torch.float8_e4m3fn, device=g.device)
        scale = torch.empty(g.shape[0], 1, dtype=torch.float32, device=g.device)
        with torch.cuda.device(g.device):
            launch_swiglu_quantize(g, u, q, scale, fp8_max(torch.float8_e4m3fn))
        return q, scale

    @swiglu_quantize_op.register_fake
    def _(g, u):
        return (torch.empty(g.shape, dtype=torch.float8_e4m3fn, device=g.device),
                torch.empty(g.shape[0], 1, dtype=torch.float32, device=g.device))

    @torch.library.custom_op("lorabench::swiglu_backward_quantize", mutates_args=())
    def swiglu_backward_quantize_op(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, gate_scale: torch.Tensor,
                                    up_scale: torch.Tensor, grad_dtype: torch.dtype
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dg_q, du_q = (torch.empty(g.shape, dtype=grad_dtype, device=g.device) for _ in range(2))
        dg_s, du_s = (torch.empty(g.shape[0], 1, dtype=torch.float32, device=g.device) for _ in range(2))
        with torch.cuda.device(g.device):
            launch_swiglu_backward_quantize(dh, g, u, gate_scale, up_scale, dg_q, dg_s, du_q, du_s,
                                            fp8_max(grad_dtype))
        return dg_q, dg_s, du_q, du_s

    @swiglu_backward_quantize_op.register_fake
    def _(dh, g, u, gate_scale, up_scale, grad_dtype):
        q = [torch.empty(g.shape, dtype=grad_dtype, device=g.device) for _ in range(2)]
        s = [torch.empty(g.shape[0], 1, dtype=torch.float32, device=g.device) for _ in range(2)]
        return q[0], s[0], q[1], s[1]

    return swiglu_quantize_op, swiglu_backward_quantize_op


_SWIGLU_QUANTIZE, _SWIGLU_BACKWARD_QUANTIZE = _define_ops()
_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # imported when a kernel first runs


def uses_kernels(g: torch.Tensor) -> bool:
    """Whether SwiGLU's passes over ``g``-shaped rows run the Triton kernels (a CUDA tensor, Triton and the custom
    ops present, rows of at most MAX_COLS) rather than the references."""
    return g.is_cuda and g.shape[-1] <= MAX_COLS and _SWIGLU_QUANTIZE is not None and _HAVE_TRITON


def swiglu_quantize(g, u):
    """(q, scale) of silu(g) * u quantized per row to e4m3 (swiglu_quantize_reference's numbers)."""
    if uses_kernels(g):
        return _SWIGLU_QUANTIZE(g.contiguous(), u.contiguous())
    return swiglu_quantize_reference(g, u)


def swiglu_backward_quantize(dh, g, u, gate_scale, up_scale, grad_dtype):
    """(dg_q, dg_scale, du_q, du_scale) as swiglu_backward_quantize_reference gives them."""
    if uses_kernels(g):
        return _SWIGLU_BACKWARD_QUANTIZE(dh.contiguous(), g, u, gate_scale, up_scale, grad_dtype)
    return swiglu_backward_quantize_reference(dh, g, u, gate_scale, up_scale, grad_dtype)


class _Fp8MLP(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with three frozen FP8 weights; saves the gate and up outputs (bf16) for the
    SwiGLU backward, nothing else but the weights."""

    @staticmethod
    def forward(ctx, x, gate_w, gate_s, up_w, up_s, down_w, down_s, grad_dtype):
        lead = x.shape[:-1]
        xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
        g = scaled_mm(xq, xs, gate_w, gate_s, x.dtype)
        u = scaled_mm(xq, xs, up_w, up_s, x.dtype)
        hq, hs = swiglu_quantize(g, u)
        y = scaled_mm(hq, hs, down_w, down_s, x.dtype)
        ctx.save_for_backward(g, u, gate_w, gate_s, up_w, up_s, down_w, down_s)
        ctx.grad_dtype = grad_dtype
        return y.view(*lead, down_w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        g, u, gate_w, gate_s, up_w, up_s, down_w, down_s = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        lead, dtype = gy.shape[:-1], gy.dtype
        gq, gs = quantize_rows(gy.reshape(-1, gy.shape[-1]), ctx.grad_dtype, multiplier=down_s)
        ones_i = torch.ones(down_w.shape[1], device=gy.device, dtype=torch.float32)
        dh = scaled_mm(gq, gs, down_w.t().contiguous(), ones_i, dtype)
        dg_q, dg_s, du_q, du_s = swiglu_backward_quantize(dh, g, u, gate_s, up_s, ctx.grad_dtype)
        ones_c = torch.ones(gate_w.shape[1], device=gy.device, dtype=torch.float32)
        dx = scaled_mm(dg_q, dg_s, gate_w.t().contiguous(), ones_c, dtype) + \
            scaled_mm(du_q, du_s, up_w.t().contiguous(), ones_c, dtype)
        return (dx.view(*lead, gate_w.shape[1]),) + (None,) * 7


def fp8_mlp(x: torch.Tensor, gate, up, down, grad_dtype: torch.dtype) -> torch.Tensor:
    """The SwiGLU MLP of three frozen FP8 projections (each with ``weight`` and ``weight_scale``, as
    model.Fp8Linear), FP8 in both directions, x's dtype out."""
    return _Fp8MLP.apply(x, gate.weight, gate.weight_scale, up.weight, up.weight_scale, down.weight,
                         down.weight_scale, grad_dtype)

