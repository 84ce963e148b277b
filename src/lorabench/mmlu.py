"""MMLU 5-shot, exact and fast (REFERENCE section 4): scoring, the whole evaluation and its report.

The questions, lm-evaluation-harness's prompt and the tokenised requests come from mmlu_data.py. Each letter is
scored by the summed log-likelihood of its continuation " A".." D"; when every continuation is one token that
extends the context, one forward pass per question serves all four letters.

Speed: questions are sorted by length and batched (right padding needs no mask under a causal model; batches are
capped by count, tokens and padding), only the scored positions go through lm_head, and — native engine — the
token prefix every question of a subject shares (description + shots) is run once, its KV cache reused for all of
the subject's questions. On a GPU the blocks run compiled (one shape-generic graph; from COMPILED_EVAL_MIN
questions, as compiling costs seconds), worker processes tokenise the next subjects while the GPU scores, and the
host queues each subject's batches before it reads the previous subject's scores back, so the device does not wait
for the host between subjects.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from .config import ConfigError
from .mmlu_data import (CATEGORY, LETTERS, Question, Request, Subject, build_context, format_question, load_mmlu,
                        make_request, make_requests, subject_requests)
from .report import markdown_table, write_text_atomic

__all__ = [  # the data side (mmlu_data) and the scoring side, in one place for callers
    "CATEGORY", "LETTERS", "Question", "Request", "Subject", "build_context", "format_question", "load_mmlu",
    "make_request", "make_requests", "subject_requests", "length_batches", "score_requests", "queue_scores",
    "kv_token_cap", "check_mmlu_options", "evaluate_mmlu", "summarize", "write_outputs", "render_mmlu",
]


# -- scoring ----------------------------------------------------------------------------------------------------
def _lower_right_causal():
    """torch's lower-right causal bias (query i sees keys up to P + i) where SDPA takes it with GQA, else None."""
    try:
        import inspect

        from torch.nn.attention.bias import CausalBias, causal_lower_right
    except ImportError:
        return None
    return causal_lower_right if "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters else None


_CAUSAL_LOWER_RIGHT = _lower_right_causal()


def _prefix_mask(T: int, P: int, device):
    """Suffix queries see the whole cached prefix and the suffix causally. The lower-right causal bias says that
    without a materialised mask (and lets SDPA pick its flash kernel); a boolean mask otherwise."""
    if _CAUSAL_LOWER_RIGHT is not None:
        return _CAUSAL_LOWER_RIGHT(T, P + T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat((torch.ones(T, P, dtype=torch.bool, device=device), causal), dim=1)[None, None]


def _to_device(data, device) -> torch.Tensor:
    """A long tensor on ``device`` without stalling the host: through pinned memory, asynchronously, on a GPU
    (a plain copy would wait for every queued kernel, and the host could not prepare the next batch meanwhile)."""
    t = torch.tensor(data, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _pad(seqs: list[list[int]], device) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return _to_device([s + [0] * (T - len(s)) for s in seqs], device)


def _score_sequences(engine, seqs: list[list[int]], positions: list[list[int]], targets: list[list[int]],
                     device, prefix=None, copy_prefix: bool = True) -> torch.Tensor:
    """Log-probs of targets[i] (token ids) at positions[i] of each padded sequence, in one forward pass, flat
    and still on the device. ``positions`` index the logits that predict each target. ``prefix``: (kv_caches,
    length) shared by all; ``copy_prefix``: attend through SDPA on per-row copies of it (else without copies)."""
    ids = _pad(seqs, device)
    if prefix is None:
        h = engine.forward_hidden(ids)
    else:
        kv, P = prefix
        mask = _prefix_mask(ids.shape[1], P, device) if copy_prefix else None
        h = engine.forward_hidden(ids, kv_caches=kv, position_offset=P, attn_mask=mask)
    rows = _to_device([i for i, p in enumerate(positions) for _ in p], device)
    cols = _to_device([c for p in positions for c in p], device)
    logp = torch.log_softmax(engine.head(h[rows, cols]), dim=-1)
    return logp.gather(1, _to_device([[t] for ts in targets for t in ts], device))[:, 0].float()


def length_batches(lengths: list[int], batch_size: int, batch_tokens: int | None, max_padding: float = 0.2,
                   prefix: int = 0, kv_tokens: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` in ascending length, cut into batches of at most ``batch_size`` items. With
    ``batch_tokens``, a batch also stays within that many tokens padding included, and padding within
    ``max_padding`` of its real tokens; with ``kv_tokens``, items x (``prefix`` + longest) stays within it (the
    cached prefix is copied per item for attention). A single item that breaks a cap gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    real = 0
    for i in order:
        b, n = (out[-1], len(out[-1])) if out else (None, 0)
        full = b is None or n >= batch_size
        if not full and batch_tokens:
            padded = (n + 1) * lengths[i]
            full = padded > batch_tokens or padded > (1 + max_padding) * (real + lengths[i])
        if not full and kv_tokens:
            full = (n + 1) * (prefix + lengths[i]) > kv_tokens
        if full:
            out.append([i])
            real = lengths[i]
        else:
            b.append(i)
            real += lengths[i]
    return out


PREFIX_ATTENTION = ("split", "copy")
"""How suffix batches attend to a subject's cached prefix: ``split`` (the default), one attention of all the
batch's queries against the single prefix merged with the causal suffix attention by log-sum-exp
(model.prefix_suffix_attention, no copies); ``copy``, SDPA over per-question copies of the prefix's keys and
values. Full MMLU on an H200, each cold in a fresh process of the same call: split 52.3 s, copy 54.0 s end to end
(the copies had taken 2.2 s of GPU time; benchmarks/NOTES.md item 18)."""


def score_requests(engine, reqs: list[Request], device, batch_size: int, use_prefix_cache: bool,
                   batch_tokens: int | None = None, kv_tokens: int | None = None,
                   prefix_attention: str = PREFIX_ATTENTION[0]) -> list[list[float]]:
    """[A, B, C, D] log-likelihoods per request, in request order. A batch holds at most ``batch_size``
    questions and, when set, at most ``batch_tokens`` tokens padding included (suffixes after a cached prefix)
    and ``kv_tokens`` tokens of keys and values per layer (prefix + suffix, per question; ``copy`` only)."""
    return queue_scores(engine, reqs, device, batch_size, use_prefix_cache, batch_tokens, kv_tokens,
                        prefix_attention)()


@torch.no_grad()
def queue_scores(engine, reqs: list[Request], device, batch_size: int, use_prefix_cache: bool,
                 batch_tokens: int | None = None, kv_tokens: int | None = None,
                 prefix_attention: str = PREFIX_ATTENTION[0]):
    """``score_requests`` in two halves: this queues the one-pass questions' batches on the device without waiting
    for them and returns ``collect()``, which reads every score back at once. Between the two the host is free to
    prepare more work (evaluate_mmlu queues the next subject first), so the device does not idle meanwhile."""
    if prefix_attention not in PREFIX_ATTENTION:
        raise ValueError(f"prefix_attention {prefix_attention!r}: choose from {', '.join(PREFIX_ATTENTION)}")
    out: list[list[float] | None] = [None] * len(reqs)
    fast = [i for i, r in enumerate(reqs) if r.single_token]
    slow = [i for i, r in enumerate(reqs) if not r.single_token]
    groups: dict[tuple, list[int]] = {}
    for i in fast:  # same subject and shot count -> same prefix
        groups.setdefault((reqs[i].q.subject, reqs[i].shots), []).append(i)
    copy = prefix_attention == "copy"
    done, pending = [], []  # request indices and their scores, still on the device
    for idxs in groups.values():
        prefix, P = None, 0
        if use_prefix_cache and len(idxs) > 1 and getattr(engine, "supports_prefix_cache", False):
            shared = _common_prefix([reqs[i].context for i in idxs]) - 1  # keep >= 1 token in every suffix
            if shared > 0:  # (a left-truncated context can share nothing with the others)
                P = shared
                prefix = (engine.prefix_kv(_to_device([reqs[idxs[0]].context[:P]], device)), P)
        for batch in length_batches([len(reqs[i].context) - P for i in idxs], batch_size, batch_tokens,
                                    prefix=P, kv_tokens=kv_tokens if copy else None):
            chunk = [idxs[j] for j in batch]
            rows = chunk * 2 if len(chunk) == 1 and prefix else chunk  # a lone question goes twice: compiled
            seqs = [reqs[i].context[P:] for i in rows]  # blocks then keep one graph for every batch size
            flat = _score_sequences(engine, seqs, [[len(s) - 1] * 4 for s in seqs],
                                    [[c[0] for c in reqs[i].conts] for i in rows], device, prefix, copy)
            done += chunk
            pending.append(flat[:4 * len(chunk)])
    for i in slow:  # general path: each letter's context + continuation, summed over the continuation tokens
        r = reqs[i]
        seqs = [c + x for c, x in zip(r.contexts, r.conts)]
        pos = [list(range(len(c) - 1, len(c) + len(x) - 1)) for c, x in zip(r.contexts, r.conts)]
        flat = _score_sequences(engine, seqs, pos, r.conts, device)
        out[i] = [v.sum().item() for v in torch.split(flat, [len(p) for p in pos])]

    def collect() -> list[list[float]]:
        if pending:
            for i, v in zip(done, torch.cat(pending).view(-1, 4).tolist()):
                out[i] = v
        return out

    return collect


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


# -- the whole evaluation -----------------------------------------------------------------------------------------
DEFAULT_BATCH_GPU = 256
DEFAULT_BATCH_TOKENS = 16384
"""GPU batches: up to 256 questions, 16k tokens padding included, and padding within 20% of the real tokens
(length_batches). A fixed count of length-sorted questions pads each subject's long tail: at 128 questions a
batch 45% of MMLU's tokens would be padding; these caps keep it at 13% in 300 batches of ~3k tokens (the
shared-prefix cache keeps batches within one subject)."""
KV_COPY_BYTES = 2 << 30
"""Per layer, the batch's copies of the cached prefix keys and values stay within 2 GiB (131,072 tokens of
Llama-2-7B in bf16): at most ~3 GB transient, whatever the prefix length."""
BACKGROUND_TOKENIZE_MIN = 2000
"""Questions from which tokenising runs in worker processes, overlapped with scoring."""
COMPILED_EVAL_MIN = 6000
"""Questions from which evaluation runs the compiled graph (when the engine has one). Full MMLU cold on an H200,
each in a fresh process of one call: eager 68.2 s (4.5 ms a question), compiled 54.0 s (3.0 ms a question after
a first subject of 11.0 s, 1.8 s eager: ~9 s of compiling), so compiling pays from ~6,000 questions on
(benchmarks/NOTES.md item 18)."""
TOKENIZE_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 4))
"""On an H200 host (16 cores) 4 workers keep up with the GPU: full MMLU end to end 62.7 s vs scoring alone
59.6 s; 1 worker: 76.7 s (benchmarks/NOTES.md)."""

def check_mmlu_options(opts: dict, model_dir) -> list[Subject]:
    """Validate MMLU options (and read the questions) so a bad flag fails before any training."""
    if model_dir is None:
        raise ConfigError("MMLU needs the model's tokenizer: give --model-dir (or --no-mmlu)")
    if opts.get("shots", 5) < 0:
        raise ConfigError(f"--shots must be >= 0, got {opts['shots']}")
    if opts.get("limit") is not None and opts["limit"] <= 0:
        raise ConfigError(f"--limit must be positive, got {opts['limit']}")
    if opts.get("batch_size") is not None and opts["batch_size"] <= 0:
        raise ConfigError(f"--batch-size must be positive, got {opts['batch_size']}")
    subjects = opts.get("subjects")
    if isinstance(subjects, str):
        subjects = [s.strip() for s in subjects.split(",") if s.strip()]
    return load_mmlu(opts["dir"], subjects, opts.get("limit"))


def evaluate_mmlu(engine, model_dir, opts: dict, device, out_dir: Path | None,
                  progress: bool = True, subjects: list[Subject] | None = None) -> dict:
    """Run MMLU with ``opts`` (dir, subjects, shots, batch_size, limit[, prefix_cache, prefix_attention]); write
    mmlu_predictions.jsonl, mmlu.json and mmlu.md to ``out_dir``; return the summary. ``subjects``: the
    questions as ``check_mmlu_options`` already read them."""
    from tqdm.auto import tqdm

    if subjects is None:
        subjects = check_mmlu_options(opts, model_dir)
    shots = opts.get("shots", 5)
    max_len = engine.model_cfg.max_position_embeddings
    n = sum(len(s.test) for s in subjects)
    background = opts.get("tokenize_workers")
    if background is None:  # worker processes pay off once tokenising takes seconds
        background = TOKENIZE_WORKERS if n >= BACKGROUND_TOKENIZE_MIN else 0
    gpu = device.type == "cuda"
    caps = {"batch_size": opts.get("batch_size") or (DEFAULT_BATCH_GPU if gpu else 8),
            "batch_tokens": opts.get("batch_tokens", DEFAULT_BATCH_TOKENS if gpu else None),
            "kv_tokens": opts.get("kv_tokens", kv_token_cap(engine) if gpu else None)}  # copy only
    how = (opts.get("prefix_cache", True), opts.get("prefix_attention", PREFIX_ATTENTION[0]))
    reqs, scores = [], []
    timing = {"tokenize_wait_s": 0.0, "score_s": 0.0, "first_subject_s": None}
    chunks = subject_requests(model_dir, subjects, shots, max_len, background)
    model = getattr(engine, "model", None)
    graph_was = getattr(model, "eval_graph_enabled", None)
    if graph_was is not None and n < COMPILED_EVAL_MIN:
        model.eval_graph_enabled = False
    engine.eval()
    try:
        with tqdm(total=n, desc="mmlu", unit="q", disable=not progress, dynamic_ncols=True) as bar:
            previous = None  # (collect, count) of the subject queued last
            while True:
                t0 = time.perf_counter()
                chunk = next(chunks, None)
                t1 = time.perf_counter()
                timing["tokenize_wait_s"] += t1 - t0
                queued = None
                if chunk is not None:
                    reqs += chunk
                    queued = (_queue_backing_off(engine, chunk, device, caps, *how, bar), len(chunk))
                    if timing["first_subject_s"] is None:  # includes compiling the evaluation graph, if any
                        timing["first_subject_s"] = time.perf_counter() - t1
                if previous is not None:  # read back only now: the device already has the next subject's work
                    scores += previous[0]()
                    bar.update(previous[1])
                timing["score_s"] += time.perf_counter() - t1
                if queued is None:
                    break
                previous = queued
    finally:
        chunks.close()
        engine.train()
        if graph_was is not None:
            model.eval_graph_enabled = graph_was
    summary = summarize(reqs, scores, shots)
    summary["timing"] = timing
    if out_dir is not None:
        write_outputs(Path(out_dir), reqs, scores, summary)
    return summary


def kv_token_cap(engine) -> int:
    """Keys + values per layer that fit KV_COPY_BYTES in the engine's dtype (the cached prefix is copied per
    question of a batch)."""
    cfg = engine.model_cfg
    elem = next(engine.model.parameters()).element_size()
    return KV_COPY_BYTES // (2 * cfg.num_key_value_heads * cfg.head_dim * elem)


def _queue_backing_off(engine, chunk: list[Request], device, caps: dict, use_cache: bool, prefix_attention: str,
                       bar):
    """queue_scores with ``caps``; out of device memory, halve them (for the rest of the run) and retry."""
    while True:
        try:
            return queue_scores(engine, chunk, device, caps["batch_size"], use_cache,
                                batch_tokens=caps["batch_tokens"], kv_tokens=caps["kv_tokens"],
                                prefix_attention=prefix_attention)
        except torch.cuda.OutOfMemoryError:
            if caps["batch_size"] == 1:
                raise
            caps.update({k: max(1, v // 2) for k, v in caps.items() if v})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bar.write(f"mmlu: out of device memory; retrying {chunk[0].q.subject} with at most "
                      f"{caps['batch_size']} questions per batch (--mmlu-batch-size sets the start)")


def summarize(reqs: list[Request], scores: list[list[float]], shots: int) -> dict:
    per_subject: dict[str, list[int]] = {}
    for r, s in zip(reqs, scores):
        correct = int(max(range(4), key=lambda k: s[k]) == r.q.gold)
        per_subject.setdefault(r.q.subject, []).append(correct)
    cats: dict[str, list[int]] = {}
    for subj, c in per_subject.items():
        cats.setdefault(CATEGORY.get(subj, "unknown"), []).extend(c)
    n = sum(len(c) for c in per_subject.values())
    return {
        "acc": sum(sum(c) for c in per_subject.values()) / n if n else math.nan,
        "acc_macro": sum(sum(c) / len(c) for c in per_subject.values()) / len(per_subject) if per_subject else math.nan,
        "questions": n, "shots": shots,
        "shots_dropped": sum(r.shots < shots for r in reqs), "truncated": sum(r.truncated for r in reqs),
        "categories": {k: {"acc": sum(v) / len(v), "questions": len(v)} for k, v in sorted(cats.items())},
        "subjects": {k: {"acc": sum(v) / len(v), "questions": len(v), "category": CATEGORY.get(k, "unknown")}
                     for k, v in sorted(per_subject.items())},
    }


def write_outputs(out_dir: Path, reqs, scores, summary: dict):
    lines = [json.dumps({"subject": r.q.subject, "index": r.q.index, "gold": LETTERS[r.q.gold],
                         "pred": LETTERS[max(range(4), key=lambda k: s[k])], "logprobs": s})
             for r, s in zip(reqs, scores)]
    write_text_atomic(out_dir / "mmlu_predictions.jsonl", "\n".join(lines) + "\n")
    write_text_atomic(out_dir / "mmlu.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out_dir / "mmlu.md", render_mmlu(summary))


def render_mmlu(summary: dict) -> str:
    head = (f"# MMLU {summary['shots']}-shot\n\nmicro accuracy {summary['acc']:.4f} over {summary['questions']} "
            f"questions; macro over subjects {summary['acc_macro']:.4f}; shots dropped for "
            f"{summary['shots_dropped']} questions, left-truncated {summary['truncated']}\n\n")
    cats = markdown_table([{"category": k, "acc": f"{v['acc']:.4f}", "questions": v["questions"]}
                           for k, v in summary["categories"].items()])
    subs = markdown_table([{"subject": k, "category": v["category"], "acc": f"{v['acc']:.4f}",
                            "questions": v["questions"]} for k, v in summary["subjects"].items()])
    return head + cats + "\n\n" + subs + "\n"
