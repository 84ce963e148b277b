"""Where a training step's GPU time goes: torch.profiler over a few steps of one engine, GPU time by kind of
kernel (GEMM, attention, Inductor/Triton, other), the top kernels, and wall time per step beside GPU time (the
difference is launch gaps and host work).

    PYTHONPATH=src python benchmarks/profile_step.py --engine native --compile --precision bf16 --batch-size 16
"""
from __future__ import annotations

import argparse
import time

import torch

from lorabench.config import MODEL_PRESETS, LoRAConfig
from lorabench.data.synthetic import synthetic_chunks
from lorabench.engines import NativeOptions, build_engine
from lorabench.kernels.attention import ATTENTION_IMPLS
from lorabench.precision import PRECISIONS, get_precision
from lorabench.quantized import NF4_DEQUANT

KINDS = (("attention", ("flash_fwd", "flash_bwd", "cudnn", "fmha", "sdpa_", "attention_kernel")),
         ("triton", ("triton",)),  # Inductor's kernels (an SDPA op in a fused kernel's name is its inputs' copy)
         ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "gemv", "splitk")))
"""First match wins: attention kernels name cutlass types in their templates; Inductor names fused kernels after
the ops they serve."""


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="native")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--precision", default="bf16", choices=tuple(PRECISIONS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="compile the native engine's blocks")
    ap.add_argument("--compile-mode", help="torch.compile mode for the training blocks (e.g. reduce-overhead)")
    ap.add_argument("--fuse", action="store_true", help="fused q/k/v and gate/up GEMMs (native)")
    ap.add_argument("--attention", default="sdpa", choices=ATTENTION_IMPLS, help="native training attention")
    ap.add_argument("--nf4-dequant", choices=NF4_DEQUANT, help="--precision nf4: how products dequantize")
    ap.add_argument("--gemm-shapes", action="store_true",
                    help="profile once more with the host ops recorded and print GEMM time by operand shapes")
    a = ap.parse_args()
    dev = torch.device("cuda")
    precision = get_precision(a.precision)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision.tf32
    cfg = MODEL_PRESETS[a.model]
    eng = build_engine(a.engine, cfg, LoRAConfig(), model_dir=None, device=dev, precision=precision, seed=0,
                       attn="sdpa", native=NativeOptions(compile=a.compile, attention=a.attention,
                                                         fused_projections=a.fuse, compile_mode=a.compile_mode,
                                                         nf4_dequant=a.nf4_dequant))
    step, wall = timed_steps(eng, cfg.vocab_size, a.batch_size, a.seq_len, a.steps, dev)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(a.steps):
            step(3 + i)
        torch.cuda.synchronize()
    title = (f"{a.engine}{' compiled' if a.compile else ''}{' fused' if a.fuse else ''} {a.precision} "
             f"LBS {a.batch_size} T {a.seq_len} attention {a.attention}"
             + (f" nf4 dequant {a.nf4_dequant}" if a.nf4_dequant else ""))
    print(f"{title}: {wall * 1e3:.1f} ms wall per step, {a.batch_size * a.seq_len / wall:.0f} tok/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print_top(prof, a.steps, title, "step", a.top)
    print_gaps(prof, a.steps)
    if a.gemm_shapes:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA], record_shapes=True) as prof:
            for i in range(a.steps):
                step(3 + i)
            torch.cuda.synchronize()
        print_gemm_shapes(prof, a.steps, a.top)


def timed_steps(eng, vocab: int, batch: int, seq: int, steps: int, dev):
    """(step(i): a training step of ``eng`` on synthetic batch i, AdamW at lr 1e-4; the wall seconds a step over
    ``steps`` of them after three warm-up steps, compiling included in those). Batches 3 to 3 + steps may run
    again (a profile of the same steps)."""
    data = torch.from_numpy(synthetic_chunks(batch * (steps + 6), seq, vocab)).long().to(dev)
    opt = torch.optim.AdamW(eng.trainable_params(), lr=1e-4)

    def step(i):
        ids = data[i * batch:(i + 1) * batch]
        eng.loss(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(3 + i)
    torch.cuda.synchronize()
    return step, (time.perf_counter() - t0) / steps


def print_top(prof, reps: int, title: str, unit: str, top: int):
    """GPU time per ``unit`` (the profiled region ran ``reps`` of them), by kind of kernel, and the top kernels."""
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"{title}: {total / reps / 1e3:.1f} ms GPU per {unit}")
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + e.device_time_total
    print("  by kind: " + ", ".join(f"{k} {v / reps / 1e3:.1f} ms ({100 * v / total:.0f}%)"
                                    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"{100 * e.device_time_total / total:5.1f}%  {e.device_time_total / reps / 1e3:7.2f} ms  "
              f"x{e.count // reps:<4d} {kind(e.key):9s} {e.key[:90]}")


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
"""The leaf GEMM ops (linear and matmul call these, so counting only them counts each kernel once)."""


def print_gemm_shapes(prof, reps: int, top: int, thin: int = 16):
    """GPU time per step of the GEMM ops by operand shapes, and the part with a dimension <= ``thin`` (the
    adapters' rank-r products, which are memory-bound)."""
    rows = sorted((e for e in prof.key_averages(group_by_input_shape=True)
                   if e.key in GEMM_OPS and e.device_time_total > 0), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows)
    thin_t = sum(e.device_time_total for e in rows
                 if any(0 < d <= thin for shape in e.input_shapes for d in shape))
    print(f"GEMM ops: {total / reps / 1e3:.1f} ms per step, of it {thin_t / reps / 1e3:.1f} ms with a dimension "
          f"<= {thin}")
    for e in rows[:top]:
        print(f"  {e.device_time_total / reps / 1e3:7.2f} ms  x{e.count // reps:<4d} {e.key} "
              f"{[s for s in e.input_shapes if s]}")


def print_gaps(prof, reps: int, top: int = 10):
    """Where the GPU sits idle between kernels: idle time per step by gap length, and the longest gaps with the
    kernels on either side (launch bubbles are a few us; longer gaps mean the host fell behind)."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    gaps, end, prev = [], None, None
    for e in kernels:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, prev.name, e.name))
        if end is None or e.time_range.end > end:
            end, prev = e.time_range.end, e
    bins = {"< 5 us": 0.0, "5-50 us": 0.0, ">= 50 us": 0.0}
    for g, _, _ in gaps:
        bins["< 5 us" if g < 5 else "5-50 us" if g < 50 else ">= 50 us"] += g
    print(f"idle between kernels per step: {sum(bins.values()) / reps / 1e3:.1f} ms over {len(gaps) // reps} gaps ("
          + ", ".join(f"{k} {v / reps / 1e3:.1f} ms" for k, v in bins.items()) + ")")
    for g, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  {g:8.0f} us  after {before[:60]}  before {after[:60]}")


if __name__ == "__main__":
    main()
