"""Synthetic packed tokens with learnable structure, for benchmarks without a dataset.

Each sequence walks a fixed random successor table (token -> next token) over a 4096-token slice of the
vocabulary and jumps to a random token with probability 0.2, so a model that learns the table lowers its loss
from about ln(V) towards the jump entropy: loss curves of two engines can be compared on something real.
"""
from __future__ import annotations

import numpy as np


def synthetic_chunks(n_chunks: int, seq_len: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = min(vocab_size - 3, 4096)
    table = rng.permutation(k)
    out = np.empty((n_chunks, seq_len), dtype=np.int32)
    cur = rng.integers(0, k, size=n_chunks)
    for t in range(seq_len):
        out[:, t] = cur + 3  # keep clear of <unk>, <s>, </s>
        jump = rng.random(n_chunks) < 0.2
        cur = np.where(jump, rng.integers(0, k, size=n_chunks), table[cur])
    return out
