"""One run, assembled: engine + data + the training loop + metrics (+ MMLU) -> result.json and report.md.

``lorabench run`` and every row of ``lorabench bench`` call ``run_job``, so the benchmark measures exactly what
users run.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from .config import MODEL_PRESETS, ConfigError, LoRAConfig, ModelConfig, TrainConfig
from .engines import build_engine
from .model import count_params
from .report import GIB, environment, render_report, write_json_atomic, write_text_atomic
from .train import barrier, dist_info, train_loop

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_MODEL = ASSETS / "tiny-llama"
TINY_DATA = ASSETS / "samsum-tiny"
TINY_MMLU = ASSETS / "mmlu-tiny"
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Job:
    """Everything one run needs, resolved (the CLI builds it from flags and a preset)."""

    train: TrainConfig
    lora: LoRAConfig
    preset: str = "tiny"
    fix_hp: str = "/"
    engine: str = "native"
    model_dir: Path | None = TINY_MODEL
    """HF model folder (config, tokenizer, weights). With init='random' only its config and tokenizer are used."""
    init: str = "pretrained"
    """'pretrained' (weights from model_dir) or 'random' (canonical random weights on the device)."""
    model_preset: str | None = None
    """Shape preset for init='random' without a model_dir (e.g. llama2-7b)."""
    data: str = str(TINY_DATA)
    """samsum source (see data/samsum.py) or 'synthetic'."""
    device: str = "auto"
    attn: str = "eager"
    compile: bool | None = None
    """torch.compile the native engine's blocks (None: on for CUDA devices)."""
    peak_tflops: float | None = None
    run_dir: Path | None = None
    save_adapter: bool = True
    cache_dir: Path | None = None
    progress: bool = True
    mmlu: dict | None = None
    """MMLU options (dir, subjects, shots, batch_size, limit) or None to skip."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this torch build sees no CUDA device; use --device cpu")
    return dev


def model_config(job: Job) -> ModelConfig:
    if job.model_dir is not None:
        return ModelConfig.from_hf_json(job.model_dir)
    if job.model_preset not in MODEL_PRESETS:
        raise ConfigError(f"--model: unknown {job.model_preset!r}; choose from {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[job.model_preset]


def load_data(job: Job, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(train chunks, validation chunks or None, description)."""
    t = job.train
    if job.data == "synthetic":
        from .data.synthetic import synthetic_chunks

        rank, world = dist_info()
        n = max(64, t.batch_size * t.grad_accum * world * (t.max_steps or 50))
        return synthetic_chunks(n, t.seq_len, cfg.vocab_size, seed=t.seed), None, "synthetic (learnable bigram walk)"
    if job.model_dir is None:
        raise ConfigError("--data needs a tokenizer: give --model-dir (with --init random only its config.json and "
                          "tokenizer are used), or --data synthetic")
    from .data.packing import packed_dataset
    from .data.samsum import load_split
    from .data.tokenizer import Tokenizer

    tok = Tokenizer(job.model_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{job.model_dir}: tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    records, label = load_split(job.data, "train")
    train, cached = packed_dataset(records, tok, t.seq_len, job.cache_dir)
    val_records, _ = load_split(job.data, "validation")
    val = packed_dataset(val_records, tok, t.seq_len, job.cache_dir)[0] if val_records else None
    desc = f"{label} ({len(records)} samples{', cached' if cached else ''})"
    return train, val, desc


def compile_default(flag: bool | None, device: torch.device, engine: str) -> bool:
    """``--compile/--no-compile`` as given; unset, on for the native engine on CUDA."""
    return flag if flag is not None else device.type == "cuda" and engine == "native"


def native_attention(precision: str, device: torch.device) -> str:
    """The native engine's training attention on a GPU: cuDNN's SDPA kernel first for fp16/bf16 (on an H200 it
    runs causal attention forward + backward 1.2-1.9x faster than the flash kernel eager SDPA picks; torch 2.11's
    compiled graphs pick it anyway, other versions may not: benchmarks/NOTES.md), plain matmuls under TF32 (6%
    faster there than SDPA's fp32 kernel); SDPA's own choice otherwise. $LORABENCH_NATIVE_ATTENTION overrides it
    (for A/B benchmarks)."""
    from .model import ATTENTION_IMPLS

    forced = _env_choice("LORABENCH_NATIVE_ATTENTION", ATTENTION_IMPLS)
    if forced:
        return forced
    if device.type != "cuda":
        return "sdpa"
    return {"tf32": "matmul", "fp16": "cudnn", "bf16": "cudnn"}.get(precision, "sdpa")


def fused_projections_default(precision: str, device: torch.device) -> bool:
    """Whether the native engine runs q/k/v and gate/up as one GEMM each: under TF32 on a GPU, where it measured
    2.2% faster (H200: 9,417 vs 9,211 tok/s, same machine); not in fp16/bf16, where it was 0.4% slower with gate/up
    concatenated and 1.1% slower with them interleaved (bf16 LBS 16: 20,452 vs 20,682; benchmarks/NOTES.md items
    13 and 20).
    $LORABENCH_FUSED_PROJECTIONS=1/0 overrides it (for A/B benchmarks)."""
    forced = _env_choice("LORABENCH_FUSED_PROJECTIONS", ("1", "0"), "1 (fused) or 0 (separate GEMMs)")
    if forced:
        return forced == "1"
    return device.type == "cuda" and precision == "tf32"


def dropout_mask_choice() -> str:
    """How the native engine draws dropout masks (kernels/dropout.py): philox16 unless $LORABENCH_DROPOUT_MASK
    names another of MASK_IMPLS (for A/B benchmarks)."""
    from .kernels.dropout import MASK_IMPLS

    return _env_choice("LORABENCH_DROPOUT_MASK", MASK_IMPLS) or MASK_IMPLS[0]


def _env_choice(name: str, choices, meaning: str | None = None) -> str | None:
    """The value of environment variable ``name`` if set (an A/B override), checked against ``choices``."""
    value = os.environ.get(name)
    if value and value not in choices:
        hint = f"use {meaning}" if meaning else f"choose from {', '.join(choices)}"
        raise ConfigError(f"${name}={value!r}: {hint}")
    return value or None


def run_job(job: Job) -> dict:
    """Train (and evaluate) as ``job`` says; returns the result dict, also written to run_dir on rank 0."""
    rank, world = dist_info()
    device = resolve_device(job.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    t, lo = job.train, job.lora
    if t.precision == "tf32" and device.type != "cuda":
        raise ConfigError("--tf32 / precision tf32 needs a CUDA device")
    cfg = model_config(job)
    if t.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {t.seq_len} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}")
    mmlu_subjects = None
    if job.mmlu:  # fail before training, not after it
        from .mmlu import check_mmlu_options

        mmlu_subjects = check_mmlu_options(job.mmlu, job.model_dir)
    if rank != 0:
        barrier()  # rank 0 tokenises and fills the cache first
    train_data, val_data, data_desc = load_data(job, cfg)
    if rank == 0:
        barrier()
    weights_dir = job.model_dir if job.init == "pretrained" else None
    compile_ = compile_default(job.compile, device, job.engine)
    attention = native_attention(t.precision, device)
    fuse = fused_projections_default(t.precision, device)
    dropout_mask = dropout_mask_choice()
    compile_mode = os.environ.get("LORABENCH_COMPILE_MODE") or None  # for A/B runs (reduce-overhead: CUDA graphs)
    t_build = time.perf_counter()
    engine = build_engine(job.engine, cfg, lo, model_dir=weights_dir, device=device, dtype=DTYPES[t.precision],
                          seed=t.seed, attn=job.attn, compile=compile_, attention=attention,
                          fuse=fuse, compile_mode=compile_mode, dropout_mask=dropout_mask)
    build_s = time.perf_counter() - t_build
    if device.type == "cuda":  # peaks of the training itself (the weights stay allocated, so they count)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out = train_loop(engine, train_data, t, device, val_data=val_data, progress=job.progress)
    stats = M.step_stats(out["series"]["step_time_s"], out["tokens_per_step"], t.warmup_steps)
    env = environment(device)
    peak = M.peak_flops(env["device_name"] if device.type == "cuda" else None, t.precision, job.peak_tflops)
    fpt = M.flops_per_token(cfg, lo, t.seq_len)
    n_params = count_params(cfg)["total"]
    tps = stats["tokens_per_s_per_chip"]
    losses = out["series"]["loss"]
    metrics = {
        **stats,
        "mfu": None if tps is None else M.mfu(tps, fpt, peak),
        "mfu_flagperf": None if tps is None else M.mfu_flagperf(tps, n_params),
        "flops_per_token": float(fpt),
        "peak_flops": peak,
        **memory_stats(device),
        "train_loss_avg": out["epoch_loss_avg"][-1] if out["epoch_loss_avg"] else None,
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
        "attn": job.attn if job.engine.startswith("reference") else attention,
        "fused_projections": fuse and job.engine == "native", "init": job.init,
        "dropout_mask": dropout_mask if job.engine == "native" else None,
        "compile": (compile_mode or True) if compile_ and job.engine == "native" else compile_,
        "model": str(job.model_dir) if job.model_dir else job.model_preset, "model_config": asdict(cfg),
        "n_params": n_params, "n_trainable": sum(p.numel() for p in engine.trainable_params()),
        "data": data_desc, "train_chunks": len(train_data), "device": str(device), "world_size": world, "nnodes": 1,
    }
    result = {"config": config, "env": env, "metrics": metrics,
              "series": {k: out["series"][k] for k in ("step", "epoch", "loss", "step_time_s", "lr")}}
    run_dir = Path(job.run_dir) if job.run_dir else None
    if rank == 0 and run_dir is not None and job.save_adapter:
        engine.save_adapter(run_dir / "adapter")
        result["adapter_dir"] = str(run_dir / "adapter")
    if job.mmlu and rank == 0:  # the adapters are identical on every rank: rank 0 evaluates
        from .mmlu import evaluate_mmlu

        mm = evaluate_mmlu(engine, job.model_dir, job.mmlu, device, run_dir, progress=job.progress,
                           subjects=mmlu_subjects)
        metrics.update(mmlu_acc=mm["acc"], mmlu_acc_macro=mm["acc_macro"], mmlu_questions=mm["questions"],
                       mmlu_shots=mm["shots"], mmlu_categories=mm["categories"])
    barrier()
    if rank == 0 and run_dir is not None:
        write_json_atomic(run_dir / "result.json", result)
        write_text_atomic(run_dir / "report.md", render_report(result))
    return result


def memory_stats(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_mem_allocated_gib": None, "peak_mem_reserved_gib": None, "device_mem_total_gib": None}
    return {"peak_mem_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
            "device_mem_total_gib": torch.cuda.get_device_properties(device).total_memory / GIB}
