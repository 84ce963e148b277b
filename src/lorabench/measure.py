"""A finished training loop measured: throughput and MFU per chip, FlagPerf's figures, memory, losses, and the
run's configuration as result.json records them (runner.py's measure stage)."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import metrics as M
from .config import MODEL_PRESETS
from .report import GIB, environment
from .shapes import count_params, flops_per_token, rows_flops

if TYPE_CHECKING:
    from .engines import Engine
    from .runner import Data, Plan


def measure(plan: Plan, engine: Engine, data: Data, out: dict, build_s: float,
            device_mem: M.DeviceMemoryPeak | None = None) -> dict:
    """The result dict (config, env, metrics, per-step series) of a finished training loop ``out``; ``device_mem``:
    the device-memory sampler that ran over it (GPU)."""
    job, t, lo, cfg, device = plan.job, plan.train, plan.job.lora, plan.model_cfg, plan.device
    ser = out["series"]
    tokens, mean_tokens = out["tokens_per_step"], out["tokens_per_step"]  # a chip's, per step
    fpt = flops_per_token(cfg, lo, t.seq_len)
    if "tokens" in ser:  # --packing none: each step's own unpadded tokens; FLOPs with each row's own length
        tokens = [n / plan.world for n in ser["tokens"]]
        mean_tokens = sum(tokens) / len(tokens)
        first = M.first_timed(len(tokens), t.untimed_steps)
        n, sq = ser["tokens"][first:], ser["tokens_sq"][first:]
        fpt = rows_flops(cfg, lo, sum(n), sum(sq)) / max(1, sum(n))
    resumed_at = out.get("resumed_at")
    stats = M.step_stats(ser["step_time_s"], tokens, t.untimed_steps, resumed_at)
    if resumed_at:
        stats["resumed_at_step"] = resumed_at
    env = environment(device)
    peak = M.peak_flops(env["device_name"] if device.type == "cuda" else None, plan.precision, job.peak_tflops)
    n_params = count_params(cfg)["total"]
    tps = stats["tokens_per_s_per_chip"]
    losses = out["series"]["loss"]
    metrics = {
        **stats,
        "mfu": None if tps is None else M.mfu(tps, fpt, peak),
        **M.flagperf_figures(out["series"]["step_time_s"], out["epoch_loss_avg"], out["epoch_time_s"],
                             mean_tokens, plan.world, plan.nnodes,
                             llama2_7b=n_params == count_params(MODEL_PRESETS["llama2-7b"])["total"]),
        "flops_per_token": float(fpt),
        "peak_flops": peak,
        **memory_stats(device, device_mem),
        "train_loss_last_epoch_avg": out["epoch_loss_avg"][-1] if out["epoch_loss_avg"] else None,
        "train_loss_epoch_avgs": out["epoch_loss_avg"],
        "train_loss_first": losses[0] if losses else None,
        "train_loss_final": losses[-1] if losses else None,
        "eval_loss": out.get("eval_loss"),
        "eval_perplexity": None if out.get("eval_loss") is None else float(np.exp(out["eval_loss"])),
        "skipped_steps": out["skipped_steps"],
        "steps": out["steps"],
        "build_s": build_s,
        "mmlu_acc": None,
    }
    config = {
        **asdict(t), "lora_r": lo.r, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout,
        "lora_targets": list(lo.targets), "preset": job.preset, "fix_hp": job.fix_hp, "engine": job.engine,
        "engine_options": engine.describe(), "tf32": plan.tf32, "init": job.init,
        "model": str(job.model_dir) if job.model_dir else job.model_preset, "model_config": asdict(cfg),
        "n_params": n_params, "n_trainable": sum(p.numel() for p in engine.trainable_params()),
        "data": data.description, "data_cached": data.cached, "train_chunks": len(data.train),
        "device": str(device), "world_size": plan.world,
        "nnodes": plan.nnodes, "gpus_per_node": plan.world // plan.nnodes,
        "shard_mesh": engine.shard_mesh,
    }
    series = {k: out["series"][k] for k in ("step", "epoch", "loss", "step_time_s", "lr", "grad_norm",
                                            "label_tokens", "tokens") if k in out["series"]}
    result = {"config": config, "env": env, "metrics": metrics, "series": series}
    from .report import CPU_NOTE, MFU_FOOTNOTE, on_a100

    if device.type == "cpu":
        metrics["throughput_note"] = CPU_NOTE.format(card=env["device_name"])
    if metrics["mfu_flagperf"] is not None and not on_a100(result):
        metrics["mfu_flagperf_note"] = MFU_FOOTNOTE.format(card=env["device_name"]).removeprefix("* ")
    if out.get("evals"):  # --eval-every: (step, eval loss) pairs, and the best of them
        result["evals"] = out["evals"]
        best = min(range(len(out["evals"]["step"])), key=lambda i: out["evals"]["eval_loss"][i])
        metrics["best_eval_loss"] = out["evals"]["eval_loss"][best]
        metrics["best_eval_step"] = out["evals"]["step"][best]
    return result


def memory_stats(device: torch.device, device_mem: M.DeviceMemoryPeak | None = None) -> dict:
    """torch's allocated/reserved peaks, the device's total, and the sampled device-wide peak where there is one."""
    sampled = {"peak_mem_device_gib": None if device_mem is None else device_mem.peak_gib,
               "peak_mem_device_source": None if device_mem is None else device_mem.source}
    if device.type != "cuda":
        return {"peak_mem_allocated_gib": None, "peak_mem_reserved_gib": None, "device_mem_total_gib": None,
                **sampled}
    return {"peak_mem_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
            "device_mem_total_gib": torch.cuda.get_device_properties(device).total_memory / GIB, **sampled}
