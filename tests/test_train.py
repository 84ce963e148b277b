"""The training loop (train.py): accumulation, learning-rate schedules, clipping, AdamW's settings, the loss over
label tokens, the GradScaler's skipped steps and the loop's checkpointed state. Resuming bit for bit is
test_resume.py's; data parallel, test_distributed.py's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorabench.config import LoRAConfig, TrainConfig
from lorabench.data.synthetic import synthetic_chunks
from lorabench.engines import build_engine
from lorabench.train import Optimiser, TrainState, train_loop

from conftest import SMALL

CPU = torch.device("cpu")


def test_grad_accumulation_equals_the_big_batch():
    """2 micro-batches of 1 == 1 batch of 2: equal-length packed chunks make the mean of means exact."""
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    data = synthetic_chunks(16, 32, SMALL.vocab_size, seed=3)
    res = []
    for bs, ga in ((2, 1), (1, 2)):
        cfg = TrainConfig(precision="fp32", batch_size=bs, seq_len=32, epochs=1, max_steps=3, lr=1e-2,
                          untimed_steps=0, grad_accum=ga)
        eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0)
        res.append(train_loop(eng, data, cfg, CPU, progress=False)["series"]["loss"])
    np.testing.assert_allclose(res[0], res[1], atol=1e-6)


@pytest.mark.parametrize("schedule, warmup", [("step", 0), ("step", 3), ("cosine", 2), ("linear", 3),
                                                     ("constant", 2)])
def test_lr_schedules_follow_their_formulas(schedule, warmup):
    """The lr each step ran with, against the formula worked out here: 2 epochs of 5 steps, lr 1e-2, gamma 0.5."""
    import math

    cfg = TrainConfig(precision="fp32", batch_size=2, seq_len=32, epochs=2, lr=1e-2, lr_gamma=0.5, untimed_steps=0,
                      lr_schedule=schedule, lr_warmup_steps=warmup)
    data = synthetic_chunks(10, 32, SMALL.vocab_size, seed=1)  # 10 chunks / LBS 2: 5 steps an epoch
    eng = build_engine("native", SMALL, LoRAConfig(r=4, alpha=16, dropout=0.0), model_dir=None, device=CPU,
                       precision="fp32", seed=0)
    lrs = train_loop(eng, data, cfg, CPU, progress=False)["series"]["lr"]
    total = 10

    def want(k):
        base = 1e-2 * ((k + 1) / warmup if k < warmup else 1.0)
        if k < warmup:
            return base
        if schedule == "cosine":
            return base * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        if schedule == "linear":  # 1e-2 at step 4 (k = 3), falling by 1e-2 / 7 a step
            return base * (total - k) / (total - warmup)
        return base * (0.5 ** (k // 5) if schedule == "step" else 1.0)

    np.testing.assert_allclose(lrs, [want(k) for k in range(total)], rtol=1e-12)


def test_max_grad_norm_clips_the_true_gradient():
    """One step on one batch: the recorded norm is the gradient's own (computed here by plain autograd), and the
    AdamW step moved each weight by lr * k g / (k |g| + eps), k = max_norm / norm: worked out here in float64. A clip
    that small makes k |g| comparable to eps, so a missing clip would move weights by lr instead."""
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    data = synthetic_chunks(2, 32, SMALL.vocab_size, seed=5)
    ref = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0)
    with torch.no_grad():
        for _, b in ref.adapters().values():
            b.normal_(0, 0.02, generator=torch.Generator().manual_seed(7))
    start = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in ref.adapters().items()}
    ids = torch.from_numpy(data).long()
    ref.loss(ids, ids).backward()
    grads = {k: (a.grad.double(), b.grad.double()) for k, (a, b) in ref.adapters().items()}
    norm = torch.sqrt(sum((g ** 2).sum() for pair in grads.values() for g in pair)).item()
    max_norm, lr, eps = norm * 1e-6, 1e-2, 1e-8
    cfg = TrainConfig(precision="fp32", batch_size=2, seq_len=32, epochs=1, max_steps=1, lr=lr, untimed_steps=0,
                      shuffle=False, max_grad_norm=max_norm)
    eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0)
    eng.set_adapters(start, "test")
    out = train_loop(eng, data, cfg, CPU, progress=False)
    assert out["series"]["grad_norm"][0] == pytest.approx(norm, rel=1e-5)
    k = max_norm / (norm + 1e-6)  # clip_grad_norm_'s coefficient
    for name, (a, b) in eng.adapters().items():
        for new, old, g in ((a, start[name][0], grads[name][0]), (b, start[name][1], grads[name][1])):
            want = old.double() - lr * (k * g) / ((k * g).abs() + eps)
            torch.testing.assert_close(new.detach().double(), want, rtol=0, atol=1e-7)


def test_adam_betas_reach_the_optimizer(monkeypatch):
    """--adam-beta1/--adam-beta2 are the betas the run's AdamW steps with (seen on the optimizer it builds)."""
    import lorabench.train as train

    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(train.torch.optim, "AdamW", Recording)
    cfg = TrainConfig(precision="fp32", batch_size=2, seq_len=32, epochs=1, max_steps=1, untimed_steps=0,
                      adam_beta1=0.8, adam_beta2=0.95)
    eng = build_engine("native", SMALL, LoRAConfig(r=4, alpha=16, dropout=0.0), model_dir=None, device=CPU,
                       precision="fp32", seed=0)
    train_loop(eng, synthetic_chunks(2, 32, SMALL.vocab_size, seed=5), cfg, CPU, progress=False)
    assert [g["betas"] for g in made[0].param_groups] == [(0.8, 0.95)]


def test_response_loss_is_the_sum_over_label_tokens_over_their_number_at_any_accumulation():
    """Chunks with a label mask (--loss-on response), the rows holding 1 to 31 label tokens: the first step's loss
    is sum(CE over label tokens) / their number, computed here in float64 from the engine's logits, and its gradient
    norm is that loss's own, whether the 8 chunks come as 1 x 8, 2 x 4 or 4 x 2 micro-batches."""
    ids = synthetic_chunks(8, 32, SMALL.vocab_size, seed=3)
    g = np.random.default_rng(0)
    mask = np.zeros_like(ids)
    for i, k in enumerate([1, 31, 3, 20, 7, 2, 12, 5]):  # label tokens per row, at random places
        mask[i, 1 + g.choice(31, size=k, replace=False)] = 1
    data = np.stack([ids, mask], axis=1)
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)

    def engine():
        eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0)
        with torch.no_grad():  # B non-zero, so the adapters' A gradients are not zero
            for _, b in eng.adapters().values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        return eng

    ref = engine()
    t = torch.from_numpy(ids).long()
    logp = torch.log_softmax(ref.logits(t).double(), -1)[:, :-1]
    ce = -logp.gather(-1, t[:, 1:, None])[..., 0]
    m = torch.from_numpy(mask[:, 1:]).double()
    want = (ce * m).sum() / m.sum()
    want.backward()
    want_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.trainable_params())).item()
    got = {}
    for lbs, ga in ((8, 1), (4, 2), (2, 4)):
        cfg = TrainConfig(precision="fp32", batch_size=lbs, grad_accum=ga, seq_len=32, epochs=1, max_steps=1,
                          lr=1e-6, untimed_steps=0, shuffle=False, max_grad_norm=1e9)
        out = train_loop(engine(), data, cfg, CPU, progress=False)["series"]
        assert out["label_tokens"] == [int(mask[:, 1:].sum())]
        got[(lbs, ga)] = (out["loss"][0], out["grad_norm"][0])
    for loss, norm in got.values():  # float32 sums of ~100 terms against float64: 1e-5 relative holds anywhere
        assert loss == pytest.approx(want.item(), rel=1e-5) and norm == pytest.approx(want_norm, rel=1e-5)


def test_a_grad_scaler_skips_a_step_with_an_inf_gradient_and_counts_it():
    """fp16's GradScaler: a step whose gradient overflowed leaves the weight as it was, halves the scale and is
    reported skipped; the next, finite, step moves the weight and is not."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    optim = Optimiser([w], opt, sched, False, torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True), False)
    optim.scaler.scale((w * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    lr, skipped, norm = optim.step(None)
    assert (skipped, lr, norm) == (True, 0.1, None)
    assert torch.equal(w.detach(), torch.ones(3)) and optim.scaler.get_scale() == 512.0
    optim.scaler.scale(w.sum()).backward()
    assert optim.step(None)[1] is False
    assert (w.detach() < 1).all()


def test_the_loops_checkpointed_state_keeps_its_keys():
    """A checkpoint holds the loop's state under these names (format 2, resume.VERSION): renaming a TrainState
    field would leave every earlier checkpoint unreadable, so a change here needs a new format."""
    assert set(TrainState().to_dict()) == {"step", "epoch", "epoch_step", "losses", "elapsed", "series",
                                           "epoch_losses", "epoch_times", "skipped", "evals"}
    saved = {**TrainState(step=3, epoch=1, epoch_step=2, skipped=1).to_dict(), "params": [], "rng": {}}
    assert TrainState.from_dict(saved) == TrainState(step=3, epoch=1, epoch_step=2, skipped=1)
