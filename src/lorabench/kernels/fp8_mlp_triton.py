"""The Triton kernels of kernels/fp8_mlp.py (which says what they compute and why): one program a row, the whole
row in registers, each input read once. Imported only when a kernel first runs, so importing lorabench does not
import Triton."""
import triton
import triton.language as tl


@triton.jit
def _row_quantize(v, mask, top, out_ptr, scale_ptr, row, n):
    """Store row ``v`` (fp32, masked-off lanes 0) divided by its scale amax / top, saturated at +-top, in the
    output's dtype, and the scale (1 for a row of zeros)."""
    amax = tl.max(tl.abs(v), axis=0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, top), 1.0)
    q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -top), top)
    tl.store(out_ptr + row * n + tl.arange(0, v.shape[0]), q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)

@triton.jit
def swiglu_quantize_kernel(g_ptr, u_ptr, q_ptr, scale_ptr, n, top, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(g_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    h = (g * tl.sigmoid(g) * u).to(g_ptr.dtype.element_ty).to(tl.float32)
    _row_quantize(h, mask, top, q_ptr, scale_ptr, row, n)

@triton.jit
def swiglu_backward_quantize_kernel(dh_ptr, g_ptr, u_ptr, gate_scale_ptr, up_scale_ptr, dg_ptr, dg_scale_ptr,
                                    du_ptr, du_scale_ptr, n, top, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dh = tl.load(dh_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    du = (dh * (g * s)).to(dh_ptr.dtype.element_ty).to(tl.float32)
    du = du * tl.load(up_scale_ptr + cols, mask=mask, other=0.0)
    _row_quantize(du, mask, top, du_ptr, du_scale_ptr, row, n)
    u = tl.load(u_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    dg = (dh * u * s * (1 + g * (1 - s))).to(dh_ptr.dtype.element_ty).to(tl.float32)
    dg = dg * tl.load(gate_scale_ptr + cols, mask=mask, other=0.0)
    _row_quantize(dg, mask, top, dg_ptr, dg_scale_ptr, row, n)
