"""FlagPerf's samsum SFT data: prompt template, tokenisation, packing into fixed-length chunks, on-disk cache.

Each record becomes ``"Summarize this dialog:\\n{dialogue}\\n---\\nSummary:\\n{summary}"`` tokenised with BOS (as the
tokenizer config says) and EOS appended; all samples are concatenated in order and cut into ``seq_len`` chunks;
the incomplete tail is dropped (FlagPerf's dataset code under training/benchmarks/llama2_7b_finetune/pytorch).
Labels are the inputs (the model shifts them). Samples therefore share chunks and attend across their boundaries, exactly as the case trains.

The packed array is cached as ``<cache>/<key>.npy`` with key = hash(tokenizer files, records content, seq_len,
template), so a second run with the same data skips tokenisation.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .tokenizer import Tokenizer

from .formats import PROMPT
_CACHE_VERSION = "2"


def format_sample(rec: dict) -> str:
    return PROMPT.format(dialogue=rec["dialogue"]) + rec["summary"]


def pack(token_lists: list[list[int]], seq_len: int) -> np.ndarray:
    """Concatenate and cut into [n_chunks, seq_len] (int32); the remainder shorter than seq_len is dropped."""
    flat = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def pack_documents(token_lists: list[list[int]], mask_lists: list[list[int]] | None, seq_len: int) -> np.ndarray:
    """``--packing documents``: the stream cut as ``pack`` cuts it, into [n_chunks, 3, seq_len] (int32): the ids,
    the label mask (``mask_lists``, or every token) and each token's position within its document's part of the
    chunk: positions restart at every document's first token and at every chunk's first token (a document cut by
    a chunk boundary goes on as a part of its own), and a position-0 token is never a target (nothing before it
    is in view)."""
    ids = pack(token_lists, seq_len)
    n = ids.shape[0] * seq_len
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    starts = np.zeros(n, dtype=np.int64)  # the index where each token's document starts in the stream
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    starts[doc_starts[doc_starts < n]] = doc_starts[doc_starts < n]
    starts = np.maximum.accumulate(starts)
    g = np.arange(n)
    pos = g - np.maximum(starts, (g // seq_len) * seq_len)
    mask = np.ones(n, dtype=np.int32) if mask_lists is None else \
        np.fromiter((m for ms in mask_lists for m in ms), dtype=np.int32)[:n]
    mask = mask * (pos > 0)
    return np.stack([ids, mask.reshape(-1, seq_len), pos.reshape(-1, seq_len).astype(np.int32)], axis=1)


def pack_rows(token_lists: list[list[int]], mask_lists: list[list[int]] | None, seq_len: int,
              pad_id: int = 0) -> np.ndarray:
    """``--packing none``: one record a row, [n_rows, 3, seq_len] (int32): ids, label mask, positions. A record
    longer than ``seq_len`` takes several rows, each a part of its own (positions from 0, its first token no
    target); the rest of a row is padding: id ``pad_id``, mask 0, position -1 (the training loop cuts each batch to
    its longest row and never counts padding)."""
    rows = []
    for k, ids in enumerate(token_lists):
        mask = [1] * len(ids) if mask_lists is None else mask_lists[k]
        for a in range(0, len(ids), seq_len):
            part = ids[a:a + seq_len]
            row = np.full((3, seq_len), [[pad_id], [0], [-1]], dtype=np.int32)
            row[0, :len(part)] = part
            row[1, :len(part)] = mask[a:a + seq_len]
            row[1, 0] = 0
            row[2, :len(part)] = np.arange(len(part))
            rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, 3, seq_len), dtype=np.int32)


def training_text(rec: dict) -> str:
    """What a record trains on: its "text" (data/formats.py renders it), or samsum's prompt of a bare
    {dialogue, summary} record."""
    return rec["text"] if "text" in rec else format_sample(rec)


def framing(rec: dict, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens around a record's text: BOS (as the tokenizer config says) and EOS, or none for a chat
    template's text, which carries its own."""
    return ([], []) if rec.get("templated") else (tok.with_bos([]), [tok.eos_id])


def tokenize_records(records: list[dict], tok: Tokenizer) -> list[list[int]]:
    """Each record's training text within its framing (BOS and EOS, or a chat template's own)."""
    out = []
    for r, x in zip(records, tok.encode_batch([training_text(r) for r in records])):
        head, tail = framing(r, tok)
        out.append(head + x + tail)
    return out


def response_spans(rec: dict) -> list[tuple[int, int]] | None:
    """The [start, end) characters of training_text(rec) that are its response (None: a record with none): from
    the response's start to the end for prompt/response records, the assistant turns for chat records."""
    if rec.get("templated"):
        return rec.get("response_spans")
    if "text" in rec:
        start = rec.get("response_start")
        return None if start is None else [(start, len(rec["text"]))]
    return [(len(PROMPT.format(dialogue=rec["dialogue"])), len(format_sample(rec)))]


def tokenize_with_mask(records: list[dict], tok: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """tokenize_records' ids, and beside each a label mask: 1 on the response's tokens (every token that holds a
    character of a response span, so one that straddles a boundary is trained on) and on the EOS added after a
    response, 0 on BOS and the prompt. A record without a response (plain text, or a chat template that does not
    render turn by turn) is a DataError."""
    from ..errors import DataError

    texts = [training_text(r) for r in records]
    ids, masks = [], []
    for i, (rec, (tokens, offsets)) in enumerate(zip(records, tok.encode_batch_offsets(texts))):
        spans = response_spans(rec)
        if spans is None:
            why = ("its chat template does not render turn by turn (an earlier turn changes with what follows)"
                   if rec.get("templated") else "it is plain text")
            raise DataError(f"record {i + 1} has no response to train on ({why}); --loss-on response needs "
                            "prompt/response records (samsum, alpaca, chat, or a --prompt-template whose last "
                            "{column} is the response)")
        head, tail = framing(rec, tok)
        ids.append(head + tokens + tail)
        masks.append([0] * len(head) + [int(any(b > s and a < e for s, e in spans)) for a, b in offsets]
                     + [1] * len(tail))
    return ids, masks


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORABENCH_CACHE", Path.home() / ".cache" / "lorabench"))


def cache_key(records: list[dict], tok: Tokenizer, seq_len: int, loss_on: str = "all",
              packing: str = "flagperf") -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION}|{PROMPT}|{tok.fingerprint}|{seq_len}|".encode())
    if loss_on != "all" or packing != "flagperf":
        h.update(f"loss_on={loss_on}|packing={packing}|".encode())
    for r in records:
        h.update(training_text(r).encode() + (b"\x02" if r.get("templated") else b"\x01"))
        if loss_on != "all":
            h.update(f"{response_spans(r)}\x01".encode())
    return h.hexdigest()[:24]


def packed_dataset(records: list[dict], tok: Tokenizer, seq_len: int, cache_dir: Path | None = None,
                   loss_on: str = "all", packing: str = "flagperf") -> tuple[np.ndarray, bool]:
    """The packed chunks for ``records`` [N, seq_len] and whether they came from the cache; with ``loss_on``
    "response", [N, 2, seq_len]: each chunk's ids and its label mask (tokenize_with_mask), packed alike; with
    ``packing`` "documents" or "none", [N, 3, seq_len]: ids, label mask and positions (pack_documents, pack_rows).
    Each entry carries the SHA-256 of its array beside it (``<key>.sha256``); an entry that does not load or does not match (a truncated file, a
    zero-byte file, other tokens) is rebuilt with a one-line note naming it."""
    import sys

    from ..errors import DataError

    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DataError(f"the data cache {cache_dir} is a file, not a folder; point --cache-dir (or "
                        "$LORABENCH_CACHE) at a folder")
    path = cache_dir / "packed" / f"{cache_key(records, tok, seq_len, loss_on, packing)}.npy"
    channels = 3 if packing != "flagperf" else 2 if loss_on != "all" else 1
    want = (seq_len,) if channels == 1 else (channels, seq_len)
    digest_path = path.with_suffix(".sha256")
    if path.is_file():
        why = None
        try:
            arr = np.load(path)
            if not digest_path.is_file():
                why = "no checksum beside it"
            elif _digest(arr) != digest_path.read_text().strip():
                why = "its tokens do not match their checksum"
            elif arr.shape[1:] != want:
                why = f"shape {arr.shape}, expected [N, {', '.join(map(str, want))}]"
        except (OSError, ValueError, EOFError) as e:
            why = f"unreadable ({type(e).__name__})"
        if why is None:
            return arr, True
        print(f"lorabench: note: data cache entry {path}: {why}; rebuilding it", file=sys.stderr)
    ids, masks = (tokenize_records(records, tok), None) if loss_on == "all" else tokenize_with_mask(records, tok)
    if packing == "documents":
        arr = pack_documents(ids, masks, seq_len)
    elif packing == "none":
        arr = pack_rows(ids, masks, seq_len, pad_id=tok.eos_id)
    else:
        arr = pack(ids, seq_len) if masks is None else np.stack([pack(ids, seq_len), pack(masks, seq_len)], axis=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        digest_path.write_text(_digest(arr) + "\n")  # before the entry it vouches for appears
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"the data cache {cache_dir} is not writable ({e.strerror}); point --cache-dir (or "
                        "$LORABENCH_CACHE) at a writable folder") from None
    return arr, False


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
