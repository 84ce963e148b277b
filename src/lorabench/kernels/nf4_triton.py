"""The Triton kernels of kernels/nf4.py's dequantization (that module says what they compute); imported only when an
NF4 weight is first dequantized on a GPU, so importing lorabench does not import Triton.

Both work on tiles of whole absmax blocks (one absmax read and decoded a block, broadcast along it), read each packed
byte once and write each byte's two outputs as one word (two bf16 or fp16 weights in 32 bits, two float32 in
64, two e4m3 codes in 16), so every store is a wide, contiguous one; a double-quantized block absmax is decoded in
the kernel (its code's value x its group's float32 absmax + offset), not by separate PyTorch ops in front of it.
The absmax decode multiplies then adds, rounding after each, as PyTorch's separate ops (and bitsandbytes') do: the
product is libdevice's ``mul_rn``, which the compiler does not fuse with the sum into one multiply-add (that would
round once), whatever the launch's ``enable_fp_fusion``, so the kernels are exact however they are launched (from
Python or from a compiled graph's generated code, which sets no launch options; tests/test_nf4.py compiles the
kernel for an H100 and finds no fused multiply-add). Triton links libdevice flushing subnormals (``mul.rn.ftz``): a
product or group absmax below float32's normal range (1.2e-38) would become zero, which no real weight's block
scales come near. Triton's CPU interpreter, which the tests run, has no libdevice and never fuses: there the
product is a plain one."""
import triton
import triton.language as tl

try:  # keep the name `libdevice`: a compiled graph copies the kernels' source into its own code, whose header
    from triton.language.extra import libdevice  # imports libdevice under that name, not this module's imports
except ImportError:  # Triton before 3.2 kept it under the CUDA backend (a Triton with neither, or a ROCm build
    from triton.language.extra.cuda import libdevice  # without mul_rn: the kernels are not used, PyTorch's path is)

OUT_BF16, OUT_FP16, OUT_FP32 = 0, 1, 2
"""The output dtype codes of ``dequantize_kernel``'s OUT."""


@triton.jit
def _block_absmax(absmax_ptr, nested_ptr, code_ptr, offset_ptr, block, inside, NESTED: tl.constexpr,
                  NESTED_BLOCK: tl.constexpr):
    """The float32 absmax of each block index ``block``: stored as is, or (NESTED) the nested code table's value of
    its 8-bit code times its group's float32 absmax, plus the offset, rounded after the product and after the sum;
    0 outside (where ``inside`` is false)."""
    if NESTED:
        code = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        code_value = tl.load(code_ptr + code)
        group_absmax = tl.load(nested_ptr + block // NESTED_BLOCK, mask=inside, other=0.0)
        if _COMPILED:
            value = libdevice.mul_rn(code_value, group_absmax)
        else:
            value = code_value * group_absmax
        value = tl.where(inside, value + tl.load(offset_ptr), 0.0)
    else:  # one return after the branch: Triton's compiler types every return statement, dead or not
        value = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    return value


@triton.jit
def _pair_values(packed_ptr, absmax_ptr, nested_ptr, code_ptr, offset_ptr, levels_ptr, blocks, limit,
                 BLOCK_BYTES: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
    """A tile of whole absmax blocks (``blocks``: their indices, [R]) as [R, BLOCK_BYTES] packed bytes: (their
    byte offsets, which of them lie below ``limit``, the float32 weights (first, second) of each byte, the first
    element of a byte being its high four bits, level[code] x the block's absmax). One absmax per block, broadcast
    along it."""
    byte = blocks[:, None] * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)[None, :]
    inside = byte < limit
    b = tl.load(packed_ptr + byte, mask=inside, other=0).to(tl.int32)
    scale = _block_absmax(absmax_ptr, nested_ptr, code_ptr, offset_ptr, blocks, blocks * BLOCK_BYTES < limit, NESTED,
                          NESTED_BLOCK)[:, None]
    return byte, inside, tl.load(levels_ptr + (b >> 4)) * scale, tl.load(levels_ptr + (b & 15)) * scale


@triton.jit
def _bf16_bits(v):
    """float32 ``v`` rounded to the nearest bf16 (ties to even) with integer ops, its 16 bits in a uint32 (Triton's
    CPU interpreter, which the tests run, truncates its float32 -> bf16 casts)."""
    bits = v.to(tl.uint32, bitcast=True)
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


@triton.jit
def dequantize_kernel(packed_ptr, absmax_ptr, nested_ptr, code_ptr, offset_ptr, levels_ptr, out_ptr, nbytes,
                      BYTES: tl.constexpr, BLOCK_BYTES: tl.constexpr, NESTED: tl.constexpr,
                      NESTED_BLOCK: tl.constexpr, OUT: tl.constexpr):
    """BYTES packed bytes a program (whole blocks of BLOCK_BYTES): each byte's two weights computed in float32,
    rounded once to the output dtype (OUT: bf16 to nearest even by hand) and stored as one word of ``out_ptr``
    (int32 words for the 16-bit dtypes, int64 for float32; the first weight in the low half, so the words are the
    weights in order in memory)."""
    blocks = tl.program_id(0).to(tl.int64) * (BYTES // BLOCK_BYTES) + tl.arange(0, BYTES // BLOCK_BYTES)
    byte, inside, first, second = _pair_values(packed_ptr, absmax_ptr, nested_ptr, code_ptr, offset_ptr, levels_ptr,
                                               blocks, nbytes, BLOCK_BYTES, NESTED, NESTED_BLOCK)
    if OUT == 2:
        word = (first.to(tl.uint32, bitcast=True).to(tl.uint64)
                | (second.to(tl.uint32, bitcast=True).to(tl.uint64) << 32))
    elif OUT == 1:
        word = (first.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
                | (second.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16))
    else:
        word = _bf16_bits(first) | (_bf16_bits(second) << 16)
    tl.store(out_ptr + byte, word.to(out_ptr.dtype.element_ty, bitcast=True), mask=inside)


@triton.jit
def _bf16_round(v):
    """float32 ``v`` rounded to the nearest bf16 (ties to even), kept in float32, with integer ops."""
    return (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_round(v):
    """float32 ``v`` (|v| <= 448) rounded to the nearest e4m3 value (ties to even), kept in float32, with integer
    ops: Triton's interpreter rounds its float32 -> float8 casts wrongly where the rounding carries into the
    exponent (127 became 64), and a value rounded here converts exactly. e4m3 keeps 3 mantissa bits down to 2^-6
    (20 of float32's 23 dropped) and steps of 2^-9 below it (one more dropped bit per halving; under 2^-9 the value
    is 0 or 2^-9)."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag = bits & 0x7FFFFFFF
    exponent = (mag >> 23).to(tl.int32) - 127
    drop = (20 + tl.minimum(tl.maximum(-6 - exponent, 0), 3)).to(tl.uint32)
    kept_lsb = tl.where(drop == 23, 1, (mag >> drop) & 1)  # dropping 23: the implicit bit is the one kept
    rounded = ((mag + ((1 << (drop - 1)) - 1) + kept_lsb) >> drop) << drop
    tiny = tl.where(mag > 0x3A800000, 0x3B000000, 0).to(tl.uint32)  # above 2^-10: 2^-9; else 0 (a tie: even)
    rounded = tl.where(mag < 0x3B000000, tiny, rounded)  # under 2^-9
    return (rounded | sign).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_code(v, scale, FP8_MAX: tl.constexpr):
    """The e4m3 code (in a uint16) of ``v`` / ``scale``, the division rounded to nearest as torch's is. The code is
    assembled from the rounded float32's bits, not by a float8 cast (on an H100 the cast's results moved with the
    launch's warps per element): sign; then a normal value's exponent rebiased (float32 bias 127, e4m3's 7) and its
    three mantissa bits, or a subnormal's multiple of 2^-9."""
    r = _e4m3_round(tl.clamp(tl.div_rn(v, scale), -FP8_MAX, FP8_MAX))
    bits = r.to(tl.uint32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    normal = ((exponent - 120) << 3) | ((bits >> 20) & 7)
    subnormal = (tl.abs(r) * 512.0).to(tl.uint32)
    code = tl.where(exponent >= 121, normal, subnormal) | ((bits >> 24) & 0x80)
    return code.to(tl.uint16)


@triton.jit
def dequantize_fp8_kernel(packed_ptr, absmax_ptr, nested_ptr, code_ptr, offset_ptr, levels_ptr, scale_ptr, out_ptr,
                          nbytes, row_bytes, BYTES: tl.constexpr, BLOCK_BYTES: tl.constexpr, NESTED: tl.constexpr,
                          NESTED_BLOCK: tl.constexpr, FP8_MAX: tl.constexpr):
    """BYTES packed bytes a program (whole blocks, a row being whole blocks of ``row_bytes`` / BLOCK_BYTES): each
    byte's two weights dequantized and rounded to bf16 (as the bf16 kernel above makes them), divided by their row's
    float32 scale (``scale_ptr``, one a row, read once a block) and coded in e4m3, the two codes stored as one
    16-bit word of ``out_ptr``: as kernels/fp8.py's quantize_rows codes a bf16 weight whose row scales are
    given. One pass: the scales of a frozen weight are computed once, where it is loaded."""
    blocks = tl.program_id(0).to(tl.int64) * (BYTES // BLOCK_BYTES) + tl.arange(0, BYTES // BLOCK_BYTES)
    byte, inside, first, second = _pair_values(packed_ptr, absmax_ptr, nested_ptr, code_ptr, offset_ptr, levels_ptr,
                                               blocks, nbytes, BLOCK_BYTES, NESTED, NESTED_BLOCK)
    start = blocks * BLOCK_BYTES
    scale = tl.load(scale_ptr + start // row_bytes, mask=start < nbytes, other=1.0)[:, None]
    word = _e4m3_code(_bf16_round(first), scale, FP8_MAX) | (_e4m3_code(_bf16_round(second), scale, FP8_MAX) << 8)
    tl.store(out_ptr + byte, word.to(out_ptr.dtype.element_ty, bitcast=True), mask=inside)


_COMPILED = tl.constexpr(isinstance(dequantize_kernel, triton.runtime.JITFunction))
"""Whether the kernels compile for a device (False under Triton's CPU interpreter, which has no libdevice)."""
