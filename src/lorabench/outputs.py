"""What a run leaves in its folder: the folder claimed (or the resumed run's, checked against this job), the
settings a checkpoint must share with the run resuming it, the best adapter of --eval-every, and the results
written in an order where a failure at a later file never costs an earlier one (runner.py runs these stages)."""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import resume, rundir
from .config import ConfigError
from .files import write_json_atomic, write_text_atomic
from .report import render_report

if TYPE_CHECKING:
    from .engines import Engine
    from .runner import Data, Plan


def write(run_dir: Path, result: dict, phases=None):
    """result.json first (the data), then report.md and the plots (plots.py; without matplotlib, result["plots"]
    says how to get them), then result.json again naming the plots (and, with ``phases``, the time this took): a
    failure at a later file never costs the results."""
    from .plots import plot_run

    t0 = time.perf_counter()
    write_json_atomic(run_dir / "result.json", result)
    write_text_atomic(run_dir / "report.md", render_report(result))
    drawn = plot_run(result, run_dir)
    result["plots"] = drawn if isinstance(drawn, str) else [p.name for p in drawn]
    if phases is not None:
        phases.add("write", time.perf_counter() - t0)
        result["phases"] = phases.as_dict()
    write_json_atomic(run_dir / "result.json", result)
    write_text_atomic(run_dir / "report.md", render_report(result))


RESUME_MAY_DIFFER = {
    "job": ("fix_hp", "progress", "tensorboard", "cache_dir", "run_dir", "default_run_dir", "overwrite", "resume",
            "settings", "config_file", "save_adapter", "precision_from_flag", "device", "train", "lora", "native",
            "mmlu", "command", "started"),
    "train": ("checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
              "activation_checkpointing", "memory_budget_gib"),  # memory, not the numbers
    "mmlu": ("tokenize_workers",),
    "native": ("checkpoint_blocks",),
}
"""Settings a resumed run may change: where and how it reports, how often it checkpoints, what the backward
keeps, the memory budget. Every other setting changes the numbers and must equal the checkpointed run's
(job_fingerprint)."""


def _plain(v):
    """A setting as the checkpoint stores it (torch.load's weights_only reads only plain types)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return str(v) if isinstance(v, Path) else v


def job_fingerprint(plan: Plan, data: Data) -> dict:
    """Every setting that changes a run's numbers, as resolved (the settings of a checkpoint's run and of the run
    resuming it must be equal: resume.check_fingerprint), the user's settings first, then what follows from
    them (the data's chunks)."""
    job, skip = plan.job, RESUME_MAY_DIFFER
    out = {k: v for k, v in asdict(job).items() if k not in skip["job"]}
    out.update({k: v for k, v in asdict(plan.train).items() if k not in skip["train"]})
    out.update({f"lora_{k}": v for k, v in asdict(job.lora).items()})
    out.update({k: v for k, v in asdict(plan.native).items() if k not in skip["native"]})
    out["mmlu"] = None if job.mmlu is None else {k: v for k, v in asdict(job.mmlu).items() if k not in skip["mmlu"]}
    out.update(device=str(plan.device), world_size=plan.world, chunks=len(data.train),
               tokens_sha256=hashlib.sha256(np.ascontiguousarray(data.train).tobytes()).hexdigest()[:16])
    return _plain(out)


def claim_output(plan: Plan, data: Data) -> resume.CheckpointPlan | None:
    """The run folder (claimed and locked on rank 0, the path shared with every rank) and the checkpoint plan in
    it, the job's settings written there as config.toml; with --resume, the resumed run's folder (locked) and its
    checkpoint, checked against this job. None for a run that writes nothing."""
    job = plan.job
    if job.resume is None and job.run_dir is None and job.default_run_dir is None:
        return None
    state = None
    fingerprint = job_fingerprint(plan, data)  # (hashes the training tokens: once)
    if job.resume is not None:
        if job.run_dir is not None and Path(job.run_dir).resolve() != Path(job.resume).resolve():
            raise ConfigError("--resume continues a run in its own folder; leave out --run-dir")
        if plan.rank == 0 and resume.states(Path(job.resume) / resume.DIRNAME):  # (a folder with no checkpoint
            plan.lock = rundir.lock(Path(job.resume))                            # is refused, untouched, below)
        state = resume.load(job.resume, plan.rank)
        resume.check_fingerprint(state["fingerprint"], fingerprint, job.resume)
        plan.run_dir = Path(job.resume)
    else:
        if plan.rank == 0:
            plan.run_dir, plan.lock = rundir.claim(job.run_dir, job.overwrite, job.default_run_dir, "run",
                                                   job.inputs())
            if job.settings is not None:
                write_text_atomic(plan.run_dir / "config.toml", job.settings)
        if plan.world > 1:
            shared = [str(plan.run_dir) if plan.rank == 0 else None]
            torch.distributed.broadcast_object_list(shared, src=0)
            plan.run_dir = Path(shared[0])
    return resume.CheckpointPlan(plan.run_dir / resume.DIRNAME, every=plan.train.checkpoint_every,
                                 minutes=plan.train.checkpoint_minutes, keep=plan.train.keep_checkpoints,
                                 fingerprint=fingerprint, resume=state,
                                 at_end=job.mmlu is not None or job.eval_rouge is not None)


def best_adapter_writer(plan: Plan, engine: Engine):
    """--eval-every's on_best: the adapter of the best evaluation so far to <run dir>/best_adapter (replaced whole,
    as save_adapter writes); None where nothing is written."""
    if plan.run_dir is None or not plan.job.save_adapter or plan.train.eval_every is None or \
            plan.train.shard != "none":  # (a sharded run's adapters would need every rank to gather them)
        return None
    return lambda step, loss: engine.save_adapter(plan.run_dir / "best_adapter")
