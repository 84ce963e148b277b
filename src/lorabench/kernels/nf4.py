"""4-bit NormalFloat (NF4) frozen weights, as QLoRA defines them (Dettmers et al. 2023, "QLoRA: Efficient Finetuning
of Quantized LLMs", section 3 and appendix E), in the layout bitsandbytes stores them, so checkpoints quantized by
bitsandbytes load here and ours load there.

- **Levels**: 16 values in [-1, 1], the quantiles of a standard normal distribution, split so that zero is exact: 8
  from the positive half and 7 from the negative, each half spread over the probabilities from 0.5 to
  ``NF4_OFFSET``, then scaled so the largest is 1 (``nf4_levels_float64`` builds them in float64; ``NF4_LEVELS``
  are those values in float32, as bitsandbytes stores its ``quant_map``).
- **Blocks**: the weight, flattened in row-major order, is cut into blocks of ``BLOCK`` (64) elements; each block
  is divided by its absolute maximum (``absmax``) and each element coded by the nearest level. Two codes share a
  byte, the first element in the high four bits.
- **Double quantization** (QLoRA's section 3): the float32 absmax constants, less their mean (``offset``), are
  themselves quantized to 8 bits in blocks of ``NESTED_BLOCK`` (256) with the signed dynamic map
  (``dynamic_map``: Dettmers' dynamic tree quantization, 2^i values in decade i for i = 0..6, from 1e-6 to 1, both
  signs, and 0 and 1), which costs 0.127 bits per parameter instead of 0.5.

Dequantizing gives ``level[code] * absmax`` for each element, absmax being ``nested_code[q] * nested_absmax +
offset`` under double quantization. The functions here are plain PyTorch (any device); tests compare them with
bitsandbytes bit for bit where it is installed, and with the float64 levels everywhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from .fp8 import WEIGHT_FORMAT, fp8_input_grad, fp8_max, fp8_product, quantize_weight, scale_of, with_scales

BLOCK = 64
"""Elements per absmax block (QLoRA's and bitsandbytes' default)."""
NESTED_BLOCK = 256
"""Absmax constants per block of the double quantization."""
NF4_OFFSET = 0.9677083
"""The largest probability the levels are taken at: QLoRA's choice, so that the outermost level is the mean of the
normal quantiles 1 - 1/(2 x 15) and 1 - 1/(2 x 16) rather than an infinite one."""

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
"""The 16 NF4 levels in float32, in code order (code 7 is 0.0); tests check them against nf4_levels_float64."""


def nf4_levels_float64() -> list[float]:
    """The NF4 levels computed in float64 from the normal quantiles (QLoRA appendix E's construction)."""
    ppf = NormalDist().inv_cdf

    def probs(n: int) -> list[float]:  # n points from NF4_OFFSET down to 0.5, the last (0.5: quantile 0) left out
        return [NF4_OFFSET + (0.5 - NF4_OFFSET) * k / (n - 1) for k in range(n - 1)]

    positive = [ppf(p) for p in probs(9)]
    negative = [-ppf(p) for p in probs(8)]
    levels = sorted(positive + [0.0] + negative)
    top = max(abs(v) for v in levels)
    return [v / top for v in levels]


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (256 float32 values, ascending) that double quantization codes the absmax
    constants with: in decade i (i = 0..6, values of magnitude 10^(i-6) x [0.1, 1]) the midpoints of 2^i equal
    steps from 0.1 to 1, both signs, then 0 and 1."""
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1)
        mids = (edges[:-1] + edges[1:]) / 2
        values += (10.0 ** (i - 6) * mids).tolist() + (-(10.0 ** (i - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the level nearest each element of ``x`` (levels ascending; a tie goes to the upper level)."""
    mids = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(x, mids, right=True).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 absmax per block) of flat float32 ``x`` coded by ``code`` (ascending values in
    [-1, 1]) after dividing each block of ``block`` elements by its absolute maximum (an all-zero block by 1)."""
    n = x.numel()
    pad = (-n) % block
    blocks = torch.nn.functional.pad(x.float().reshape(-1), (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    return _nearest(scaled, code.to(x.device)).reshape(-1)[:n], absmax


@dataclass
class NF4Tensor:
    """A weight stored as NF4 (the fields bitsandbytes' quant state holds)."""

    packed: torch.Tensor
    """uint8 [ceil(n / 2)]: two 4-bit codes a byte, the first element in the high bits."""
    absmax: torch.Tensor
    """Per block of BLOCK: float32, or uint8 codes of the double quantization."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    """The dtype the weight dequantizes to (and was quantized from)."""
    block: int = BLOCK
    levels: torch.Tensor | None = None
    """The 16 float32 levels (None: NF4_LEVELS). No tensor as the default: torch.compile (2.11) cannot trace a
    constructor whose defaults hold a tensor and broke every compiled 4-bit block into pieces at each product."""
    nested_absmax: torch.Tensor | None = None
    """Double quantization: float32 absmax per block of NESTED_BLOCK absmax codes."""
    nested_code: torch.Tensor | None = None
    offset: float | torch.Tensor = 0.0
    """Double quantization: the mean subtracted from the absmax constants (a 0-d float32 tensor in a module)."""
    nested_block: int = NESTED_BLOCK
    fp8_scale: torch.Tensor | None = None
    """float32 [rows]: the per-row e4m3 scales of the weight dequantized to bf16 (``fp8_row_scales``), for FP8
    products; the weight is frozen, so they are computed once, where it is loaded, and kept."""

    def __post_init__(self):
        if self.levels is None:
            self.levels = NF4_LEVELS

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """float32 absmax of each block (decoded from the double quantization where there is one)."""
        if not self.nested:
            return self.absmax.float()
        n = self.absmax.numel()
        code = self.nested_code.to(self.absmax.device)[self.absmax.long()]
        scale = self.nested_absmax.repeat_interleave(self.nested_block)[:n]
        return code * scale + self.offset

    def dequantize(self, kernel: bool = False) -> torch.Tensor:
        """The weight as ``dtype``: level[code] x its block's absmax, computed in float32 and rounded once, by plain
        PyTorch ops; with ``kernel``, on a GPU, by one Triton kernel (``dequantize_kernel``: the same values, bit for
        bit; --nf4-dequant triton)."""
        n = math.prod(self.shape)
        if kernel and self.packed.is_cuda and n % 2 == 0 and _tiled(self.block) and (op := define_ops()[0]) is not None:
            return op(*self.kernel_args(), self.block, self.nested_block, self.dtype).view(self.shape)
        absmax, levels = self.block_absmax().float(), self.levels.to(self.packed.device, torch.float32)
        return _dequantize(self.packed.reshape(-1), absmax, levels, self.block, self.dtype)[:n].view(self.shape)

    def fp8_row_scales(self, kernel: bool = False) -> torch.Tensor:
        """float32 [rows]: the scales kernels/fp8.py's quantize_weight gives the weight dequantized to bf16, one a
        row (its largest magnitude / 448; the scales alone, no codes made)."""
        weight = dataclasses.replace(self, dtype=torch.bfloat16).dequantize(kernel).reshape(self.shape[0], -1)
        return scale_of(weight.abs().amax(dim=1).float(), WEIGHT_FORMAT)  # (a bf16 maximum is exact in float32)

    def dequantize_fp8(self, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight [out, in] dequantized (to ``dtype``) and then quantized per row to e4m3 as kernels/fp8.py's
        quantize_weight does: (e4m3 codes [out, in], float32 scales [out]); a bf16 weight's scales are
        ``fp8_scale`` where kept. With ``kernel``, on a GPU, for a bf16 weight whose rows are whole blocks, one
        Triton kernel makes the codes (``dequantize_fp8_kernel``: the same values, bit for bit), so the bf16 weight
        is not written (only where no scales were kept are they made first, from the bf16 weight)."""
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        bf16 = self.dtype == torch.bfloat16
        scale = self.fp8_scale if bf16 else None
        if (kernel and self.packed.is_cuda and bf16 and cols % self.block == 0 and _tiled(self.block)
                and (op := define_ops()[1]) is not None):
            scale = self.fp8_row_scales(kernel) if scale is None else scale
            return op(*self.kernel_args(), self.block, self.nested_block, scale).view(rows, cols), scale
        weight = self.dequantize(kernel).reshape(rows, cols)
        if scale is None:
            return quantize_weight(weight, WEIGHT_FORMAT)
        return with_scales(weight, scale[:, None], WEIGHT_FORMAT), scale

    def kernel_args(self) -> tuple:
        """(packed codes flat, absmax, nested absmax, nested code table, offset as a 0-d float32 tensor, levels) on
        the weight's device, as the kernels take them; the nested three are None without double quantization."""
        device = self.packed.device
        levels = self.levels.to(device, torch.float32)
        if not self.nested:
            return self.packed.reshape(-1), self.absmax.float(), None, None, None, levels
        offset = torch.as_tensor(self.offset, dtype=torch.float32, device=device).reshape(())
        return (self.packed.reshape(-1), self.absmax, self.nested_absmax.float(),
                self.nested_code.to(device, torch.float32), offset, levels)

    def quant_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes saves beside ``<prefix>`` (the packed weight itself not included)."""
        meta = {"quant_type": "nf4", "blocksize": self.block, "dtype": str(self.dtype).removeprefix("torch."),
                "shape": list(self.shape)}
        # copies of the shared code tables: each weight's state saves on its own (safetensors refuses shared memory)
        out = {f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.levels.clone()}
        if self.nested:
            meta.update(nested_blocksize=self.nested_block, nested_dtype="float32", nested_offset=float(self.offset))
            out.update({f"{prefix}.nested_absmax": self.nested_absmax,
                        f"{prefix}.nested_quant_map": self.nested_code.clone()})
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()),
                                                                      dtype=torch.uint8)
        return out


def _dequantize(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, block: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The 2 x packed.numel() weights of the flat codes ``packed`` (the last block padded), each block of ``block``
    scaled by its float32 ``absmax``, in plain PyTorch ops."""
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1).long()
    values = levels[codes]
    pad = (-values.numel()) % block
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, block) * absmax[:, None]
    return values.reshape(-1)[:codes.numel()].to(dtype)


DEQUANTIZE_BYTES = FP8_BYTES = 2048
"""Packed bytes (2 x this many weights) a program of each kernel handles (NF4 -> bf16, NF4 -> e4m3)."""
DEQUANTIZE_WARPS = FP8_WARPS = 4
"""Warps a program of each kernel."""


def _tiled(block: int) -> bool:
    """Whether the kernels take blocks of ``block`` elements: they tile whole blocks of block / 2 bytes, a power of
    two (bitsandbytes' block sizes all are)."""
    return block >= 2 and block & (block - 1) == 0


@functools.cache
def _triton_kernel(name: str = "dequantize_kernel"):
    """The Triton kernel ``name`` of nf4_triton (imported once, on first use), or None without Triton."""
    try:
        from . import nf4_triton
    except ImportError:
        return None
    return getattr(nf4_triton, name)


def kernels_available() -> bool:
    """Whether the Triton kernels import here (Triton installed; they then run on a GPU)."""
    return _triton_kernel() is not None


def _absmax_pointers(absmax, nested_absmax, nested_code, offset) -> dict:
    """The kernels' block-absmax arguments: the nested ones, or (no double quantization) ``absmax`` standing in
    for the three the kernel then does not read."""
    nested = nested_absmax is not None
    return dict(absmax_ptr=absmax, nested_ptr=nested_absmax if nested else absmax,
                code_ptr=nested_code if nested else absmax, offset_ptr=offset if nested else absmax, NESTED=nested)


def launch_dequantize(kernel, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                      nested_code: torch.Tensor | None, offset: torch.Tensor | None, levels: torch.Tensor, block: int,
                      nested_block: int, dtype: torch.dtype, bytes_per_program: int | None = None,
                      num_warps: int | None = None) -> torch.Tensor:
    """The weights of the flat codes ``packed`` (NF4Tensor.kernel_args' fields) as ``dtype`` (bf16, fp16 or
    float32; 2 x packed.numel() of them, flat), each block of ``block`` elements (a power of two) scaled by its
    absmax; ``bytes_per_program``: a power of two (raised to a block's bytes where a block is larger; default
    DEQUANTIZE_BYTES), ``num_warps`` (default DEQUANTIZE_WARPS). The kernel writes words of two weights, allocated
    here as integers and returned viewed as ``dtype`` (a compiled graph then sees the kernel write a fresh tensor,
    not a view)."""
    from .nf4_triton import OUT_BF16, OUT_FP16, OUT_FP32
    code = {torch.bfloat16: OUT_BF16, torch.float16: OUT_FP16, torch.float32: OUT_FP32}[dtype]
    nbytes = packed.numel()
    words = torch.empty(nbytes, dtype=torch.int64 if dtype == torch.float32 else torch.int32, device=packed.device)
    per = max(bytes_per_program or DEQUANTIZE_BYTES, block // 2)  # whole blocks a program
    kernel[(-(-nbytes // per),)](
        packed_ptr=packed, levels_ptr=levels, out_ptr=words, nbytes=nbytes, BYTES=per, BLOCK_BYTES=block // 2,
        NESTED_BLOCK=nested_block, OUT=code, num_warps=num_warps or DEQUANTIZE_WARPS,
        **_absmax_pointers(absmax, nested_absmax, nested_code, offset))
    return words.view(dtype)


def launch_dequantize_fp8(kernel, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                          nested_code: torch.Tensor | None, offset: torch.Tensor | None, levels: torch.Tensor,
                          block: int, nested_block: int, scale: torch.Tensor, bytes_per_program: int | None = None,
                          num_warps: int | None = None) -> torch.Tensor:
    """The e4m3 codes (flat, 2 x packed.numel(); ``scale.numel()`` rows, each whole blocks) of the weights of
    ``packed`` (as launch_dequantize), dequantized to bf16 and coded per row with the float32 row scales ``scale``
    [rows]; ``bytes_per_program`` (default FP8_BYTES) and ``num_warps`` (default FP8_WARPS) as launch_dequantize's;
    written as 16-bit words of two codes and returned viewed as e4m3."""
    nbytes = packed.numel()
    words = torch.empty(nbytes, dtype=torch.int16, device=packed.device)
    per = max(bytes_per_program or FP8_BYTES, block // 2)
    kernel[(-(-nbytes // per),)](
        packed_ptr=packed, levels_ptr=levels, scale_ptr=scale, out_ptr=words, nbytes=nbytes,
        row_bytes=nbytes // scale.numel(), BYTES=per, BLOCK_BYTES=block // 2, NESTED_BLOCK=nested_block,
        FP8_MAX=fp8_max(WEIGHT_FORMAT), num_warps=num_warps or FP8_WARPS,
        **_absmax_pointers(absmax, nested_absmax, nested_code, offset))
    return words.view(WEIGHT_FORMAT)


def _plain(packed, absmax, nested_absmax, nested_code, offset, levels, block, nested_block, dtype) -> NF4Tensor:
    """The flat NF4Tensor of kernel arguments (for the PyTorch path where Triton is missing)."""
    return NF4Tensor(packed, absmax, (2 * packed.numel(),), dtype, block, levels, nested_absmax, nested_code,
                     0.0 if offset is None else offset, nested_block)


def _op(name: str, triton_op: bool = True):
    """(a decorator making a kernel's launch a torch op named ``name``, a function giving the kernel as that op's
    body launches it, whether the op traces its body), or (None, None, False) before torch 2.4. Where torch has
    ``triton_op`` (2.6 on; ``triton_op``: use it), the op is one: a compiled block sees the kernel inside it and
    launches it from its generated code, with no Python a call (an opaque op costs ~50-200 us of host time a
    product: benchmarks/NOTES.md items 95, 103), and its body, traced, gives the output's shape; eagerly it runs the
    body as written. Before that, a custom op a compiled block calls as one opaque kernel (Inductor's own fusion of
    the PyTorch ops ran far from the memory bandwidth: item 81), its output's shape registered beside it."""
    library = torch.library
    if triton_op and hasattr(library, "triton_op"):
        return library.triton_op(name, mutates_args=()), _wrapped, True
    if hasattr(library, "custom_op"):
        return library.custom_op(name, mutates_args=()), lambda kernel: kernel, False
    return None, None, False


def _wrapped(kernel):
    """``kernel`` as a triton_op's body launches it: wrapped for tracing, unless Triton's CPU interpreter runs it
    (torch before 2.13 refuses to wrap an interpreted kernel, even eagerly)."""
    from triton.runtime import JITFunction

    return torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def _on(device: torch.device):
    """Launches on ``device`` (Triton launches on the current CUDA device; a CPU tensor: the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _define_dequantize(name: str = "lorabench::nf4_dequantize", triton_op: bool = True):
    """The bf16 (fp16, float32) dequantization kernel as the torch op ``name`` (``_op``)."""
    define, wrap, traced = _op(name, triton_op)
    if define is None:
        return None

    @define
    def op(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
           nested_code: torch.Tensor | None, offset: torch.Tensor | None, levels: torch.Tensor, block: int,
           nested_block: int, dtype: torch.dtype) -> torch.Tensor:
        kernel = _triton_kernel()
        if kernel is None:  # a GPU without Triton
            return _plain(packed, absmax, nested_absmax, nested_code, offset, levels, block, nested_block,
                          dtype).dequantize()
        with _on(packed.device):
            return launch_dequantize(wrap(kernel), packed, absmax, nested_absmax, nested_code, offset, levels, block,
                                     nested_block, dtype)

    if not traced:
        op.register_fake(lambda packed, *rest: torch.empty(2 * packed.numel(), dtype=rest[-1],  # rest[-1]: dtype
                                                            device=packed.device))
    return op


def _define_dequantize_fp8(name: str = "lorabench::nf4_dequantize_fp8", triton_op: bool = True):
    """The NF4 -> e4m3 kernel as the torch op ``name`` (``_op``)."""
    define, wrap, traced = _op(name, triton_op)
    if define is None:
        return None

    @define
    def op(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
           nested_code: torch.Tensor | None, offset: torch.Tensor | None, levels: torch.Tensor, block: int,
           nested_block: int, scale: torch.Tensor) -> torch.Tensor:
        kernel = _triton_kernel("dequantize_fp8_kernel")
        if kernel is None:
            weight = _plain(packed, absmax, nested_absmax, nested_code, offset, levels, block, nested_block,
                            torch.bfloat16).dequantize()
            return with_scales(weight.view(scale.numel(), -1), scale[:, None], WEIGHT_FORMAT).view(-1)
        with _on(packed.device):
            return launch_dequantize_fp8(wrap(kernel), packed, absmax, nested_absmax, nested_code, offset, levels,
                                         block, nested_block, scale)

    if not traced:
        op.register_fake(lambda packed, *_: torch.empty(2 * packed.numel(), dtype=WEIGHT_FORMAT,
                                                        device=packed.device))
    return op


_DEQUANTIZE = _DEQUANTIZE_FP8 = None
"""The two kernels' ops once ``define_ops`` has made them."""


def define_ops() -> tuple:
    """(the bf16 dequantization's op, the NF4 -> e4m3 kernel's op), defined on the first call made outside a
    compiled graph's tracing (None before torch 2.4; inside a tracing, the ops defined so far, and where there are
    none the PyTorch path runs). Not at import: a triton_op reads its body's source for kernels as it is defined,
    which imports Triton and Inductor (seconds) that a CPU run never needs. convert.quantize_projections calls this
    where products are to use the kernels, before any block is compiled."""
    global _DEQUANTIZE, _DEQUANTIZE_FP8
    if _DEQUANTIZE is None and not torch.compiler.is_compiling():
        _DEQUANTIZE, _DEQUANTIZE_FP8 = _define_dequantize(), _define_dequantize_fp8()
    return _DEQUANTIZE, _DEQUANTIZE_FP8


def quantize_nf4(w: torch.Tensor, double_quant: bool = True, block: int = BLOCK) -> NF4Tensor:
    """``w`` as NF4 in blocks of ``block``, its absmax constants double-quantized where ``double_quant``."""
    codes, absmax = quantize_blockwise(w.reshape(-1), NF4_LEVELS, block)
    if codes.numel() % 2:
        codes = torch.cat((codes, codes.new_zeros(1)))
    packed = (codes[0::2] << 4) | codes[1::2]
    q = NF4Tensor(packed, absmax, tuple(w.shape), w.dtype, block)
    if double_quant:
        offset = absmax.mean()
        q.nested_code = dynamic_map().to(w.device)
        q.absmax, q.nested_absmax = quantize_blockwise(absmax - offset, q.nested_code, NESTED_BLOCK)
        q.offset = offset.item()
    return q


def from_quant_state(packed: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str) -> NF4Tensor:
    """An NF4Tensor from a bitsandbytes checkpoint's packed weight and the quant-state tensors saved beside it
    (``<prefix>.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map``,
    ``.quant_state.bitsandbytes__nf4``); a ValueError naming what is missing or not NF4."""
    key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if key not in tensors:
        raise ValueError(f"{prefix}: no {key} (not an NF4 weight of bitsandbytes)")
    meta = json.loads(bytes(tensors[key].tolist()).decode())
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{prefix}: quant_type {meta.get('quant_type')!r}; lorabench reads nf4")
    q = NF4Tensor(packed.reshape(-1), tensors[f"{prefix}.absmax"], tuple(meta["shape"]),
                  getattr(torch, meta["dtype"]), int(meta["blocksize"]), tensors[f"{prefix}.quant_map"].float())
    if "nested_blocksize" in meta:
        q.nested_absmax = tensors[f"{prefix}.nested_absmax"].float()
        q.nested_code = tensors[f"{prefix}.nested_quant_map"].float()
        q.offset, q.nested_block = float(meta["nested_offset"]), int(meta["nested_blocksize"])
    return q


class _Nf4Linear(torch.autograd.Function):
    """x W^T over an NF4 weight: W dequantized for the forward product and again for the input gradient's, so
    no dequantized weight outlives its product (the backward holds only the 4-bit codes and their scales). The
    weight is frozen: no gradient for it. Its tensors come as separate arguments (an offset as a 0-d tensor), so
    that a compiled block traces one graph for every layer. With FP8 products (``meta``'s last field, the input
    gradient's FP8 format) the dequantized weight is quantized per row to e4m3 as --precision fp8 quantizes a
    bf16 weight (its row scales ``fp8_scale``, kept from loading, or computed here where None), and both products
    are kernels/fp8.py's."""

    @staticmethod
    def forward(ctx, x, packed, absmax, levels, nested_absmax, nested_code, offset, fp8_scale, meta):
        ctx.meta = meta
        ctx.save_for_backward(packed, absmax, levels, nested_absmax, nested_code, offset, fp8_scale)
        q, kernel, fp8_grad = _stored(packed, absmax, levels, nested_absmax, nested_code, offset, fp8_scale, meta,
                                      x.dtype)
        if fp8_grad is None:
            return torch.nn.functional.linear(x, q.dequantize(kernel))
        return fp8_product(x.reshape(-1, x.shape[-1]), *q.dequantize_fp8(kernel)).view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, kernel, fp8_grad = _stored(*ctx.saved_tensors, ctx.meta, grad.dtype)
        if fp8_grad is None:
            gx = grad @ q.dequantize(kernel)
        else:
            gx = fp8_input_grad(grad.reshape(-1, grad.shape[-1]), *q.dequantize_fp8(kernel), fp8_grad)
            gx = gx.view(*grad.shape[:-1], q.shape[1])
        return gx, None, None, None, None, None, None, None, None


def _stored(packed, absmax, levels, nested_absmax, nested_code, offset, fp8_scale, meta, dtype):
    """(the NF4Tensor of the arguments, whether to dequantize by kernel, the FP8 gradient format or None)."""
    shape, block, nested_block, kernel, fp8_grad = meta
    q = NF4Tensor(packed, absmax, shape, dtype, block, levels, nested_absmax, nested_code, offset, nested_block,
                  fp8_scale)
    return q, kernel, fp8_grad


def nf4_linear(x: torch.Tensor, q: NF4Tensor, kernel: bool = False,
               fp8_grad: torch.dtype | None = None) -> torch.Tensor:
    """x W^T for a frozen weight stored as NF4 (``q``), computed in x's dtype (the weight dequantized in float32,
    then rounded to x's dtype, as bitsandbytes dequantizes); ``kernel``: dequantized by the Triton kernel on a
    GPU; ``fp8_grad`` (an FP8 format): both products as FP8 GEMMs over the dequantized weight quantized per row,
    the input gradient quantized to that format (kernels/fp8.py; --precision nf4-fp8)."""
    offset = q.offset if isinstance(q.offset, torch.Tensor) else torch.tensor(q.offset, device=q.packed.device)
    return _Nf4Linear.apply(x, q.packed, q.absmax, q.levels.to(q.packed.device), q.nested_absmax, q.nested_code,
                            offset, q.fp8_scale, (tuple(q.shape), q.block, q.nested_block, kernel, fp8_grad))
