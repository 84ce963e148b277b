"""FP8 frozen projections: rowwise quantization and the scaled GEMMs of the forward and of the input gradient.

A frozen weight W [out, in] is stored once, in float8 e4m3, with one fp32 scale per output channel (row):
``W ~ Wq * s_w[:, None]``, s_w = amax(|W row|) / 448, so each row's largest weight lands on e4m3's largest value
and no weight saturates. Per-channel scales keep an outlier row from coarsening every other row (one tensorwise
scale would) and, unlike blockwise scales, still factor out of both GEMMs of a step:

- forward, y = x W^T: x is quantized per row (token), ``y = (xq Wq^T) * s_x[:, None] * s_w[None, :]``: cuBLASLt's
  rowwise-scaled FP8 GEMM (``torch._scaled_mm`` with a [M, 1] and a [1, N] scale), fp32 accumulation, the scales
  applied in its epilogue, bf16 out.
- input gradient, dx = dy W = (dy * s_w[None, :]) Wq: the weight's scales run along the reduction, so they are
  folded into the gradient before it is quantized per row; the GEMM's second scale is then 1. Hopper's FP8 GEMMs
  read both operands K-major, so Wq^T is written contiguous just before the GEMM (one stored copy of the weight: a
  70B model has no room for two).

Why per channel and not in blocks (an H200, 2026-12-01, benchmarks/NOTES.md item 58): cuBLASLt's blockwise GEMMs
(1 x 128 activation groups by 128 x 128 weight blocks; benchmarks/fp8_blocks.py) run 4-13% slower than the rowwise
ones at Llama-2-7B's shapes (a projection's norm + GEMMs forward and backward, compiled, 4-15%), and on random
weights they err against bf16 exactly as much (3.7e-2 either way: a Gaussian row's largest value is hardly larger
than its blocks'). On a trained model they are more accurate (SmolLM2-135M, emulated: 128 x 128 weight blocks cut
the next-token KL by 25-35%), but per-channel scales already meet the MMLU and fine-tune checks there.

The gradient is quantized to e4m3 by default (``GRAD_FORMATS``: the per-row scale covers the range that e5m2's
extra exponent bits would; the choice is measured in benchmarks/NOTES.md). Quantization is plain tensor code: in
the compiled blocks Inductor fuses it into the kernels that produce the activations and gradients (the norms,
SwiGLU, attention's output projection input, and their backward counterparts) rather than as passes of their own.

Off CUDA the GEMMs are emulated exactly as the GPU defines them: the FP8 values (exact in fp32) multiplied in fp32,
then scaled, then rounded to the output dtype; the tests check this emulation against float64 and
benchmarks/gpu_check.py checks cuBLASLt's kernels against it.
"""
from __future__ import annotations

import torch

GRAD_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
"""FP8 formats the input gradient can be quantized to (``--fp8-grad``)."""
WEIGHT_FORMAT = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 format: 448 (e4m3fn), 57344 (e5m2)."""
    return float(torch.finfo(dtype).max)


def cast_fp8(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (already divided by its scale) rounded to ``dtype``, saturating at the format's largest finite value:
    e4m3fn has no infinity, and a value past 448 would become NaN (past 57344, e5m2's infinity)."""
    top = fp8_max(dtype)
    return v.clamp(-top, top).to(dtype)


def inverse_max(dtype: torch.dtype) -> float:
    """1 / the format's largest value, as the float32 multiplier a scale is made with (``amax * inverse_max``).
    A multiply, not ``amax / max``: PyTorch's CUDA kernels divide a tensor by a Python number as a multiply by its
    float32 reciprocal while its CPU kernels divide, so only the multiply gives the same scales on every device.
    Off by at most an ulp from the quotient."""
    return 1.0 / fp8_max(dtype)


def _scaled(xf: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype):
    """(float32 ``xf`` / scale cast to ``dtype``, scale) with scale = ``amax`` / the format's max
    (``inverse_max``), 1 where amax is 0 (never a division by zero); the cast saturates (``cast_fp8``)."""
    scale = scale_of(amax, dtype)
    return with_scales(xf, scale, dtype), scale


def scale_of(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 scale that puts ``amax`` on the format's largest value (``amax * inverse_max``), 1 where amax
    is 0."""
    return torch.where(amax > 0, amax * inverse_max(dtype), torch.ones_like(amax))


def with_scales(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in float32 divided by ``scale`` (broadcast) and cast to ``dtype`` (``cast_fp8``): the codes of x under
    scales already known (a frozen weight's, computed once)."""
    return cast_fp8(x.float() / scale, dtype)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = WEIGHT_FORMAT, multiplier: torch.Tensor | None = None):
    """x [..., K] (times ``multiplier``, broadcast along K, when given) as (q [..., K] in ``dtype``, scale [..., 1]
    fp32) with x ~ q * scale, each row scaled by its own amax (``_scaled``); a row of zeros gets scale 1 and
    zeros."""
    xf = x.float()
    if multiplier is not None:
        xf = xf * multiplier
    return _scaled(xf, xf.abs().amax(dim=-1, keepdim=True), dtype)


def quantize_tensor(x: torch.Tensor, dtype: torch.dtype = WEIGHT_FORMAT):
    """x as (q in ``dtype``, scale [1, 1] fp32) with one scale for the whole tensor, from its amax (``_scaled``;
    a tensor of zeros gets scale 1)."""
    xf = x.float()
    return _scaled(xf, xf.abs().amax().reshape(1, 1), dtype)


FP8_RECIPES = ("rowwise", "tensorwise")
"""How FP8 tensors are scaled (--fp8-recipe). rowwise: one scale per activation or gradient row (token) and per
weight output channel, cuBLASLt's rowwise-scaled GEMMs. tensorwise: one scale per tensor (each from the tensor's own
amax: current scaling), the weight's too, cuBLASLt's tensorwise GEMMs."""


def quantize_weight(w: torch.Tensor, dtype: torch.dtype, recipe: str = "rowwise"):
    """A frozen weight [out, in] as (q, scale [out] fp32) under ``recipe``: per-row scales, or the one per-tensor
    scale repeated for every row (so both recipes store the same layout)."""
    if recipe == "tensorwise":
        q, scale = quantize_tensor(w, dtype)
        return q, scale.view(1).expand(w.shape[0]).contiguous()
    q, scale = quantize_rows(w, dtype)
    return q, scale.view(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale in fp32 (``scale`` [..., 1] per row, or [out] for a stored weight)."""
    if scale.dim() == 1:
        scale = scale[:, None]
    return q.float() * scale


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(a b^T) * a_scale * b_scale^T rounded to ``out_dtype``: a [M, K] and b [N, K] FP8, row-major; a_scale
    [M, 1], b_scale [N] fp32. On CUDA cuBLASLt's rowwise-scaled FP8 GEMM, elsewhere its emulation (fp32 products of
    the exact FP8 values, then the scales)."""
    if a.is_cuda:
        return torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype)
    return ((a.float() @ b.float().t()) * a_scale * b_scale.view(1, -1)).to(out_dtype)


def fp8_product(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, recipe: str = "rowwise") -> torch.Tensor:
    """x [M, K] W^T (W = wq * w_scale per row) as the forward's FP8 GEMM, in x's dtype: x quantized per row, or
    (tensorwise: the weight's scales all one) as a whole."""
    if recipe == "tensorwise":
        xq, xs = quantize_tensor(x)
        return scaled_mm(xq, xs, wq, w_scale[:1], x.dtype)
    xq, xs = quantize_rows(x)
    return scaled_mm(xq, xs, wq, w_scale, x.dtype)


def fp8_input_grad(gy: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, grad_dtype: torch.dtype,
                   recipe: str = "rowwise"):
    """gy [M, N] W as the input gradient's FP8 GEMM, Wq^T written contiguous for it, in gy's dtype. rowwise: the
    weight's scales folded into gy before it is quantized per row to ``grad_dtype``; tensorwise: gy quantized as a
    whole, the weight's one scale the GEMM's second."""
    wt = wq.t().contiguous()
    if recipe == "tensorwise":
        gq, gs = quantize_tensor(gy, grad_dtype)
        return scaled_mm(gq, gs, wt, w_scale[:1], gy.dtype)
    gq, gs = quantize_rows(gy, grad_dtype, multiplier=w_scale)
    ones = torch.ones(wq.shape[1], device=gy.device, dtype=torch.float32)
    return scaled_mm(gq, gs, wt, ones, gy.dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with W = Wq * s_w; saves nothing but the weight (no weight gradient: W is frozen)."""

    @staticmethod
    def forward(ctx, x, wq, w_scale, grad_dtype, recipe):
        ctx.save_for_backward(wq, w_scale)
        ctx.grad_dtype, ctx.recipe = grad_dtype, recipe
        return fp8_product(x.reshape(-1, x.shape[-1]), wq, w_scale, recipe).view(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, gy):
        wq, w_scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        gx = fp8_input_grad(gy.reshape(-1, gy.shape[-1]), wq, w_scale, ctx.grad_dtype, ctx.recipe)
        return gx.view(*gy.shape[:-1], wq.shape[1]), None, None, None, None


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               grad_dtype: torch.dtype = torch.float8_e4m3fn, recipe: str = "rowwise") -> torch.Tensor:
    """x W^T for a frozen FP8 weight (``wq`` [out, in], ``w_scale`` [out]), in x's dtype, FP8 in both directions,
    scaled as ``recipe`` (FP8_RECIPES) says."""
    return _Fp8Linear.apply(x, wq, w_scale, grad_dtype, recipe)


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                  grad_dtype: torch.dtype = torch.float8_e4m3fn, recipe: str = "rowwise") -> torch.Tensor:
    """x W^T for a frozen weight stored plainly (``scale`` None) or as FP8 with its scales."""
    if scale is None:
        return torch.nn.functional.linear(x, weight)
    return fp8_linear(x, weight, scale, grad_dtype, recipe)


def fp8_shape_problems(shapes: dict[str, tuple[int, int]]) -> list[str]:
    """The projections (name: (in, out)) whose sizes cuBLASLt's FP8 GEMMs cannot take: both must be multiples of
    16 (the token count may be anything)."""
    return [f"{name} {i}->{o}" for name, (i, o) in shapes.items() if i % 16 or o % 16]


def fp8_gemm_supported(device: torch.device) -> str | None:
    """None where FP8 GEMMs run on ``device`` (any CPU, emulated; an sm89+ GPU), else why not."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (sm{major}{minor}) has no FP8 tensor cores; "
                "--precision fp8 needs Ada or Hopper (sm89+)")
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm; --precision fp8 needs torch >= 2.4"
    return None
