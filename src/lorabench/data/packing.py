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


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORABENCH_CACHE", Path.home() / ".cache" / "lorabench"))


def cache_key(records: list[dict], tok: Tokenizer, seq_len: int) -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION}|{PROMPT}|{tok.fingerprint}|{seq_len}|".encode())
    for r in records:
        h.update(training_text(r).encode() + b"\x01")
    return h.hexdigest()[:24]


def packed_dataset(records: list[dict], tok: Tokenizer, seq_len: int, cache_dir: Path | None = None,
                   ) -> tuple[np.ndarray, bool]:
    """The packed chunks for ``records`` and whether they came from the cache. Each entry carries the SHA-256 of
    its array beside it (``<key>.sha256``); an entry that does not load or does not match (a truncated file, a
    zero-byte file, other tokens) is rebuilt with a one-line note naming it."""
    import sys

    from .samsum import DataError

    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DataError(f"the data cache {cache_dir} is a file, not a folder; point --cache-dir (or "
                        "$LORABENCH_CACHE) at a folder")
    path = cache_dir / "packed" / f"{cache_key(records, tok, seq_len)}.npy"
    digest_path = path.with_suffix(".sha256")
    if path.is_file():
        why = None
        try:
            arr = np.load(path)
            if not digest_path.is_file():
                why = "no checksum beside it"
            elif _digest(arr) != digest_path.read_text().strip():
                why = "its tokens do not match their checksum"
            elif arr.ndim != 2 or arr.shape[1] != seq_len:
                why = f"shape {arr.shape}, expected [N, {seq_len}]"
        except (OSError, ValueError, EOFError) as e:
            why = f"unreadable ({type(e).__name__})"
        if why is None:
            return arr, True
        print(f"lorabench: note: data cache entry {path}: {why}; rebuilding it", file=sys.stderr)
    arr = pack(tokenize_records(records, tok), seq_len)
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
