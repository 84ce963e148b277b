"""MMLU 5-shot speed on the Llama-2-7B shape: our batched, prefix-cached scorer vs the naive loop FlagPerf uses.

Random weights are fine for timing; what matters is the token work, so a 32,000-entry BPE tokenizer is trained on
the MMLU text itself (the Llama-2 tokenizer is not available offline) and the context limit is Llama-2's 4096.
The fast path runs all 14,042 questions end to end (read, tokenise in worker processes while scoring, score) for
each variant of blocks (eager / compiled), batch size and tokenising workers, then the last variant's scoring
alone; the naive loop (one question per forward pass, whole prompt, no batching, no cache) runs a per-subject
sample and is extrapolated by its measured mean time per question. The predictions of both paths are compared on
the sample.

    PYTHONPATH=src python benchmarks/mmlu_speed.py --mmlu ../shared/data/mmlu
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch

from lorabench.config import MODEL_PRESETS, LoRAConfig
from lorabench.convert import compile_blocks
from lorabench.data.tokenizer import Tokenizer
from lorabench.engines import build_engine
from lorabench.mmlu.data import load_mmlu, make_requests
from lorabench.mmlu.evaluate import DEFAULT_BATCH_TOKENS, MmluOptions, evaluate_mmlu, kv_token_cap
from lorabench.mmlu.scoring import score_requests


def mmlu_tokenizer(mmlu_dir: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer as Tk, decoders, models, pre_tokenizers, trainers

    texts = []
    for f in sorted(mmlu_dir.glob("*/*.csv")):
        with open(f, newline="") as fh:
            texts += [" ".join(row[:5]) for row in csv.reader(fh)]
    tok = Tk(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                           "eos_token": "</s>"}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mmlu", type=Path, default=Path("../shared/data/mmlu"))
    ap.add_argument("--variants", default="compiled:256",
                    help="comma-separated blocks:batch[:tokenize workers[:prefix attention]], blocks eager or "
                    "compiled (compiled ones run last; the first compiled run includes compiling); workers default "
                    "to evaluate_mmlu's (empty: the default); prefix attention split (default) or copy")
    ap.add_argument("--naive-per-subject", type=int, default=3, help="0: only the end-to-end runs")
    ap.add_argument("--limit", type=int, default=None, help="questions per subject (all)")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true", help="then the last variant again under torch.profiler")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cfg = MODEL_PRESETS[a.model]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    mmlu_tokenizer(a.mmlu, tmp, cfg.vocab_size)
    tok = Tokenizer(tmp)
    print(f"tokenizer trained in {time.perf_counter() - t0:.1f} s")
    t_load = time.perf_counter()
    eng = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=dev,
                       precision="bf16" if dev.type == "cuda" else "fp32", seed=0)
    sync()
    print(f"model built in {time.perf_counter() - t_load:.1f} s")
    rows = []
    variants = sorted((v.split(":") for v in a.variants.split(",")), key=lambda v: v[0] == "compiled")
    for blocks, bs, *rest in variants:
        workers, attention = (rest + ["", "split"][len(rest):])[:2]
        if blocks == "compiled" and eng.model.compiled_layers is None:
            compile_blocks(eng.model)
        opts = MmluOptions(str(a.mmlu), limit=a.limit, batch_size=int(bs), prefix_attention=attention,
                           tokenize_workers=int(workers) if workers else None,  # GPU: 16k-token batches
                           compiled_graph=blocks == "compiled")
        sync()
        t0 = time.perf_counter()  # end to end after load: read the CSVs, tokenise (overlapped), score
        summary = evaluate_mmlu(eng, tmp, opts, dev, None, progress=False, subjects=load_mmlu(a.mmlu, limit=a.limit))
        sync()
        name = (f"{blocks} blocks, batch {bs}" + (f", {workers} tokenising workers" if workers else "")
                + (", prefix attention copy" if attention == "copy" else ""))
        rows.append((name, time.perf_counter() - t0, summary["acc"]))
        tm = summary["timing"]
        print(f"{rows[-1][0]}: {rows[-1][1]:.1f} s (scoring {tm['score_s']:.1f} s, of it the first subject "
              f"{tm['first_subject_s']:.1f} s; waiting for tokenised subjects {tm['tokenize_wait_s']:.1f} s)",
              flush=True)
    if a.profile:  # the last variant once more (warm), under the profiler: GPU busy time vs wall time
        from profile_step import print_top

        sync()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            evaluate_mmlu(eng, tmp, opts, dev, None, progress=False, subjects=load_mmlu(a.mmlu, limit=a.limit))
            sync()
        print(f"profiled run: {time.perf_counter() - t0:.1f} s wall (with the profiler's overhead)")
        print_top(prof, 1, f"MMLU, {rows[-1][0]}", "run", 25)
    if a.naive_per_subject == 0:
        print(f"\nMMLU 5-shot, {summary['questions']} questions, {a.model} shape, random weights, "
              f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}: "
              + "; ".join(f"{name} {sec:.1f} s end to end" for name, sec, _ in rows))
        return
    subjects = load_mmlu(a.mmlu, limit=a.limit)
    t0 = time.perf_counter()
    reqs = make_requests(tok, [(s, q) for s in subjects for q in s.test], 5, cfg.max_position_embeddings)
    prep_s = time.perf_counter() - t0
    tokens = sum(len(r.context) for r in reqs)
    print(f"{len(reqs)} questions, {tokens} context tokens (mean {tokens / len(reqs):.0f}), "
          f"shots dropped {sum(r.shots < 5 for r in reqs)}, truncated {sum(r.truncated for r in reqs)}; "
          f"tokenised in one go (no overlap) in {prep_s:.1f} s")
    t0 = time.perf_counter()  # the last variant's scoring alone, on the requests tokenised up front
    fast = score_requests(eng, reqs, dev, int(variants[-1][1]), True, batch_tokens=DEFAULT_BATCH_TOKENS,
                          kv_tokens=kv_token_cap(eng.model_cfg, eng.dtype), prefix_attention=opts.prefix_attention)
    sync()
    score_s = time.perf_counter() - t0
    print(f"scoring alone ({variants[-1][0]} blocks, batch {variants[-1][1]}): {score_s:.1f} s", flush=True)
    eng.model.compiled_layers = eng.model.eval_layers = None  # the naive loop as FlagPerf runs it: eager
    sample = [r for s in subjects for r in [x for x in reqs if x.q.subject == s.name][:a.naive_per_subject]]
    score_requests(eng, sample[:3], dev, 1, False)  # warm-up of the eager kernels
    sync()
    t0 = time.perf_counter()
    naive = score_requests(eng, sample, dev, 1, False)
    sync()
    naive_s = time.perf_counter() - t0
    naive_total = naive_s / len(sample) * len(reqs)
    idx = {id(r): i for i, r in enumerate(reqs)}
    diffs = [max(abs(x - y) for x, y in zip(naive[j], fast[idx[id(r)]])) for j, r in enumerate(sample)]
    agree = sum(max(range(4), key=lambda k: naive[j][k]) == max(range(4), key=lambda k: fast[idx[id(r)]][k])
                for j, r in enumerate(sample))
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"\nMMLU 5-shot, {len(reqs)} questions, {a.model} shape, random weights, {card}")
    print("| path | seconds end to end after load | questions/s | vs naive |\n|---|---|---|---|")
    for name, sec, acc in rows:
        print(f"| ours, {name} | {sec:.1f} | {len(reqs) / sec:.0f} | {naive_total / sec:.1f}x |")
    print(f"| (ours, scoring alone: {variants[-1][0]}, batch {variants[-1][1]}, tokenised beforehand in "
          f"{prep_s:.1f} s) | {score_s:.1f} | {len(reqs) / score_s:.0f} | {naive_total / score_s:.1f}x |")
    print(f"| naive, one question per pass, eager ({len(sample)} measured in {naive_s:.1f} s, extrapolated) | "
          f"{naive_total:.0f} | {len(sample) / naive_s:.1f} | 1.0x |")
    print(f"sample: predictions agree {agree}/{len(sample)}, max |logprob diff| {max(diffs):.4f} "
          f"({'bf16' if dev.type == 'cuda' else 'fp32'}); "
          f"accuracy of each run (random weights): {', '.join(f'{r[2]:.4f}' for r in rows)}")


if __name__ == "__main__":
    main()
