"""One run as a short pipeline of named stages: resolve -> load data -> build engine -> train -> measure ->
evaluate -> write.

``lorabench run`` and every row of ``lorabench bench`` call ``run_job``, so the benchmark measures exactly what
users run. Each stage is a plain function of what the stages before it produced, so each can be tested alone;
what differs between engines lives in the engines (``Engine.describe``, ``Engine.evaluating``), not here.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from .assets import TINY_DATA, TINY_MODEL
from .config import MODEL_PRESETS, ConfigError, LoRAConfig, ModelConfig, TrainConfig
from .engines import (Engine, NativeOptions, build_engine, check_native_flags, checkpointing_policy,
                      precision_problem, spec)
from .mmlu.evaluate import MmluOptions
from .precision import PRECISIONS, Precision, get_precision, slow_on_cpu
from .files import write_json_atomic
from .measure import measure
from .outputs import best_adapter_writer, claim_output, write
from . import resume, rundir
from .rouge import record_rouge, rouge_pass
from .streams import out_of_memory_message, step_stream, tensorboard_writer
from .distributed import barrier, dist_info, process_group, synchronize
from .train import train_loop


@dataclass
class Job:
    """Everything one run needs, as the user gave it (the CLI builds it from flags and a preset)."""

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
    data_format: str | None = None
    """The records' format (data/formats.py; None: detected from their columns)."""
    prompt_template: str | None = None
    """A "...{column}..." template for records of any other columns."""
    val_fraction: float | None = None
    """Hold out this fraction of the training records as the validation split (sources without one)."""
    device: str = "auto"
    attn: str = "eager"
    """Attention of the plain reference engine (eager or sdpa)."""
    native: NativeOptions = field(default_factory=NativeOptions)
    """The native engine's tuning (None fields: defaults for the precision and device)."""
    peak_tflops: float | None = None
    run_dir: Path | None = None
    """Output folder: absent or empty (rundir.claim); None with default_run_dir None: nothing written."""
    default_run_dir: Path | None = None
    """Without run_dir: this name, made unique (-2, -3, ...)."""
    overwrite: bool = False
    """Replace a non-empty run_dir whole, where it is a lorabench run folder (rundir.check_replaceable)."""
    save_adapter: bool = True
    init_adapter: Path | None = None
    """A PEFT-format adapter (lorabench's or PEFT's) to start training from instead of the canonical init."""
    resume: Path | None = None
    """A run folder with a checkpoint to continue (resume.py); the run writes its results there."""
    cache_dir: Path | None = None
    progress: bool = True
    tensorboard: bool | None = None
    """TensorBoard event files in <run dir>/tensorboard (None: when the tensorboard package is installed)."""
    mmlu: MmluOptions | None = None
    """MMLU after training, or None to skip."""
    eval_rouge: int | None = None
    """Generate for this many validation records before and after training and score them with ROUGE."""
    rouge_max_new_tokens: int = 64
    precision_off_cuda: str | None = None
    """The precision to run instead where there is no CUDA device (Preset.precision_off_cuda)."""
    precision_from_flag: bool = False
    """Whether --precision chose train.precision (else the preset did), for result.json's word on TF32."""
    settings: str | None = None
    """The job's settings as a config file (config_file.render), written to <run dir>/config.toml when the folder
    is claimed, so that ``--resume`` reads them back."""
    config_file: Path | None = None
    """The --config file the settings came from (an input --overwrite must never delete)."""
    command: str = "run"
    """run (train, then evaluate) or eval (evaluate the model and init_adapter, no training: ``eval_job``)."""
    started: float | None = None
    """The process's start as a time.perf_counter() reading (the CLI's), so the phase times count the start-up
    (interpreter, imports, flags); None: the phases start when run_job is called."""

    def inputs(self) -> dict:
        """{flag: path} of what the job reads, which no --overwrite may touch."""
        data = None if self.data == "synthetic" else self.data
        adapter = "--adapter" if self.command == "eval" else "--init-adapter"
        return {"--model-dir": self.model_dir, "--data": data, "--mmlu": self.mmlu.dir if self.mmlu else None,
                adapter: self.init_adapter, "--config": self.config_file, "--cache-dir": self.cache_dir}


@dataclass
class Plan:
    """A job resolved: the device, the precision the matmuls really run in (and why TF32 is on or off), the
    training config with that precision, the model shape, the native options with every default filled in, and the
    MMLU questions already read (so a bad flag fails before any training)."""

    job: Job
    device: torch.device
    precision: Precision
    train: TrainConfig
    tf32: dict
    """{"on": bool, "why": str}, for result.json."""
    model_cfg: ModelConfig
    native: NativeOptions
    mmlu: MmluOptions | None
    """The job's MMLU options with every default filled in for the device and the questions."""
    mmlu_subjects: list | None
    rank: int
    world: int
    nnodes: int
    """Nodes of a torchrun job (WORLD_SIZE / LOCAL_WORLD_SIZE), 1 otherwise."""
    run_dir: Path | None = None
    """The output folder once claimed (rank 0; run_job), None for a run that writes nothing."""
    lock: rundir.FolderLock | None = None
    """The run folder's lock (rank 0), held until the run ends."""
    phases: M.Phases = field(default_factory=M.Phases)
    """Seconds each stage took (result.json's phases)."""
    writing: bool = False
    """The results are being written (what an interrupt then stops)."""


@dataclass
class Data:
    train: np.ndarray
    """Packed training chunks [N, seq_len]."""
    val: np.ndarray | None
    description: str
    val_records: list | None = None
    """The validation records themselves (--eval-rouge generates from them)."""
    cached: bool = False
    """Whether the packed chunks came from the cache (result.json's data_cached)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: give auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this torch build sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: lorabench runs on cpu or cuda")
    if dev.type == "cuda":  # always with its index, so results name the card that ran
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def model_config(job: Job) -> ModelConfig:
    if job.model_dir is not None:
        return ModelConfig.from_hf_json(job.model_dir)
    if job.model_preset not in MODEL_PRESETS:
        raise ConfigError(f"--model: unknown {job.model_preset!r}; choose from {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[job.model_preset]


# -- the stages -----------------------------------------------------------------------------------------------
def resolve(job: Job) -> Plan:
    """Check the job against the device and the model, and fill in every default."""
    rank, world = dist_info()
    engine_spec = spec(job.engine)
    device = resolve_device(job.device)  # (under torchrun: cuda:LOCAL_RANK, which init_distributed made current)
    precision, tf32 = resolve_precision(job, device)
    why = precision_problem(job.engine, precision)
    if why:
        raise ConfigError(why)
    slow = slow_on_cpu(precision, device)
    if slow and rank == 0:
        print(f"lorabench: {slow}", file=sys.stderr)
    check_native_flags(job.engine, job.native)
    train = replace(job.train, precision=precision.name)
    cfg = model_config(job)
    if train.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {train.seq_len} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}")
    if train.seq_len > cfg.context_limit and not engine_spec.can("beyond-sliding-window"):
        raise engine_spec.refuse(f"--seq-len {train.seq_len} (past the model's sliding_window "
                                 f"{cfg.sliding_window})", "beyond-sliding-window")
    if job.peak_tflops is not None and not (math.isfinite(job.peak_tflops) and job.peak_tflops > 0):
        raise ConfigError(f"--peak-tflops {job.peak_tflops}: give the device's peak in TFLOP/s, more than 0")
    if train.memory_budget_gib is not None:
        check_memory_budget(train.memory_budget_gib, device)
    if train.checkpoint_minutes is not None and world > 1:
        raise ConfigError("--checkpoint-minutes runs in one process only (ranks would see different clocks); "
                          "use --checkpoint-every under torchrun")
    if job.tensorboard:
        tensorboard_writer(None, True, 0, check_only=True)
    from . import shard

    shard.check(train.shard, job.engine, precision, world, mmlu=job.mmlu is not None,
                rouge=job.eval_rouge is not None, group=train.shard_group_size)
    if train.packing == "documents" and not engine_spec.can("packing-documents"):
        raise engine_spec.refuse("--packing documents", "packing-documents")
    if job.init_adapter is not None:  # its shape checked now, before any data is read
        from .adapter_io import read_adapter

        a = read_adapter(job.init_adapter)[0]
        if (a.r, a.alpha, set(a.targets)) != (job.lora.r, job.lora.alpha, set(job.lora.targets)):
            raise ConfigError(f"--init-adapter {job.init_adapter}: r={a.r}, alpha={a.alpha}, targets="
                              f"{','.join(sorted(a.targets))}; this run has r={job.lora.r}, alpha={job.lora.alpha}, "
                              f"targets={','.join(sorted(job.lora.targets))} (give the same --lora-r, --lora-alpha, "
                              "--lora-targets)")
    if job.eval_rouge is not None:
        from .rouge import scorer

        if job.eval_rouge <= 0 or job.rouge_max_new_tokens <= 0:
            raise ConfigError("--eval-rouge and --rouge-max-new-tokens must be positive")
        if job.data == "synthetic":
            raise ConfigError("--eval-rouge generates from validation records; --data synthetic has none")
        scorer()
    subjects = mmlu = None
    if job.mmlu is not None:
        from .mmlu.evaluate import check_mmlu_options, kv_token_cap

        subjects = check_mmlu_options(job.mmlu, job.model_dir)
        mmlu = job.mmlu.resolve(device.type == "cuda", sum(len(s.test) for s in subjects),
                                kv_token_cap(cfg, precision.dtype))
    if rank == 0:  # the output folder's checks (read only), before any data is read
        if job.resume is not None:
            rundir.check_free(Path(job.resume))
        else:
            rundir.check_claimable(job.run_dir, job.overwrite, job.inputs(), job.default_run_dir)
    nnodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    native = job.native.resolve(precision, device)
    train = replace(train, activation_checkpointing=checkpointing_policy(job.engine, train.activation_checkpointing,
                                                                         native, job.lora.dropout,
                                                                         cfg.num_hidden_layers))
    return Plan(job, device, precision, train, tf32, cfg, native, mmlu, subjects, rank, world, nnodes)


def check_memory_budget(gib: float, device: torch.device) -> float:
    """The fraction of ``device``'s memory that --memory-budget-gib ``gib`` is; refused off CUDA and past the
    device's own memory."""
    if device.type != "cuda":
        raise ConfigError(f"--memory-budget-gib caps a CUDA device's memory; this run's device is {device.type} "
                          "(leave the flag out)")
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if gib > total:
        raise ConfigError(f"--memory-budget-gib {gib:g}: more than this GPU's {total:.1f} GiB")
    return gib / total


TF32_OVERRIDE = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"
"""Set to 1 (as NVIDIA's NGC PyTorch images do), cuBLAS runs fp32 matmuls in TF32 whatever torch's switches say."""


def resolve_precision(job: Job, device: torch.device) -> tuple[Precision, dict]:
    """The precision the matmuls will really run in, and why TF32 is on or off: the preset's or flag's choice; a
    preset's TF32 on a device without CUDA becomes its precision_off_cuda; fp32 under TF32_OVERRIDE is TF32."""
    precision = get_precision(job.train.precision)
    source = f"--precision {precision.name}" if job.precision_from_flag else f"preset {job.preset}"
    if precision.needs_cuda and device.type != "cuda" and job.precision_off_cuda:
        fallback = get_precision(job.precision_off_cuda)
        return fallback, {"on": False, "why": f"preset {job.preset} runs TF32 matmuls on CUDA; TF32 does not apply "
                                              f"on {device.type}, so {fallback.name}"}
    precision.check_device(device)
    if precision.tf32:
        return precision, {"on": True, "why": source}
    if device.type == "cuda" and precision.name == "fp32" and os.environ.get(TF32_OVERRIDE, "0") not in ("", "0"):
        return PRECISIONS["tf32"], {"on": True, "why": f"{TF32_OVERRIDE}={os.environ[TF32_OVERRIDE]} found set: "
                                                       "cuBLAS runs the fp32 matmuls in TF32"}
    return precision, {"on": False, "why": source}


def load_data(plan: Plan) -> Data:
    """The packed training chunks and the validation chunks (None without a validation split). Under torchrun,
    rank 0 tokenises and fills the cache before the other ranks read it."""
    if plan.rank != 0:
        barrier()
    try:
        return _load_data(plan)
    finally:
        if plan.rank == 0:
            barrier()


def _load_data(plan: Plan) -> Data:
    job, t, cfg = plan.job, plan.train, plan.model_cfg
    if job.data == "synthetic":
        from .data.synthetic import synthetic_chunks

        if t.loss_on != "all" or t.packing != "flagperf":
            raise ConfigError(f"--{'loss-on response' if t.loss_on != 'all' else 'packing documents'} needs records; "
                              "--data synthetic is one token stream")
        n = max(64, t.batch_size * t.grad_accum * plan.world * (t.max_steps or 50))
        return Data(synthetic_chunks(n, t.seq_len, cfg.vocab_size, seed=t.seed), None,
                    "synthetic (learnable bigram walk)")
    if job.model_dir is None:
        raise ConfigError("--data needs a tokenizer: give --model-dir (with --init random only its config.json and "
                          "tokenizer are used), or --data synthetic")
    from .data.packing import packed_dataset
    from .data.samsum import drop_empty, load_split
    from .data.tokenizer import Tokenizer

    tok = Tokenizer(job.model_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{job.model_dir}: tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    from functools import cache

    from .data.chat import ChatTemplate

    chat = cache(lambda: ChatTemplate.from_model_dir(job.model_dir))  # read where a chat record first needs it
    records, label = load_split(job.data, "train", job.data_format, job.prompt_template, chat)
    records, empty = drop_empty(records, label)
    val_records, val_label = load_split(job.data, "validation", job.data_format, job.prompt_template, chat)
    val_records, val_empty = drop_empty(val_records, val_label)
    if empty or val_empty:
        label += f", {empty + val_empty} records without content left out"
    if job.val_fraction is not None:
        if val_records:
            raise ConfigError(f"--val-fraction: {job.data} has a validation split of its own; leave it out")
        records, val_records = split_off(records, job.val_fraction)
        label += f", {len(val_records)} held out for validation"
    train, cached = packed_dataset(records, tok, t.seq_len, job.cache_dir, t.loss_on, t.packing)
    val = packed_dataset(val_records, tok, t.seq_len, job.cache_dir, t.loss_on, t.packing)[0] if val_records else None
    if t.packing != "flagperf":
        kernel = "FlexAttention, a block mask" if plan.device.type == "cuda" else "SDPA, a dense mask"
        label += (f", packed as documents (attention within each: {kernel})" if t.packing == "documents" else
                  ", one record a row (padded per batch; tok/s and MFU count no padding)")
    if train.ndim == 3:  # chunks with no target among their tokens teach nothing: left out, and said
        train, dropped = with_labels(train)
        val = with_labels(val)[0] if val is not None else None
        if not len(train):
            raise ConfigError(f"--loss-on response: no chunk of {job.data} holds a response token")
        label += (", loss on responses" if t.loss_on == "response" else "") + \
            f" ({int(train[:, 1, 1:].sum())} label tokens" + \
            (f"; {dropped} chunks without any left out)" if dropped else ")")
    if job.eval_rouge is not None:
        from .rouge import prompt_pairs

        if not prompt_pairs(val_records, 1):
            raise ConfigError(f"--eval-rouge: {job.data} has no validation records with a response to generate (a "
                              "validation split of samsum, alpaca or --prompt-template records, or --val-fraction)")
    return Data(train, val, f"{label} ({len(records)} samples)", val_records, cached)


def with_labels(chunks: np.ndarray) -> tuple[np.ndarray, int]:
    """The [N, 2, S] chunks with at least one label token (a chunk's first token is no target), and how many had
    none."""
    keep = chunks[:, 1, 1:].any(axis=1)
    return chunks[keep], int((~keep).sum())


def split_off(records: list, fraction: float) -> tuple[list, list]:
    """(train, validation): a fraction of the records, chosen by a fixed permutation (the same split on every run
    and machine), held out; both keep the records' order."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, got {fraction}")
    k = round(len(records) * fraction)
    if k == 0 or k == len(records):
        raise ConfigError(f"--val-fraction {fraction} of {len(records)} records leaves "
                          f"{'no validation' if k == 0 else 'no training'} records")
    held = set(np.random.default_rng(0).permutation(len(records))[:k].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def build(plan: Plan) -> tuple[Engine, float]:
    """The engine, and the seconds its build took. On a GPU the memory peaks restart afterwards, so they are the
    training's own (the weights stay allocated, so they count)."""
    job = plan.job
    if plan.train.memory_budget_gib is not None:  # before the first allocation of the model
        torch.cuda.set_per_process_memory_fraction(check_memory_budget(plan.train.memory_budget_gib, plan.device),
                                                   plan.device)
    t0 = time.perf_counter()
    layout = sharder = None
    if plan.train.shard != "none":
        from .shard import mesh, native_sharder

        group = plan.train.shard_group_size or plan.world // plan.nnodes
        layout = mesh(plan.train.shard, plan.world, group, plan.device)
        sharder = native_sharder(plan.precision.dtype, layout, gather_as_stored=plan.precision.fp8_weights) \
            if spec(job.engine).can("shard-at-build") else None
    engine = build_engine(job.engine, plan.model_cfg, job.lora, model_dir=job.model_dir if job.init == "pretrained"
                          else None, device=plan.device, precision=plan.precision, seed=plan.train.seed,
                          native=plan.native, attn=job.attn, checkpointing=plan.train.activation_checkpointing,
                          sharder=sharder)
    if job.init_adapter is not None:
        engine.load_adapter(job.init_adapter)
    if layout is not None:
        if sharder is None:  # the reference engine, built whole: sharded now (identical weights on every rank)
            from .shard import shard_engine

            shard_engine(engine, plan.precision.dtype, layout)
        engine.mark_sharded(list(layout.shape))  # (replicas, ranks a group) for hsdp
    build_s = time.perf_counter() - t0
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(plan.device)
    return engine, build_s


def evaluate(plan: Plan, engine: Engine, result: dict | None = None) -> dict:
    """MMLU on rank 0 (the adapters are identical on every rank) by the protocols the job asks for, in the job's
    precision (its matmul mode): {"lm-eval": summary, "flagperf": summary} of those that ran, their figures also
    into ``result``'s metrics where given: mmlu_acc (lm-evaluation-harness's), mmlu_acc_flagperf (FlagPerf's, 3
    decimals)."""
    from .mmlu.evaluate import evaluate_protocols

    job = plan.job
    with plan.precision.matmul_mode():
        done = evaluate_protocols(engine, job.model_dir, plan.mmlu, plan.device, plan.run_dir,
                                  progress=job.progress and plan.rank == 0, subjects=plan.mmlu_subjects,
                                  seq_len=plan.train.seq_len)
    if result is None:
        return done
    m = result["metrics"]
    if "lm-eval" in done:
        mm = done["lm-eval"]
        m.update(mmlu_acc=mm["acc"], mmlu_acc_macro=mm["acc_macro"], mmlu_questions=mm["questions"],
                 mmlu_shots=mm["shots"], mmlu_categories=mm["categories"])
    if "flagperf" in done:
        fp = done["flagperf"]
        m.update(mmlu_acc_flagperf=fp["acc"], mmlu_acc_flagperf_exact=fp["acc_exact"],
                 mmlu_flagperf_questions=fp["questions"], mmlu_flagperf_seq_len=fp["seq_len"],
                 mmlu_flagperf_shots_dropped=fp["shots_dropped"])
    return done


def eval_job(job: Job) -> dict:
    """``lorabench eval``: the model (and ``job.init_adapter``) scored on MMLU through the run's own stages:
    resolve, claim the folder, build, evaluate; eval.json written there. Returns eval.json's content."""
    plan = resolve(job)
    plan.run_dir, plan.lock = rundir.claim(job.run_dir, job.overwrite, job.default_run_dir, "eval", job.inputs())
    try:
        engine, load_s = build(plan)
        synchronize(plan.device)
        t0 = time.perf_counter()
        done = evaluate(plan, engine)
        synchronize(plan.device)
        info = {"load_s": load_s, "eval_s": time.perf_counter() - t0, "precision": plan.precision.name,
                "engine": job.engine, "engine_options": engine.describe(),
                "adapter": str(job.init_adapter) if job.init_adapter else None, "model_dir": str(job.model_dir),
                "init": job.init, "mmlu": done.get("lm-eval"), "mmlu_flagperf": done.get("flagperf")}
        write_json_atomic(plan.run_dir / "eval.json", info)
        return info
    except BaseException:  # a refusal, Ctrl-C or a failure before eval.json: the new folder given back
        if not (plan.run_dir / "eval.json").exists():
            rundir.unclaim(plan.run_dir, plan.lock)
        raise
    finally:
        plan.lock.release()


def run_job(job: Job) -> dict:
    """Train (and evaluate) as ``job`` says; returns the result dict, also written to run_dir on rank 0. Under
    torchrun every rank runs this, in the process group it joins here. The run folder stays locked until the run
    ends; a refusal before training starts gives a new folder back."""
    with process_group():
        return _run_job(job)


def _run_job(job: Job) -> dict:
    phases = M.Phases(job.started)
    if job.started is not None:
        phases.add("startup", time.perf_counter() - job.started)
    with phases("resolve"):
        plan = resolve(job)
    plan.phases = phases
    with phases("data"):
        data = load_data(plan)
    try:
        ck = claim_output(plan, data)
        return _run(plan, data, ck)
    except BaseException:  # a refusal, Ctrl-C or a failure before the first step: the new folder given back
        if plan.run_dir is not None and job.resume is None and plan.lock is not None and \
                not (plan.run_dir / "metrics.jsonl").exists():
            rundir.unclaim(plan.run_dir, plan.lock)
        raise
    finally:
        if plan.lock is not None:
            plan.lock.release()


def _run(plan: Plan, data: Data, ck: resume.CheckpointPlan | None) -> dict:
    job = plan.job
    if plan.rank != 0:
        plan.run_dir = None  # only rank 0 writes results (the other ranks write their checkpoint RNG files)
    done = [ck.resume["step"] if ck is not None and ck.resume else 0]  # optimiser steps ended, for an OOM message
    with out_of_memory_message(plan, done, "while building the model"), plan.phases("build"):
        engine, build_s = build(plan)
    lead = plan.rank == 0
    evaluates = lead or engine.sharded  # a sharded model needs every rank in each forward
    if ck is not None and ck.resume is not None:
        rouge_before = ck.resume.get("extra", {}).get("rouge_before")
    elif evaluates and job.eval_rouge:
        with plan.phases("rouge"):
            rouge_before = rouge_pass(plan, engine, data)
    else:
        rouge_before = None
    if ck is not None:
        ck.extra["rouge_before"] = rouge_before
    device_mem = M.DeviceMemoryPeak(plan.device) if plan.device.type == "cuda" else None
    with device_mem or contextlib.nullcontext(), \
            resume.on_signals(ck.stop) if ck is not None else contextlib.nullcontext(), \
            step_stream(plan.run_dir, done[0], job.tensorboard) as on_step, out_of_memory_message(plan, done), \
            plan.phases("train"):
        def counted(record: dict):
            done[0] = record["step"]
            if on_step is not None:
                on_step(record)

        out = train_loop(engine, data.train, plan.train, plan.device, val_data=data.val, progress=job.progress,
                         checkpoint=ck, on_step=counted, on_best=best_adapter_writer(plan, engine))
    try:
        result = _after_training(plan, engine, data, out, build_s, device_mem, ck, rouge_before)
    except KeyboardInterrupt:
        if ck is None or not resume.states(ck.folder):
            raise
        during = "while writing the results" if plan.writing else "while evaluating after training"
        raise resume.Interrupted(out["steps"], ck.folder, during) from None
    return result


def _after_training(plan: Plan, engine: Engine, data: Data, out: dict, build_s: float, device_mem, ck,
                    rouge_before) -> dict:
    """Measure, save the adapter, evaluate, write; the checkpoint goes once the results are written."""
    job, lead = plan.job, plan.rank == 0
    evaluates = lead or engine.sharded
    result = measure(plan, engine, data, out, build_s, device_mem)
    if ck is not None and ck.resume is not None:
        result["resumed_at_step"] = ck.resume["step"]
    run_dir = plan.run_dir
    if run_dir is not None:
        result["run_dir"] = str(run_dir)
    adapters = None
    if engine.sharded:  # the whole adapters, gathered on every rank (a collective)
        from .shard import full

        adapters = {k: (full(a.detach()), full(b.detach())) for k, (a, b) in engine.adapters().items()}
    if lead and run_dir is not None and job.save_adapter:
        with plan.phases("save_adapter"):
            engine.save_adapter(run_dir / "adapter", adapters)
        result["adapter_dir"] = str(run_dir / "adapter")
    if evaluates and job.eval_rouge:
        with plan.phases("rouge"):
            record_rouge(result, rouge_before, rouge_pass(plan, engine, data), job, run_dir)
    if job.mmlu is not None and evaluates:
        done = evaluate(plan, engine, result)
        for protocol, summary in done.items():
            plan.phases.add(f"mmlu_{protocol.replace('-', '_')}", summary["eval_s"])
    barrier()
    result["phases"] = plan.phases.as_dict()
    if lead and run_dir is not None:
        plan.writing = True
        write(run_dir, result, plan.phases)
        resume.remove(ck)  # the run is complete: its results replace the checkpoint
    return result


