"""Blockwise FP8 scales, as a measurement (not an engine option): 1 x 128 groups for activations and gradients,
128 x 128 blocks for the frozen weight, cuBLASLt's blockwise FP8 GEMM on sm90 (CUDA 12.9+) through
``torch._scaled_mm``. benchmarks/fp8_gemm.py times it against the rowwise GEMMs of kernels/fp8.py and
benchmarks/gpu_check.py (``fp8_blocks``) compares it with its emulation here (each operand dequantized in fp32, then
multiplied). Why the engine keeps per-channel scales: kernels/fp8.py's docstring, with the measurements.

On torch 2.11 (cu130, H200) the GEMM is wrong, silently, whenever the reduction's block count ceil(K / 128) is not a
multiple of 4 (Llama-2-7B's 11008 is 86 blocks): torch checks the weight's block scales with a row stride of
ceil(K / 128), while cuBLASLt reads them with that stride rounded up to 4. ``padded_ld=True`` lays the scales out
as cuBLASLt reads them, behind a view whose strides torch's check accepts; gpu_check says whether that is right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorabench.kernels.fp8 import WEIGHT_FORMAT, quantize_rows

BLOCK = 128


def _quantize(x: torch.Tensor, dtype: torch.dtype, rows: int):
    """x as blocks of ``rows`` x BLOCK (zero-padded at the edges), each quantized as kernels/fp8.py quantizes a row."""
    xf = x.float().reshape(-1, x.shape[-1])
    m, k = xf.shape
    xf = F.pad(xf, (0, -k % BLOCK, 0, -m % rows))
    mb, kb = xf.shape[0] // rows, xf.shape[1] // BLOCK
    tiles = xf.view(mb, rows, kb, BLOCK).transpose(1, 2).reshape(mb, kb, rows * BLOCK)  # one block a row
    q, scale = quantize_rows(tiles, dtype)
    q = q.view(mb, kb, rows, BLOCK).transpose(1, 2).reshape(xf.shape)
    if q.shape != (m, k):  # partial blocks: the padding dropped
        q = q[:m, :k].contiguous()
    return q.reshape(x.shape), scale.view(mb, kb)


def quantize_groups(x: torch.Tensor, dtype: torch.dtype = WEIGHT_FORMAT):
    """x [..., K] as (q, scale [M, ceil(K / 128)]): one scale per 128 consecutive values of a row."""
    return _quantize(x, dtype, 1)


def quantize_weight_blocks(w: torch.Tensor, dtype: torch.dtype = WEIGHT_FORMAT):
    """w [N, K] as (q, scale [ceil(N / 128), ceil(K / 128)]): one scale per 128 x 128 block."""
    return _quantize(w, dtype, BLOCK)


def _expand(scale: torch.Tensor, rows: int, shape) -> torch.Tensor:
    m, k = shape
    return scale.repeat_interleave(rows, 0).repeat_interleave(BLOCK, 1)[:m, :k]


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * _expand(scale, 1, q.shape)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * _expand(scale, BLOCK, q.shape)


def cublas_block_scales(scale: torch.Tensor) -> torch.Tensor:
    """[Nb, Kb] scales stored with rows of round_up(Kb, 4), viewed with torch's stride Kb (see the docstring)."""
    nb, kb = scale.shape
    buf = torch.zeros(nb, -(-kb // 4) * 4, dtype=scale.dtype, device=scale.device)
    buf[:, :kb] = scale
    return buf.as_strided((nb, kb), (kb, 1))


def scaled_mm_blocks(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, padded_ld: bool = False):
    """a [M, K] (groups a_scale [M, K/128]) times b [N, K]^T (blocks b_scale [N/128, K/128]); on CUDA cuBLASLt's
    blockwise GEMM (activation scales column-major, M padded to a multiple of 4), elsewhere the emulation."""
    if not a.is_cuda:
        return (dequantize_groups(a, a_scale) @ dequantize_blocks(b, b_scale).t()).to(out_dtype)
    m = a.shape[0]
    pad = -m % 4
    if pad:
        a = F.pad(a.view(torch.uint8), (0, 0, 0, pad)).view(a.dtype)
        a_scale = F.pad(a_scale, (0, 0, 0, pad), value=1.0)
    sb = cublas_block_scales(b_scale) if padded_ld else b_scale
    y = torch._scaled_mm(a, b.t(), scale_a=a_scale.t().contiguous().t(), scale_b=sb.t(), out_dtype=out_dtype)
    return y[:m] if pad else y


class _BlockLinear(torch.autograd.Function):
    """x W^T and its input gradient dy W, both blockwise: W^T's blocks are W's, transposed."""

    @staticmethod
    def forward(ctx, x, wq, w_scale, grad_dtype, padded_ld):
        xq, xs = quantize_groups(x.reshape(-1, x.shape[-1]))
        y = scaled_mm_blocks(xq, xs, wq, w_scale, x.dtype, padded_ld)
        ctx.save_for_backward(wq, w_scale)
        ctx.grad_dtype, ctx.padded_ld = grad_dtype, padded_ld
        return y.view(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, gy):
        wq, w_scale = ctx.saved_tensors
        gq, gs = quantize_groups(gy.reshape(-1, gy.shape[-1]), ctx.grad_dtype)
        gx = scaled_mm_blocks(gq, gs, wq.t().contiguous(), w_scale.t().contiguous(), gy.dtype, ctx.padded_ld)
        return gx.view(*gy.shape[:-1], wq.shape[1]), None, None, None, None


def block_linear(x, wq, w_scale, grad_dtype=torch.float8_e4m3fn, padded_ld: bool = False):
    return _BlockLinear.apply(x, wq, w_scale, grad_dtype, padded_ld)
