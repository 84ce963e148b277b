"""FP8 GEMMs at the frozen shapes of a Llama step on this GPU: bf16 vs FP8 (rowwise and tensorwise scales), the
input-gradient GEMM with e4m3 or e5m2 gradients, the just-in-time weight transpose, and one projection's quantize +
GEMM forward and backward, eager and compiled, with the norm that produces its input; blockwise scales (1 x 128
activations by 128 x 128 weights, benchmarks/fp8_blocks.py) beside the rowwise ones.

    PYTHONPATH=src python benchmarks/fp8_gemm.py [--model llama2-7b] [--tokens 8192] [--only blockwise]

Prints one table (ms and TFLOP/s, median of 20 timed runs after 5 warm-up).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lorabench.bench.floor import timed as floor_timed
from lorabench.config import MODEL_PRESETS
from lorabench.kernels.fp8 import fp8_linear, quantize_rows
from lorabench.shapes import projection_shapes

from fp8_blocks import block_linear, cublas_block_scales, quantize_groups, quantize_weight_blocks

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def timed(fn) -> float:
    """Median ms of ``fn()`` over 20 runs after 5 warm-up (CUDA events)."""
    return 1e3 * floor_timed(fn)


def row(name: str, ms: float, flops: float | None = None):
    tf = f"{flops / ms / 1e9:,.0f}" if flops else ""
    print(f"| {name} | {ms:.3f} | {tf} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--only", choices=("all", "blockwise"), default="all",
                    help="blockwise: only the rows that compare blockwise with rowwise scales")
    a = ap.parse_args()
    cfg, m, dev = MODEL_PRESETS[a.model], a.tokens, torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.model}, M = {m} tokens")
    print("| op | ms | TFLOP/s |\n|---|---|---|")
    seen = set()
    for proj, (k, n) in projection_shapes(cfg).items():
        if (k, n) in seen:
            continue
        seen.add((k, n))
        fl = 2 * m * k * n
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_rows(w)
        ws = ws.view(-1)
        xq, xs = quantize_rows(x)
        wt = wq.t().contiguous()
        tag = f"{proj} {k}->{n}"
        blockwise_rows(tag, x, g, w, wq, ws, wt, xq, xs, fl)  # with the rowwise rows it is compared against
        if a.only == "blockwise":
            continue
        row(f"{tag} bf16 fwd x W^T", timed(lambda: F.linear(x, w)), fl)
        row(f"{tag} bf16 dx = g W", timed(lambda: g @ w), fl)
        one = torch.ones((), device=dev)
        row(f"{tag} fp8 tensorwise fwd", timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                                         out_dtype=torch.bfloat16)), fl)
        ones_k = torch.ones(1, k, device=dev)
        gq, gs = quantize_rows(g, E5M2, multiplier=ws)  # (the e4m3 gradient: in blockwise_rows)
        try:
            row(f"{tag} fp8 rowwise dx, grad e5m2",
                timed(lambda: torch._scaled_mm(gq, wt.t(), scale_a=gs, scale_b=ones_k, out_dtype=torch.bfloat16)), fl)
        except RuntimeError as e:
            print(f"| {tag} fp8 rowwise dx, grad e5m2 | unsupported: {str(e).splitlines()[0][:80]} | |")
        row(f"{tag} transpose Wq, eager contiguous()", timed(lambda: wq.t().contiguous()))
        ct = torch.compile(lambda t: t.t().contiguous())
        row(f"{tag} transpose Wq, compiled", timed(lambda: ct(wq)))
        row(f"{tag} quantize x rowwise, eager", timed(lambda: quantize_rows(x)))  # (compiled: in blockwise_rows)

        norm_w = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5

        def layer(h, fp8: bool):
            hn = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype) * norm_w
            return fp8_linear(hn, wq, ws) if fp8 else F.linear(hn, w)

        for fp8, compiled in ((False, False), (False, True), (True, False)):  # (fp8 compiled: in blockwise_rows)
            f = torch.compile(layer) if compiled else layer
            h = x.clone().requires_grad_()

            def step():
                f(h, fp8).backward(g)

            row(f"{tag} norm + {'fp8' if fp8 else 'bf16'} linear fwd+bwd, {'compiled' if compiled else 'eager'}",
                timed(step), 2 * fl)


def blockwise_rows(tag, x, g, w, wq, ws, wt, xq, xs, fl):
    """Blockwise against rowwise scales at one shape: the GEMMs alone, the activation quantize, and the norm +
    projection forward and backward compiled (as the blocks run)."""
    bq, bs = quantize_weight_blocks(w)
    gxq, gxs = quantize_groups(x)
    bt, bts = bq.t().contiguous(), bs.t().contiguous()
    ggq, ggs = quantize_groups(g)
    row(f"{tag} fp8 rowwise fwd", timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1),
                                                                  out_dtype=torch.bfloat16)), fl)
    rq, rs = quantize_rows(g, E4M3, multiplier=ws)
    ones_k = torch.ones(1, x.shape[1], device=x.device)
    row(f"{tag} fp8 rowwise dx, grad e4m3", timed(lambda: torch._scaled_mm(rq, wt.t(), scale_a=rs, scale_b=ones_k,
                                                                 out_dtype=torch.bfloat16)), fl)
    # the scales laid out once, as the GEMM takes them (scaled_mm_blocks does it per call)
    xs_t, gs_t = gxs.t().contiguous().t(), ggs.t().contiguous().t()
    bs_l, bts_l = cublas_block_scales(bs), cublas_block_scales(bts)
    row(f"{tag} fp8 blockwise fwd", timed(lambda: torch._scaled_mm(gxq, bq.t(), scale_a=xs_t, scale_b=bs_l.t(),
                                                                    out_dtype=torch.bfloat16)), fl)
    row(f"{tag} fp8 blockwise dx", timed(lambda: torch._scaled_mm(ggq, bt.t(), scale_a=gs_t, scale_b=bts_l.t(),
                                                                   out_dtype=torch.bfloat16)), fl)
    cr, cg = torch.compile(quantize_rows), torch.compile(quantize_groups)
    row(f"{tag} quantize x rowwise, compiled", timed(lambda: cr(x)))
    row(f"{tag} quantize x 1 x 128 groups, compiled", timed(lambda: cg(x)))
    norm_w = torch.rand(x.shape[1], device=x.device, dtype=torch.bfloat16) + 0.5

    def layer(h, block: bool):
        hn = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype) * norm_w
        return block_linear(hn, bq, bs, padded_ld=True) if block else fp8_linear(hn, wq, ws)

    for block in (False, True):  # a graph of its own each (the blockwise GEMM's lowering wants static shapes)
        f = torch.compile(layer, dynamic=False)
        h = x.clone().requires_grad_()
        row(f"{tag} norm + fp8 {'blockwise' if block else 'rowwise'} linear fwd+bwd, compiled",
            timed(lambda: f(h, block).backward(g)), 2 * fl)


if __name__ == "__main__":
    main()
