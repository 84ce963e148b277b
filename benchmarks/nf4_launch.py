"""What launching the NF4 -> bf16 dequantization costs the host: the kernel as lorabench's op (a
``torch.library.triton_op``, which a compiled block launches from Inductor's generated code) against the same kernel
behind an opaque ``torch.library.custom_op`` (one Python call and one Triton launch from Python per product, as
lorabench launched it before; the 4-bit step was host-bound there: benchmarks/NOTES.md item 101). Prints whether
the values are bit for bit the plain PyTorch dequantization's (each launch, eager and compiled: the compiled graph
launches the kernel with no launch options, so its exactness cannot rest on any), the host time and the time with
the GPU per call of each, and with ``--step``, a Llama-2-7B nf4 training step (LBS 16, seq 512, seed LoRA, compiled
blocks) with one of them.

    PYTHONPATH=src python benchmarks/nf4_launch.py --step triton_op   # then --step custom_op in a fresh process
"""
from __future__ import annotations

import argparse
import time

import torch


def custom_op_dequantize():
    """The bf16 dequantization kernel behind an opaque custom op, launched from Python on every call (as torch
    before 2.6 gets it)."""
    from lorabench.kernels.nf4 import _define_dequantize

    return _define_dequantize("lorabench_bench::nf4_dequantize", triton_op=False)


def per_call(fn, calls: int = 200) -> tuple[float, float]:
    """(host seconds a call, seconds a call until the GPU is done)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / calls, (time.perf_counter() - t0) / calls


def main():
    import lorabench.kernels.nf4 as nf4

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="11008,4096")
    ap.add_argument("--step", choices=("custom_op", "triton_op"), help="then time a 7B nf4 step with this launch")
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows, cols = map(int, a.shape.split(","))
    custom, ours = custom_op_dequantize(), nf4.define_ops()[0]
    print(f"lorabench's op is a triton_op: {hasattr(torch.library, 'triton_op')}")
    for double in (False, True):  # the timings below take the last: double-quantized, as QLoRA's weights are
        q = nf4.quantize_nf4(torch.randn(rows, cols, device=dev, dtype=torch.bfloat16) * 0.02, double_quant=double)
        args = (*q.kernel_args(), q.block, q.nested_block, torch.bfloat16)
        want = q.dequantize().view(-1).view(torch.int16)
        for name, op in (("triton_op", ours), ("custom op", custom)):
            compiled = torch.compile(lambda *x, op=op: op(*x) + 0)
            differ = [int((got.view(torch.int16) != want).sum()) for got in (op(*args), compiled(*args))]
            print(f"[{rows}, {cols}] double={double} {name}: values differing from PyTorch's eager {differ[0]}, "
                  f"compiled {differ[1]}")
    compiled_op = torch.compile(lambda *x: ours(*x) + 0)
    compiled_custom = torch.compile(lambda *x: custom(*x) + 0)
    for name, fn in (("custom op, eager", lambda: custom(*args)), ("triton_op, eager", lambda: ours(*args)),
                     ("custom op, compiled", lambda: compiled_custom(*args)),
                     ("triton_op, compiled", lambda: compiled_op(*args))):
        host, total = per_call(fn)
        print(f"  {name:20s} host {host * 1e6:6.0f} us a call, {total * 1e6:6.0f} us with the GPU")
    if a.step:
        step(a.step, custom, nf4)


def step(variant: str, custom, nf4, batch: int = 16, seq: int = 512):
    from lorabench.config import MODEL_PRESETS, LoRAConfig
    from lorabench.engines import NativeOptions, build_engine
    from profile_step import timed_steps

    if variant == "custom_op":
        nf4._DEQUANTIZE = custom  # (defined above) NF4Tensor.dequantize reads it at trace time
    cfg, dev = MODEL_PRESETS["llama2-7b"], torch.device("cuda")
    eng = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=dev, precision="nf4", seed=0,
                       attn="sdpa", native=NativeOptions(compile=True, nf4_dequant="triton"))
    dt = timed_steps(eng, cfg.vocab_size, batch, seq, 8, dev)[1]
    print(f"{variant}: 7B nf4 LBS {batch} T {seq}: {dt * 1e3:.1f} ms a step, {batch * seq / dt:.0f} tok/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
