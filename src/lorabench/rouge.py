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
    from .progress import progress as progress_bar

    preds, kept, skipped = [], [], 0
    with engine.evaluating(compiled=False), progress_bar(len(pairs), progress, "rouge", "record") as bar:
        for prompt, ref in pairs:
            bar.update(1)
            ids = tok.with_bos(tok.encode(prompt))
            if len(ids) + max_new_tokens > context:
                skipped += 1
                continue
            preds.append(tok.decode(engine.generate(ids, max_new_tokens, tok.eos_id)).strip())
            kept.append((prompt, ref))
    return {**score(kept, preds), "records": len(kept), "skipped_too_long": skipped, "predictions": preds,
            "references": [r for _, r in kept]}


def rouge_pass(plan, engine, data) -> dict:
    """--eval-rouge: greedy generations for the first validation records and their ROUGE."""
    from .data.tokenizer import Tokenizer

    job = plan.job
    pairs = prompt_pairs(data.val_records, job.eval_rouge)
    context = min(plan.model_cfg.context_limit, plan.model_cfg.max_position_embeddings)
    with plan.precision.matmul_mode():
        return generate_and_score(engine, Tokenizer(job.model_dir), pairs, job.rouge_max_new_tokens, context,
                                  progress=job.progress and plan.rank == 0)


def record_rouge(result: dict, before: dict | None, after: dict, job, run_dir) -> None:
    """ROUGE before and after training into ``result`` ("rouge"), each record's generations to
    rouge_predictions.jsonl."""
    result["rouge"] = {"records": after["records"], "skipped_too_long": after["skipped_too_long"],
                       "max_new_tokens": job.rouge_max_new_tokens,
                       "before": None if before is None else {m: before[m] for m in METRICS},
                       "after": {m: after[m] for m in METRICS}}
    if run_dir is not None:
        import json

        lines = [json.dumps({"reference": ref, "before": None if before is None else before["predictions"][i],
                             "after": pred}) for i, (ref, pred) in enumerate(zip(after["references"],
                                                                                  after["predictions"]))]
        from .files import write_text_atomic

        write_text_atomic(run_dir / "rouge_predictions.jsonl", "".join(line + "\n" for line in lines))
