"""Where MMLU scoring's time goes, as `lorabench eval` scores (prefix cache, the default batch caps, eager blocks or
with ``--compiled-graph`` the compiled evaluation graph): the token work (prefix, real and padded suffix tokens),
the first pass's wall time (compiling included), then a warm pass's wall time, GPU time by kind of kernel, the top
kernels and the idle gaps between them (torch.profiler), optionally GEMM time by operand shapes.

    PYTHONPATH=src python benchmarks/profile_mmlu.py --mmlu ../shared/data/mmlu --model-dir <llama2-dir>

Without ``--model-dir`` a 32,000-entry BPE tokenizer is trained on the MMLU text (mmlu_speed.py).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lorabench.config import MODEL_PRESETS, LoRAConfig
from lorabench.data.tokenizer import Tokenizer
from lorabench.engines import NativeOptions, build_engine
from lorabench.mmlu import flagperf
from lorabench.mmlu.data import load_mmlu, make_requests
from lorabench.mmlu.evaluate import DEFAULT_BATCH_GPU, DEFAULT_BATCH_TOKENS
from lorabench.mmlu.scoring import length_batches, prefix_length, score_requests
from mmlu_speed import mmlu_tokenizer
from profile_step import print_gaps, print_gemm_shapes, print_top


def token_work(seqs_by_group: list[list[list[int]]], batch_size: int, batch_tokens: int) -> str:
    """Prefix tokens (once per group), the suffixes' real tokens and the tokens their padded batches run."""
    prefix = real = padded = batches = 0
    for seqs in seqs_by_group:
        P = prefix_length(seqs) if len(seqs) > 1 else 0  # as the scorers cache it
        lengths = [len(s) - P for s in seqs]
        prefix += P
        real += sum(lengths)
        for b in length_batches(lengths, batch_size, batch_tokens, prefix=P):
            padded += len(b) * max(lengths[i] for i in b)
            batches += 1
    return (f"{prefix} prefix tokens in {len(seqs_by_group)} groups, {real} suffix tokens run as {padded} "
            f"({100 * (padded - real) / padded:.1f}% padding) in {batches} batches")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mmlu", type=Path, default=Path("../shared/data/mmlu"))
    ap.add_argument("--model-dir", type=Path, help="a folder with the model's tokenizer (e.g. llama2-dir.sh's)")
    ap.add_argument("--subjects", default="", help="comma-separated (default: all)")
    ap.add_argument("--limit", type=int, help="questions per subject")
    ap.add_argument("--protocol", default="lm-eval", choices=("lm-eval", "flagperf"))
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_GPU)
    ap.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--gemm-shapes", action="store_true")
    ap.add_argument("--compiled-graph", action="store_true", help="score through the compiled evaluation graph")
    a = ap.parse_args()
    dev, cfg = torch.device("cuda"), MODEL_PRESETS["llama2-7b"]
    tok_dir = a.model_dir
    if tok_dir is None:
        tok_dir = Path(tempfile.mkdtemp())
        mmlu_tokenizer(a.mmlu, tok_dir, cfg.vocab_size)
    tok = Tokenizer(tok_dir)
    eng = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=dev, precision=a.precision, seed=0,
                       native=NativeOptions(compile=True))
    eng.eval()
    subs = load_mmlu(a.mmlu, a.subjects.split(",") if a.subjects else None, limit=a.limit)
    items = [(s, q) for s in subs for q in s.test]
    t0 = time.perf_counter()
    if a.protocol == "lm-eval":
        reqs = make_requests(tok, items, 5, cfg.max_position_embeddings)

        def score():
            score_requests(eng, reqs, dev, a.batch_size, True, batch_tokens=a.batch_tokens)
    else:
        reqs = flagperf.make_requests(tok, items, 5, 512)

        def score():
            flagperf.predict(eng, reqs, dev, a.batch_size, a.batch_tokens)
    groups: dict[tuple, list[list[int]]] = {}  # the scorers' groups: one subject, the same shots kept
    for r in reqs:
        groups.setdefault((r.q.subject, r.shots), []).append(r.context if a.protocol == "lm-eval" else r.ids)
    print(f"{a.protocol}: {len(reqs)} questions of {len(subs)} subjects, tokenised in {time.perf_counter() - t0:.1f} s; "
          + token_work(list(groups.values()), a.batch_size, a.batch_tokens))

    def timed() -> float:
        t = time.perf_counter()
        with eng.evaluating(a.compiled_graph):
            score()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    print(f"first pass (compiling included) {timed():.2f} s; warm pass {timed():.2f} s wall")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        timed()
    print_top(prof, 1, a.protocol, "pass", a.top)
    print_gaps(prof, 1)
    if a.gemm_shapes:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA], record_shapes=True) as prof:
            timed()
        print_gemm_shapes(prof, 1, a.top)


if __name__ == "__main__":
    main()
