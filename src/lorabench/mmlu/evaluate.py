"""MMLU k-shot evaluation as lm-evaluation-harness scores it (its mmlu task; hendrycks/test): the typed options, the
whole evaluation loop and its outputs (mmlu.json, mmlu.md, mmlu_predictions.jsonl).

The questions and prompts come from data.py, the scores from scoring.py. Speed: worker processes tokenise the next
subjects while the GPU scores, and the host queues each subject's batches before it reads the previous subject's
scores back, so the device does not wait for the host between subjects; the blocks run eagerly unless
``compiled_graph`` asks for the compiled one (one shape-generic graph; the default for all of MMLU on a GPU).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import ConfigError
from ..files import write_text_atomic
from ..report import markdown_table
from .data import CATEGORY, LETTERS, Request, Subject, load_mmlu, subject_requests
from .scoring import PREFIX_ATTENTION, queue_scores

DEFAULT_BATCH_GPU = 256
DEFAULT_BATCH_CPU = 8
DEFAULT_BATCH_TOKENS = 16384
"""GPU batches: up to 256 questions, 16k tokens padding included, and padding within 20% of the real tokens
(scoring.length_batches). A fixed count of length-sorted questions pads each subject's long tail: at 128 questions
a batch 45% of MMLU's tokens would be padding; these caps keep it at 13% in 300 batches of ~3k tokens (the
shared-prefix cache keeps batches within one subject)."""
KV_COPY_BYTES = 2 << 30
"""Per layer, the batch's copies of the cached prefix keys and values stay within 2 GiB (131,072 tokens of
Llama-2-7B in bf16): at most ~3 GB transient, whatever the prefix length."""
BACKGROUND_TOKENIZE_MIN = 2000
"""Questions from which tokenising runs in worker processes, overlapped with scoring."""
TOKENIZE_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 4))
"""Tokenising workers: four keep up with a fast GPU where the host has the cores (benchmarks/NOTES.md item 18)."""


PROTOCOLS = ("lm-eval", "flagperf", "both")
COMPILED_GRAPH_MIN = 10_000
"""Questions from which a GPU scores lm-eval's protocol (alone or with FlagPerf's) through the compiled evaluation
graph by default. All of MMLU (14,042) on one H100, side by side: eager 80.9 s, the graph 72.7 s with its cold
compile (~24 s: the first subject's time, benchmarks/NOTES.md items 98, 108), so the graph pays from ~10,500
questions on. FlagPerf's protocol alone stays eager: there the graph scored no faster even compiled (item 100)."""


@dataclass(frozen=True)
class MmluOptions:
    """One MMLU evaluation. None: the default for the device and the amount of work, which ``resolve`` fills in
    (runner.resolve does, once per job)."""

    dir: str
    """MMLU folder (dev/ + test/ CSVs, or the cais/mmlu parquet layout) or an HF dataset name."""
    subjects: tuple[str, ...] | None = None
    """Subjects to evaluate (None: all found)."""
    shots: int = 5
    """Few-shot examples per question (the subject's first dev rows)."""
    limit: int | None = None
    """At most this many test questions per subject."""
    batch_size: int | None = None
    """At most this many questions per forward pass (None: DEFAULT_BATCH_GPU on a GPU, DEFAULT_BATCH_CPU else)."""
    batch_tokens: int | None = None
    """At most this many tokens per forward pass, padding included (None: DEFAULT_BATCH_TOKENS on a GPU, no cap
    on a CPU; 0: no cap)."""
    kv_tokens: int | None = None
    """With prefix_attention 'copy': per layer, the batch's copies of the cached prefix stay within this many
    keys + values (None: KV_COPY_BYTES' worth on a GPU, no cap on a CPU; 0: no cap)."""
    prefix_cache: bool = True
    """Run each subject's shared prompt prefix once and reuse its keys and values (engines that support it)."""
    prefix_attention: str = PREFIX_ATTENTION[0]
    """How questions attend to the cached prefix: scoring.PREFIX_ATTENTION."""
    tokenize_workers: int | None = None
    """Worker processes that tokenise while the device scores (None: TOKENIZE_WORKERS from
    BACKGROUND_TOKENIZE_MIN questions, else 0 = tokenise inline)."""
    compiled_graph: bool | None = None
    """Score with the compiled blocks' evaluation graph where the engine has one (None: on a GPU for lm-eval's
    protocol from COMPILED_GRAPH_MIN questions on, else eager: compiling costs ~24 s cold)."""
    protocol: str = "lm-eval"
    """How questions are asked and scored: lm-eval (lm-evaluation-harness: the four letters' log-likelihoods),
    flagperf (FlagPerf's prompt, length rule and whole-vocabulary argmax: flagperf.py) or both."""
    seq_len: int | None = None
    """FlagPerf's length rule cap (None: the run's --seq-len; for eval, 512 as in the case)."""

    def __post_init__(self):
        if self.shots < 0:
            raise ConfigError(f"--shots must be >= 0, got {self.shots}")
        for flag, v in (("--limit", self.limit), ("--mmlu-batch-size", self.batch_size)):
            if v is not None and v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        for flag, v in (("--mmlu-batch-tokens", self.batch_tokens), ("--mmlu-kv-tokens", self.kv_tokens),
                        ("--tokenize-workers", self.tokenize_workers)):
            if v is not None and v < 0:
                raise ConfigError(f"{flag} must be >= 0, got {v}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"--mmlu-protocol {self.protocol!r}: choose from {', '.join(PROTOCOLS)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2 for MMLU, got {self.seq_len}")
        if self.prefix_attention not in PREFIX_ATTENTION:
            raise ConfigError(f"--prefix-attention {self.prefix_attention!r}: choose from "
                              f"{', '.join(PREFIX_ATTENTION)}")

    @property
    def resolved(self) -> bool:
        return None not in (self.batch_size, self.batch_tokens, self.kv_tokens, self.tokenize_workers,
                            self.compiled_graph)

    def resolve(self, gpu: bool, questions: int, kv_tokens: int) -> "MmluOptions":
        """These options with every default filled in for a GPU or not (``gpu``), the number of test
        ``questions`` and ``kv_tokens`` (kv_token_cap for the model and dtype); a cap of 0 is none."""
        def cap(value, default):
            return value if value is not None else default

        return replace(self, batch_size=self.batch_size or (DEFAULT_BATCH_GPU if gpu else DEFAULT_BATCH_CPU),
                       batch_tokens=cap(self.batch_tokens, DEFAULT_BATCH_TOKENS if gpu else 0),
                       kv_tokens=cap(self.kv_tokens, kv_tokens if gpu else 0),
                       tokenize_workers=cap(self.tokenize_workers,
                                            TOKENIZE_WORKERS if questions >= BACKGROUND_TOKENIZE_MIN else 0),
                       compiled_graph=cap(self.compiled_graph, gpu and self.protocol != "flagperf"
                                          and questions >= COMPILED_GRAPH_MIN))


def check_mmlu_options(opts: MmluOptions, model_dir) -> list[Subject]:
    """Read the questions ``opts`` asks for, so a bad folder or subject fails before any training."""
    if model_dir is None:
        raise ConfigError("MMLU needs the model's tokenizer: give --model-dir (or --no-mmlu)")
    if opts.shots < 0:
        raise ConfigError(f"--shots must be 0 or more, got {opts.shots}")
    subjects = load_mmlu(opts.dir, list(opts.subjects) if opts.subjects else None, opts.limit)
    short = [s for s in subjects if len(s.dev) < opts.shots]
    if short:  # the report would say k-shot where fewer shots exist
        s = min(short, key=lambda s: len(s.dev))
        more = f" and {len(short) - 1} more subjects with fewer than {opts.shots}" if len(short) > 1 else ""
        raise ConfigError(f"--shots {opts.shots}: {opts.dir} has {len(s.dev)} dev questions for {s.name}{more}; "
                          f"give --shots {len(s.dev)} or less")
    return subjects


def evaluate_mmlu(engine, model_dir, opts: MmluOptions, device, out_dir: Path | None,
                  progress: bool = True, subjects: list[Subject] | None = None) -> dict:
    """Run MMLU as ``opts`` says; write mmlu_predictions.jsonl, mmlu.json and mmlu.md to ``out_dir``; return the
    summary. ``subjects``: the questions as ``check_mmlu_options`` already read them."""
    from ..progress import progress as progress_bar

    if subjects is None:
        subjects = check_mmlu_options(opts, model_dir)
    max_len = engine.model_cfg.context_limit  # a sliding window caps it: longer prompts drop shots, then truncate
    n = sum(len(s.test) for s in subjects)
    opts = resolved(opts, engine, device, n)
    caps = {"batch_size": opts.batch_size, "batch_tokens": opts.batch_tokens or None,
            "kv_tokens": opts.kv_tokens or None}
    how = (opts.prefix_cache, opts.prefix_attention)
    reqs, scores = [], []
    timing = {"tokenize_wait_s": 0.0, "score_s": 0.0, "first_subject_s": None}
    chunks = subject_requests(model_dir, subjects, opts.shots, max_len, opts.tokenize_workers)
    try:
        with engine.evaluating(opts.compiled_graph), progress_bar(n, progress, desc="mmlu", unit="question") as bar:
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
    summary = summarize(reqs, scores, opts.shots)
    summary["timing"] = timing
    if out_dir is not None:
        write_outputs(Path(out_dir), reqs, scores, summary)
    return summary


def evaluate_protocols(engine, model_dir, opts: MmluOptions, device, out_dir: Path | None, progress: bool = True,
                       subjects: list[Subject] | None = None, seq_len: int = 512,
                       overlap: bool | None = None) -> dict:
    """Every protocol ``opts`` asks for: {"lm-eval": summary, "flagperf": summary} (those that ran).
    ``seq_len``: FlagPerf's cap where opts.seq_len is unset (the run's sequence length). ``overlap``: with both
    protocols, make FlagPerf's prompts in a thread while lm-eval's are scored (None: on a GPU, where the host is
    otherwise idle)."""
    from concurrent.futures import ThreadPoolExecutor

    from .flagperf import evaluate_flagperf, flagperf_requests

    if subjects is None:
        subjects = check_mmlu_options(opts, model_dir)
    opts = resolved(opts, engine, device, sum(len(s.test) for s in subjects))
    cap = opts.seq_len or seq_len
    if opts.protocol in ("flagperf", "both") and cap > engine.model_cfg.context_limit:
        raise ConfigError(f"--seq-len {cap} exceeds the model's sliding_window {engine.model_cfg.sliding_window} "
                          "(attention here has no window); give a shorter --seq-len for FlagPerf's MMLU")
    out, pool, prepared = {}, None, None
    if opts.protocol == "both" and (device.type == "cuda" if overlap is None else overlap):
        pool = ThreadPoolExecutor(1)  # (the tokenizer's own threads do the work, outside the GIL)
        prepared = pool.submit(flagperf_requests, model_dir, subjects, opts.shots, cap)
    try:
        if opts.protocol in ("lm-eval", "both"):
            t0 = time.perf_counter()
            out["lm-eval"] = evaluate_mmlu(engine, model_dir, opts, device, out_dir, progress, subjects)
            out["lm-eval"]["eval_s"] = time.perf_counter() - t0  # (the scores were read back: the device is done)
        if opts.protocol in ("flagperf", "both"):
            t0 = time.perf_counter()
            out["flagperf"] = evaluate_flagperf(engine, model_dir, subjects, opts.shots, cap, device, out_dir,
                                                batch_size=opts.batch_size, batch_tokens=opts.batch_tokens or None,
                                                reqs=prepared.result() if prepared else None,
                                                prefix_cache=opts.prefix_cache,
                                                prefix_attention=opts.prefix_attention,
                                                kv_tokens=opts.kv_tokens or None,
                                                compiled_graph=opts.compiled_graph)
            out["flagperf"]["eval_s"] = time.perf_counter() - t0  # (its prompts' making overlapped on a GPU)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def resolved(opts: MmluOptions, engine, device, questions: int) -> MmluOptions:
    """``opts`` as the job resolved them, else resolved here (a caller that evaluates without a job)."""
    if opts.resolved:
        return opts
    return opts.resolve(device.type == "cuda", questions, kv_token_cap(engine.model_cfg, engine.dtype))


def kv_token_cap(cfg, dtype: torch.dtype) -> int:
    """Keys + values per layer that fit KV_COPY_BYTES in ``dtype`` for model ``cfg`` (the cached prefix is copied
    per question of a batch)."""
    elem = torch.empty((), dtype=dtype).element_size()
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
