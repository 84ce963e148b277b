"""Dropout keep-masks drawn outside Inductor's kernels, also inside compiled blocks.

``rand_like(x) >= p`` inside a compiled block becomes part of an Inductor kernel that runs one Philox call per
element and keeps one of the four 32-bit words it yields. At the Llama-2-7B shape that made the RMSNorm kernel the
masks are fused into compute-bound (10.4 ms of a 404 ms step at bf16 LBS 16 on an H200, 2026-11-28,
benchmarks/NOTES.md item 12). ``keep_mask`` is a custom op instead, which a compiled graph calls as an opaque kernel:

- ``philox16`` (CUDA with Triton): one Philox4x32-10 call gives 128 random bits, read as eight 16-bit numbers, each
  compared with round(p * 65536): eight mask elements per call (p is kept to 1/65536: 0.05 becomes 3277/65536 =
  0.050003). The seed of each call is drawn from torch's CPU generator, so ``torch.manual_seed`` fixes the masks.
  ``philox_keep_mask`` is the same mask in plain PyTorch: the tests run the kernel in Triton's CPU interpreter and
  benchmarks/gpu_check.py on a GPU, both bit for bit against it. On an H200 (2026-11-28) at bf16 LBS 16 the masks
  took 2.0 ms a step this way and 4.5 ms with torch's Bernoulli kernel; the norm kernel that drew them itself took
  10.4 ms (benchmarks/NOTES.md items 12, 22-23).
- ``bernoulli``: torch's Bernoulli kernel on a bool tensor (the op's path on a CPU, or without Triton, or while a
  CUDA graph is being captured, where a seed drawn on the host would be frozen into the graph).
- ``inline``: ``rand_like(x, float32) >= p`` where it is needed (Inductor fuses it into its kernels); also the
  path on torch without ``torch.library.custom_op`` (before 2.4).

The op's masks are packed, one bit an element (``pack_mask``; the inline draw's stay bool): the backward needs
each mask again, and a bool mask is a byte an element, half a bf16 activation of its shape (2.1 GB a step at
Llama-2-7B LBS 16 with FlagPerf's q/v adapters, ~8.6 GB with all seven adapted); packed, an eighth of that. The
kernels that apply a mask read the bits (``unpack_mask`` is elementwise, so Inductor folds it into them). On an
H200 (2026-12-02, benchmarks/NOTES.md item 73) that took FlagPerf's bf16 LBS 16 row from 38.2 to 36.5 GiB and the
all-linear dropout-0.05 row from 46.0 to 38.5 GiB at the same speed; the packing kernel takes 44.7 us a [8192,
4096] mask.

The op is tagged as a seeded random op (the partitioner saves its output for the backward rather than drawing it
again: it recomputes no op outside its allowlist). The joint graph's common-subexpression elimination, though,
merges calls with equal arguments unless the op is one of torch's own random ops, so two adapters reading the same
input (q_proj and v_proj both read the attention norm's output) pass different ``salt`` values, or they would
share one mask.
"""
from __future__ import annotations

import functools
import math

import torch

MASK_IMPLS = ("philox16", "bernoulli", "inline")
"""How a keep-mask is drawn (see above)."""

BLOCK = 1024
"""Philox calls per program of the Triton kernel; a program writes 8 x BLOCK mask elements (BLOCK bytes), word w's
low and high halves to elements [(2w) BLOCK, (2w + 1) BLOCK) and [(2w + 1) BLOCK, (2w + 2) BLOCK) of its tile."""


def _threshold(p: float) -> int:
    return round(p * 65536)


@functools.cache
def _triton_kernel():
    """The Triton kernel (its module imported once, on first use), or None without Triton."""
    try:
        from . import dropout_triton
    except ImportError:
        return None
    return dropout_triton.keep_mask_kernel


def _philox16_cuda(x: torch.Tensor, p: float) -> torch.Tensor:
    kernel = _triton_kernel()
    if kernel is None or torch.cuda.is_current_stream_capturing():
        return _bernoulli_packed(x, p)
    out = torch.empty(packed_size(x.numel()), dtype=torch.uint8, device=x.device)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    with torch.cuda.device(x.device):
        _launch(kernel, out, p, seed)
    return out


def _launch(kernel, out: torch.Tensor, p: float, seed: int):
    """Fill the contiguous uint8 tensor ``out`` with the packed philox16 mask of ``seed`` (8 out.numel() elements;
    a program writes BLOCK bytes)."""
    kernel[(_cdiv(out.numel(), BLOCK),)](out, out.numel(), seed, _threshold(p), BLOCK=BLOCK)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def packed_size(n: int) -> int:
    """Bytes of a packed mask of ``n`` elements."""
    return _cdiv(n, 8)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask as packed bytes (uint8, flat): element 8i + k of the flattened mask in bit k of byte i, the last
    byte's spare bits 0."""
    flat = keep.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(packed_size(flat.numel()) * 8 - flat.numel())])
    bits = flat.view(-1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8, device=flat.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, shape, backward: bool = False) -> torch.Tensor:
    """The bool mask of ``shape`` that ``mask`` holds: as it is if it is bool already (the inline draw), else
    unpacked from its bytes (pack_mask's layout). Elementwise ops, so a compiled graph reads the bytes inside the
    kernels that use the mask. ``backward``: the same bits by other ops (a test against a bit instead of a shift),
    so the joint graph's common-subexpression elimination cannot merge the backward's unpacking with the
    forward's, which would let the partitioner keep the forward's bool mask (eight times the bytes) for it."""
    if mask.dtype == torch.bool:
        return mask
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    if backward:
        bits = (mask[:, None] & (torch.ones_like(shifts) << shifts)) != 0
    else:
        bits = ((mask[:, None] >> shifts) & 1).bool()
    return bits.reshape(-1)[:math.prod(shape)].view(shape)


def _bernoulli_packed(x: torch.Tensor, p: float) -> torch.Tensor:
    return pack_mask(torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p))


def _define_op():
    if not hasattr(torch.library, "custom_op"):
        return None

    def impl(x: torch.Tensor, p: float, salt: int, philox16: bool) -> torch.Tensor:
        if philox16 and x.is_cuda:
            return _philox16_cuda(x, p)
        return _bernoulli_packed(x, p)

    try:
        op = torch.library.custom_op("lorabench::keep_mask", impl, mutates_args=(),
                                     tags=(torch.Tag.nondeterministic_seeded,))
    except TypeError:  # torch without the tags argument: the op would be recomputable, so do without it
        return None

    @op.register_fake
    def _(x, p, salt, philox16):
        return torch.empty(packed_size(x.numel()), dtype=torch.uint8, device=x.device)

    return op


_KEEP_MASK = _define_op()


def keep_mask(x: torch.Tensor, p: float, impl: str = "philox16", salt: int = 0) -> torch.Tensor:
    """A keep-mask of ``x``'s elements, each kept with probability 1 - p, independently: packed bytes (one bit an
    element, pack_mask's layout) from the op, a bool tensor like x from the inline draw; ``unpack_mask`` gives
    the bool tensor either way. Masks drawn from the same ``x`` in one compiled graph need different ``salt``
    values (see above); the draw ignores it."""
    if impl != "inline" and _KEEP_MASK is not None:
        return _KEEP_MASK(x, p, salt, impl == "philox16")
    return torch.rand_like(x, dtype=torch.float32) >= p


# -- the plain-PyTorch reference of the philox16 mask ---------------------------------------------------------

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of m * c for 32-bit c in int64 arithmetic (16-bit limbs, so nothing overflows)."""
    t, u = m * (c & 0xFFFF), m * (c >> 16)  # m * c = u * 2^16 + t, both < 2^48
    mid = u + (t >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32(counters: list[torch.Tensor], key: tuple[int, int], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32 (Salmon et al., SC'11) of the four 32-bit counter words under the key's two words: the four
    output words, as int64 tensors."""
    c0, c1, c2, c3 = (c.to(torch.int64) for c in counters)
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return [c0, c1, c2, c3]


def philox_keep_mask(shape, p: float, seed: int) -> torch.Tensor:
    """The philox16 kernel's mask for ``seed``, computed in plain PyTorch on the CPU."""
    n = math.prod(shape)
    tiles = _cdiv(n, 8 * BLOCK)
    counter = torch.arange(tiles * BLOCK, dtype=torch.int64)
    zero = torch.zeros_like(counter)
    words = philox4x32([counter, zero, zero, zero], (seed & _U32, seed >> 32))  # Triton's randint4x
    halves = [h.view(tiles, 1, BLOCK) for w in words for h in (w & 0xFFFF, w >> 16)]  # order within a tile
    keep = torch.cat(halves, dim=1).reshape(-1)[:n] >= _threshold(p)
    return keep.reshape(shape)
