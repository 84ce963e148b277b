"""MMLU 5-shot speed on the Llama-2-7B shape: our batched, prefix-cached scorer vs the naive loop FlagPerf uses.

Random weights are fine for timing; what matters is the token work, so a 32,000-entry BPE tokenizer is trained on
the MMLU text itself (the Llama-2 tokenizer is not available offline) and the context limit is Llama-2's 4096.
The fast path runs all 14,042 questions; the naive loop (one question per forward pass, whole prompt, no batching,
no cache) runs a per-subject sample and is extrapolated by its measured mean time per question. The predictions of
both paths are compared on the sample.

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
from lorabench.data.tokenizer import Tokenizer
from lorabench.engines import build_engine
from lorabench.mmlu import load_mmlu, make_requests, score_requests


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
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--naive-per-subject", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="questions per subject for the fast path (all)")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--device", default="cuda")
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
    eng = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=dev, dtype=torch.bfloat16 if dev.type == 'cuda' else torch.float32, seed=0)
    eng.eval()
    sync()
    print(f"model built in {time.perf_counter() - t_load:.1f} s")
    t_all = time.perf_counter()
    subjects = load_mmlu(a.mmlu, limit=a.limit)
    t0 = time.perf_counter()
    reqs = make_requests(tok, [(s, q) for s in subjects for q in s.test], 5, cfg.max_position_embeddings)
    prep_s = time.perf_counter() - t0
    tokens = sum(len(r.context) for r in reqs)
    print(f"{len(reqs)} questions, {tokens} context tokens (mean {tokens / len(reqs):.0f}), "
          f"shots dropped {sum(r.shots < 5 for r in reqs)}, truncated {sum(r.truncated for r in reqs)}; "
          f"prompts built and tokenised in {prep_s:.1f} s")
    t0 = time.perf_counter()
    fast = score_requests(eng, reqs, dev, a.batch_size, True)
    sync()
    fast_s = time.perf_counter() - t0
    end_to_end_s = time.perf_counter() - t_all
    sample = [r for s in subjects for r in [x for x in reqs if x.q.subject == s.name][:a.naive_per_subject]]
    t0 = time.perf_counter()
    naive = score_requests(eng, sample, dev, 1, False)
    sync()
    naive_s = time.perf_counter() - t0
    naive_total = naive_s / len(sample) * len(reqs)
    idx = {id(r): i for i, r in enumerate(reqs)}
    diffs = [max(abs(x - y) for x, y in zip(naive[j], fast[idx[id(r)]])) for j, r in enumerate(sample)]
    agree = sum(max(range(4), key=lambda k: naive[j][k]) == max(range(4), key=lambda k: fast[idx[id(r)]][k])
                for j, r in enumerate(sample))
    acc = sum(max(range(4), key=lambda k: s[k]) == r.q.gold for r, s in zip(reqs, fast)) / len(reqs)
    print(f"| path | questions | seconds | questions/s |\n|---|---|---|---|")
    print(f"| batched + prefix cache (ours), scoring only | {len(reqs)} | {fast_s:.1f} | {len(reqs) / fast_s:.0f} |")
    print(f"| ours end to end after load (read CSVs, tokenise, score) | {len(reqs)} | {end_to_end_s:.1f} | "
          f"{len(reqs) / end_to_end_s:.0f} |")
    print(f"| naive, one question per pass (measured sample) | {len(sample)} | {naive_s:.1f} | "
          f"{len(sample) / naive_s:.1f} |")
    print(f"| naive, extrapolated to all | {len(reqs)} | {naive_total:.0f} | {len(sample) / naive_s:.1f} |")
    print(f"speed-up {naive_total / fast_s:.1f}x on {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; sample: predictions agree "
          f"{agree}/{len(sample)}, max |logprob diff| {max(diffs):.4f} (bf16); random-weight accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
