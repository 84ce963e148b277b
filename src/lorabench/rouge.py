"""``--eval-rouge N``: does the fine-tune do the task? Greedy generation on N validation records before and after
training, scored with ROUGE against their references.

Each record's prompt (its training text up to the response: FlagPerf's samsum prompt ending in "Summary:\\n",
alpaca's up to "### Response:\\n", a --prompt-template up to its last column) is tokenised with BOS as in
training; the engine continues it greedily (``Engine.generate``, a KV cache on the native engine) until EOS or
``--rouge-max-new-tokens``; the new tokens are decoded and stripped. ROUGE-1, ROUGE-2 and ROUGE-L F-measures (x100,
the mean over the records) come from Google's ``rouge-score`` package with Porter stemming, as samsum results
are usually reported (the optional extra ``lorabench[rouge]``). Records whose prompt and new tokens would pass the
model's context are left out and counted. Chat records are not scored (their response is several turns).
"""
from __future__ import annotations

import statistics

from .config import ConfigError

METRICS = ("rouge1", "rouge2", "rougeL")


def scorer():
    """Google's ROUGE scorer, or a ConfigError saying what to install."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("--eval-rouge needs the rouge-score package: pip install 'lorabench[rouge]'") from None
    return rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)


def prompt_pairs(records: list[dict], n: int) -> list[tuple[str, str]]:
    """(prompt, reference) of the first ``n`` records that have a response (samsum, alpaca, template records)."""
    from .data.packing import response_spans, training_text

    out = []
    for r in records:
        spans = response_spans(r)
        if spans is None or r.get("templated"):
            continue
        text, start = training_text(r), spans[0][0]
        out.append((text[:start], text[start:].strip()))
        if len(out) == n:
            break
    return out


def score(pairs: list[tuple[str, str]], predictions: list[str]) -> dict:
    """Mean F-measures (x100) of ``predictions`` against the pairs' references."""
    rs = scorer()
    per = [rs.score(ref, pred) for (_, ref), pred in zip(pairs, predictions)]
    return {m: 100 * statistics.fmean(p[m].fmeasure for p in per) for m in METRICS} if per else \
        {m: None for m in METRICS}


def generate_and_score(engine, tok, pairs: list[tuple[str, str]], max_new_tokens: int, context: int,
                       progress: bool = False) -> dict:
    """Greedy predictions for ``pairs`` and their ROUGE; records too long for ``context`` tokens left out."""
    from tqdm.auto import tqdm

    preds, kept, skipped = [], [], 0
    with engine.evaluating(compiled=False):
        for prompt, ref in tqdm(pairs, desc="rouge", unit="record", disable=not progress):
            ids = tok.with_bos(tok.encode(prompt))
            if len(ids) + max_new_tokens > context:
                skipped += 1
                continue
            preds.append(tok.decode(engine.generate(ids, max_new_tokens, tok.eos_id)).strip())
            kept.append((prompt, ref))
    return {**score(kept, preds), "records": len(kept), "skipped_too_long": skipped, "predictions": preds,
            "references": [r for _, r in kept]}
