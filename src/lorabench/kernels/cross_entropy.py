"""Cross-entropy through a frozen lm_head without keeping the logits.

The plain path materialises logits [N, V] (bf16), upcasts them (fp32) and keeps what the backward needs: about
6 bytes x N x V (Llama-2-7B, LBS 4 x 512: 0.8 GB; LBS 16: 3.1 GB). Because lm_head is frozen, only the gradient
with respect to the hidden states is ever needed, so it is computed during the forward, chunk by chunk:

    logits = h_c W^T (in h's dtype, then fp32);  loss_c = sum(logsumexp(logits) - logits[target])
    g_c = (softmax(logits) - onehot(target)) * 1024;  dh_c = g_c (in h's dtype) W

and only dh [N, C] is kept; the backward multiplies it by grad_out / (n_valid * 1024). The factor 1024 is a power
of two (exact): it lifts softmax entries of about 1/V out of fp16's subnormal range, where the plain path relies on
GradScaler's scale instead. The loss equals ``F.cross_entropy(lm_head(h).float(), labels)``, and the gradient
matches it to rounding (tests/test_kernels.py).
"""
from __future__ import annotations

import functools

import torch

# Rows of h per chunk. Fewer, larger chunks run the head faster: forward and backward over 8,192 tokens of hidden
# 4096 on an H200 (2026-12-01, benchmarks/ce_chunks.py, each setting compiled afresh) took 35.8 ms at V = 128,256
# with the 261 rows that a 128 MiB budget of fp32 logits gave, 31.4 at 512 and 29.6 at 1024 (1.2 GiB more at the
# peak); at V = 32,000 1024 rows took what 1048 did (7.7 ms). A multiple of the GEMMs' 128/256-row tiles.
_CHUNK_ROWS = 1024
_LIFT = 1024.0


class FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, compiled: bool) -> torch.Tensor:
        n_rows, chunk = h.shape[0], _CHUNK_ROWS
        valid = labels != -100
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        loss_and_grad = _compiled_loss_and_grad() if compiled and need_grad else _loss_and_grad
        for s in range(0, n_rows, chunk):
            e = min(s + chunk, n_rows)
            loss, g = loss_and_grad(h[s:e] @ weight.t(), labels[s:e], valid[s:e], need_grad)
            total += loss
            if need_grad:
                grad_h[s:e] = g @ weight
        if need_grad:
            ctx.save_for_backward(grad_h, n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, n_valid = ctx.saved_tensors
        return (grad_h.float() * (grad_out / (n_valid * _LIFT))).to(grad_h.dtype), None, None, None


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, need_grad: bool):
    """One chunk: the summed loss of its valid rows and (if asked) the lifted logits gradient in the logits'
    dtype. ``logits`` [rows, V] in h's dtype, computed in fp32 here."""
    x = logits.float()
    tgt = labels.clamp(min=0)
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, tgt[:, None])[:, 0]) * valid).sum()
    if not need_grad:
        return loss, None
    p = x.sub(lse[:, None]).exp_()  # softmax
    p[torch.arange(p.shape[0], device=p.device), tgt] -= 1.0
    p.mul_((valid.to(torch.float32) * _LIFT)[:, None])
    return loss, p.to(logits.dtype)


@functools.cache
def _compiled_loss_and_grad():
    """_loss_and_grad as one compiled graph (with compiled blocks): the upcast, log-sum-exp, softmax and lift
    fused into a kernel or two that read the logits in their own dtype, instead of about eight eager passes over
    the fp32 logits (~1.3 GB a 1,024-row chunk at V = 32000)."""
    return torch.compile(_loss_and_grad)


def frozen_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of targets ``labels`` [N] (-100 ignored) under logits ``h [N, C] @ weight[V, C]^T``.
    ``compiled``: run each chunk's softmax and gradient as a compiled graph (for training with compiled blocks)."""
    return FrozenHeadCrossEntropy.apply(h, weight, labels, compiled)
