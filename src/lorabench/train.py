"""The training loop: one plain function that every entry point (run, bench) drives.

AdamW on the adapter parameters, StepLR(gamma) stepped once per epoch, gradient accumulation, precisions
fp32 / tf32 / fp16 (GradScaler; skipped steps counted) / bf16. Every packed chunk has the same number of target
tokens, so averaging the micro-batch means over ``grad_accum`` gives exactly the loss of the whole step.

Timing is honest: the device is synchronised before each clock read, one reading per optimiser step, and the
caller drops the warm-up steps. Data parallel under torchrun: each step's global batch is the next
batch_size x grad_accum x world_size chunks of the epoch's order, rank r takes micro-batch slices r, r + W, ...,
adapter gradients are averaged with one all-reduce, and only rank 0 shows progress (writing results is the
caller's, on rank 0). So W ranks train exactly as one process with grad_accum x W (tests/test_distributed.py).
Checkpoints and resuming (resume.py) pick the loop up at the step after the checkpoint with every state it had:
the loop's own (``TrainState``) and the optimiser's (``Optimiser``), saved and restored by one pair of functions.
The loop body is ``train_step`` (one timed optimiser step) and small named hooks around it.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from .config import ConfigError, TrainConfig
from .distributed import all_reduce_mean, dist_info, synchronize
from .precision import Precision, get_precision
from .progress import progress as _progress
from .resume import CheckpointPlan, Interrupted, set_rng_state
from .resume import states as checkpoint_states
from .resume import save as save_checkpoint


def _step_block(order: np.ndarray, step: int, cfg: TrainConfig, world: int) -> np.ndarray:
    """The chunk indices of optimiser step ``step`` (0-based within the epoch), every rank's micro-batches."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    return order[step * per_step:(step + 1) * per_step]


def batch_tensors(batch: np.ndarray, device: torch.device, packing: str = "flagperf",
                  ) -> tuple[torch.Tensor, torch.Tensor, int | None, dict]:
    """(ids, labels, label tokens, the loss's other arguments) of a micro-batch: [B, S] chunks train on every
    token (labels = ids, count None); [B, 2, S] chunks carry a label mask, the tokens it leaves out labelled -100;
    [B, 3, S] chunks also each token's position: in its document (``--packing documents``), or in its row with -1
    on padding (``--packing none``: the batch is cut to its longest row, each row one record from position 0)."""
    if packing == "none":
        batch = batch[:, :, :int((batch[:, 2] >= 0).sum(axis=1).max())]

    def channel(c, dtype=torch.long):
        return torch.from_numpy(np.ascontiguousarray(batch[:, c])).to(device=device, dtype=dtype, non_blocking=True)

    if batch.ndim == 2:
        ids = torch.from_numpy(batch).to(device=device, dtype=torch.long, non_blocking=True)
        return ids, ids, None, {}
    ids = channel(0)
    labels = ids.masked_fill(channel(1, torch.int32) == 0, -100)
    documents = batch.shape[1] == 3 and packing == "documents"
    return ids, labels, int(batch[:, 1, 1:].sum()), {"positions": channel(2)} if documents else {}


def _new_series() -> dict:
    return {"step": [], "epoch": [], "loss": [], "step_time_s": [], "lr": []}


@dataclass
class TrainState:
    """Where the loop stands and what its steps so far left behind, apart from the weights and the optimiser: the
    part of a checkpoint that is the loop's own (``Optimiser`` holds the rest)."""

    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    """Next up: step ``epoch_step`` of ``epoch`` (both 0-based)."""
    epoch_step: int = 0
    losses: list = field(default_factory=list)
    """This epoch's step losses so far."""
    elapsed: float = 0.0
    """This epoch's seconds so far."""
    series: dict = field(default_factory=_new_series)
    """Per step: step, epoch, loss, step_time_s, lr (grad_norm, label_tokens, tokens where they apply)."""
    epoch_losses: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)
    skipped: int = 0
    """Steps a GradScaler skipped (fp16)."""
    evals: dict = field(default_factory=lambda: {"step": [], "eval_loss": []})
    """--eval-every's (step, eval loss) pairs."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


@dataclass
class Optimiser:
    """AdamW over the adapters, its learning-rate schedule and the GradScaler: the rest of a checkpoint."""

    params: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    per_step_sched: bool
    """Whether ``sched`` steps every optimiser step (else once an epoch: FlagPerf's StepLR)."""
    scaler: torch.amp.GradScaler
    sharded: bool
    """The adapters are FSDP2 shards: each rank saves and loads its own (shard.py)."""

    @classmethod
    def make(cls, engine, cfg: TrainConfig, device: torch.device, precision: Precision, total: int,
             steps_per_epoch: int) -> "Optimiser":
        params = engine.trainable_params()
        # fused on a GPU, and for fp16 adapters anywhere (FlagPerf's fused=use_fp16: GradScaler then hands the
        # fused kernel its scale instead of unscaling fp16 gradients, which it refuses)
        fused = device.type == "cuda" or any(p.dtype == torch.float16 for p in params)
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay, fused=fused)
        sched, per_step = lr_scheduler(opt, cfg, total, steps_per_epoch)
        return cls(params, opt, sched, per_step, torch.amp.GradScaler(device.type, enabled=precision.grad_scaler),
                   engine.sharded)

    def step(self, max_grad_norm: float | None) -> tuple[float, bool, float | None]:
        """One optimiser step on the gradients the backward left: (the lr it used, whether the GradScaler skipped
        it, the gradient's norm before clipping where --max-grad-norm clips)."""
        norm = None
        if max_grad_norm is not None:  # on the true gradients: unscaled first under a GradScaler
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.opt)
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        skipped = False
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lr = self.opt.param_groups[0]["lr"]
        if self.per_step_sched:
            self.sched.step()
        return lr, skipped, norm

    def end_epoch(self):
        if not self.per_step_sched:
            with warnings.catch_warnings():  # (a run resumed at an epoch's end steps it before any opt.step)
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                self.sched.step()

    def state_dict(self) -> tuple[dict, dict | None]:
        """(what rank 0's state file holds, this rank's own shards or None)."""
        mine = None
        if self.sharded:
            from .shard import local_state

            mine = local_state(self.params, self.opt)
        return {"params": None if self.sharded else [p.detach().cpu().clone() for p in self.params],
                "opt": None if self.sharded else self.opt.state_dict(),
                "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict()}, mine

    def load_state_dict(self, saved: dict):
        if self.sharded:  # this rank's shards, from its own file
            from .shard import load_local_state

            load_local_state(self.params, self.opt, saved["rng"]["shard"])
        else:
            with torch.no_grad():
                for p, kept in zip(self.params, saved["params"], strict=True):
                    p.copy_(kept)
            self.opt.load_state_dict(saved["opt"])
        self.sched.load_state_dict(saved["sched"])
        self.scaler.load_state_dict(saved["scaler"])


def save_state(checkpoint: CheckpointPlan, state: TrainState, optim: Optimiser, rank: int):
    """A checkpoint of the loop as it stands (``state.epoch``/``epoch_step``: the step next up)."""
    kept, mine = optim.state_dict()
    save_checkpoint(checkpoint, {**kept, **state.to_dict()}, rank, shard=mine)


def restore_state(saved: dict, optim: Optimiser) -> TrainState:
    """The loop's state from a checkpoint (resume.load), the optimiser and random states put back as they were."""
    optim.load_state_dict(saved)
    state = TrainState.from_dict(saved)
    set_rng_state(saved["rng"])
    return state


def _steps(data: np.ndarray, cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(optimiser steps per epoch, steps in the run) for packed chunks ``data``, refusing what cannot train."""
    masked = data.ndim == 3
    if data.ndim not in (2, 3) or data.shape[-1] != cfg.seq_len or (masked and data.shape[1] not in (2, 3)):
        raise ConfigError(f"packed data has shape {data.shape}, expected [N, {cfg.seq_len}] or [N, 2 or 3, "
                          f"{cfg.seq_len}]")
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = len(data) // (per_step * world)
    if steps_per_epoch == 0:
        raise ConfigError(f"the training data packs into {len(data)} chunks of {cfg.seq_len} tokens, fewer than one "
                          f"step needs ({per_step} x {world} ranks); lower --batch-size/--grad-accum/--seq-len")
    total = cfg.epochs * steps_per_epoch
    return steps_per_epoch, total if cfg.max_steps is None else min(total, cfg.max_steps)


@dataclass
class _Step:
    """What one optimiser step measured."""

    loss: float
    time_s: float
    lr: float
    skipped: bool
    grad_norm: float | None
    label_tokens: int | None
    stop: bool | None
    """Under torchrun, whether any rank was asked to stop (the flag rode along the gradients' all-reduce)."""


def train_step(engine, data: np.ndarray, block: np.ndarray, cfg: TrainConfig, device: torch.device,
               optim: Optimiser, number: int, stop_requested=lambda: False) -> _Step:
    """Optimiser step ``number`` (1-based) on the chunks ``block`` (every rank's), timed between two device
    synchronisations: this rank's micro-batches forward and backward, the gradients averaged across ranks (a stop
    asked for, ``stop_requested()``, riding along), the optimiser step."""
    rank, world = dist_info()
    synchronize(device)
    t0 = time.perf_counter()
    step_loss = torch.zeros((), device=device)
    step_tokens = None
    if data.ndim == 3:  # the loss is the sum over the step's label tokens / their number, on every rank
        step_tokens = int(data[block, 1, 1:].sum())  # (a chunk's first token is no target)
        if step_tokens == 0:
            raise ConfigError(f"step {number} has no label tokens; the data needs responses")
    bs = cfg.batch_size
    for m in range(cfg.grad_accum):
        j = (m * world + rank) * bs
        ids, labels, n, extra = batch_tensors(data[block[j:j + bs]], device, cfg.packing)
        if n == 0:  # nothing to learn here (its share of the step's sum is 0)
            continue
        with engine.autocast():
            # a mean over its n label tokens times n / (the step's tokens / ranks): gradient averaging across ranks
            # then leaves the sum over all of them / their number
            loss = engine.loss(ids, labels, **extra)
            loss = loss / cfg.grad_accum if n is None else loss * (n * world / step_tokens)
        optim.scaler.scale(loss).backward()
        step_loss += loss.detach()
    stop = None  # (one process reads its own request after the step)
    if world > 1:  # the stop flag rides along, so every rank stops after the same step
        flag = torch.full((1,), float(stop_requested()), device=device)
        all_reduce_mean(([] if optim.sharded else [p.grad for p in optim.params]) + [step_loss.view(1), flag], world)
        stop = flag.item() > 0
    lr, skipped, norm = optim.step(cfg.max_grad_norm)
    loss_val = step_loss.item()
    synchronize(device)
    return _Step(loss_val, time.perf_counter() - t0, lr, skipped, norm, step_tokens, stop)


def _check_finite(s: _Step, state: TrainState, optim: Optimiser, checkpoint: CheckpointPlan | None):
    """Stop on a loss that is no longer finite (a GradScaler skips such steps itself), saying where it went."""
    if math.isfinite(s.loss) or optim.scaler.is_enabled():
        return
    last = (f" (the last finite loss: {state.series['loss'][-1]:.4f} at step {state.step})" if state.series["loss"]
            else "")
    saved = (f"; the last checkpoint is in {checkpoint.folder}" if checkpoint is not None
             and checkpoint_states(checkpoint.folder) else "")
    raise FloatingPointError(f"loss became {s.loss} at step {state.step + 1}{last}{saved}; try a lower --lr or a "
                             "wider precision")


def _record(state: TrainState, s: _Step, epoch: int, data: np.ndarray, block: np.ndarray, packing: str) -> dict:
    """The step into the state's books; returns its record (what on_step and metrics.jsonl get)."""
    state.step += 1
    state.losses.append(s.loss)
    state.skipped += int(s.skipped)
    series = state.series
    for k, v in (("step", state.step), ("epoch", epoch + 1), ("loss", s.loss), ("step_time_s", s.time_s),
                 ("lr", s.lr)):
        series[k].append(v)
    if s.grad_norm is not None:
        series.setdefault("grad_norm", []).append(s.grad_norm)
    if s.label_tokens is not None:
        series.setdefault("label_tokens", []).append(s.label_tokens)
    if packing == "none":  # the tokens this step computed on, padding left out (all ranks)
        lengths = (data[block, 2] >= 0).sum(axis=1)
        series.setdefault("tokens", []).append(int(lengths.sum()))
        series.setdefault("tokens_sq", []).append(int((lengths.astype(np.int64) ** 2).sum()))
    return {k: series[k][-1] for k in series}


def train_loop(engine, data: np.ndarray, cfg: TrainConfig, device: torch.device, val_data: np.ndarray | None = None,
               progress: bool = True, checkpoint: CheckpointPlan | None = None, on_step=None, on_best=None) -> dict:
    """Train ``engine`` on packed chunks ``data`` [N, seq_len]; returns the per-step series and losses.
    ``checkpoint``: where to checkpoint, how often, what stops the loop, and a state to resume from (resume.py);
    ``on_step``: called on rank 0 with each step's record (step, epoch, loss, lr, step_time_s) as it ends;
    ``on_best``: called on rank 0 with (step, eval loss) when a --eval-every evaluation is the best so far."""
    rank, world = dist_info()
    steps_per_epoch, total = _steps(data, cfg, world)
    torch.manual_seed(cfg.seed + rank)  # dropout masks
    precision = get_precision(cfg.precision)
    optim = Optimiser.make(engine, cfg, device, precision, total, steps_per_epoch)
    resume = checkpoint.resume if checkpoint is not None else None
    state = restore_state(resume, optim) if resume is not None else TrainState()
    periodic_eval = cfg.eval_every is not None and val_data is not None and len(val_data) and cfg.eval_batches != 0
    bar = _progress(total, progress and rank == 0, desc="train", unit="step")
    bar.update(state.step)
    engine.train()
    start_epoch, start_step = state.epoch, state.epoch_step
    closed = start_epoch  # epochs whose books are closed
    with precision.matmul_mode():
        for epoch in range(start_epoch, cfg.epochs):
            # (a run resumed within an epoch whose last step was done still closes that epoch's books)
            if state.step >= total and not (resume is not None and epoch == start_epoch and start_step > 0):
                break
            order = (np.random.default_rng(cfg.seed + epoch).permutation(len(data)) if cfg.shuffle
                     else np.arange(len(data)))
            if epoch > start_epoch or resume is None:
                state.losses, state.elapsed = [], 0.0
            epoch_t0 = time.perf_counter() - state.elapsed
            for epoch_step in range(start_step if epoch == start_epoch else 0, steps_per_epoch):
                if state.step >= total:
                    break
                block = _step_block(order, epoch_step, cfg, world)
                s = train_step(engine, data, block, cfg, device, optim, state.step + 1,
                               (lambda: checkpoint.stop.requested) if checkpoint is not None else (lambda: False))
                _check_finite(s, state, optim, checkpoint)
                record = _record(state, s, epoch, data, block, cfg.packing)
                bar.set_postfix(epoch=epoch + 1, loss=f"{s.loss:.4f}")
                bar.update(1)
                if periodic_eval and state.step % cfg.eval_every == 0:  # after the step's clock: not in its time
                    record["eval_loss"] = _periodic_eval(engine, val_data, cfg, device, state, on_best, rank)
                if on_step is not None and rank == 0:
                    on_step(record)
                if checkpoint is not None:
                    stopping = checkpoint.stop.requested if s.stop is None else s.stop
                    # (the clock rule runs in one process only: the runner refuses --checkpoint-minutes under DDP)
                    if stopping or checkpoint.due(state.step, total, time.monotonic()):
                        state.epoch, state.epoch_step, state.elapsed = epoch, epoch_step + 1, \
                            time.perf_counter() - epoch_t0
                        save_state(checkpoint, state, optim, rank)
                    if stopping:
                        bar.close()
                        raise Interrupted(state.step, checkpoint.folder)
            synchronize(device)
            state.epoch_times.append(time.perf_counter() - epoch_t0)
            state.epoch_losses.append(float(np.mean(state.losses)) if state.losses else float("nan"))
            optim.end_epoch()
            closed = epoch + 1
    if checkpoint is not None and checkpoint.at_end and (resume is None or resume["step"] < state.step):
        # the trained state, for a run stopped in the work that follows
        save_state(checkpoint, replace(state, epoch=closed, epoch_step=0, losses=[], elapsed=0.0), optim, rank)
    bar.close()
    out = {"series": state.series, "epoch_loss_avg": state.epoch_losses, "epoch_time_s": state.epoch_times,
           "skipped_steps": state.skipped, "steps": state.step, "evals": state.evals if periodic_eval else None,
           "tokens_per_step": cfg.batch_size * cfg.grad_accum * cfg.seq_len,
           "resumed_at": resume["step"] if resume is not None else None}
    if val_data is not None and len(val_data) and cfg.eval_batches != 0:
        # an --eval-every evaluation after the last step already has it: the same weights and batches
        done = periodic_eval and state.evals["step"] and state.evals["step"][-1] == state.step
        out["eval_loss"] = state.evals["eval_loss"][-1] if done else evaluate_loss(engine, val_data, cfg, device)
    return out


def _periodic_eval(engine, val_data: np.ndarray, cfg: TrainConfig, device: torch.device, state: TrainState,
                   on_best, rank: int) -> float | None:
    """--eval-every: the eval loss now, into the state's books; ``on_best`` (rank 0) when it is the best so far."""
    ev = evaluate_loss(engine, val_data, cfg, device)
    best = not state.evals["eval_loss"] or ev < min(state.evals["eval_loss"])
    state.evals["step"].append(state.step)
    state.evals["eval_loss"].append(ev)
    if best and on_best is not None and rank == 0:
        on_best(state.step, ev)
    return ev


def lr_scheduler(opt, cfg: TrainConfig, total: int, steps_per_epoch: int):
    """(scheduler, whether it steps every optimiser step). "step" with no warm-up is FlagPerf's StepLR, stepped per
    epoch; otherwise a per-step factor of the base lr: warm-up (k + 1) / w for the first w = lr_warmup_steps, then
    1 (constant), gamma ** epoch (step, the epoch counted in steps), the cosine from 1 to 0 over the steps left, or a
    straight line from 1 to 0 over them (linear: 1 - j / span after j steps past the warm-up)."""
    if cfg.lr_schedule == "step" and cfg.lr_warmup_steps == 0:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.lr_gamma), False
    warm = cfg.lr_warmup_steps

    def factor(k: int) -> float:  # k: optimiser steps taken so far
        if k < warm:
            return (k + 1) / warm
        span = max(1, total - warm)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(k - warm, span) / span))
        if cfg.lr_schedule == "linear":
            return 1 - min(k - warm, span) / span
        if cfg.lr_schedule == "step":
            return cfg.lr_gamma ** (k // steps_per_epoch)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor), True


@torch.no_grad()
def evaluate_loss(engine, data: np.ndarray, cfg: TrainConfig, device: torch.device) -> float | None:
    """Mean loss over the first ``eval_batches`` batches of ``data`` (in order): every chunk weighted equally, or,
    for chunks with a label mask, every label token."""
    rank, world = dist_info()
    engine.eval()
    n = len(data) // cfg.batch_size
    if cfg.eval_batches is not None:
        n = min(n, cfg.eval_batches)
    sharded = engine.sharded
    # a sharded model needs every rank in each forward: all run the same number, a rank past the end a spare one
    turns = -(-n // world) if sharded else None
    total, count = 0.0, 0
    with get_precision(cfg.precision).matmul_mode():
        for i in (range(rank, turns * world, world) if sharded else range(rank, n, world)):
            spare = i >= n
            ids, labels, tokens, extra = batch_tensors(data[(0 if spare else i) * cfg.batch_size:][:cfg.batch_size],
                                                       device, cfg.packing)
            if tokens == 0 and not sharded:
                continue
            with engine.autocast():
                loss = engine.loss(ids, labels, **extra).item()
            if not spare and tokens != 0:
                total += loss * (1 if tokens is None else tokens)
                count += 1 if tokens is None else tokens
    engine.train()
    if world > 1:
        t = torch.tensor([total, count], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        total, count = t.tolist()
    return total / count if count else None
