"""The floor: time only the work no LoRA trainer can avoid, and convert it to tokens/s.

Per step, for every frozen matrix of the model (q, k, v, o, gate, up, down in each layer, and lm_head): the forward
GEMM and the input-gradient GEMM (no weight gradient: the weights are frozen); plus attention forward + backward
with the fastest kernel available (each is timed and listed). Each
GEMM shape is timed on its own with CUDA events (median of repeats after warm-up) and multiplied by how often a
step runs it. Adapters, norms, RoPE, SwiGLU, the loss and the optimizer are left out, so real training cannot
reach this number; the gap to it is what an engine still wastes.

    PYTHONPATH=src python benchmarks/floor.py --batch-size 4 --seq-len 512
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from lorabench.config import MODEL_PRESETS


def timed(fn, reps=20, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def floor(model: str, batch: int, seq: int, dtype=torch.bfloat16) -> dict:
    cfg = MODEL_PRESETS[model]
    n, h, kv = batch * seq, cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    shapes = [  # (in, out, count per step); a list, since q and k have the same shape without GQA
        (h, h, 2 * cfg.num_hidden_layers),  # q, o
        (h, kv, 2 * cfg.num_hidden_layers),  # k, v
        (h, cfg.intermediate_size, 2 * cfg.num_hidden_layers),  # gate, up
        (cfg.intermediate_size, h, cfg.num_hidden_layers),  # down
        (h, cfg.vocab_size, 1),  # lm_head
    ]
    total, flops = 0.0, 0.0
    for i, o, count in shapes:
        x = torch.randn(n, i, device="cuda", dtype=dtype)
        w = torch.randn(o, i, device="cuda", dtype=dtype) * 0.02
        dy = torch.randn(n, o, device="cuda", dtype=dtype)
        t = timed(lambda: x @ w.t()) + timed(lambda: dy @ w)
        total += count * t
        flops += count * 2 * (2 * n * i * o)
    attn = attention_times(cfg, batch, seq, dtype)
    t_attn = min(attn.values()) * cfg.num_hidden_layers  # the fastest kernel this torch has for the shape
    total += t_attn
    return {"model": model, "batch": batch, "seq": seq, "gemm_s": total - t_attn, "attn_s": t_attn,
            "attn_by_kernel_ms": {k: 1e3 * v for k, v in attn.items()},
            "gemm_tflops": flops / (total - t_attn) / 1e12, "tokens_per_s": n / total}


def attention_times(cfg, batch: int, seq: int, dtype) -> dict[str, float]:
    """One layer's causal attention forward + backward, per kernel that runs the shape: SDPA's flash, cuDNN and
    memory-efficient kernels, and softmax(QK^T)V as matmuls (TF32 when allowed, for fp32)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lorabench.model import matmul_attention

    q = torch.randn(batch, cfg.num_attention_heads, seq, cfg.head_dim, device="cuda", dtype=dtype,
                    requires_grad=True)
    k = torch.randn(batch, cfg.num_key_value_heads, seq, cfg.head_dim, device="cuda", dtype=dtype,
                    requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    go = torch.randn_like(q)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    kw = {"enable_gqa": True} if rep > 1 else {}
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw).backward(go)
        try:
            out[name] = timed(sdpa)
        except RuntimeError:  # the kernel does not take this dtype/shape on this card
            pass
    out["matmul"] = timed(lambda: matmul_attention(q, k, v, rep).backward(go))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--configs", default="4x512,16x512,2x4096", help="comma-separated LBSxSEQ")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "tf32"),
                    help="tf32: fp32 tensors with TF32 matmuls (the flagperf-tf32 preset)")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = a.dtype == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}[a.dtype]
    print(f"floor on {torch.cuda.get_device_name()} ({a.dtype})")
    print("| LBS | seq | GEMM ms | attn ms | GEMM TFLOP/s | floor tok/s | attention fwd+bwd per layer, ms |")
    print("|---|---|---|---|---|---|---|")
    for c in a.configs.split(","):
        b, s = map(int, c.split("x"))
        r = floor(a.model, b, s, dtype)
        kernels = ", ".join(f"{k} {v:.2f}" for k, v in r["attn_by_kernel_ms"].items())
        print(f"| {b} | {s} | {1e3 * r['gemm_s']:.1f} | {1e3 * r['attn_s']:.1f} | {r['gemm_tflops']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {kernels} |")


if __name__ == "__main__":
    main()
