"""The floor: time only the work no LoRA trainer can avoid, and convert it to tokens/s.

Per step, for every frozen matrix of the model (q, k, v, o, gate, up, down in each layer, and lm_head): the forward
GEMM and the input-gradient GEMM (no weight gradient: the weights are frozen), q/k/v and gate/up each timed as one
GEMM and as one per matrix, the faster counting; plus causal attention forward + backward with the fastest kernel
available (SDPA's flash, cuDNN and memory-efficient kernels, plain matmuls, and in fp32 those matmuls compiled; each
is timed and reported). Each GEMM shape is timed on its own with CUDA events (median of repeats after warm-up) and
multiplied by how often a step runs it; attention by its kernels' busy time (``work_time``: timed alone, its small
kernels would otherwise wait on the host). Adapters, norms, RoPE, SwiGLU, the loss and the optimizer are left out, so
real training cannot reach this number; the gap to it is what an engine still wastes. For fp8 the blocks' GEMMs are
cuBLASLt's rowwise-scaled FP8 GEMMs (their quantizations left out, like the norms), lm_head and attention bf16.
``lorabench bench`` prints it beside the engines' rows; ``benchmarks/floor.py`` prints it alone.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels.attention import matmul_attention
from ..precision import get_precision
from ..shapes import GEMM_GROUP_NAMES, gemm_groups


def timed(fn, reps: int = 20, warmup: int = 5) -> float:
    """Median seconds of ``fn`` on the current CUDA device."""
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


def busy(fn, reps: int = 20, warmup: int = 5) -> float:
    """Seconds per call that ``fn``'s kernels keep the current CUDA device busy (their durations summed from a
    profile; 0.0 if the profiler saw none): unlike ``timed``, without the idle time of a host that launches the
    kernels more slowly than they run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if e.device_time_total > 0) / reps / 1e6


def work_time(fn) -> float:
    """Seconds of ``fn``'s work on the device: its kernels' busy time where the profiler gives one no longer than
    the wall time between CUDA events, else that wall time. An attention of a few small kernels, timed alone, is
    otherwise host-bound: at tf32 LBS 2 x 512 on an H200 (2026-11-28) the compiled matmul attention measured 0.69 ms
    a layer between events while the same kernels took ~0.4 ms inside a training step (benchmarks/NOTES.md item
    32)."""
    wall = timed(fn)
    try:
        gpu = busy(fn, warmup=0)  # timed has warmed fn up
    except RuntimeError:  # no profiler on this install: the wall time stands
        return wall
    return gpu if 0.0 < gpu <= wall else wall


def attention_times(cfg: ModelConfig, batch: int, seq: int, dtype) -> dict[str, float]:
    """Seconds of one layer's causal attention forward + backward, per kernel that runs the shape (work_time)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

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
            out[name] = work_time(sdpa)
        except RuntimeError:  # the kernel does not take this dtype/shape on this card
            pass
    out["matmul"] = work_time(lambda: matmul_attention(q, k, v, rep).backward(go))
    if dtype == torch.float32:  # compiled, as the native engine runs it under TF32 (where no flash kernel runs)
        try:
            compiled = torch.compile(matmul_attention)
            out["matmul compiled"] = work_time(lambda: compiled(q, k, v, rep).backward(go))
        except Exception:  # noqa: BLE001  (no compiler on this install: the other kernels still give the floor)
            pass
    return out


def _pair_time(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, fp8: bool) -> float:
    """Seconds of one frozen matrix's forward GEMM (x w^T) and input-gradient GEMM (dy w): in x's dtype, or as
    rowwise-scaled FP8 GEMMs (the operands quantized beforehand and w^T made contiguous beforehand: the floor
    counts GEMMs only)."""
    if not fp8:
        return timed(lambda: x @ w.t()) + timed(lambda: dy @ w)
    from ..kernels.fp8 import quantize_rows

    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    gq, gs = quantize_rows(dy, multiplier=ws.view(1, -1))
    wt, ones = wq.t().contiguous(), torch.ones(1, w.shape[1], device=w.device)
    return (timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=x.dtype))
            + timed(lambda: torch._scaled_mm(gq, wt.t(), scale_a=gs, scale_b=ones, out_dtype=x.dtype)))


def fp8_matrices(fp8: bool, skip: tuple[str, ...] = ()) -> list[list[bool]]:
    """For each of shapes.gemm_groups' groups, whether each of its matrices runs in FP8: the block projections
    under ``fp8`` but those in ``skip`` (--fp8-skip), never lm_head."""
    return [[fp8 and name != "lm_head" and name not in skip for name in names] for names in GEMM_GROUP_NAMES]


def floor(cfg: ModelConfig, batch: int, seq: int, dtype=torch.bfloat16, fp8: bool = False,
          fp8_skip: tuple[str, ...] = ()) -> dict:
    """The floor of one step of ``batch`` x ``seq`` tokens in ``dtype`` (TF32 as the caller has set it); ``fp8``:
    the blocks' frozen GEMMs in FP8 but those of the projections in ``fp8_skip`` (lm_head and attention stay in
    ``dtype``, as --precision fp8 runs them)."""
    import warnings

    n = batch * seq
    total, flops = 0.0, 0.0
    for (i, outs, count), in_fp8 in zip(gemm_groups(cfg), fp8_matrices(fp8, fp8_skip), strict=True):
        x = torch.randn(n, i, device="cuda", dtype=dtype)
        w = torch.randn(sum(outs), i, device="cuda", dtype=dtype) * 0.02
        dy = torch.randn(n, sum(outs), device="cuda", dtype=dtype)
        fused = _pair_time(x, w, dy, in_fp8[0]) if len(set(in_fp8)) == 1 else float("inf")
        if len(outs) > 1:  # or one GEMM per matrix, whichever is faster on this card (the only way if they differ)
            parts = [(wp.contiguous(), dyp.contiguous()) for wp, dyp in zip(w.split(outs), dy.split(outs, dim=1))]
            fused = min(fused, sum(_pair_time(x, wp, dyp, f) for (wp, dyp), f in zip(parts, in_fp8)))
        total += count * fused
        flops += count * 2 * (2 * n * i * sum(outs))
        del x, w, dy
    with warnings.catch_warnings():  # SDPA warns for every kernel that cannot take the shape
        warnings.simplefilter("ignore")
        attn = attention_times(cfg, batch, seq, dtype)
    t_attn = min(attn.values()) * cfg.num_hidden_layers  # the fastest kernel this torch has for the shape
    total += t_attn
    return {"batch": batch, "seq": seq, "gemm_s": total - t_attn, "attn_s": t_attn,
            "attn_by_kernel_ms": {k: 1e3 * v for k, v in attn.items()},
            "gemm_tflops": flops / (total - t_attn) / 1e12, "tokens_per_s": n / total}


def floor_for_precision(cfg: ModelConfig, batch: int, seq: int, precision: str,
                        fp8_skip: tuple[str, ...] = ()) -> dict:
    """The floor for a training precision (fp32, tf32, fp16, bf16, fp8; under fp8, ``fp8_skip`` the projections
    kept in bf16), TF32 on only for tf32."""
    p = get_precision(precision)
    with p.matmul_mode():
        return {**floor(cfg, batch, seq, p.dtype, fp8=p.fp8_gemms, fp8_skip=fp8_skip), "precision": precision}
