"""NF4 frozen weights (kernels/nf4.py): the 16 levels against their float64 construction, the dynamic map of the
double quantization, quantize and dequantize against a float64 reference written here, the byte layout by a
hand-worked example, and bitsandbytes' own quantize and dequantize where it is installed."""
from __future__ import annotations

import pytest
import torch

from lorabench.kernels import nf4


def test_levels_are_the_normal_quantiles_of_qlora():
    """The float32 table against the construction in float64 (normal quantiles at probabilities from 0.9677083 to
    0.5, 8 positive and 7 negative, over the largest). float32 holds each level to 6e-8; the table's own
    construction took its probabilities in float32 (1e-7 of 0.97 each, through a quantile slope of ~14 at the
    outermost level, over its 1.85): 5e-7 bounds both, and a level from a wrong construction (another offset, 8
    negative levels) is off by more than 1e-2."""
    want = nf4.nf4_levels_float64()
    assert len(want) == 16 and want[0] == -1.0 and want[15] == 1.0 and want[7] == 0.0
    assert max(abs(a - b) for a, b in zip(want, nf4.NF4_LEVELS.tolist())) < 5e-7
    assert nf4.NF4_LEVELS.tolist() == sorted(nf4.NF4_LEVELS.tolist())


def test_nf4_tensor_defaults_hold_no_tensor_and_levels_default_to_nf4():
    """A compiled 4-bit block builds an NF4Tensor at each product. torch.compile (2.11 on an H100) could not trace
    a constructor whose defaults held a tensor (the levels' did): a graph break at every product (43 logged in a
    7B block-checkpointed step, whose recomputed blocks then saved a different number of tensors than their
    forward; benchmarks/NOTES.md item 105). torch 2.13, which CI runs, traces it either way. So no field's
    default is a tensor, and a missing ``levels`` still means NF4's."""
    import dataclasses

    for f in dataclasses.fields(nf4.NF4Tensor):
        assert not isinstance(f.default, torch.Tensor), f.name
    q = nf4.NF4Tensor(torch.zeros(4, dtype=torch.uint8), torch.ones(1), (8,), torch.float32)
    assert q.levels is nf4.NF4_LEVELS and torch.equal(q.dequantize(), torch.full((8,), -1.0))


def test_importing_lorabench_defines_no_kernel_op_and_imports_no_triton():
    """The kernels' ops are defined where a model's products are set to use them (define_ops), not at import:
    defining a triton_op reads its body for kernels, importing Triton and Inductor, seconds a CPU run never needs."""
    import subprocess
    import sys

    code = ("import sys, lorabench.kernels.nf4 as nf4, lorabench.engines.native, lorabench.cli\n"
            "print(nf4._DEQUANTIZE is None, 'triton' in sys.modules, 'torch._inductor.utils' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "False"], done.stdout


def test_dynamic_map_has_2_to_the_i_values_in_decade_i():
    m = nf4.dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32 and torch.all(m[1:] > m[:-1])
    assert m[-1] == 1.0 and (m == 0).sum() == 1
    positive = m[m > 0][:-1]  # (less the 1.0)
    for i in range(7):
        decade = positive[(positive >= 10.0 ** (i - 7)) & (positive < 10.0 ** (i - 6))]
        assert len(decade) == 2 ** i, i
    assert torch.equal(m[m < 0].flip(0), -positive)


def reference(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized values) in float64: each block over its absolute maximum, the nearest level."""
    x = w.double().reshape(-1, block)
    absmax = x.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(nf4.nf4_levels_float64(), dtype=torch.float64)
    codes = ((x / absmax)[..., None] - levels).abs().argmin(dim=-1)
    return codes.reshape(-1), (levels[codes] * absmax).reshape(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_and_dequantize_against_float64(dtype):
    """Without double quantization every element is the level nearest it times its block's absmax: the codes equal
    the float64 reference's (a tie between two levels has probability ~0 on random data) and the values agree to
    float32's rounding of a product (then the dtype's own rounding)."""
    torch.manual_seed(0)
    w = (torch.randn(96, 128) * 0.02).to(dtype)
    q = nf4.quantize_nf4(w, double_quant=False)
    codes, want = reference(w)
    got_codes = torch.stack((q.packed >> 4, q.packed & 0xF), dim=1).reshape(-1).long()
    assert torch.equal(got_codes, codes)
    got = q.dequantize()
    assert got.dtype == dtype and got.shape == w.shape
    torch.testing.assert_close(got.double().reshape(-1), want.to(dtype).double(), rtol=0, atol=0) \
        if dtype != torch.float32 else torch.testing.assert_close(got.double().reshape(-1), want, rtol=1e-6, atol=0)


def test_byte_layout_by_hand():
    """One block [1, -1, 0, 0.5, ...zeros]: codes 15, 0, 7 and the level nearest 0.5 (0.4407, code 12); two codes a
    byte, the first element in the high four bits; an odd count pads the last byte's low bits."""
    w = torch.zeros(65)
    w[:4] = torch.tensor([1.0, -1.0, 0.0, 0.5])
    q = nf4.quantize_nf4(w, double_quant=False)
    assert q.packed.shape == (33,)
    assert q.packed[:2].tolist() == [0xF0, 0x7C] and q.packed[2:].tolist() == [0x77] * 30 + [0x70]
    assert q.absmax.tolist() == [1.0, 0.0]
    assert q.dequantize()[:4].tolist() == [1.0, -1.0, 0.0, nf4.NF4_LEVELS[12].item()]


def test_double_quantization_keeps_each_absmax_within_half_a_code_step():
    torch.manual_seed(1)
    w = torch.randn(512, 256) * 0.02
    plain, double = nf4.quantize_nf4(w, double_quant=False), nf4.quantize_nf4(w)
    assert double.absmax.dtype == torch.uint8 and double.nested_absmax.shape == (2048 // 256,)
    err = (double.block_absmax() - plain.absmax).abs()
    m = nf4.dynamic_map()
    step = (m[1:] - m[:-1]).max()  # the widest gap of the map, times each block's scale
    assert torch.all(err <= step / 2 * double.nested_absmax.repeat_interleave(256) + 1e-7)
    codes = torch.stack((plain.packed >> 4, plain.packed & 0xF), dim=1).reshape(-1).long()
    want = (nf4.NF4_LEVELS[codes].view(-1, 64) * double.block_absmax()[:, None]).view(w.shape)
    assert torch.equal(double.dequantize(), want)  # the same codes, each block's decoded absmax


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_against_bitsandbytes(bnb, dtype):
    """bitsandbytes' quantize_4bit(nf4, double quantization) and ours give the same 4-bit codes, absmax
    constants, nested scales and offset. Of the 8-bit codes of the absmax constants, its CPU build picks a
    neighbour of the nearest code for a few (0.2-0.5% here: its table-driven search is approximate where the
    dynamic map's steps are fine), ours the nearest. Its checkpoint tensors dequantize here bit for bit as it
    dequantizes them, and ours there as here."""
    torch.manual_seed(2)
    w = (torch.randn(1000, 512) * 0.02).to(dtype)
    qb, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = nf4.quantize_nf4(w)
    assert torch.equal(qb.reshape(-1), q.packed) and torch.equal(state.code, nf4.NF4_LEVELS)
    assert torch.equal(state.state2.absmax, q.nested_absmax) and state.offset.item() == q.offset
    assert torch.equal(state.state2.code, q.nested_code)
    differ = (state.absmax != q.absmax).nonzero().flatten()
    a = nf4.quantize_blockwise(w.reshape(-1), nf4.NF4_LEVELS, 64)[1] - q.offset
    m = q.nested_code
    for i in differ.tolist():
        x = a[i] / q.nested_absmax[i // 256]
        mine, theirs = q.absmax[i].long(), state.absmax[i].long()
        assert abs(mine - theirs) == 1 and (x - m[mine]).abs() <= (x - m[theirs]).abs()
    assert len(differ) < 0.01 * len(q.absmax)
    saved = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
    theirs = nf4.from_quant_state(qb, saved, "w")
    assert torch.equal(theirs.dequantize(), bnb.dequantize_4bit(qb, state))
    from bitsandbytes.functional import QuantState

    ours = QuantState.from_dict({k.removeprefix("w."): v for k, v in q.quant_state("w").items()}, torch.device("cpu"))
    assert torch.equal(bnb.dequantize_4bit(q.packed.view(-1, 1), ours), q.dequantize())


def test_nf4_linear_forward_and_input_gradient_against_float64():
    """The product and the input gradient over the dequantized weight, against float64 products of the same
    dequantized weight: float32 sums of 256 terms (~1e-6 relative); the weight gets no gradient, and the
    backward keeps no dequantized weight and not the input: only the codes and their quantization state."""
    torch.manual_seed(3)
    w = torch.randn(96, 256) * 0.05
    q = nf4.quantize_nf4(w)
    x = torch.randn(5, 7, 256, requires_grad=True)
    y = nf4.nf4_linear(x, q)
    wd = q.dequantize().double()
    torch.testing.assert_close(y.double(), x.detach().double() @ wd.T, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ wd, rtol=1e-5, atol=1e-6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nf4.nf4_linear(torch.randn(2, 256, requires_grad=True), q).sum().backward()
    assert any(t is q.packed for t in saved)
    state = q.packed.numel() + q.absmax.numel() + 4 * (q.nested_absmax.numel() + 256 + 16 + 1)
    assert sum(t.numel() * t.element_size() for t in saved) == state  # 4.1 bits a weight, nothing more


INTERPRETED = """
import sys, torch
from lorabench.kernels import nf4
kernel = nf4._triton_kernel()
torch.manual_seed(4)
bad = 0
for shape, dtype, double, block, per in (((96, 256), torch.bfloat16, True, 64, nf4.DEQUANTIZE_BYTES),
                                        ((40, 1000), torch.float16, False, 64, nf4.DEQUANTIZE_BYTES),
                                        ((3, 2 * nf4.DEQUANTIZE_BYTES + 64), torch.float32, True, 64, 1024),
                                        ((7, 1000), torch.bfloat16, True, 128, 256),  # a last block part full
                                        ((2, 3000), torch.bfloat16, False, 4096, 1024)):  # blocks above `per`
    q = nf4.quantize_nf4((torch.randn(shape) * 0.02).to(dtype), double_quant=double, block=block)
    out = nf4.launch_dequantize(kernel, *q.kernel_args(), q.block, q.nested_block, dtype, per)
    want = q.dequantize()
    differ = int((out.view(shape) != want).sum())
    if per == nf4.DEQUANTIZE_BYTES:  # as a product launches it
        via_op = nf4.define_ops()[0](*q.kernel_args(), q.block, q.nested_block, dtype)
        differ += int((via_op.view(shape) != want).sum())
    print(shape, dtype, double, block, differ, "differ")
    bad += differ
# the op as torch before 2.6 defines it (a custom op, its output's shape registered beside it): values, and the shape
# and dtype a compiled graph is told
from torch._subclasses.fake_tensor import FakeTensorMode
custom = nf4._define_dequantize("lorabench_test::nf4_dequantize", triton_op=False)
q = nf4.quantize_nf4((torch.randn(40, 256) * 0.02).bfloat16())
args = (*q.kernel_args(), q.block, q.nested_block, torch.bfloat16)
differ = int((custom(*args).view(40, 256) != q.dequantize()).sum())
with FakeTensorMode() as mode:
    fake = custom(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
differ += int(fake.shape != (40 * 256,) or fake.dtype != torch.bfloat16)
print("custom op", differ, "differ")
bad += differ
sys.exit(1 if bad else 0)
"""


def test_dequantize_kernel_matches_the_pytorch_dequantization_in_the_interpreter():
    """The Triton kernel itself, run by Triton's CPU interpreter: bit for bit the plain PyTorch dequantization
    (bf16, fp16 and fp32 outputs; double-quantized and plain absmax; a last program only partly full), launched
    directly and through the op a product calls (a triton_op), and through the custom op torch before 2.6 gets
    (with the output shape and dtype it declares to a compiled graph). In a fresh process: the interpreter must be
    on before triton is imported. On a GPU, benchmarks/gpu_check.py compares the compiled kernel the same way."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64 (its interpreter runs here)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" 0 differ") == 6, done.stdout


def _sm90_ptx(kernel, signature: dict, constexprs: dict) -> str:
    """``kernel`` compiled for an H100 (sm_90) to PTX with floating-point contraction on, as a compiled graph
    launches it (Triton's NVIDIA backend compiles here without a GPU); a skip where this Triton cannot."""
    triton = pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64")
    try:
        from triton.backends.compiler import GPUTarget

        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True}).asm["ptx"]
    except (ImportError, AttributeError, TypeError, RuntimeError) as e:  # another Triton's API, no NVIDIA backend
        pytest.skip(f"Triton {triton.__version__} does not compile for sm_90 here: {type(e).__name__}: {e}")


def test_absmax_decode_multiplies_then_adds_compiled_for_a_gpu(monkeypatch, tmp_path):
    """The decode of a double-quantized absmax rounds its product before adding the offset, as PyTorch's separate
    ops (and bitsandbytes) do. Compiled for an H100 with contraction on, the product is libdevice's ``mul.rn`` (which
    ptxas never fuses) and no multiply-add appears; the same kernel with a plain product (as the interpreter runs
    it) compiles to ``fma``: what the launches' ``enable_fp_fusion=False`` used to prevent, which a compiled graph
    would not pass. (``mul.rn.ftz``: a product or group absmax below float32's normal range, 1.2e-38, would flush
    to zero; no real weight has such block scales.)"""
    import re

    from lorabench.kernels import nf4_triton

    signature = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_ptr": "*fp32", "code_ptr": "*fp32",
                 "offset_ptr": "*fp32", "levels_ptr": "*fp32", "out_ptr": "*i32", "nbytes": "i32",
                 "BYTES": "constexpr", "BLOCK_BYTES": "constexpr", "NESTED": "constexpr",
                 "NESTED_BLOCK": "constexpr", "OUT": "constexpr"}
    constexprs = {"BYTES": 2048, "BLOCK_BYTES": 32, "NESTED": True, "NESTED_BLOCK": 256, "OUT": nf4_triton.OUT_BF16}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "as_written"))
    ptx = _sm90_ptx(nf4_triton.dequantize_kernel, signature, constexprs)
    assert re.search(r"mul\.rn(\.ftz)?\.f32", ptx) and "fma" not in ptx
    monkeypatch.setattr(nf4_triton, "_COMPILED", type(nf4_triton._COMPILED)(False))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "plain_product"))  # not the first compile's PTX
    assert "fma.rn.f32" in _sm90_ptx(nf4_triton.dequantize_kernel, signature, constexprs)


INTERPRETED_FP8 = """
import sys, torch, triton, triton.language as tl
from lorabench.kernels import nf4, nf4_triton
from lorabench.kernels.fp8 import quantize_rows

@triton.jit
def round_kernel(x_ptr, o_ptr, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(o_ptr + i, nf4_triton._e4m3_round(x).to(tl.float8e4nv), mask=i < n)

# every e4m3 value, the midpoints between neighbours (ties) and values a float32 ulp either side, log-uniform
# values from 1e-12 to 448 and zeros, both signs
grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
grid = grid[~grid.isnan() & (grid >= 0)].sort().values
mid = (grid[:-1] + grid[1:]) / 2
x = torch.cat([grid, mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e3)),
               torch.exp(torch.empty(20000).uniform_(-27.6, 6.1)), torch.zeros(2)])
x = torch.cat([x, -x]).clamp(-448, 448)
out = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
round_kernel[(-(-x.numel() // 1024),)](x, out, x.numel(), B=1024)
differ = int((out.view(torch.uint8) != x.to(torch.float8_e4m3fn).view(torch.uint8)).sum())
print("rounding", x.numel(), differ, "differ")
bad = differ
torch.manual_seed(4)
kernel = nf4._triton_kernel("dequantize_fp8_kernel")
# rows shorter than a program (several rows a program), longer than one with a last program part full, a program
# smaller than a row, a row of one block
for shape, double, spread, per in (((96, 256), True, None, nf4.FP8_BYTES), ((5, 4 * nf4.FP8_BYTES + 192), False,
                                   "rows", nf4.FP8_BYTES), ((40, 960), True, "rows", 64),
                                   ((6, 1024), False, "columns", nf4.FP8_BYTES), ((33, 64), True, "rows", 256)):
    w = torch.randn(shape) * 0.02
    if spread == "rows":  # rows of very different sizes, one of zeros
        w = w * torch.logspace(-3, 2, shape[0])[:, None]
        w[1] = 0
    if spread == "columns":  # blocks of a row from 1e-7 to 1 of its largest: e4m3's subnormals and underflow
        w = w * torch.logspace(-7, 0, shape[1])[None, :]
    q = nf4.quantize_nf4(w.bfloat16(), double_quant=double)
    scale = q.fp8_row_scales()
    out = nf4.launch_dequantize_fp8(kernel, *q.kernel_args(), q.block, q.nested_block, scale, per).view(shape)
    wq, ws = quantize_rows(q.dequantize())
    differ = int((out.view(torch.uint8) != wq.view(torch.uint8)).sum()) + int((scale != ws.view(-1)).sum())
    if per == nf4.FP8_BYTES:  # as a product launches it
        via_op = nf4.define_ops()[1](*q.kernel_args(), q.block, q.nested_block, scale).view(shape)
        differ += int((via_op.view(torch.uint8) != wq.view(torch.uint8)).sum())
    print(shape, double, per, differ, "differ")
    bad += differ
from torch._subclasses.fake_tensor import FakeTensorMode
custom = nf4._define_dequantize_fp8("lorabench_test::nf4_dequantize_fp8", triton_op=False)
q = nf4.quantize_nf4((torch.randn(40, 256) * 0.02).bfloat16())
args = (*q.kernel_args(), q.block, q.nested_block, q.fp8_row_scales())
wq = quantize_rows(q.dequantize())[0]
differ = int((custom(*args).view(40, 256).view(torch.uint8) != wq.view(torch.uint8)).sum())
with FakeTensorMode() as mode:
    fake = custom(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
differ += int(fake.shape != (40 * 256,) or fake.dtype != torch.float8_e4m3fn)
print("custom op", differ, "differ")
bad += differ
sys.exit(1 if bad else 0)
"""


def test_nf4_to_fp8_kernel_matches_dequantize_then_quantize_rows_in_the_interpreter(tmp_path):
    """--precision nf4-fp8's kernel (NF4 -> bf16 values -> e4m3 under the row scales kept from loading, no bf16
    weight written), run by Triton's interpreter: its codes, and the row scales NF4Tensor.fp8_row_scales computes,
    equal kernels/fp8.py's quantize_rows of the plain PyTorch dequantization, bit for bit (rows of mixed sizes, a
    row of zeros, blocks whose values fall below e4m3's normal range or round to zero, rows shorter and longer than
    a program); and its rounding to e4m3 by integer ops equals torch's cast on every e4m3 value, every tie between
    two and values an ulp either side. (A file, not -c: Triton reads a kernel's source.)"""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64 (its interpreter runs here)")
    script = tmp_path / "interpreted_fp8.py"
    script.write_text(INTERPRETED_FP8)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" 0 differ") == 7, done.stdout
