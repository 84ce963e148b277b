"""What a run streams to its folder while it trains, and how it fails on the device: ``metrics.jsonl`` and
TensorBoard events one step at a time (so a killed run keeps its curve), and the out-of-memory message that names
the step, the settings that set the memory and what to try."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .config import ConfigError


class OutOfMemory(Exception):
    """The device ran out of memory: the message names the job's shape, the memory held and what to try."""


@contextlib.contextmanager
def out_of_memory_message(plan, done: list, where: str | None = None):
    """Turn the device's out-of-memory error into ``OutOfMemory``: where it happened (``where``, else the step
    after ``done[0]``), the settings that set the memory (model, precision, batch shape, LoRA, activation
    checkpointing), the memory held at the peak, the settings that lower it, and the per-step series kept so far."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        t, job = plan.train, plan.job
        shape = (f"{job.model_dir or job.model_preset}, {t.precision}, --batch-size {t.batch_size}, --seq-len "
                 f"{t.seq_len}, --grad-accum {t.grad_accum}, LoRA r{job.lora.r} on {','.join(job.lora.targets)}")
        from .engines import spec

        engine = spec(job.engine)
        policy = plan.train.activation_checkpointing
        blocks, layers = plan.native.checkpoint_blocks, plan.model_cfg.num_hidden_layers
        shape += f", --activation-checkpointing {policy}" + ("" if blocks is None else f" --checkpoint-blocks {blocks}")
        held = ""
        if plan.device.type == "cuda":
            total = torch.cuda.get_device_properties(plan.device).total_memory
            held = f"; {torch.cuda.max_memory_allocated(plan.device) / 2**30:.1f} of {total / 2**30:.1f} GiB held " \
                   "at the peak"
        tries = []
        if t.batch_size > 1:
            tries.append(f"--batch-size {t.batch_size // 2} --grad-accum {2 * t.grad_accum} (the same global batch)")
        if blocks is not None and blocks < layers:
            tries.append(f"--checkpoint-blocks {min(layers, blocks + max(1, layers // 8))} or more (now {blocks} of "
                         f"{layers} blocks recompute)")
        elif policy in ("none", "adapter-inputs") and "block" in engine.checkpointing:
            tries.append("--activation-checkpointing block")
        elif policy == "block" and "offload" in engine.checkpointing:
            tries.append("--activation-checkpointing offload" + ("" if blocks is None else " --checkpoint-blocks all")
                         + " (the blocks' inputs in host memory)")
        if engine.can("fp8-weights") and not plan.precision.weights:
            tries.append("--precision fp8 (Ada/Hopper)" if plan.precision.dtype in (torch.bfloat16, torch.float16)
                         else "--precision bf16")
        if engine.can("nf4-weights") and plan.precision.weights != "nf4":
            tries.append("--precision nf4 (the frozen weights in 4 bits)")
        if t.seq_len > 512:
            tries.append("a shorter --seq-len")
        if t.memory_budget_gib is not None:
            tries.append(f"a larger --memory-budget-gib than {t.memory_budget_gib:g}")
        kept = (f"; the {done[0]} steps so far are in {plan.run_dir / 'metrics.jsonl'}"
                if plan.run_dir is not None and done[0] else "")
        at = where or f"in step {done[0] + 1}"
        advice = " or ".join(tries) or "a smaller model"
        raise OutOfMemory(f"out of device memory {at} ({shape}{held}); try {advice}{kept} "
                          f"[{str(e).splitlines()[0][:160]}]") from None


def tensorboard_writer(run_dir: Path | None, wanted: bool | None, resumed_at: int, check_only: bool = False):
    """A SummaryWriter on <run dir>/tensorboard, or None: ``wanted`` None takes it when the tensorboard package is
    installed; True without it is a ConfigError saying what to install. A resumed run drops the events after its
    checkpoint's step (``purge_step``), as metrics.jsonl drops those lines."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if wanted:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'lorabench[tensorboard]' "
                              "(or leave the flag out)") from None
        return None
    if check_only:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)


def kept_lines(path: Path, resumed_at: int) -> list[str]:
    """The lines of a resumed run's ``metrics.jsonl`` up to its checkpoint's step. A line cut short by a crash
    mid-write (not JSON) and lines past the checkpoint (steps the resumed run repeats) are dropped, and said."""
    import json
    import sys

    kept, cut, past = [], 0, 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            cut += 1
            continue
        if isinstance(step, int) and step <= resumed_at:
            kept.append(line)
        else:
            past += 1
    if cut or past:
        why = ", ".join(w for w in (f"{cut} incomplete (a write cut short)" if cut else "",
                                    f"{past} past the checkpoint's step {resumed_at} (run again now)" if past else "")
                        if w)
        print(f"lorabench: {path}: dropped {cut + past} lines: {why}", file=sys.stderr)
    return kept


@contextlib.contextmanager
def step_stream(run_dir: Path | None, resumed_at: int, tensorboard: bool | None = None):
    """``<run dir>/metrics.jsonl``: one JSON line per optimiser step, flushed as it ends (``tail -f`` it, or read it
    after a crash); a resumed run keeps the lines up to its checkpoint's step. The same records go to TensorBoard
    (``tensorboard_writer``: ``train/<series>`` per step, ``eval/loss`` where an eval ran). Yields the loop's
    ``on_step`` (None without a run folder)."""
    if run_dir is None:
        yield None
        return
    import json

    from . import files

    board = tensorboard_writer(run_dir, tensorboard, resumed_at)
    path = run_dir / "metrics.jsonl"
    kept = kept_lines(path, resumed_at) if resumed_at and path.is_file() else []

    # (a full disk at any of these writes is DiskFull naming the file: exit 6)
    try:
        with files.full_disk_names(path):
            f = open(path, "w")
        try:
            with files.full_disk_names(path):
                files._write(path, f, "".join(line + "\n" for line in kept))
                f.flush()

            def on_step(record: dict):
                line = json.dumps(record) + "\n"
                with files.full_disk_names(path, len(line)):
                    files._write(path, f, line)
                    f.flush()
                if board is not None:
                    for k, v in record.items():
                        if k != "step" and isinstance(v, (int, float)):
                            board.add_scalar("eval/loss" if k == "eval_loss" else f"train/{k}", v, record["step"])
                    with files.full_disk_names(run_dir / "tensorboard"):
                        board.flush()

            yield on_step
        finally:
            with files.full_disk_names(path):
                f.close()
    finally:
        if board is not None:
            with files.full_disk_names(run_dir / "tensorboard"):
                board.close()
