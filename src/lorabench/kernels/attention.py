"""Attention kernels of the native engine: the SDPA dispatch, an attention of two matmuls with its own backward,
attention that returns each row's log-sum-exp, and the prefix + suffix merge that MMLU's cached prefixes use.

``attend`` is what a decoder block calls; ``ATTENTION_IMPLS`` are the training choices
(``NativeOptions.attention``), ``sdpa_priority`` the context that puts one SDPA kernel first.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# SDPA learned grouped-query attention (enable_gqa) in torch 2.5; older torch gets repeated k/v instead.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)

ATTENTION_IMPLS = ("sdpa", "cudnn", "flash", "efficient", "matmul")
"""How training attends: ``sdpa`` lets torch pick its kernel; ``cudnn``/``flash``/``efficient`` put that SDPA
kernel first (torch falls back where it cannot run); ``matmul`` is softmax(QK^T)V as two matmuls, which TF32 runs
on the tensor cores where SDPA's fp32 kernels do not. Evaluation with a mask uses SDPA; with a cached prefix and
no mask, prefix_suffix_attention."""


def attend(q, k, v, rep: int, impl: str = "sdpa", attn_mask=None, kv_cache=None):
    """Attention of q [B, H, T, D] over k/v [B, Hkv, T, D] (``rep`` = H / Hkv query heads per KV head), causal.
    kv_cache: optional (k, v) of earlier positions [1, Hkv, S, D] shared by the batch (prefix reuse). attn_mask:
    optional mask over [T, S+T] for SDPA (with kv_cache, attention then runs on per-row copies of the cached keys
    and values); with kv_cache and no mask, every position sees the whole cache and the batch's own positions
    causally, computed without copying the cache (prefix_suffix_attention). ``impl`` "matmul" (training, no cache,
    no mask): matmul_attention; otherwise SDPA under whatever kernel priority the caller set."""
    B = q.shape[0]
    if type(attn_mask).__name__ == "BlockMask":  # documents or a sliding window on a GPU (model.training_mask)
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=attn_mask, enable_gqa=rep > 1)
    if kv_cache is not None and attn_mask is None:
        return prefix_suffix_attention(q, k, v, kv_cache[0], kv_cache[1], rep)
    if kv_cache is None and attn_mask is None and impl == "matmul":
        return matmul_attention(q, k, v, rep)
    if kv_cache is not None:
        k = torch.cat((kv_cache[0].expand(B, -1, -1, -1), k), dim=2)
        v = torch.cat((kv_cache[1].expand(B, -1, -1, -1), v), dim=2)
    kw = {"is_causal": True} if attn_mask is None else {"attn_mask": attn_mask}
    if rep > 1 and _SDPA_HAS_GQA:
        kw["enable_gqa"] = True
    elif rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def attention_with_lse(q, k, v, causal: bool):
    """softmax(q k^T / sqrt(d)) v and each row's log-sum-exp (fp32, [B, H, T]); q [B, H, T, D], k/v [B, H, S, D]
    with as many heads as q; causal means T == S. fp16/bf16 on a GPU: the flash kernel, which returns the
    log-sum-exp; otherwise plain matmuls, the softmax in fp32 (or wider)."""
    D = q.shape[-1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]
        return out, lse
    return _matmul_with_lse(q, k, v, causal)


def _matmul_with_lse(q, k, v, causal: bool):
    """softmax(q k^T / sqrt(d)) v with plain matmuls (the softmax in fp32 or wider) and each row's log-sum-exp."""
    s = _scores(q, k, causal)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]).to(v.dtype) @ v, lse


def prefix_suffix_attention(q, k, v, k_prefix, v_prefix, rep: int):
    """Attention of a batch of suffixes q/k/v [B, H(kv), T, D] that all follow one cached prefix k/v_prefix
    [1, Hkv, P, D]: each position sees the whole prefix and its own suffix causally. The prefix part runs as one
    attention of all B x T queries against the single prefix (no per-row copy of it), the suffix part causally per
    row, and the two are merged by their log-sum-exps, which is exactly the softmax over prefix + suffix keys."""
    if rep > 1:
        k, v, k_prefix, v_prefix = (t.repeat_interleave(rep, dim=1) for t in (k, v, k_prefix, v_prefix))
    B, H, T, D = q.shape
    flat = q.transpose(0, 1).reshape(1, H, B * T, D)
    o_pre, lse_pre = attention_with_lse(flat, k_prefix, v_prefix, causal=False)
    o_pre = o_pre.reshape(H, B, T, D).transpose(0, 1)
    lse_pre = lse_pre.reshape(H, B, T).transpose(0, 1)
    o_suf, lse_suf = attention_with_lse(q, k, v, causal=True)
    lse = torch.logaddexp(lse_pre, lse_suf)
    wide = _softmax_dtype(q)
    out = o_pre.to(wide) * torch.exp(lse_pre - lse)[..., None] + o_suf.to(wide) * torch.exp(lse_suf - lse)[..., None]
    return out.to(q.dtype)


def matmul_attention(q, k, v, rep: int):
    """Causal softmax(q k^T / sqrt(d)) v with plain matmuls (the softmax in fp32), k/v repeated for GQA."""
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _MatmulAttention.apply(q, k, v)


def _scores(q, k, causal: bool = True):
    """q k^T / sqrt(d) in fp32 (or wider); causal: -inf above the diagonal."""
    s = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).to(_softmax_dtype(q))
    if not causal:
        return s
    T = q.shape[-2]
    return s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))


def _softmax_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


class _MatmulAttention(torch.autograd.Function):
    """Saves q, k, v, the output and each row's log-sum-exp, not the [B, H, T, T] probabilities: the backward
    recomputes them with one more q k^T (a few GFLOP a layer) and so keeps B x H x T^2 x 4 bytes per layer out of
    memory (2 GiB over Llama-2-7B at LBS 2 x 512 in fp32)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = _matmul_with_lse(q, k, v, causal=True)
        ctx.save_for_backward(q, k, v, out, lse[..., None])
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        p = torch.exp(_scores(q, k) - lse)
        dv = p.to(v.dtype).transpose(-1, -2) @ grad
        wide = _softmax_dtype(q)
        dp = (grad @ v.transpose(-1, -2)).to(wide)
        ds = (p * (dp - (grad.to(wide) * out.to(wide)).sum(-1, keepdim=True))).to(q.dtype) * q.shape[-1] ** -0.5
        return ds @ k, ds.transpose(-1, -2) @ q, dv


def _sdpa_priority_lists() -> dict:
    """{impl: SDPA backends with that kernel first}, where this torch can set a priority (2.6+), else {}."""
    try:
        import inspect

        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return {}
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return {impl: [first] + [b for b in order if b != first]
            for impl, first in zip(("flash", "cudnn", "efficient"), order)}


_SDPA_PRIORITY = _sdpa_priority_lists()


def sdpa_priority(impl: str):
    """A context that puts the SDPA kernel ``impl`` names first (no-op for sdpa/matmul or an old torch)."""
    if impl not in _SDPA_PRIORITY:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_SDPA_PRIORITY[impl], set_priority=True)
