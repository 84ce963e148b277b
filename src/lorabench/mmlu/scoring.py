"""MMLU scoring, exact and fast: log-likelihoods of the four letters for tokenised requests (data.py).

Each letter is scored by the summed log-likelihood of its continuation " A".." D"; when every continuation is one
token that extends the context, one forward pass per question serves all four letters. Questions are sorted by
length and batched (right padding needs no mask under a causal model; batches are capped by count, tokens and
padding), only the scored positions go through lm_head, and where the engine supports it the token prefix every
question of a subject shares (description + shots) runs once, its KV cache reused for all of the subject's
questions.
"""
from __future__ import annotations

import functools

import torch

from .data import Request


@functools.cache
def _lower_right_causal():
    """torch's lower-right causal bias (query i sees keys up to P + i) where SDPA takes it with GQA, else None.
    Looked up on first use: its module imports torch's compiler stack (and Triton), seconds at every start-up."""
    try:
        import inspect

        from torch.nn.attention.bias import CausalBias, causal_lower_right
    except ImportError:
        return None
    return causal_lower_right if "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters else None


def _prefix_mask(T: int, P: int, device):
    """Suffix queries see the whole cached prefix and the suffix causally. The lower-right causal bias says that
    without a materialised mask (and lets SDPA pick its flash kernel); a boolean mask otherwise."""
    if (lower_right := _lower_right_causal()) is not None:
        return lower_right(T, P + T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat((torch.ones(T, P, dtype=torch.bool, device=device), causal), dim=1)[None, None]


def to_device(data, device) -> torch.Tensor:
    """A long tensor on ``device`` without stalling the host: through pinned memory, asynchronously, on a GPU
    (a plain copy would wait for every queued kernel, and the host could not prepare the next batch meanwhile)."""
    t = torch.tensor(data, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def pad_batch(seqs: list[list[int]], device) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return to_device([s + [0] * (T - len(s)) for s in seqs], device)


def forward_padded(engine, seqs: list[list[int]], device, prefix=None, copy_prefix: bool = True) -> torch.Tensor:
    """Hidden states [rows, longest, hidden] of ``seqs`` padded on the right (under a causal model the padding
    after a row's last token never reaches it). ``prefix``: (kv_caches, length) of tokens every row continues;
    ``copy_prefix``: attend through SDPA on per-row copies of it (else one attention against it, no copies)."""
    ids = pad_batch(seqs, device)
    if prefix is None:
        return engine.forward_hidden(ids)
    kv, P = prefix
    mask = _prefix_mask(ids.shape[1], P, device) if copy_prefix else None
    return engine.forward_hidden(ids, kv_caches=kv, position_offset=P, attn_mask=mask)


def prefix_length(seqs: list[list[int]]) -> int:
    """Tokens of the prefix ``shared_prefix`` caches for ``seqs``: the longest all share, less one token so that
    every row keeps a suffix to run (0: none to cache)."""
    return max(_common_prefix(seqs) - 1, 0)


def shared_prefix(engine, seqs: list[list[int]], device):
    """(kv_caches, P) of the ``prefix_length`` tokens all ``seqs`` share; None where they share nothing (a
    left-truncated prompt, say)."""
    P = prefix_length(seqs)
    return (engine.prefix_kv(to_device([seqs[0][:P]], device)), P) if P > 0 else None


def _score_sequences(engine, seqs: list[list[int]], positions: list[list[int]], targets: list[list[int]],
                     device, prefix=None, copy_prefix: bool = True) -> torch.Tensor:
    """Log-probs of targets[i] (token ids) at positions[i] of each padded sequence, in one forward pass, flat
    and still on the device. ``positions`` index the logits that predict each target; ``prefix``,
    ``copy_prefix``: as forward_padded."""
    h = forward_padded(engine, seqs, device, prefix, copy_prefix)
    rows = to_device([i for i, p in enumerate(positions) for _ in p], device)
    cols = to_device([c for p in positions for c in p], device)
    logp = torch.log_softmax(engine.head(h[rows, cols]), dim=-1)
    return logp.gather(1, to_device([[t] for ts in targets for t in ts], device))[:, 0].float()


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
"""How suffix batches attend to a subject's cached prefix: ``split`` (the default), one attention of all the batch's
queries against the single prefix merged with the causal suffix attention by log-sum-exp
(kernels.attention.prefix_suffix_attention, no copies); ``copy``, SDPA over per-question copies of the prefix's
keys and values. Full MMLU on an H200 (2026-11-28), each cold in a fresh process of the same call: split 52.3 s,
copy 54.0 s end to end (the copies had taken 2.2 s of GPU time; benchmarks/NOTES.md item 18)."""


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
        prefix = None
        if use_prefix_cache and len(idxs) > 1 and engine.supports_prefix_cache:
            prefix = shared_prefix(engine, [reqs[i].context for i in idxs], device)
        P = prefix[1] if prefix else 0
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
