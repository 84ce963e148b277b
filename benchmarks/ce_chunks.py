"""The frozen-head cross-entropy (kernels/cross_entropy.py) at a step's shape, by rows per chunk: forward and
backward time, the two head GEMMs' TFLOP/s, the extra peak memory, and the loss against the first row's.

    PYTHONPATH=src python benchmarks/ce_chunks.py [--tokens 8192] [--hidden 4096] [--vocabs 32000,128256]

The first row of each vocabulary is the rule before 2026-12-01 (2^25 // V rows, fp32 logits near 128 MiB);
"default" is today's ``_CHUNK_ROWS``. Prints one table (median of 10 timed runs after 3 warm-up, CUDA events).
"""
from __future__ import annotations

import argparse

import torch

from lorabench.bench.floor import timed
from lorabench.kernels import cross_entropy as ce


def run(h0, w, labels, rows: int):
    """Each setting compiled afresh, as a training run compiles it: a whole chunk's shape, then (if the tokens
    are no multiple of ``rows``) the ragged last chunk's, which makes the graph shape-generic."""
    ce._CHUNK_ROWS = rows
    torch._dynamo.reset()
    ce._compiled_loss_and_grad.cache_clear()
    h = h0.clone().requires_grad_()

    def step():
        h.grad = None
        ce.frozen_head_cross_entropy(h, w, labels, compiled=True).backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = 1e3 * timed(step, reps=10, warmup=3)
    peak = torch.cuda.max_memory_allocated() - base
    loss = ce.frozen_head_cross_entropy(h0, w, labels, compiled=True).item()
    return ms, peak, loss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocabs", default="32000,128256,152064")
    ap.add_argument("--rows", default="256,512,1024,2048", help="rows per chunk to try besides the old rule")
    a = ap.parse_args()
    default = ce._CHUNK_ROWS
    n, c = a.tokens, a.hidden
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {n} tokens, hidden {c}, bf16")
    print("| vocab | rows | ms | head GEMMs TFLOP/s | extra peak GiB | loss - first row's |")
    print("|---|---|---|---|---|---|")
    for v in (int(x) for x in a.vocabs.split(",")):
        g = torch.Generator(device="cuda").manual_seed(v)
        h0 = torch.randn(n, c, device="cuda", generator=g).bfloat16()
        w = (torch.randn(v, c, device="cuda", generator=g) * c ** -0.5).bfloat16()
        labels = torch.randint(0, v, (n,), device="cuda", generator=g)
        first = None
        for i, rows in enumerate([(1 << 25) // v] + [int(x) for x in a.rows.split(",")]):
            ms, peak, loss = run(h0, w, labels, rows)
            first = loss if i == 0 else first
            tag = (" (old rule)" if i == 0 else "") + (" (default)" if rows == default else "")
            print(f"| {v:,} | {rows}{tag} | {ms:.2f} | {4 * n * c * v / ms / 1e9:,.0f} | {peak / 2**30:.2f} "
                  f"| {loss - first:+.1e} |", flush=True)
        del h0, w
    ce._CHUNK_ROWS = default


if __name__ == "__main__":
    main()
