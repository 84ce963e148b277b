"""The training loop: one plain function that every entry point (run, bench) drives.

AdamW on the adapter parameters, StepLR(gamma) stepped once per epoch, gradient accumulation, precisions
fp32 / tf32 / fp16 (GradScaler; skipped steps counted) / bf16. Every packed chunk has the same number of target
tokens, so averaging the micro-batch means over ``grad_accum`` gives exactly the loss of the whole step.

Timing is honest: the device is synchronised before each clock read, one reading per optimiser step, and the
caller drops the warm-up steps. Data parallel under torchrun: each step's global batch is the next
batch_size x grad_accum x world_size chunks of the epoch's order, rank r takes micro-batch slices r, r + W, ...,
adapter gradients are averaged with one all-reduce, and only rank 0 shows progress (writing results is the
caller's, on rank 0). So W ranks train exactly as one process with grad_accum x W (tests/test_distributed.py).
Checkpoints and resuming (resume.py) pick the loop up at the step after the checkpoint with every state it had.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch

from .config import ConfigError, TrainConfig
from .precision import get_precision
from .progress import progress as _progress
from .resume import CheckpointPlan, Interrupted, set_rng_state
from .resume import states as checkpoint_states
from .resume import save as save_checkpoint


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU. Returns whether
    it did; each rank then uses cuda:LOCAL_RANK."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def barrier():
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_block(order: np.ndarray, step: int, cfg: TrainConfig, world: int) -> np.ndarray:
    """The chunk indices of optimiser step ``step`` (0-based within the epoch), every rank's micro-batches."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    return order[step * per_step:(step + 1) * per_step]


def _step_batches(data: np.ndarray, order: np.ndarray, step: int, cfg: TrainConfig, rank: int, world: int):
    """This rank's micro-batches of optimiser step ``step``."""
    block, bs = _step_block(order, step, cfg, world), cfg.batch_size
    for m in range(cfg.grad_accum):
        j = (m * world + rank) * bs
        yield data[block[j:j + bs]]


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


def _all_reduce_mean(tensors: list[torch.Tensor], world: int):
    """Average tensors across ranks with one collective on a flat buffer."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def train_loop(engine, data: np.ndarray, cfg: TrainConfig, device: torch.device, val_data: np.ndarray | None = None,
               progress: bool = True, checkpoint: CheckpointPlan | None = None, on_step=None, on_best=None) -> dict:
    """Train ``engine`` on packed chunks ``data`` [N, seq_len]; returns the per-step series and losses.
    ``checkpoint``: where to checkpoint, how often, what stops the loop, and a state to resume from (resume.py);
    ``on_step``: called on rank 0 with each step's record (step, epoch, loss, lr, step_time_s) as it ends;
    ``on_best``: called on rank 0 with (step, eval loss) when a --eval-every evaluation is the best so far."""
    rank, world = dist_info()
    sharded = engine.sharded  # FSDP2 reduce-scatters and averages the gradients itself
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
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    torch.manual_seed(cfg.seed + rank)  # dropout masks
    precision = get_precision(cfg.precision)
    params = engine.trainable_params()
    # fused on a GPU, and for fp16 adapters anywhere (FlagPerf's fused=use_fp16: GradScaler then hands the fused
    # kernel its scale instead of unscaling fp16 gradients, which it refuses)
    fused = device.type == "cuda" or any(p.dtype == torch.float16 for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, fused=fused)
    sched, per_step_sched = lr_scheduler(opt, cfg, total, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
    series = {"step": [], "epoch": [], "loss": [], "step_time_s": [], "lr": []}
    epoch_losses, epoch_times, skipped = [], [], 0
    step, start_epoch, start_step, losses, epoch_elapsed = 0, 0, 0, [], 0.0
    evals = {"step": [], "eval_loss": []}
    periodic_eval = cfg.eval_every is not None and val_data is not None and len(val_data) and cfg.eval_batches != 0
    resume = checkpoint.resume if checkpoint is not None else None
    if resume is not None:  # everything the steps so far left behind, in the order the loop made it
        if sharded:  # this rank's shards, from its own file
            from .shard import load_local_state

            load_local_state(params, opt, resume["rng"]["shard"])
        else:
            with torch.no_grad():
                for p, saved in zip(params, resume["params"], strict=True):
                    p.copy_(saved)
            opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        scaler.load_state_dict(resume["scaler"])
        series, epoch_losses, epoch_times = resume["series"], resume["epoch_losses"], resume["epoch_times"]
        skipped, step, losses, epoch_elapsed = resume["skipped"], resume["step"], resume["losses"], resume["elapsed"]
        start_epoch, start_step = resume["epoch"], resume["epoch_step"]
        evals = resume.get("evals", evals)
        set_rng_state(resume["rng"])
    bar = _progress(total, progress and rank == 0, desc="train", unit="step")
    bar.update(step)
    stop = torch.zeros(1, device=device)
    engine.train()
    def save(epoch: int, epoch_step: int, losses: list, elapsed: float):
        """A checkpoint of the loop as it stands: next up, step ``epoch_step`` of ``epoch`` (0-based)."""
        mine = None
        if sharded:
            from .shard import local_state

            mine = local_state(params, opt)
        save_checkpoint(checkpoint, {
            "params": None if sharded else [p.detach().cpu().clone() for p in params],
            "opt": None if sharded else opt.state_dict(),
            "sched": sched.state_dict(), "scaler": scaler.state_dict(), "series": series,
            "epoch_losses": epoch_losses, "epoch_times": epoch_times, "skipped": skipped,
            "step": step, "epoch": epoch, "epoch_step": epoch_step, "losses": losses, "evals": evals,
            "elapsed": elapsed}, rank, shard=mine)

    epoch = start_epoch - 1
    with precision.matmul_mode():
        for epoch in range(start_epoch, cfg.epochs):
            # (a run resumed within an epoch whose last step is done still closes that epoch's books)
            if step >= total and not (resume is not None and epoch == start_epoch and start_step > 0):
                epoch -= 1
                break
            order = (np.random.default_rng(cfg.seed + epoch).permutation(len(data)) if cfg.shuffle
                     else np.arange(len(data)))
            if epoch > start_epoch or resume is None:
                losses, epoch_elapsed = [], 0.0
            epoch_t0 = time.perf_counter() - epoch_elapsed
            for epoch_step in range(start_step if epoch == start_epoch else 0, steps_per_epoch):
                if step >= total:
                    break
                synchronize(device)
                t0 = time.perf_counter()
                step_loss = torch.zeros((), device=device)
                if masked:  # the loss is the sum over the step's label tokens / their number, on every rank
                    # (a chunk's first token is no target)
                    step_tokens = int(data[_step_block(order, epoch_step, cfg, world), 1, 1:].sum())
                    if step_tokens == 0:
                        raise ConfigError(f"step {step + 1} has no label tokens; the data needs responses")
                for batch in _step_batches(data, order, epoch_step, cfg, rank, world):
                    ids, labels, n, extra = batch_tensors(batch, device, cfg.packing)
                    if n == 0:  # nothing to learn here (its share of the step's sum is 0)
                        continue
                    with engine.autocast():
                        # a mean over its n label tokens times n / (the step's tokens / ranks): gradient averaging
                        # across ranks then leaves the sum over all of them / their number
                        loss = engine.loss(ids, labels, **extra)
                        loss = loss / cfg.grad_accum if n is None else loss * (n * world / step_tokens)
                    scaler.scale(loss).backward()
                    step_loss += loss.detach()
                if world > 1:  # the stop flag rides along, so every rank stops after the same step
                    stop.fill_(float(checkpoint is not None and checkpoint.stop.requested))
                    _all_reduce_mean(([] if sharded else [p.grad for p in params]) + [step_loss.view(1), stop],
                                     world)
                if cfg.max_grad_norm is not None:  # on the true gradients: unscaled first under a GradScaler
                    if scaler.is_enabled():
                        scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                    series.setdefault("grad_norm", []).append(float(norm))
                if scaler.is_enabled():
                    scale = scaler.get_scale()
                    scaler.step(opt)
                    scaler.update()
                    skipped += int(scaler.get_scale() < scale)
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                lr_used = opt.param_groups[0]["lr"]
                if per_step_sched:
                    sched.step()
                loss_val = step_loss.item()
                synchronize(device)
                dt = time.perf_counter() - t0
                if not math.isfinite(loss_val) and not scaler.is_enabled():
                    last = (f" (the last finite loss: {series['loss'][-1]:.4f} at step {step})" if series["loss"]
                            else "")
                    saved = (f"; the last checkpoint is in {checkpoint.folder}" if checkpoint is not None
                             and checkpoint_states(checkpoint.folder) else "")
                    raise FloatingPointError(f"loss became {loss_val} at step {step + 1}{last}{saved}; try a lower "
                                             "--lr or a wider precision")
                step += 1
                losses.append(loss_val)
                for k, v in (("step", step), ("epoch", epoch + 1), ("loss", loss_val), ("step_time_s", dt),
                             ("lr", lr_used)):
                    series[k].append(v)
                if masked:
                    series.setdefault("label_tokens", []).append(step_tokens)
                if cfg.packing == "none":  # the tokens this step computed on, padding left out (all ranks)
                    lengths = (data[_step_block(order, epoch_step, cfg, world), 2] >= 0).sum(axis=1)
                    series.setdefault("tokens", []).append(int(lengths.sum()))
                    series.setdefault("tokens_sq", []).append(int((lengths.astype(np.int64) ** 2).sum()))
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_val:.4f}")
                bar.update(1)
                record = {k: series[k][-1] for k in series}
                if periodic_eval and step % cfg.eval_every == 0:  # after the step's clock: not in its time
                    ev = evaluate_loss(engine, val_data, cfg, device)
                    best = not evals["eval_loss"] or ev < min(evals["eval_loss"])
                    evals["step"].append(step)
                    evals["eval_loss"].append(ev)
                    record["eval_loss"] = ev
                    if best and on_best is not None and rank == 0:
                        on_best(step, ev)
                if on_step is not None and rank == 0:
                    on_step(record)
                if checkpoint is not None:
                    stopping = checkpoint.stop.requested if world == 1 else stop.item() > 0
                    # (the clock rule runs in one process only: the runner refuses --checkpoint-minutes under DDP)
                    if stopping or checkpoint.due(step, total, time.monotonic()):
                        save(epoch, epoch_step + 1, losses, time.perf_counter() - epoch_t0)
                    if stopping:
                        bar.close()
                        raise Interrupted(step, checkpoint.folder)
            synchronize(device)
            epoch_times.append(time.perf_counter() - epoch_t0)
            epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
            if not per_step_sched:
                with warnings.catch_warnings():  # (a run resumed at an epoch's end steps it before any opt.step)
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    sched.step()
    if checkpoint is not None and checkpoint.at_end and (resume is None or resume["step"] < step):
        save(epoch + 1, 0, [], 0.0)  # the trained state, for a run stopped in the work that follows
    bar.close()
    out = {"series": series, "epoch_loss_avg": epoch_losses, "epoch_time_s": epoch_times, "skipped_steps": skipped,
           "steps": step, "evals": evals if periodic_eval else None,
           "tokens_per_step": per_step * cfg.seq_len, "resumed_at": resume["step"] if resume is not None else None}
    if val_data is not None and len(val_data) and cfg.eval_batches != 0:
        # an --eval-every evaluation after the last step already has it: the same weights and batches
        done = periodic_eval and evals["step"] and evals["step"][-1] == step
        out["eval_loss"] = evals["eval_loss"][-1] if done else evaluate_loss(engine, val_data, cfg, device)
    return out


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
