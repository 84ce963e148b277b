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

import torch

# Rows per chunk so that one chunk's fp32 logits stay near 128 MiB (1024 rows at V = 32000).
_CHUNK_ELEMS = 1 << 25
_LIFT = 1024.0


class FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n_rows, vocab = h.shape[0], weight.shape[0]
        chunk = max(1, _CHUNK_ELEMS // vocab)
        valid = labels != -100
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        for s in range(0, n_rows, chunk):
            e = min(s + chunk, n_rows)
            logits = (h[s:e] @ weight.t()).float()
            tgt = labels[s:e].clamp(min=0)
            v = valid[s:e]
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, tgt[:, None])[:, 0]
            total += ((lse - picked) * v).sum()
            if need_grad:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(e - s, device=h.device), tgt] -= 1.0
                p.mul_((v.to(torch.float32) * _LIFT)[:, None])
                grad_h[s:e] = p.to(h.dtype) @ weight
        if need_grad:
            ctx.save_for_backward(grad_h, n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, n_valid = ctx.saved_tensors
        return (grad_h.float() * (grad_out / (n_valid * _LIFT))).to(grad_h.dtype), None, None


def frozen_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of targets ``labels`` [N] (-100 ignored) under logits ``h [N, C] @ weight[V, C]^T``."""
    return FrozenHeadCrossEntropy.apply(h, weight, labels)
