"""What launching the NF4 -> bf16 dequantization costs the host: the kernel as today's Python custom op (one Python
call and one Triton launch from Python per product) against the same kernel as a ``torch.library.triton_op``, which
a compiled block launches from Inductor's generated code. The 4-bit step is host-bound at these launches
(benchmarks/NOTES.md item 101). Prints whether the triton_op's values equal the custom op's bit for bit (eager and
compiled; it is first launched with floating-point contraction off, as the custom op is, and without that option
where wrap_triton refuses it), the host time and the time with the GPU per call of each, eager and compiled, and
with ``--step``, a Llama-2-7B nf4 training step (LBS 16, seq 512, seed LoRA, compiled blocks) with one of them.

    PYTHONPATH=src python benchmarks/nf4_launch.py --step triton_op   # then --step custom_op in a fresh process
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import torch


def triton_op_dequantize(options: dict):
    """The bf16 dequantization kernel as a triton_op; ``options``: extra launch options (enable_fp_fusion)."""
    import triton
    from torch.library import triton_op, wrap_triton

    from lorabench.kernels.nf4 import DEQUANTIZE_BYTES, DEQUANTIZE_WARPS
    from lorabench.kernels.nf4_triton import OUT_BF16, dequantize_kernel

    @triton_op("lorabench_bench::nf4_dequantize", mutates_args={})
    def op(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
           nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], levels: torch.Tensor, block: int,
           nested_block: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(2 * packed.numel(), dtype=dtype, device=packed.device)
        nbytes, per, nested = packed.numel(), max(DEQUANTIZE_BYTES, block // 2), nested_absmax is not None
        wrap_triton(dequantize_kernel)[(triton.cdiv(nbytes, per),)](
            packed, absmax, nested_absmax if nested else absmax, nested_code if nested else absmax,
            offset if nested else absmax, levels, out.view(torch.int32), nbytes, BYTES=per,
            BLOCK_BYTES=block // 2, NESTED=nested, NESTED_BLOCK=nested_block, OUT=OUT_BF16,
            num_warps=DEQUANTIZE_WARPS, **options)
        return out

    return op


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
    q = nf4.quantize_nf4(torch.randn(rows, cols, device=dev, dtype=torch.bfloat16) * 0.02)
    args = (*q.kernel_args(), q.block, q.nested_block, torch.bfloat16)
    ref = nf4._DEQUANTIZE(*args)
    options = {"enable_fp_fusion": False}
    op = triton_op_dequantize(options)
    try:
        got = op(*args)
    except Exception as e:  # noqa: BLE001 - a refused launch option is what this reports
        print(f"wrap_triton refused enable_fp_fusion ({type(e).__name__}: {str(e)[:160]}); launching without it")
        options.clear()
        got = op(*args)
    compiled_op = torch.compile(lambda *x: op(*x) + 0)
    compiled_custom = torch.compile(lambda *x: nf4._DEQUANTIZE(*x) + 0)
    print(f"[{rows}, {cols}] triton_op {options or 'with contraction on'}: bit for bit the custom op eager "
          f"{torch.equal(ref.view(torch.int16), got.view(torch.int16))}, compiled "
          f"{torch.equal(ref.view(torch.int16), compiled_op(*args).view(torch.int16))}")
    for name, fn in (("custom op, eager", lambda: nf4._DEQUANTIZE(*args)), ("triton_op, eager", lambda: op(*args)),
                     ("custom op, compiled", lambda: compiled_custom(*args)),
                     ("triton_op, compiled", lambda: compiled_op(*args))):
        host, total = per_call(fn)
        print(f"  {name:20s} host {host * 1e6:6.0f} us a call, {total * 1e6:6.0f} us with the GPU")
    if a.step:
        step(a.step, op, nf4)


def step(variant: str, op, nf4, batch: int = 16, seq: int = 512):
    from lorabench.config import MODEL_PRESETS, LoRAConfig
    from lorabench.engines import NativeOptions, build_engine
    from profile_step import timed_steps

    if variant == "triton_op":
        nf4._DEQUANTIZE = op  # NF4Tensor.dequantize reads it at trace time
    cfg, dev = MODEL_PRESETS["llama2-7b"], torch.device("cuda")
    eng = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=dev, precision="nf4", seed=0,
                       attn="sdpa", native=NativeOptions(compile=True, nf4_dequant="triton"))
    dt = timed_steps(eng, cfg.vocab_size, batch, seq, 8, dev)[1]
    print(f"{variant}: 7B nf4 LBS {batch} T {seq}: {dt * 1e3:.1f} ms a step, {batch * seq / dt:.0f} tok/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
