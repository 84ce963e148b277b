"""The Triton kernel of kernels/dropout.py's philox16 masks (that module says what it draws); imported only when a
mask is first drawn on a GPU, so importing lorabench does not import Triton."""
import triton
import triton.language as tl


@triton.jit
def store_bits(out_ptr, word, shift, threshold, first, nbytes, BLOCK: tl.constexpr):
    """One 16-bit half of every lane's ``word`` against the threshold: BLOCK mask elements, packed 8 to a byte
    (element 8i + k in bit k of byte i), stored from byte ``first``."""
    keep = (((word >> shift) & 0xFFFF).to(tl.int32) >= threshold).to(tl.int32)
    bits = tl.reshape(keep, [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
    byte = first + tl.arange(0, BLOCK // 8)
    tl.store(out_ptr + byte, tl.sum(bits, axis=1).to(tl.uint8), mask=byte < nbytes)


@triton.jit(do_not_specialize=["seed"])  # one compiled kernel for every seed (16 | seed would be a second)
def keep_mask_kernel(out_ptr, nbytes, seed, threshold, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    r0, r1, r2, r3 = tl.randint4x(seed, tile * BLOCK + tl.arange(0, BLOCK))
    first = tile.to(tl.int64) * BLOCK  # the tile's 8 BLOCK elements are its BLOCK bytes; block k: BLOCK / 8 of them
    store_bits(out_ptr, r0, 0, threshold, first, nbytes, BLOCK)
    store_bits(out_ptr, r0, 16, threshold, first + BLOCK // 8, nbytes, BLOCK)
    store_bits(out_ptr, r1, 0, threshold, first + 2 * (BLOCK // 8), nbytes, BLOCK)
    store_bits(out_ptr, r1, 16, threshold, first + 3 * (BLOCK // 8), nbytes, BLOCK)
    store_bits(out_ptr, r2, 0, threshold, first + 4 * (BLOCK // 8), nbytes, BLOCK)
    store_bits(out_ptr, r2, 16, threshold, first + 5 * (BLOCK // 8), nbytes, BLOCK)
    store_bits(out_ptr, r3, 0, threshold, first + 6 * (BLOCK // 8), nbytes, BLOCK)
    store_bits(out_ptr, r3, 16, threshold, first + 7 * (BLOCK // 8), nbytes, BLOCK)
