"""Time the fused FP8 SwiGLU kernels (kernels/fp8_mlp.py) against Inductor's code for the same references, alone,
at one MLP row width: the forward (SwiGLU + e4m3 row quantize) and the backward (SwiGLU's backward + both
gradients' row quantizes), for each warp count, with the bytes each moves at least and the bandwidth that makes.

    PYTHONPATH=src python benchmarks/fp8_mlp_kernels.py [--tokens 8192] [--width 11008]
"""
from __future__ import annotations

import argparse

import torch

from lorabench.kernels import fp8_mlp


def timed(fn, reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after warming up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--width", type=int, default=11008)
    args = ap.parse_args(argv)
    m, n, dev = args.tokens, args.width, torch.device("cuda")
    g, u = (torch.randn(m, n, device=dev) * 2).bfloat16(), torch.randn(m, n, device=dev).bfloat16()
    dh = (torch.randn(m, n, device=dev) * 1e-3).bfloat16()
    gate_s, up_s = torch.rand(n, device=dev) * 1e-3, torch.rand(n, device=dev) * 1e-3
    e4m3 = torch.float8_e4m3fn
    fwd_bytes, bwd_bytes = m * n * (2 + 2 + 1), m * n * (2 + 2 + 2 + 1 + 1)  # read bf16 inputs, write FP8 rows
    fwd_ref = torch.compile(fp8_mlp.swiglu_quantize_reference)
    bwd_ref = torch.compile(fp8_mlp.swiglu_backward_quantize_reference)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {m} x {n}\n")
    print("| pass | code | ms | GB/s (least bytes) |\n|---|---|---|---|")
    rows = [("forward", "Inductor (reference)", lambda: fwd_ref(g, u), fwd_bytes),
            ("backward", "Inductor (reference)", lambda: bwd_ref(dh, g, u, gate_s, up_s, e4m3), bwd_bytes)]
    for warps in (8, 16, 32):
        def fwd(w=warps):
            fp8_mlp.NUM_WARPS = w
            return fp8_mlp.swiglu_quantize(g, u)

        def bwd(w=warps):
            fp8_mlp.NUM_WARPS = w
            return fp8_mlp.swiglu_backward_quantize(dh, g, u, gate_s, up_s, e4m3)
        rows += [("forward", f"Triton, {warps} warps", fwd, fwd_bytes),
                 ("backward", f"Triton, {warps} warps", bwd, bwd_bytes)]
    for name, code, fn, nbytes in sorted(rows, key=lambda r: r[0], reverse=True):
        ms = timed(fn)
        print(f"| {name} | {code} | {ms:.3f} | {nbytes / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()
