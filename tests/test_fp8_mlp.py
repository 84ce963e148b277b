"""The frozen FP8 SwiGLU MLP (kernels/fp8_mlp.py): its references against float64, its Triton kernels against the
references in Triton's CPU interpreter, and the autograd function's wiring against float64 GEMMs of the same
quantized operands. benchmarks/gpu_check.py (fp8_mlp) compares the compiled kernels on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorabench.kernels import fp8_mlp
from lorabench.kernels.fp8 import quantize_rows
from lorabench.lora import LoRALinear
from lorabench.model import MLP, Fp8Linear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FORMATS = {E4M3: 3, E5M2: 2}  # mantissa bits


def swiglu_inputs(m: int, n: int, seed: int = 0, dtype=torch.bfloat16):
    """g, u [m, n] with rows of different magnitudes (so the row scales differ), and a row of zeros in u."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, n, generator=gen) * 3
    u = torch.randn(m, n, generator=gen) * torch.logspace(-2, 2, m)[:, None]
    u[1] = 0.0
    return g.to(dtype), u.to(dtype)


def within_quantization(deq: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, dtype, rounded: float):
    """Whether each dequantized value is the exact one after a rounding of relative size ``rounded`` (the
    activations' dtype) and one rounding to ``dtype`` with the row's scale: half an FP8 step (relative 2^-(m+1) for
    normals, half the subnormal spacing times the scale below them)."""
    mant = FORMATS[dtype]
    tiny = torch.finfo(dtype).smallest_normal
    step = torch.maximum(exact.abs() * (1 + rounded), tiny * scale.double()) * 2.0 ** -(mant + 1)
    return bool(torch.all((deq.double() - exact).abs() <= step + exact.abs() * rounded * 1.001))


def test_forward_reference_is_swiglu_quantized_per_row():
    g, u = swiglu_inputs(6, 200)
    q, scale = fp8_mlp.swiglu_quantize_reference(g, u)
    gd, ud = g.double(), u.double()
    exact = gd * torch.sigmoid(gd) * ud
    assert q.dtype == E4M3 and q.shape == g.shape and scale.shape == (6, 1)
    assert within_quantization(q.double() * scale.double(), exact, scale, E4M3, rounded=2.0 ** -8)
    # each row's scale is its bf16 amax over 448; u's row of zeros gets scale 1 and zeros
    h = (g.float() * torch.sigmoid(g.float()) * u.float()).bfloat16().float()
    nonzero = [i for i in range(6) if i != 1]
    torch.testing.assert_close(scale[nonzero, 0], h[nonzero].abs().amax(-1) / 448, rtol=0, atol=0)
    assert scale[1].item() == 1.0 and q[1].float().abs().max().item() == 0.0


@pytest.mark.parametrize("grad_dtype", [E4M3, E5M2])
def test_backward_reference_is_swiglus_gradient_scaled_and_quantized(grad_dtype):
    g, u = swiglu_inputs(5, 136, seed=1)
    gen = torch.Generator().manual_seed(2)
    dh = (torch.randn(5, 136, generator=gen) * 0.1).bfloat16()
    gate_s = torch.rand(136, generator=gen) * 0.01 + 1e-3  # distinct per-column weight scales
    up_s = torch.rand(136, generator=gen) * 0.01 + 1e-3
    dg_q, dg_s, du_q, du_s = fp8_mlp.swiglu_backward_quantize_reference(dh, g, u, gate_s, up_s, grad_dtype)
    # float64 autograd of silu(g) * u
    gd, ud = g.double().requires_grad_(), u.double().requires_grad_()
    (torch.nn.functional.silu(gd) * ud).backward(dh.double())
    for q, s, exact, w_s in ((dg_q, dg_s, gd.grad, gate_s), (du_q, du_s, ud.grad, up_s)):
        assert q.dtype == grad_dtype and s.shape == (5, 1)
        assert within_quantization(q.double() * s.double(), exact * w_s.double(), s, grad_dtype, rounded=2.0 ** -8)
    # u's row of zeros: dg is zero there (scale 1), du is not
    assert dg_s[1].item() == 1.0 and du_s[1].item() != 1.0


INTERPRETED = """
import sys, torch
from lorabench.kernels import fp8_mlp
from lorabench.kernels.fp8 import fp8_max
torch.manual_seed(0)
bad = 0
for dtype in (torch.float32, torch.float16):
    for m, n in ((4, 300), (3, 1), (2, 1024)):
        g = (torch.randn(m, n) * 3).to(dtype)
        u = (torch.randn(m, n) * torch.logspace(-2, 2, m)[:, None]).to(dtype)
        u[1 % m] = 0.0
        dh = (torch.randn(m, n) * 0.1).to(dtype)
        gate_s, up_s = torch.rand(n) * 0.01 + 1e-3, torch.rand(n) * 0.01 + 1e-3
        # fp32 outputs: the interpreter's own FP8 rounding is wrong, so the values before the cast are compared
        q, s = torch.empty(m, n), torch.empty(m)
        fp8_mlp.launch_swiglu_quantize(g, u, q, s, 448.0)
        gf = g.float()
        h = (gf * torch.sigmoid(gf) * u.float()).to(dtype).float()
        want_s = torch.where(h.abs().amax(-1) > 0, h.abs().amax(-1) / 448.0, torch.ones(m))
        want_q = (h / want_s[:, None]).clamp(-448, 448)
        outs = [(q, want_q), (s, want_s)]
        top = fp8_max(torch.float8_e5m2)
        dg_q, du_q, dg_s, du_s = torch.empty(m, n), torch.empty(m, n), torch.empty(m), torch.empty(m)
        fp8_mlp.launch_swiglu_backward_quantize(dh, g, u, gate_s, up_s, dg_q, dg_s, du_q, du_s, top)
        sg = torch.sigmoid(gf)
        du = (dh.float() * gf * sg).to(dtype).float() * up_s
        dg = (dh.float() * u.float() * sg * (1 + gf * (1 - sg))).to(dtype).float() * gate_s
        for got_q, got_s, v in ((dg_q, dg_s, dg), (du_q, du_s, du)):
            ws = torch.where(v.abs().amax(-1) > 0, v.abs().amax(-1) / top, torch.ones(m))
            outs += [(got_q, (v / ws[:, None]).clamp(-top, top)), (got_s, ws)]
        # sigmoid and exp may differ from torch's by an ulp; in fp16 that can move a rounding by one fp16 step
        rtol = 1e-5 if dtype == torch.float32 else 2.0 ** -10
        for got, want in outs:
            ok = torch.allclose(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
            bad += not ok
        print(dtype, m, n, "ok" if bad == 0 else "MISMATCH")
sys.exit(1 if bad else 0)
"""


def test_kernels_match_the_references_in_the_interpreter():
    """Both Triton kernels, run by Triton's CPU interpreter (in a fresh process: the interpreter must be on before
    triton is imported): a masked row (300 of 512), one column, a full block; u's zero row (scale 1)."""
    pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64 (its interpreter runs here)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" ok") == 6, done.stdout


def fp8_projection(n_in: int, n_out: int, gen, grad_dtype) -> Fp8Linear:
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    w[2] *= 20  # an outlier channel: its own scale
    lin = Fp8Linear(n_in, n_out, grad_dtype)
    q, s = quantize_rows(w)
    lin.weight.data.copy_(q)
    lin.weight_scale.copy_(s.view(-1))
    return lin


@pytest.mark.parametrize("grad_dtype", [E4M3, E5M2])
def test_fp8_mlp_is_the_gemms_of_the_quantized_operands(grad_dtype):
    """Forward and input gradient against float64 products of the quantized operands the references give: which
    scale goes where, the transposed weights, both branches of the input gradient."""
    gen = torch.Generator().manual_seed(3)
    c, i = 32, 80
    gate, up, down = fp8_projection(c, i, gen, grad_dtype), fp8_projection(c, i, gen, grad_dtype), \
        fp8_projection(i, c, gen, grad_dtype)
    x = (torch.randn(2, 7, c, generator=gen)).bfloat16().requires_grad_()
    gy = torch.randn(2, 7, c, generator=gen).bfloat16()
    y = fp8_mlp.fp8_mlp(x, gate, up, down, grad_dtype)
    y.backward(gy)

    def deq(lin):
        return lin.weight.double() * lin.weight_scale.double()[:, None]

    def product(q, s, w):  # the emulated GEMM: exact products, fp32 sums, then bf16: compared in float64
        return (q.double() * s.double()) @ w.t()

    xq, xs = quantize_rows(x.detach().reshape(-1, c))
    g, u = product(xq, xs, deq(gate)).bfloat16(), product(xq, xs, deq(up)).bfloat16()
    hq, hs = fp8_mlp.swiglu_quantize_reference(g, u)
    y_ref = product(hq, hs, deq(down))
    tol = 2.0 ** -7 * y_ref.abs().max().item()
    torch.testing.assert_close(y.detach().reshape(-1, c).double(), y_ref, rtol=2.0 ** -7, atol=tol)
    gq, gs = quantize_rows(gy.reshape(-1, c), grad_dtype, multiplier=down.weight_scale)
    dh = product(gq, gs, down.weight.double().t()).bfloat16()
    dg_q, dg_s, du_q, du_s = fp8_mlp.swiglu_backward_quantize_reference(dh, g, u, gate.weight_scale,
                                                                        up.weight_scale, grad_dtype)
    dx_ref = product(dg_q, dg_s, gate.weight.double().t()) + product(du_q, du_s, up.weight.double().t())
    tol = 2.0 ** -7 * dx_ref.abs().max().item()
    torch.testing.assert_close(x.grad.reshape(-1, c).double(), dx_ref, rtol=2.0 ** -7, atol=tol)
    # and it is the MLP: within FP8's error of the float64 SwiGLU of the unquantized weights
    xd = x.detach().double().reshape(-1, c)
    exact = (torch.nn.functional.silu(xd @ deq(gate).t()) * (xd @ deq(up).t())) @ deq(down).t()
    err = ((y.detach().reshape(-1, c).double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < err < 0.1


def test_the_mlp_takes_the_fused_path_only_when_all_three_are_plain_fp8(small_cfg, monkeypatch):
    mlp = MLP(small_cfg)
    assert not mlp.frozen_fp8()  # bf16 projections
    plain = {name: getattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")}
    for name, lin in plain.items():
        setattr(mlp, name, Fp8Linear(lin.in_features, lin.out_features, E4M3))
    assert mlp.frozen_fp8()
    calls = []
    monkeypatch.setattr("lorabench.model.fp8_mlp", lambda *a: calls.append(a) or a[0])
    mlp(torch.zeros(1, 2, small_cfg.hidden_size))
    assert len(calls) == 1 and calls[0][-1] == E4M3
    mlp.down_proj = plain["down_proj"]  # --fp8-skip down_proj
    assert not mlp.frozen_fp8()
    mlp.down_proj = Fp8Linear(plain["down_proj"].in_features, plain["down_proj"].out_features, E4M3)
    lora = LoRALinear(plain["gate_proj"], r=2, alpha=4, dropout=0.0)
    lora.store_fp8(E4M3)
    mlp.gate_proj = lora  # an adapted projection: its adapter needs the unfused path
    assert not mlp.frozen_fp8()
