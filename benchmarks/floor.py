"""The floor (src/lorabench/bench/floor.py) for several batch shapes, with attention timed per kernel.

    PYTHONPATH=src python benchmarks/floor.py --configs 4x512,16x512,2x4096 [--dtype tf32]
"""
from __future__ import annotations

import argparse

import torch

from lorabench.config import MODEL_PRESETS
from lorabench.bench.floor import floor_for_precision


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--configs", default="4x512,16x512,2x4096", help="comma-separated LBSxSEQ")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp8", "fp16", "tf32", "fp32"),
                    help="tf32: fp32 tensors with TF32 matmuls (the flagperf-fp32 preset on a GPU)")
    a = ap.parse_args()
    print(f"floor on {torch.cuda.get_device_name()} ({a.dtype})")
    print("| LBS | seq | GEMM ms | attn ms | GEMM TFLOP/s | floor tok/s | attention fwd+bwd per layer, ms |")
    print("|---|---|---|---|---|---|---|")
    for c in a.configs.split(","):
        b, s = map(int, c.split("x"))
        r = floor_for_precision(MODEL_PRESETS[a.model], b, s, a.dtype)
        kernels = ", ".join(f"{k} {v:.2f}" for k, v in r["attn_by_kernel_ms"].items())
        print(f"| {b} | {s} | {1e3 * r['gemm_s']:.1f} | {1e3 * r['attn_s']:.1f} | {r['gemm_tflops']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {kernels} |")


if __name__ == "__main__":
    main()
