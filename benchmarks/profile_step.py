"""Where a training step's GPU time goes: torch.profiler over a few steps of one engine, top kernels by time.

    PYTHONPATH=src python benchmarks/profile_step.py --engine native --precision bf16 --batch-size 4
"""
from __future__ import annotations

import argparse

import torch

from lorabench.config import MODEL_PRESETS, LoRAConfig
from lorabench.data.synthetic import synthetic_chunks
from lorabench.engines import build_engine
from lorabench.runner import DTYPES


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="native")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="compile the native engine's blocks")
    ap.add_argument("--attention", help="native training attention (model.ATTENTION_IMPLS; default sdpa)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    cfg = MODEL_PRESETS[a.model]
    eng = build_engine(a.engine, cfg, LoRAConfig(), model_dir=None, device=dev, dtype=DTYPES[a.precision], seed=0,
                       attn="sdpa", compile=a.compile)
    if a.attention:
        eng.model.set_attention(a.attention)
    data = torch.from_numpy(synthetic_chunks(a.batch_size * (a.steps + 3), a.seq_len, cfg.vocab_size)).long().to(dev)
    opt = torch.optim.AdamW(eng.trainable_params(), lr=1e-4)

    def step(i):
        ids = data[i * a.batch_size:(i + 1) * a.batch_size]
        eng.loss(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(a.steps):
            step(3 + i)
        torch.cuda.synchronize()
    print_top(prof, a.steps, f"{a.engine}{' compiled' if a.compile else ''} {a.precision} LBS {a.batch_size} "
              f"T {a.seq_len}{' attention ' + a.attention if a.attention else ''}", "step", a.top)


def print_top(prof, reps: int, title: str, unit: str, top: int):
    """GPU time per ``unit`` (the profiled region ran ``reps`` of them) and the top kernels by time."""
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"{title}: {total / reps / 1e3:.1f} ms GPU per {unit}")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"{100 * e.device_time_total / total:5.1f}%  {e.device_time_total / reps / 1e3:7.2f} ms  "
              f"x{e.count // reps:<4d} {e.key[:90]}")

if __name__ == "__main__":
    main()
