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
