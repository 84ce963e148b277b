"""FlagPerf's samsum SFT data: prompt template, tokenisation, packing into fixed-length chunks, on-disk cache.

Each record becomes ``"Summarize this dialog:\\n{dialogue}\\n---\\nSummary:\\n{summary}"`` tokenised with BOS (as the
tokenizer config says) and EOS appended; all samples are concatenated in order and cut into ``seq_len`` chunks;
the incomplete tail is dropped (REFERENCE section 1). Labels are the inputs (the model shifts them). Samples
therefore share chunks and attend across their boundaries, exactly as the case trains.

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

PROMPT = "Summarize this dialog:\n{dialogue}\n---\nSummary:\n"
_CACHE_VERSION = "2"


def format_sample(rec: dict) -> str:
    return PROMPT.format(dialogue=rec["dialogue"]) + rec["summary"]


def pack(token_lists: list[list[int]], seq_len: int) -> np.ndarray:
    """Concatenate and cut into [n_chunks, seq_len] (int32); the remainder shorter than seq_len is dropped."""
    flat = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def training_text(rec: dict) -> str:
    """What a record trains on: its "text" (data/formats.py renders it), or samsum's prompt of a bare
    {dialogue, summary} record."""
    return rec["text"] if "text" in rec else format_sample(rec)


def tokenize_records(records: list[dict], tok: Tokenizer) -> list[list[int]]:
    """Each record's training text with BOS and EOS."""
    ids = tok.encode_batch([training_text(r) for r in records])
    return [tok.with_bos(x) + [tok.eos_id] for x in ids]


def response_start(rec: dict) -> int | None:
    """The character of training_text(rec) where its response begins (None: a record with no response)."""
    if "text" in rec:
        return rec.get("response_start")
    return len(PROMPT.format(dialogue=rec["dialogue"]))


def tokenize_with_mask(records: list[dict], tok: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """tokenize_records' ids, and beside each a label mask: 1 on the response's tokens (every token that holds a
    character of the response, so one that straddles the boundary is trained on) and on EOS, 0 on BOS and the
    prompt. A record without a response (plain text) is a DataError."""
    from .samsum import DataError

    texts = [training_text(r) for r in records]
    ids, masks = [], []
    for i, (rec, (tokens, ends)) in enumerate(zip(records, tok.encode_batch_ends(texts))):
        start = response_start(rec)
        if start is None:
            raise DataError(f"record {i + 1} has no response to train on (plain text); --loss-on response needs "
                            "prompt/response records (samsum, alpaca, or a --prompt-template whose last {column} "
                            "is the response)")
        bos = tok.with_bos([])
        ids.append(bos + tokens + [tok.eos_id])
        masks.append([0] * len(bos) + [int(e > start) for e in ends] + [1])
    return ids, masks


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORABENCH_CACHE", Path.home() / ".cache" / "lorabench"))


def cache_key(records: list[dict], tok: Tokenizer, seq_len: int, loss_on: str = "all") -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION}|{PROMPT}|{tok.fingerprint}|{seq_len}|".encode())
    if loss_on != "all":
        h.update(f"loss_on={loss_on}|".encode())
    for r in records:
        h.update(training_text(r).encode() + b"\x01")
        if loss_on != "all":
            h.update(f"{response_start(r)}\x01".encode())
    return h.hexdigest()[:24]


def packed_dataset(records: list[dict], tok: Tokenizer, seq_len: int, cache_dir: Path | None = None,
                   loss_on: str = "all") -> tuple[np.ndarray, bool]:
    """The packed chunks for ``records`` [N, seq_len] and whether they came from the cache; with ``loss_on``
    "response", [N, 2, seq_len]: each chunk's ids and its label mask (tokenize_with_mask), packed alike. Each entry
    carries the SHA-256 of
    its array beside it (``<key>.sha256``); an entry that does not load or does not match (a truncated file, a
    zero-byte file, other tokens) is rebuilt with a one-line note naming it."""
    import sys

    from .samsum import DataError

    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DataError(f"the data cache {cache_dir} is a file, not a folder; point --cache-dir (or "
                        "$LORABENCH_CACHE) at a folder")
    path = cache_dir / "packed" / f"{cache_key(records, tok, seq_len, loss_on)}.npy"
    ndim = 2 if loss_on == "all" else 3
    digest_path = path.with_suffix(".sha256")
    if path.is_file():
        why = None
        try:
            arr = np.load(path)
            if not digest_path.is_file():
                why = "no checksum beside it"
            elif _digest(arr) != digest_path.read_text().strip():
                why = "its tokens do not match their checksum"
            elif arr.ndim != ndim or arr.shape[-1] != seq_len:
                why = f"shape {arr.shape}, expected [N, {'2, ' if ndim == 3 else ''}{seq_len}]"
        except (OSError, ValueError, EOFError) as e:
            why = f"unreadable ({type(e).__name__})"
        if why is None:
            return arr, True
        print(f"lorabench: note: data cache entry {path}: {why}; rebuilding it", file=sys.stderr)
    if loss_on == "all":
        arr = pack(tokenize_records(records, tok), seq_len)
    else:
        ids, masks = tokenize_with_mask(records, tok)
        arr = np.stack([pack(ids, seq_len), pack(masks, seq_len)], axis=1)
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
