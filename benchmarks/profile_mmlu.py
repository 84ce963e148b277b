"""Where MMLU scoring's GPU time goes: torch.profiler over a few subjects (compiled blocks, prefix cache), top
kernels, for the default prefix attention (split) and for the per-row prefix copies (copy) with the lower-right
causal bias and with a boolean mask.

    PYTHONPATH=src python benchmarks/profile_mmlu.py --mmlu ../shared/data/mmlu
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import lorabench.mmlu.scoring as mmlu
from lorabench.config import MODEL_PRESETS, LoRAConfig
from lorabench.data.tokenizer import Tokenizer
from lorabench.engines import NativeOptions, build_engine
from lorabench.mmlu.data import load_mmlu, make_requests
from mmlu_speed import mmlu_tokenizer
from profile_step import print_top


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mmlu", type=Path, default=Path("../shared/data/mmlu"))
    ap.add_argument("--subjects", default="college_medicine,high_school_psychology,professional_law")
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    dev, cfg = torch.device("cuda"), MODEL_PRESETS["llama2-7b"]
    tmp = Path(tempfile.mkdtemp())
    mmlu_tokenizer(a.mmlu, tmp, cfg.vocab_size)
    tok = Tokenizer(tmp)
    eng = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=dev, precision="bf16", seed=0,
                       native=NativeOptions(compile=True))
    eng.eval()
    subs = load_mmlu(a.mmlu, a.subjects.split(","), limit=a.limit)
    reqs = make_requests(tok, [(s, q) for s in subs for q in s.test], 5, cfg.max_position_embeddings)
    tokens = sum(len(r.context) for r in reqs)
    for variant, attention in (("split", "split"), ("copy, lower-right causal bias", "copy"),
                               ("copy, boolean mask", "copy")):
        if variant == "copy, boolean mask":
            mmlu._CAUSAL_LOWER_RIGHT = None

        def score():
            mmlu.score_requests(eng, reqs, dev, a.batch_size, True, prefix_attention=attention)
            torch.cuda.synchronize()

        score()  # compile / warm up
        t0 = time.perf_counter()
        score()
        wall = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            score()
        print(f"\n{variant}: {len(reqs)} questions ({tokens} context tokens) in {wall:.2f} s wall")
        print_top(prof, 1, variant, "run", a.top)


if __name__ == "__main__":
    main()
