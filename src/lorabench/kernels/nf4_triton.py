"""The Triton kernel of kernels/nf4.py's dequantization (that module says what it computes); imported only when an
NF4 weight is first dequantized on a GPU, so importing lorabench does not import Triton."""
import triton
import triton.language as tl


@triton.jit
def dequantize_kernel(packed_ptr, absmax_ptr, levels_ptr, out_ptr, nbytes, BYTES: tl.constexpr,
                      BLOCK_BYTES: tl.constexpr):
    """BYTES packed bytes a program: each byte's two codes (the first element in the high four bits) looked up in
    the 16 levels and multiplied by their block's float32 absmax (BLOCK_BYTES bytes a block), in float32, then
    rounded once to the output's dtype, to nearest even, and stored side by side. (bf16 is rounded with integer
    ops: Triton's CPU interpreter, which the tests run, truncates its float32 -> bf16 casts.)"""
    first = tl.program_id(0).to(tl.int64) * BYTES
    byte = first + tl.arange(0, BYTES)
    inside = byte < nbytes
    b = tl.load(packed_ptr + byte, mask=inside, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + byte // BLOCK_BYTES, mask=inside, other=0.0)
    high = tl.load(levels_ptr + (b >> 4)) * scale
    low = tl.load(levels_ptr + (b & 15)) * scale
    values = tl.interleave(high, low)
    if out_ptr.dtype.element_ty == tl.bfloat16:  # rounded to nearest even by hand: the same in every Triton
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        values = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        values = values.to(out_ptr.dtype.element_ty)
    element = 2 * first + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + element, values, mask=element < 2 * nbytes)


@triton.jit
def _bf16_round(v):
    """float32 ``v`` rounded to the nearest bf16 (ties to even), kept in float32, with integer ops."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


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
def _row_values(packed_ptr, absmax_ptr, levels_ptr, byte, inside, BLOCK_BYTES: tl.constexpr):
    """The bf16-rounded weights (as float32, interleaved: 2 a byte) of the packed bytes at ``byte``."""
    b = tl.load(packed_ptr + byte, mask=inside, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + byte // BLOCK_BYTES, mask=inside, other=0.0)
    high = _bf16_round(tl.load(levels_ptr + (b >> 4)) * scale)
    low = _bf16_round(tl.load(levels_ptr + (b & 15)) * scale)
    return tl.interleave(high, low)


@triton.jit
def dequantize_fp8_kernel(packed_ptr, absmax_ptr, levels_ptr, out_ptr, scale_ptr, row_bytes, inverse_max,
                          BLOCK_BYTES: tl.constexpr, CHUNK: tl.constexpr, FP8_MAX: tl.constexpr):
    """One row a program: its weights dequantized and rounded to bf16 (as the bf16 kernel above makes them), then
    quantized to e4m3 with the row's scale (its absolute maximum times ``inverse_max``, a float32 1 / FP8_MAX; 1 for
    a row of zeros), as kernels/fp8.py's quantize_rows does to a bf16 weight: two passes over the row's packed
    bytes (the first for its maximum), one write of its e4m3 codes and of its float32 scale. The division of each
    weight by the scale rounds to nearest, as torch's tensor division does."""
    row = tl.program_id(0).to(tl.int64)
    first = row * row_bytes
    top = tl.zeros([2 * CHUNK], dtype=tl.float32)
    for start in range(0, row_bytes, CHUNK):
        byte = start + tl.arange(0, CHUNK)
        inside = byte < row_bytes
        values = _row_values(packed_ptr, absmax_ptr, levels_ptr, first + byte, inside, BLOCK_BYTES)
        top = tl.maximum(top, tl.abs(values))
    amax = tl.max(top, axis=0)
    scale = tl.where(amax > 0, amax * inverse_max, 1.0)
    tl.store(scale_ptr + row, scale)
    for start in range(0, row_bytes, CHUNK):
        byte = start + tl.arange(0, CHUNK)
        inside = byte < row_bytes
        values = _row_values(packed_ptr, absmax_ptr, levels_ptr, first + byte, inside, BLOCK_BYTES)
        q = _e4m3_round(tl.clamp(tl.div_rn(values, scale), -FP8_MAX, FP8_MAX)).to(out_ptr.dtype.element_ty)
        element = 2 * start + tl.arange(0, 2 * CHUNK)
        tl.store(out_ptr + 2 * first + element, q, mask=element < 2 * row_bytes)
