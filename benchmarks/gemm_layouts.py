"""The frozen bf16 GEMMs of a Llama step on this GPU, forward against input gradient, in each operand layout cuBLAS
can be handed: is the input gradient's layout slower, and would a just-in-time transposed weight win it back?

For a frozen W [N, K] (row-major, as stored) and M tokens:
- forward     y = x W^T        x [M, K] row-major: cuBLAS sees TN (what F.linear runs);
- dx as run   dx = dy W        dy [M, N]: cuBLAS sees NN (what autograd runs);
- dx, W^T     dx = dy (W^T)^T  with W^T [K, N] written contiguous first: TN again, plus the transpose's cost,
  timed separately (one read and one write of W);
- dx^T        dx^T = W^T dy^T  the product computed transposed (the output column-major: downstream kernels would
  read it strided; timed to see what cuBLAS does with that layout);
- dx, cuBLASLt the same NN product with torch's preferred BLAS set to cuBLASLt.

    PYTHONPATH=src python benchmarks/gemm_layouts.py [--model llama2-7b] [--tokens 8192]

Prints one table: ms (median of 20 timed runs after 5 warm-up, CUDA events) and TFLOP/s per variant and shape.
Gaussian operands at the step's scales (x ~ N(0, 1), W ~ N(0, 0.02^2), dy ~ N(0, 1e-3^2)): a GEMM's speed on an
H100/H200 depends on its data (zeros draw less power than random bits), so zeros would flatter every row.
"""
from __future__ import annotations

import argparse

import torch

from lorabench.bench.floor import timed
from lorabench.config import MODEL_PRESETS
from lorabench.shapes import GEMM_GROUP_NAMES, gemm_groups


def shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of each distinct frozen matrix shape, and of each group that shares an input (q/k/v, gate/up)
    fused (shapes.gemm_groups)."""
    out, seen = [], set()
    for names, (k, outs, _) in zip(GEMM_GROUP_NAMES, gemm_groups(MODEL_PRESETS[model]), strict=True):
        parts = list(zip((p.removesuffix("_proj") for p in names), outs))
        if len(parts) > 1:
            parts.append(("/".join(n for n, _ in parts), sum(outs)))
        for name, n in parts:
            if (k, n) not in seen:  # k_proj/v_proj have q's shape under MHA: time each shape once
                seen.add((k, n))
                out.append((name, k, n))
    return out


def measure(m: int, k: int, n: int) -> dict[str, float]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g) * 1e-3
    wt = w.t().contiguous()
    ms = {"fwd x W^T (TN)": timed(lambda: torch.nn.functional.linear(x, w)),
          "dx = dy W (NN)": timed(lambda: dy @ w),
          "dx = dy (W^T)^T (TN)": timed(lambda: torch.nn.functional.linear(dy, wt)),
          "W^T contiguous": timed(lambda: w.t().contiguous()),
          "dx^T = W^T dy^T": timed(lambda: w.t() @ dy.t())}
    before = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        ms["dx = dy W (NN), cuBLASLt"] = timed(lambda: dy @ w)
        ms["fwd x W^T (TN), cuBLASLt"] = timed(lambda: torch.nn.functional.linear(x, w))
    finally:
        torch.backends.cuda.preferred_blas_library(before)
    return {key: 1e3 * v for key, v in ms.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2-7b", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--tokens", type=int, default=8192)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_layouts.py times cuBLAS: it needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.model}, M = {a.tokens} tokens")
    print("| shape | variant | ms | TFLOP/s |\n|---|---|---|---|")
    for name, k, n in shapes(a.model):
        flops = 2 * a.tokens * k * n
        for variant, t in measure(a.tokens, k, n).items():
            tf = "" if variant == "W^T contiguous" else f"{flops / t / 1e9:,.0f}"
            print(f"| {name} {k}->{n} | {variant} | {t:.3f} | {tf} |", flush=True)


if __name__ == "__main__":
    main()
