"""MMLU by FlagPerf's rules (its dataset/dataloader_mmlu.py and evaluate/evaluator.py under
training/benchmarks/llama2_7b_finetune/pytorch), so a lab running lorabench beside FlagPerf gets FlagPerf's accuracy
figure the way FlagPerf got it.

- Prompt: "The following are multiple choice questions (with answers) about" + " " + each word of the subject
  preceded by a space (two spaces after "about") + ".\\n\\n", then each of the first k dev rows as read (not
  stripped) + "\\nA. ..\\nD. .." + "\\nAnswer:" + " X\\n\\n", then the test question ending "\\nAnswer:".
- Length rule: while len(tokenize(prompt)) + 1 > seq_length: split on "\\n\\n", drop element 1, rejoin (the first
  remaining shot goes; with no shot left the question's own paragraphs go). Where one element is left and it is
  still too long, FlagPerf's loop would fail; here the prompt's tokens are cut from the left to fit (counted as
  ``cut``).
- Score: argmax over the whole vocabulary at the last position; correct iff it equals the second id of the letter
  tokenised alone with BOS (``tokenizer([letter]).input_ids[0][1]``, "▁A" = 319 for Llama); accuracy rounded to 3
  decimals as FlagPerf prints it (the exact value beside it).
- Unlike FlagPerf, the model is in eval mode (FlagPerf leaves LoRA dropout on during MMLU, which only adds noise).

Questions are scored with the lm-eval path's machinery (scoring.py): the prompts of one subject that kept the
same shots share their header and shots, so that token prefix runs once and its keys and values serve every
question's remaining tokens; the remainders go in length-sorted batches with right padding, and only each row's
last position goes through lm_head. In fp32 this gives, question by question, what one prompt per forward pass
gives (tests/test_mmlu_flagperf.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.tokenizer import Tokenizer
from ..files import write_text_atomic
from .data import CATEGORY, LETTERS, Question, Subject
from .scoring import PREFIX_ATTENTION, forward_padded, length_batches, shared_prefix, to_device


def description(subject: str) -> str:
    """FlagPerf's header: "about" and a space, then each word of the subject with a space before it."""
    return "The following are multiple choice questions (with answers) about " + "".join(
        " " + w for w in subject.split("_")) + ".\n\n"


def format_example(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, q.choices)) + "\nAnswer:"
    return text + (f" {LETTERS[q.gold]}\n\n" if with_answer else "")


def build_prompt(subject: Subject, q: Question, shots: int) -> str:
    return description(subject.name) + "".join(format_example(s, True) for s in subject.dev[:shots]) + \
        format_example(q, False)


@dataclass
class FlagperfRequest:
    q: Question
    ids: list[int]
    """The prompt's tokens as FlagPerf feeds them (BOS first where the tokenizer adds one)."""
    shots: int
    """Shots left after the length rule."""
    dropped: int
    """Paragraphs the length rule dropped (shots first, then the question's own)."""
    question_cut: bool = False
    """The length rule went past the shots into the question's own paragraphs, or, still too long with one
    paragraph left, the prompt was cut from the left to fit."""


def make_requests(tok: Tokenizer, items: list[tuple[Subject, Question]], shots: int,
                  seq_len: int) -> list[FlagperfRequest]:
    """Each (subject, question)'s prompt by FlagPerf's length rule: while the prompt and BOS exceed ``seq_len``
    tokens, drop its paragraph 1 (split on "\\n\\n"). Every round encodes all the prompts still too long in one
    batch (the tokenizer's threads), the same encodings one prompt at a time would make. Where one paragraph is
    left and it is still too long, FlagPerf's loop would fail: the tokens are cut from the left to fit."""
    prompts = [build_prompt(s, q, min(shots, len(s.dev))) for s, q in items]
    dropped = [0] * len(prompts)
    ids = tok.encode_batch(prompts) if prompts else []
    todo = [i for i, x in enumerate(ids) if len(x) + 1 > seq_len]
    while todo:
        more = []
        for i in todo:
            parts = prompts[i].split("\n\n")
            if len(parts) >= 2:
                parts.pop(1)
                prompts[i], dropped[i] = "\n\n".join(parts), dropped[i] + 1
                more.append(i)
        for i, x in zip(more, tok.encode_batch([prompts[i] for i in more]) if more else []):
            ids[i] = x
        todo = [i for i in more if len(ids[i]) + 1 > seq_len]
    out = []
    for (s, q), x, d in zip(items, ids, dropped):
        x = tok.with_bos(x)
        cut = len(x) > seq_len
        if cut:
            x = x[len(x) - seq_len:]
        k = min(shots, len(s.dev))
        out.append(FlagperfRequest(q, x, max(0, k - d), d, cut or d > k))
    return out


def make_request(tok: Tokenizer, subject: Subject, q: Question, shots: int, seq_len: int) -> FlagperfRequest:
    return make_requests(tok, [(subject, q)], shots, seq_len)[0]


def letter_ids(tok: Tokenizer) -> list[int]:
    """FlagPerf's gold token of each letter: ``tokenizer([letter]).input_ids[0][1]``."""
    out = []
    for letter in LETTERS:
        ids = tok.with_bos(tok.encode(letter))
        if len(ids) < 2:
            raise ConfigError(f"the tokenizer gives {letter!r} as {ids}: FlagPerf's MMLU score takes the second id of "
                              "the letter tokenised with BOS; use --mmlu-protocol lm-eval for this tokenizer")
        out.append(ids[1])
    return out


@torch.no_grad()
def predict(engine, reqs: list[FlagperfRequest], device, batch_size: int, batch_tokens: int | None = None,
            prefix_cache: bool = True, prefix_attention: str = PREFIX_ATTENTION[0],
            kv_tokens: int | None = None) -> list[int]:
    """The argmax token at each prompt's last position, in request order. The prompts of one subject with the same
    shots left run their shared token prefix once (``prefix_cache``, where the engine can; ``prefix_attention``
    and ``kv_tokens`` as the lm-eval path takes them), the rest in length-sorted batches."""
    out: list[int | None] = [None] * len(reqs)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):  # same subject, same shots kept -> the same header and shots
        groups.setdefault((r.q.subject, r.shots) if prefix_cache else (), []).append(i)
    copy = prefix_attention == "copy"
    pending = []
    for idxs in groups.values():
        prefix = None
        if prefix_cache and len(idxs) > 1 and getattr(engine, "supports_prefix_cache", False):
            prefix = shared_prefix(engine, [reqs[i].ids for i in idxs], device)
        P = prefix[1] if prefix else 0
        for batch in length_batches([len(reqs[i].ids) - P for i in idxs], batch_size, batch_tokens, prefix=P,
                                    kv_tokens=kv_tokens if copy and prefix else None):
            chunk = [idxs[j] for j in batch]
            seqs = [reqs[i].ids[P:] for i in chunk]
            h = forward_padded(engine, seqs, device, prefix, copy)
            last = h[to_device(list(range(len(seqs))), device), to_device([len(s) - 1 for s in seqs], device)]
            pending.append((chunk, engine.head(last).argmax(-1)))
    for chunk, pred in pending:  # read back once the device has every batch
        for i, p in zip(chunk, pred.tolist()):
            out[i] = p
    return out


def flagperf_requests(model_dir, subjects: list[Subject], shots: int, seq_len: int) -> list[FlagperfRequest]:
    """Every test question of ``subjects`` as FlagPerf prompts it (make_requests), in order."""
    return make_requests(Tokenizer(model_dir), [(s, q) for s in subjects for q in s.test], shots, seq_len)


def evaluate_flagperf(engine, model_dir, subjects: list[Subject], shots: int, seq_len: int, device,
                      out_dir: Path | None, batch_size: int, batch_tokens: int | None = None,
                      reqs: list[FlagperfRequest] | None = None, compiled_graph: bool = False, **prefix) -> dict:
    """MMLU by FlagPerf's rules over ``subjects``; writes mmlu_flagperf.json and mmlu_flagperf_predictions.jsonl
    (subject, index, pred_token_id, gold_token_id, correct, shots per question) to ``out_dir``. ``reqs``: the
    questions' requests where already made (flagperf_requests); ``compiled_graph``: score with the engine's
    compiled evaluation graph where it has one (MmluOptions.compiled_graph); ``prefix``: predict's prefix_cache,
    prefix_attention and kv_tokens."""
    tok = Tokenizer(model_dir)
    gold_ids = letter_ids(tok)
    if reqs is None:
        reqs = flagperf_requests(model_dir, subjects, shots, seq_len)
    with engine.evaluating(compiled_graph):
        preds = predict(engine, reqs, device, batch_size, batch_tokens, **prefix)
    correct = [int(p == gold_ids[r.q.gold]) for r, p in zip(reqs, preds)]
    summary = summarize(reqs, correct, shots, seq_len)
    if out_dir is not None:
        lines = [json.dumps({"subject": r.q.subject, "index": r.q.index, "pred_token_id": p,
                             "gold_token_id": gold_ids[r.q.gold], "correct": bool(c), "shots": r.shots})
                 for r, p, c in zip(reqs, preds, correct)]
        write_text_atomic(Path(out_dir) / "mmlu_flagperf_predictions.jsonl", "\n".join(lines) + "\n")
        write_text_atomic(Path(out_dir) / "mmlu_flagperf.json", json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(reqs: list[FlagperfRequest], correct: list[int], shots: int, seq_len: int) -> dict:
    per_subject: dict[str, list[int]] = {}
    for r, c in zip(reqs, correct):
        per_subject.setdefault(r.q.subject, []).append(c)
    cats: dict[str, list[int]] = {}
    for subj, c in per_subject.items():
        cats.setdefault(CATEGORY.get(subj, "unknown"), []).extend(c)
    n = len(correct)
    exact = sum(correct) / n if n else math.nan
    return {
        "protocol": "flagperf", "acc": round(exact, 3) if n else math.nan, "acc_exact": exact, "questions": n,
        "shots": shots, "seq_len": seq_len, "shots_dropped": sum(r.shots < shots for r in reqs),
        "question_cut": sum(r.question_cut for r in reqs),
        "categories": {k: {"acc": sum(v) / len(v), "questions": len(v)} for k, v in sorted(cats.items())},
        "subjects": {k: {"acc": sum(v) / len(v), "questions": len(v)} for k, v in sorted(per_subject.items())},
    }
