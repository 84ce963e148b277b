"""Kernels against plain PyTorch: forward and every gradient, odd shapes, per-dtype tolerances."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorabench.kernels import cross_entropy as ce_mod
from lorabench.kernels.cross_entropy import frozen_head_cross_entropy

# (atol, rtol) for the loss and for dh, by dtype; fp32 is exact arithmetic reordered, bf16/fp16 one rounding of
# the logits gradient before the matmul.
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2e-3, 2e-2), torch.float16: (2e-4, 5e-3)}


def reference(h, w, labels):
    return F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, c, v, chunk_rows", [(37, 24, 101, 8), (64, 32, 500, 64), (5, 16, 33, 1)])
def test_frozen_head_ce_matches_plain_cross_entropy(dtype, n, c, v, chunk_rows, monkeypatch):
    monkeypatch.setattr(ce_mod, "_CHUNK_ROWS", chunk_rows)  # several chunks, a ragged last one
    g = torch.Generator().manual_seed(n + v)
    h0 = torch.randn(n, c, generator=g).to(dtype)
    w = (torch.randn(v, c, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    h1, h2 = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    ours = frozen_head_cross_entropy(h1, w, labels)
    ref = reference(h2, w, labels)
    (ours * 3.0).backward()  # a non-unit upstream gradient, as GradScaler gives
    (ref * 3.0).backward()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=atol, rtol=rtol)
    assert h1.grad.dtype == dtype and ours.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunks_match_plain_cross_entropy(dtype, monkeypatch):
    """The compiled chunk graph (used with compiled blocks) gives the same loss and gradient, ragged chunk too."""
    import torch._dynamo

    monkeypatch.setattr(ce_mod, "_CHUNK_ROWS", 16)
    g = torch.Generator().manual_seed(5)
    h0 = torch.randn(40, 24, generator=g).to(dtype)
    w = (torch.randn(211, 24, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, 211, (40,), generator=g)
    labels[1::3] = -100
    h1, h2 = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ours = frozen_head_cross_entropy(h1, w, labels, compiled=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    ref = reference(h2, w, labels)
    (ours * 3.0).backward()
    (ref * 3.0).backward()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=atol, rtol=rtol)


def test_frozen_head_ce_detects_a_wrong_target():
    """The comparison can fail: shifting the targets by one changes the loss and gradient."""
    h = torch.randn(16, 8, requires_grad=True)
    w = torch.randn(20, 8)
    labels = torch.randint(0, 19, (16,))
    assert (frozen_head_cross_entropy(h, w, labels) - reference(h, w, labels + 1)).abs() > 1e-3


def test_fp16_logits_gradient_keeps_full_precision_near_one_over_v():
    """At V = 128,256 (Llama 3's vocabulary) softmax entries sit near 1/V = 7.8e-6, below fp16's smallest normal
    (6.1e-5): stored as subnormals they would keep a few bits (3.1e-2 relative error measured with the lift set to
    1). Lifted by 1024 they are normal numbers, so each entry of the stored gradient is within fp16's half-ulp,
    2^-11 relative, of the exact float64 softmax gradient; 2^-10 allows for the fp32 softmax before the cast."""
    v, n = 128256, 4
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 0.5).half()
    labels = torch.randint(0, v, (n,), generator=g)
    _, grad = ce_mod._loss_and_grad(logits, labels, torch.ones(n, dtype=torch.bool), True)
    exact = torch.softmax(logits.double(), -1)
    exact[torch.arange(n), labels] -= 1
    assert grad.dtype == torch.float16
    rel = ((grad.double() / ce_mod._LIFT - exact).abs() / exact.abs()).max()
    assert rel <= 2 ** -10, rel


def test_no_grad_path_only_computes_the_loss():
    h, w = torch.randn(10, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (10,))
    with torch.no_grad():
        torch.testing.assert_close(frozen_head_cross_entropy(h, w, labels), reference(h, w, labels))
