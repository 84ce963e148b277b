"""Training checkpoints: what a run needs to stop and carry on bit for bit, written atomically.

A checkpoint (``<run dir>/checkpoint/``) holds the adapter weights, the AdamW state, the LR scheduler, the
GradScaler, the data position (epoch, step, the steps of the epoch so far: the epoch's order is a function of the
seed and the epoch, so the position is enough), the per-step series so far and every random state that the loop
draws from: torch's CPU generator (dropout masks draw their Philox seeds from it) and each CUDA device's, per rank.
Rank 0 writes ``state-<step>.pt`` (identical on every rank after the all-reduce), each rank its
``rng-<rank>-<step>.pt``; each file goes to a temporary name, is flushed to disk and renamed, the state after every
rank's random states, and the ``--keep-checkpoints`` newest stay (default 1; the random states of one more), so the
newest complete checkpoint is the old one or the new one whole, wherever a process is killed.

The loop writes one every ``--checkpoint-every`` steps and, on SIGINT or SIGTERM, one at the end of the step it is
in, then stops (``Interrupted``). ``--resume RUN_DIR`` rebuilds the same job and continues from it; a checkpoint
made by a different job (another precision, batch shape, learning rate, model, LoRA, data, world size) is refused,
naming the setting. A run that ends normally removes its checkpoint.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError

DIRNAME = "checkpoint"
VERSION = 2
"""2: the fingerprint holds every setting that changes the numbers (outputs.job_fingerprint)."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, step: int, where: Path | None, during: str | None = None):
        self.step, self.where = step, where
        saved = f"; checkpoint in {where}, continue with --resume {where.parent}" if where else ""
        super().__init__(f"interrupted {during + ' ' if during else ''}after step {step}{saved}")


class StopRequest:
    """Set by a signal handler (``on_signals``); the loop reads ``requested`` once a step."""

    def __init__(self):
        self.requested = False


@contextmanager
def on_signals(stop: StopRequest):
    """SIGINT and SIGTERM set ``stop.requested`` (the step in flight finishes, is checkpointed, the run stops); a
    second SIGINT interrupts at once. Handlers only in the main thread; the previous ones come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class CheckpointPlan:
    """Where and how often the loop checkpoints, what stops it, and the state it resumes from."""

    folder: Path
    every: int | None = None
    """Steps between checkpoints (None: only when stopped by a signal)."""
    minutes: float | None = None
    """Minutes between checkpoints, whichever of the two comes first."""
    fingerprint: dict = field(default_factory=dict)
    """The job's settings a resumed run must share (``job_fingerprint``)."""
    stop: StopRequest = field(default_factory=StopRequest)
    resume: dict | None = None
    """A loaded checkpoint (``load``) to continue from."""
    keep: int = 1
    """How many of the newest checkpoints stay on disk (``--keep-checkpoints``)."""
    last_write: float = field(default_factory=time.monotonic)
    """When the last checkpoint was written (or the plan made): the clock of ``minutes``."""
    at_end: bool = False
    """Also checkpoint after the last step, so a run stopped in the work after training (MMLU, ROUGE) resumes
    there; the checkpoint goes once the results are written."""
    extra: dict = field(default_factory=dict)
    """What the run computed before training that its results need (the ROUGE before training), saved with each
    checkpoint."""

    def due(self, step: int, total: int, now: float) -> bool:
        """Whether a periodic checkpoint falls after ``step`` (none after the last step: the run ends there)."""
        if step >= total:
            return False
        by_steps = self.every is not None and step % self.every == 0
        by_time = self.minutes is not None and now - self.last_write >= 60 * self.minutes
        return by_steps or by_time


def _atomic_save(obj, path: Path):
    from .files import write_atomic

    write_atomic(path, lambda f: torch.save(obj, f), sync=True)


def rng_state() -> dict:
    cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    for i, s in enumerate(state["cuda"][:torch.cuda.device_count() if torch.cuda.is_available() else 0]):
        torch.cuda.set_rng_state(s, i)


def _step_of(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def _by_step(paths) -> list[Path]:
    return sorted((p for p in paths if p.stem.rsplit("-", 1)[1].isdigit()), key=_step_of)


def states(folder: Path) -> list[Path]:
    """The checkpoints of a folder (``state-<step>.pt``), oldest first."""
    return _by_step(Path(folder).glob("state-*.pt"))


def save(plan: CheckpointPlan, state: dict, rank: int, shard: dict | None = None):
    """Write this rank's random states and (rank 0) ``state``: the loop's position and its optimiser objects.
    Every rank's ``rng-<rank>-<step>.pt`` is on disk (a barrier under torchrun) before ``state-<step>.pt`` appears;
    rank 0 then keeps the ``plan.keep`` newest states and each rank one random state more than that, so a process
    killed at any point of a write leaves complete checkpoints: the new one or the ones before it. ``shard``: this
    rank's own part of a sharded run's state (shard.local_state), written with its random states."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    plan.last_write = time.monotonic()
    step = state["step"]
    _atomic_save({**rng_state(), **({"shard": shard} if shard is not None else {})},
                 plan.folder / f"rng-{rank}-{step}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        try:
            _atomic_save({"version": VERSION, "fingerprint": plan.fingerprint, "extra": plan.extra, **state},
                         plan.folder / f"state-{step}.pt")
        except BaseException:  # (out of space): the random states without their state go too, the last
            (plan.folder / f"rng-{rank}-{step}.pt").unlink(missing_ok=True)  # complete checkpoint stays
            raise
        for old in states(plan.folder)[:-plan.keep]:
            old.unlink(missing_ok=True)
    for old in _by_step(plan.folder.glob(f"rng-{rank}-*.pt"))[:-(plan.keep + 1)]:
        old.unlink(missing_ok=True)


def load(run_dir: Path, rank: int) -> dict:
    """The newest checkpoint of ``run_dir`` with this rank's random states under "rng"; a ConfigError if there is
    none or it cannot be read (naming the file, and an older checkpoint where one is kept)."""
    folder = Path(run_dir) / DIRNAME
    found = states(folder)
    if not found:
        raise ConfigError(f"--resume {run_dir}: no {DIRNAME}/state-<step>.pt (a run folder whose training was "
                          "checkpointed: --checkpoint-every, or stopped by Ctrl-C / SIGTERM)")
    state_path = found[-1]
    older = (f"; to resume from step {_step_of(found[-2])} instead, remove it" if len(found) > 1 else "")

    def unreadable(name: str, e: Exception) -> ConfigError:
        return ConfigError(f"--resume {run_dir}: {DIRNAME}/{name} cannot be read "
                           f"({str(e).splitlines()[0][:120]}){older}")

    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated or foreign files raise several types)
        raise unreadable(state_path.name, e) from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        made = state.get("version") if isinstance(state, dict) else None
        earlier = " (written by an earlier lorabench: finish that run with the version that wrote it)" \
            if isinstance(made, int) and made < VERSION else ""
        raise ConfigError(f"--resume {run_dir}: {DIRNAME}/{state_path.name} is not a checkpoint this lorabench "
                          f"reads (format {made!r}, expected {VERSION}){earlier}{older}")
    rng_path = folder / f"rng-{rank}-{state['step']}.pt"
    if not rng_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {DIRNAME}/{rng_path.name}; resume with the world size the run "
                          "had")
    try:
        state["rng"] = torch.load(rng_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise unreadable(rng_path.name, e) from None
    return state


FLAG_OF = {"data_format": "--format", "model_preset": "--model", "mmlu.dir": "--mmlu",
           "mmlu.batch_size": "--mmlu-batch-size", "mmlu.batch_tokens": "--mmlu-batch-tokens",
           "mmlu.kv_tokens": "--mmlu-kv-tokens", "mmlu.protocol": "--mmlu-protocol",
           "mmlu.compiled_graph": "--mmlu-compiled-graph", "mmlu.prefix_cache": "--no-prefix-cache",
           "mmlu.seq_len": "--seq-len", "mmlu": "--mmlu/--no-mmlu", "chunks": "--data", "tokens_sha256": "--data",
           "world_size": "the torchrun world size"}
"""Fingerprint keys whose flag is not their own name in kebab case."""


def _first_difference(saved, now, key: str = ""):
    """(dotted key, saved value, new value) of the first setting that differs, inside tables too."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in [*saved, *(k for k in now if k not in saved)]:
            if saved.get(k) != now.get(k):
                return _first_difference(saved.get(k), now.get(k), f"{key}.{k}" if key else k)
    return key, saved, now


def check_fingerprint(saved: dict, now: dict, run_dir: Path):
    """Refuse to resume a checkpoint of a different job, naming the first setting that differs (in the
    fingerprint's order: the user's settings before what follows from them) and its flag."""
    if saved == now:
        return
    key, was, new = _first_difference(saved, now)
    leaf = key.rsplit(".", 1)[-1]
    flag = FLAG_OF.get(key) or FLAG_OF.get(leaf) or "--" + leaf.replace("_", "-")
    raise ConfigError(f"--resume {run_dir}: the checkpoint was made with {key} = {was!r}, this run has {new!r} "
                      f"({flag}); a setting that changes the numbers cannot change on resume (a bare --resume "
                      f"{run_dir} reads the run's own settings from its config.toml)")


def remove(plan: CheckpointPlan):
    """Drop the checkpoint of a run that ended normally."""
    import shutil

    if plan.folder.is_dir():
        shutil.rmtree(plan.folder)
