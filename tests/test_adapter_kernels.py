"""kernels/adapter.py: the adapter's input-side products with the dropout mask applied as they read x, run by
Triton's CPU interpreter (fp32 and fp16; the interpreter computes bf16 wrongly, so bf16 runs on a GPU in
benchmarks/gpu_check.py), against float64: the kernels alone at ragged shapes, then the adapter path with them
(forward and the gradients of x, A and B, eager and compiled) through the same check as the plain path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = """
import sys, torch
from lorabench.kernels import adapter
worst = {}
for T, C, R, p, dtype in ((37, 100, 5, 0.3, torch.float32), (70, 130, 8, 0.0, torch.float32),
                          (33, 77, 12, 0.5, torch.float16), (129, 64, 8, 0.05, torch.float16)):
    g = torch.Generator().manual_seed(T)
    x, a, gxa = (torch.randn(*s, generator=g).to(dtype) for s in ((T, C), (R, C), (T, R)))
    mask = torch.rand(T, C, generator=g) >= p if p else None
    keep = 1 if mask is None else mask / (1 - p)
    d = x.double() * keep
    got_xa = adapter.launch_xa(x, mask, a, p)
    got_gx, got_ga = adapter.launch_grads(x, mask, gxa, a, p, splits=3)
    _, only_ga = adapter.launch_grads(x, mask, gxa, a, p, need_x=False)
    for name, got, want in (("xa", got_xa, d @ a.double().t()), ("gx", got_gx, (gxa.double() @ a.double()) * keep),
                            ("ga", got_ga, gxa.double().t() @ d), ("ga alone", only_ga, gxa.double().t() @ d)):
        assert got.shape == want.shape and got.dtype == (torch.float32 if "ga" in name else dtype), (name, got.dtype)
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        worst[dtype] = max(worst.get(dtype, 0.0), err)
        print(T, C, R, p, dtype, name, f"{err:.1e}")
    if mask is not None:
        assert torch.count_nonzero(got_gx[~mask]) == 0
print("worst", worst)
sys.exit(0 if worst[torch.float32] < 1e-6 and worst[torch.float16] < 1e-3 else 1)
"""

DELTA = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_lora import check_delta_against_float64
from lorabench.lora import adapter_delta
fused = lambda *args: adapter_delta(*args, fused=True)
for dtype in (torch.float32, torch.float16):
    check_delta_against_float64(fused, (2, 7, 33), 5, 19, 0.3, dtype, seed=1)
    check_delta_against_float64(fused, (37, 64), 8, 24, 0.0, dtype, seed=2)
    print(dtype, "eager ok")
check_delta_against_float64(torch.compile(fused), (3, 11, 40), 8, 24, 0.3, torch.float32, seed=3, scale=2.0)
print("compiled ok")
"""


def interpret(script: str) -> str:
    """Run ``script`` in a fresh process with Triton's interpreter on (it must be set before triton is imported)."""
    pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64 (its interpreter runs here)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_kernels_match_float64_at_ragged_shapes():
    """Token and feature counts off the tiles, ranks 5/8/12 (padded to 16), with and without dropout, token splits
    that do not divide the tokens: the masked input's products and both gradients against float64."""
    out = interpret(KERNELS)
    assert out.count(" xa ") == 4 and "worst" in out, out


def test_adapter_path_with_kernels_matches_plain_autograd():
    """adapter_delta(fused=True), eager and compiled (the kernels as opaque ops inside Inductor's graph): forward
    and gradients of x, A and B against the op-by-op float64 expression, dropped inputs without gradient."""
    out = interpret(DELTA.format(tests=str(Path(__file__).parent)))
    assert "compiled ok" in out, out


def test_kernels_stay_off_where_they_cannot_run():
    import torch

    from lorabench.kernels.adapter import available

    assert not available(torch.empty(0, dtype=torch.bfloat16), 8)  # a CPU tensor
    if torch.cuda.is_available():
        assert not available(torch.empty(0, device="cuda"), 8)  # fp32: the plain path keeps its precision
        assert not available(torch.empty(0, device="cuda", dtype=torch.bfloat16), 65)
