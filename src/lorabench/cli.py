"""lorabench command line: ``run`` (fine-tune and measure), ``eval`` (MMLU 5-shot), ``bench`` (engines side by side).

    lorabench run                                   # the bundled tiny default, CPU, under a minute
    lorabench run --model-dir /data/Llama-2-7b-hf --data /data/samsum --preset flagperf-fp16 --device cuda
    lorabench run --init random --model llama2-7b --data synthetic --preset bf16 --max-steps 20

Every setting is a flag here and a typed field behind it (TrainConfig, LoRAConfig, NativeOptions, MmluOptions);
flags left out keep the preset's value or the default for the precision and device.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import rundir
from .config import MODEL_PRESETS, TRAIN_PRESETS, ConfigError, resolve_preset
from .data.formats import FORMATS
from .files import DiskFull
from .kernels.attention import ATTENTION_IMPLS
from .kernels.dropout import MASK_IMPLS
from .mmlu.scoring import PREFIX_ATTENTION
from .precision import PRECISIONS
from .resume import Interrupted
from .shard import SHARDINGS
from .streams import OutOfMemory

TRAIN_FLAGS = {  # flag -> (TrainConfig field, type, help)
    "--precision": ("precision", str, "fp32 (true fp32), tf32 (fp32 weights, TF32 matmuls; CUDA), fp16 (fp16 "
                    "weights + GradScaler), bf16, fp8 (the blocks' frozen projections in FP8, forward and "
                    "input-gradient GEMMs in FP8; Ada/Hopper GPUs, emulated on a CPU), nf4 (QLoRA: those "
                    "projections in 4-bit NF4, dequantized to bf16 for each product; any device) or nf4-fp8 (stored "
                    "as nf4, their products run as fp8's)"),
    "--batch-size": ("batch_size", int, "local batch size (packed sequences per micro-batch per chip)"),
    "--seq-len": ("seq_len", int, "tokens per packed sequence"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimiser step"),
    "--epochs": ("epochs", int, "passes over the training data"),
    "--max-steps": ("max_steps", int, "stop after this many optimiser steps"),
    "--lr": ("lr", float, "AdamW learning rate"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay"),
    "--adam-beta1": ("adam_beta1", float, "AdamW beta1, the gradient mean's decay (default 0.9)"),
    "--adam-beta2": ("adam_beta2", float, "AdamW beta2, the squared gradient mean's decay (default 0.999; 0.95 "
                     "follows a suddenly growing gradient, where 0.999 lets the steps grow with it)"),
    "--lr-gamma": ("lr_gamma", float, "StepLR decay per epoch"),
    "--untimed-steps": ("untimed_steps", int, "first steps left out of the timing statistics (compilation, "
                        "allocator warm-up); the learning rate's warm-up is --lr-warmup-steps"),
    "--eval-batches": ("eval_batches", int, "validation batches after training (0 skips)"),
    "--lr-schedule": ("lr_schedule", str, "step (FlagPerf's: x --lr-gamma after every epoch), cosine or linear "
                      "(to 0 over the run's steps after the warm-up) or constant"),
    "--lr-warmup-steps": ("lr_warmup_steps", int, "steps of linear learning-rate warm-up (any schedule; default 0)"),
    "--eval-every": ("eval_every", int, "also compute the eval loss every N steps (recorded per step; the best "
                     "step's adapter kept as best_adapter/)"),
    "--max-grad-norm": ("max_grad_norm", float, "clip the adapters' gradient to this global L2 norm before each step "
                        "(default: no clipping; the norm is recorded per step)"),
    "--checkpoint-minutes": ("checkpoint_minutes", float, "also write a checkpoint whenever this many minutes have "
                             "passed since the last"),
    "--checkpoint-every": ("checkpoint_every", int, "write a checkpoint (adapter, optimizer, scheduler, RNGs, data "
                           "position) to <run dir>/checkpoint every N steps; Ctrl-C or SIGTERM always writes one "
                           "and stops"),
    "--loss-on": ("loss_on", str, "all (FlagPerf's: every token) or response (only the answers: samsum's summary, "
                  "alpaca's output, a --prompt-template's last {column}; normalised by the label tokens of the whole "
                  "optimiser step)"),
    "--packing": ("packing", str, "flagperf (records concatenated under one causal mask, FlagPerf's), documents "
                  "(positions restart and attention stays within each record; native and reference engines) or "
                  "none (one record a row, each batch padded to its longest row; tok/s and MFU count no padding)"),
    "--shard": ("shard", str, "none (each torchrun rank holds the whole model: data parallel), fsdp (the model "
                "sharded over the ranks with FSDP2; native and reference engines) "
                "or hsdp (sharded within each node, replicated across nodes)"),
    "--shard-group-size": ("shard_group_size", int, "--shard hsdp: ranks per sharded group (default: one node's)"),
    "--keep-checkpoints": ("keep_checkpoints", int, "how many of the newest checkpoints stay on disk (default 1; "
                           "--resume takes the newest)"),
    "--seed": ("seed", int, "seed for random weights, adapter init, shuffling and dropout"),
}
LORA_FLAGS = {
    "--lora-r": ("r", int, "adapter rank"),
    "--lora-alpha": ("alpha", float, "adapter scale numerator (scale = alpha / r)"),
    "--lora-dropout": ("dropout", float, "dropout on the adapter input"),
    "--lora-targets": ("targets", lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                       "comma-separated projections, e.g. q_proj,v_proj"),
}
NATIVE_FLAGS = ("attention", "fused_projections", "compile", "compile_mode", "dropout_mask", "fp8_grad",
                "fp8_skip", "fp8_recipe", "nf4_dequant", "checkpoint_blocks")
"""NativeOptions fields, each a flag of the same name (kebab-case)."""


class _Renamed(argparse.Action):
    """A flag that was renamed: using it stops with the new name (hidden from --help)."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new}")


def _renamed_warmup(p: argparse.ArgumentParser):
    p.add_argument("--warmup-steps", action=_Renamed, new="--untimed-steps (steps left out of the timing; the "
                   "learning rate's warm-up is --lr-warmup-steps)")


def _add_model_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model-dir", type=Path, help="HF-format Llama folder (config.json, tokenizer, safetensors or "
                   ".bin shards); default: the bundled tiny model")
    g.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="random: exact architecture with random weights made on the device (no weight files)")
    g.add_argument("--model", dest="model_preset", help="shape preset for --init random without --model-dir "
                   f"({', '.join(MODEL_PRESETS)})")
    g.add_argument("--engine", default="native", help="native (ours, default), reference (transformers + PEFT, the "
                   "seed's stack), reference+liger, reference+compile, reference+bnb (over bitsandbytes' NF4), "
                   "unsloth, unsloth-fp8 or unsloth-4bit (Unsloth's stack, CUDA only)")
    g.add_argument("--attn", default=None, choices=("eager", "sdpa"), help="attention of the plain reference "
                   "engine (default eager, as FlagPerf's stack)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_memory_flags(p: argparse.ArgumentParser):
    from .config import ACTIVATION_CHECKPOINTING

    g = p.add_argument_group("memory")
    g.add_argument("--activation-checkpointing", choices=ACTIVATION_CHECKPOINTING, help="what the forward keeps "
                   "for the backward (memory and speed, never the numbers): block keeps each block's input and "
                   "recomputes the block; offload: block with those inputs in host memory; matmuls: recomputes only "
                   "the elementwise work; adapter-inputs: recomputes the inputs of adapters without dropout (native, "
                   "compiled: the default there, else none). reference* take none and block, unsloth* also offload")
    g.add_argument("--memory-budget-gib", type=float, metavar="GIB", help="cap the GPU memory the run may use at "
                   "GIB (PyTorch's caching allocator), to measure what fits a smaller card on this one; recorded in "
                   "result.json (CUDA only)")


def _blocks(text) -> int | None:
    """--checkpoint-blocks: a count, or "all" (None: every block under the policy, also over a config file's N)."""
    if isinstance(text, int):
        return text
    if str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of blocks or all") from None


def _add_native_flags(p: argparse.ArgumentParser, training: bool = True):
    from .engines.native import COMPILE_MODES
    from .kernels.fp8 import FP8_RECIPES, GRAD_FORMATS
    from .quantized import NF4_DEQUANT

    g = p.add_argument_group("native engine tuning", "defaults follow the precision and device (chosen by "
                             "measurement; see NativeOptions); result.json records what ran")
    g.add_argument("--attention", choices=ATTENTION_IMPLS, help="training attention: SDPA's own pick, an SDPA "
                   "kernel put first, or two matmuls (default: cudnn for fp16/bf16 and matmul for tf32 on a GPU, "
                   "else sdpa)")
    g.add_argument("--fused-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="one GEMM for q/k/v and one for gate/up (default: on for tf32 on a GPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each decoder block (default: on with CUDA)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile's mode for the training blocks "
                   "(reduce-overhead: CUDA graphs; default: torch's default)")
    g.add_argument("--dropout-mask", choices=MASK_IMPLS, help="how adapters draw dropout masks (default philox16: "
                   "a Triton kernel on a GPU, torch's Bernoulli kernel on a CPU)")
    g.add_argument("--fp8-grad", choices=tuple(GRAD_FORMATS), help="--precision fp8, nf4-fp8: the FP8 format "
                   "input gradients are quantized to, per token, for their GEMMs (default e4m3)")
    g.add_argument("--fp8-skip", type=LORA_FLAGS["--lora-targets"][1], metavar="PROJ[,PROJ]",
                   help="--precision fp8: block projections kept in bf16, e.g. down_proj (on a trained model its "
                   "input carries the largest activations: more accurate, somewhat slower)")
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, help="--precision fp8: how FP8 tensors are scaled: rowwise "
                   "(one scale per token and per weight output channel; the default) or tensorwise (one scale per "
                   "tensor, the weight's too: cuBLASLt's tensorwise GEMMs)")
    g.add_argument("--nf4-dequant", choices=NF4_DEQUANT, help="--precision nf4, nf4-fp8: how each product "
                   "dequantizes its 4-bit weight: triton (one Triton kernel; the default on a GPU) or torch (PyTorch "
                   "ops, fused by --compile; the default elsewhere), the same values bit for bit")
    if training:
        g.add_argument("--checkpoint-blocks", type=_blocks, metavar="N|all", help="--activation-checkpointing block "
                       "or matmuls: only the first N decoder blocks recompute, the later ones keep every activation "
                       "(default: all); raise N until the step fits (--memory-budget-gib), each block kept saves "
                       "its recomputation")


def native_options(a):
    from .engines import NativeOptions

    return NativeOptions(**{f: getattr(a, f, None) for f in NATIVE_FLAGS})


def _add_mmlu_flags(p: argparse.ArgumentParser, in_run: bool):
    g = p.add_argument_group("MMLU")
    g.add_argument("--mmlu", help="MMLU folder (dev/ + test/ CSVs, or cais/mmlu parquet) or HF dataset name"
                   + ("; default: the bundled tiny sample with the tiny model, none otherwise" if in_run else ""))
    if in_run:
        g.add_argument("--no-mmlu", action="store_true", help="skip the MMLU check")
    g.add_argument("--subjects", help="comma-separated subjects (default: all found)")
    g.add_argument("--shots", type=int, default=5, help="few-shot examples per question")
    g.add_argument("--limit", type=int, help="at most this many test questions per subject")
    if not in_run:  # one name in run and eval (in run --batch-size is the training batch)
        g.add_argument("--batch-size", action=_Renamed, new="--mmlu-batch-size")
    g.add_argument("--mmlu-batch-size", dest="mmlu_batch_size", type=int, default=None,
                   help="at most this many questions per forward pass (default: 256 on GPU, 8 on CPU)")
    g.add_argument("--mmlu-batch-tokens", type=int, help="at most this many tokens per forward pass, padding "
                   "included (default: 16384 on GPU, no cap on CPU; 0: no cap)")
    g.add_argument("--no-prefix-cache", action="store_true", help="recompute the shared few-shot prefix for "
                   "every question (slower; for checking)")
    g.add_argument("--prefix-attention", choices=PREFIX_ATTENTION, default=PREFIX_ATTENTION[0],
                   help="how questions attend to the cached prefix: split (one attention against the single "
                   "prefix, merged by log-sum-exp) or copy (SDPA over per-question copies)")
    g.add_argument("--mmlu-kv-tokens", type=int, help="with --prefix-attention copy: keys + values per layer in "
                   "a batch's prefix copies (default: 2 GiB worth on GPU, no cap on CPU; 0: no cap)")
    g.add_argument("--tokenize-workers", type=int, help="processes that tokenise while the device scores "
                   "(default: up to 4 from 2,000 questions, else 0 = inline)")
    g.add_argument("--mmlu-protocol", choices=("lm-eval", "flagperf", "both"), default=None,
                   help="lm-eval (lm-evaluation-harness: the four letters' log-likelihoods), flagperf (FlagPerf's "
                   "prompt, length rule and whole-vocabulary argmax) or both (default: both with the flagperf-* "
                   "presets, else lm-eval)" if in_run else "lm-eval (default; lm-evaluation-harness), flagperf "
                   "(FlagPerf's prompt, length rule and whole-vocabulary argmax) or both")
    if not in_run:
        g.add_argument("--seq-len", type=int, default=512, help="FlagPerf's length rule: the prompt and BOS within "
                       "this many tokens (default 512, the case's)")
    g.add_argument("--mmlu-compiled-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="score with the compiled evaluation graph when the blocks are compiled, in either protocol "
                   "(default: on a GPU for lm-eval's protocol from 10,000 questions on, where it pays for its ~24 s "
                   "compile; otherwise eager)")


def mmlu_options(a, mmlu_dir: str, default_protocol: str = "lm-eval"):
    from .mmlu.evaluate import MmluOptions

    subjects = tuple(s.strip() for s in a.subjects.split(",") if s.strip()) if a.subjects else None
    return MmluOptions(dir=str(mmlu_dir), subjects=subjects, shots=a.shots, limit=a.limit,
                       batch_size=a.mmlu_batch_size, batch_tokens=a.mmlu_batch_tokens, kv_tokens=a.mmlu_kv_tokens,
                       prefix_cache=not a.no_prefix_cache, prefix_attention=a.prefix_attention,
                       tokenize_workers=a.tokenize_workers, compiled_graph=a.mmlu_compiled_graph,
                       protocol=a.mmlu_protocol or default_protocol,
                       seq_len=getattr(a, "seq_len", None) if a.cmd == "eval" else None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lorabench", description="LoRA fine-tuning benchmark and trainer for Llama "
                                 "models (FlagPerf llama2_7b_finetune, measured honestly).")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"lorabench {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ap.subcommands = sub.choices  # {name: its parser}, for --config

    run = sub.add_parser("run", help="fine-tune with LoRA and measure (default: bundled tiny model on CPU)",
                         description="Fine-tune with LoRA on samsum-format data; writes <run-dir>/result.json, "
                         "report.md and the adapter (PEFT format).")
    run.add_argument("--preset", default=None, help=f"one of {', '.join(TRAIN_PRESETS)} (default: tiny for the "
                     "bundled model, flagperf-fp32 otherwise)")
    run.add_argument("--data", help="samsum corpus.7z, a folder of train/val/test files, a .json/.jsonl/.csv/"
                     ".parquet file, an HF dataset name, or 'synthetic'; default: the bundled tiny data")
    run.add_argument("--format", dest="data_format", choices=FORMATS,
                     help="the records' format (default: from their columns: dialogue+summary, instruction+input+"
                     "output, text, messages (role/content turns, rendered with the model's chat template), "
                     "conversations (ShareGPT from/value turns))")
    run.add_argument("--val-fraction", type=float, help="hold out this fraction of the records (a fixed choice) "
                     "for the eval loss, for data without a validation split")
    run.add_argument("--prompt-template", help="the text of a record of other columns, e.g. \"Q: {question}\\n"
                     "A: {answer}\" (each {column} replaced by its value)")
    _add_model_flags(run)
    g = run.add_argument_group("training (override the preset)")
    for flag, (_, typ, hlp) in {**TRAIN_FLAGS, **LORA_FLAGS}.items():
        g.add_argument(flag, type=typ, default=None, help=hlp)
    _renamed_warmup(g)
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None, help="shuffle the chunks "
                   "each epoch (default: on, off in the flagperf-* presets, which keep FlagPerf's file order)")
    g.add_argument("--init-adapter", type=Path, metavar="ADAPTER_DIR", help="start from this PEFT-format adapter "
                   "(lorabench's or PEFT's; same r, alpha and targets) instead of the fresh init")
    _add_memory_flags(run)
    _add_native_flags(run)
    o = run.add_argument_group("output")
    o.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU on a device the table does not know")
    o.add_argument("--run-dir", type=Path, help="output folder, absent or empty (default: a new "
                   "runs/<time>-<preset>-<engine>)")
    o.add_argument("--overwrite", action="store_true", help="replace a --run-dir that is not empty, whole")
    o.add_argument("--config", type=Path, metavar="FILE", help="settings from a TOML file of flag = value lines "
                   "(flags given here win); every run writes its own as <run dir>/config.toml")
    o.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the checkpointed run in RUN_DIR with "
                   "its own settings (read from RUN_DIR/config.toml; a flag that would change the numbers is "
                   "refused); its folder receives the results")
    o.add_argument("--cache-dir", type=Path, help="packed-data cache (default: $LORABENCH_CACHE or "
                   "~/.cache/lorabench)")
    o.add_argument("--no-save-adapter", action="store_true", help="do not write the adapter")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--eval-rouge", type=int, metavar="N", help="generate (greedy) for the first N validation "
                   "records before and after training and report ROUGE-1/2/L against their references (needs "
                   "pip install 'lorabench[rouge]')")
    o.add_argument("--rouge-max-new-tokens", type=int, default=64, help="--eval-rouge: tokens generated at most "
                   "per record (default 64)")
    o.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="TensorBoard "
                   "event files of the per-step series in <run dir>/tensorboard (default: on when the tensorboard "
                   "package is installed: pip install 'lorabench[tensorboard]')")
    _add_mmlu_flags(run, in_run=True)

    ev = sub.add_parser("eval", help="MMLU k-shot accuracy of a model (+ adapter)",
                        description="MMLU k-shot as lm-evaluation-harness scores it; writes mmlu.json, mmlu.md and "
                        "mmlu_predictions.jsonl to --run-dir.")
    _add_model_flags(ev)
    ev.add_argument("--adapter", type=Path, help="PEFT-format LoRA adapter folder (lorabench's or PEFT's)")
    ev.add_argument("--precision", choices=tuple(PRECISIONS), help="the same precisions as run (default: bf16 on "
                    "GPU, fp32 on CPU)")
    _add_native_flags(ev, training=False)
    ev.add_argument("--run-dir", type=Path, help="output folder, absent or empty (default: a new runs/<time>-eval)")
    ev.add_argument("--overwrite", action="store_true", help="replace a --run-dir that is not empty, whole")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_mmlu_flags(ev, in_run=False)

    b = sub.add_parser("bench", help="engines x presets side by side on random weights and synthetic tokens",
                       description="Each engine x preset runs as its own `lorabench run --init random --data "
                       "synthetic` process; prints one table and writes bench.json/bench.md under --run-dir.")
    b.add_argument("--engines", default="native,reference", help="comma-separated: native, reference, "
                   "reference+liger, reference+compile, reference+bnb, unsloth, unsloth-fp8, unsloth-4bit (Unsloth: "
                   "CUDA, pip install unsloth)")
    b.add_argument("--presets", default="flagperf-fp32,flagperf-fp16,bf16", help=f"comma-separated of "
                   f"{', '.join(TRAIN_PRESETS)}")
    b.add_argument("--model", help="shape preset (default: llama2-7b on a GPU, tiny on CPU)")
    b.add_argument("--steps", type=int, default=20, help="optimiser steps per row")
    b.add_argument("--untimed-steps", type=int, default=5, help="first steps of each row left out of the timing")
    _renamed_warmup(b)
    b.add_argument("--device", default="auto", help="auto, cpu, cuda")
    b.add_argument("--batch-size", help="override every preset's batch size; a comma-separated list (4,16,32) "
                   "runs every row at each and prints each engine's best")
    b.add_argument("--precision", choices=tuple(PRECISIONS), help="override every preset's precision")
    b.add_argument("--seq-len", type=int, help="override every preset's sequence length")
    b.add_argument("--lora-dropout", type=float, help="override the dropout (0 for exact loss parity)")
    b.add_argument("--lora-r", type=int, help="override the adapter rank, for every engine")
    b.add_argument("--lora-alpha", type=float, help="override the adapter scale numerator, for every engine")
    b.add_argument("--lora-targets", help="override the adapted projections, for every engine (e.g. "
                   "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    b.add_argument("--lr", type=float, help="override the learning rate (e.g. 1e-3 to see random weights learn)")
    b.add_argument("--attn", choices=("eager", "sdpa"), help="attention of the plain reference rows")
    b.add_argument("--timeout", type=float, default=900, help="seconds per row before it is reported as failed")
    b.add_argument("--rounds", type=int, default=1, help="run every row this many times, round after round (each "
                   "engine once, then again), so a machine's drift slows all engines alike; a row reports its median "
                   "round and the spread, its speed-up the median of the ratios within each round")
    b.add_argument("--variant", action="append", default=[], metavar="NAME:FLAGS", help="one more native row per "
                   "preset and LBS, named native[NAME], run with the native tuning FLAGS (e.g. "
                   "'tensorwise:--fp8-recipe tensorwise'; repeat for more), to compare settings side by side within the rounds")
    b.add_argument("--nproc", type=int, default=1, help="run every row as a torchrun job of this many processes "
                   "on this host (tok/s stays per chip)")
    b.add_argument("--shard", choices=SHARDINGS, help="every row's --shard (fsdp: FSDP2, with "
                   "--nproc 2+; native and reference rows)")
    b.add_argument("--no-floor", action="store_true", help="skip timing the floor (on a GPU it runs after the rows)")
    b.add_argument("--run-dir", type=Path, help="output folder, absent or empty (default: a new runs/<time>-bench)")
    b.add_argument("--overwrite", action="store_true", help="replace a --run-dir that is not empty, whole")
    _add_memory_flags(b)
    _add_native_flags(b)

    rp = sub.add_parser("report", help="re-render a run's report and plots, or put several runs side by side",
                        description="One RUN_DIR: report.md and the PNG plots again from its result.json. Several: "
                        "the settings that differ, the key metrics and tok/s ratios to the first, printed (and "
                        "written to --out).")
    rp.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="folders written by lorabench run")
    rp.add_argument("--out", type=Path, help="with several runs: also write the comparison here (Markdown)")
    return ap


def cmd_run(a) -> int:
    from . import config_file
    from .assets import TINY_DATA, TINY_MMLU, TINY_MODEL
    from .runner import Job, run_job

    bundled = a.model_dir is None and a.model_preset is None
    if a.init == "random" and bundled:
        raise ConfigError("--init random needs --model (a shape preset such as llama2-7b) or --model-dir")
    preset = a.preset or ("tiny" if bundled else "flagperf-fp32")
    train_kw = {f: getattr(a, flag[2:].replace("-", "_")) for flag, (f, _, _) in TRAIN_FLAGS.items()}
    train_kw.update(shuffle=a.shuffle, activation_checkpointing=a.activation_checkpointing,
                    memory_budget_gib=a.memory_budget_gib)
    lora_kw = {f: getattr(a, flag[2:].replace("-", "_")) for flag, (f, _, _) in LORA_FLAGS.items()}
    p = resolve_preset(preset, train_kw, lora_kw)
    data = a.data or (str(TINY_DATA) if bundled or a.model_dir == TINY_MODEL else None)
    if data is None:
        raise ConfigError("--data is required with your own model (samsum folder/file, or 'synthetic')")
    mmlu = None
    if a.no_mmlu and a.mmlu and a.resume is not None:  # (elsewhere --no-mmlu wins over a --config file's mmlu)
        raise ConfigError(f"--mmlu {a.mmlu}: the run in {a.resume} was started with --no-mmlu (its config.toml), "
                          "and a resumed run evaluates as its run did; run lorabench eval on its adapter afterwards")
    if not a.no_mmlu and (a.mmlu or bundled):
        mmlu = mmlu_options(a, a.mmlu or str(TINY_MMLU), "both" if preset.startswith("flagperf-") else "lm-eval")
    default_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}-{a.engine}"
    job = Job(train=p.train, lora=p.lora, preset=preset, fix_hp=p.fix_hp, engine=a.engine,
              model_dir=TINY_MODEL if bundled else a.model_dir, init=a.init, model_preset=a.model_preset,
              data=data, data_format=a.data_format, prompt_template=a.prompt_template,
              val_fraction=a.val_fraction, device=a.device,
              attn=a.attn or "eager", native=native_options(a),
              peak_tflops=a.peak_tflops, run_dir=a.run_dir, default_run_dir=default_dir, overwrite=a.overwrite,
              save_adapter=not a.no_save_adapter, resume=a.resume, init_adapter=a.init_adapter,
              cache_dir=a.cache_dir, progress=not a.no_progress, tensorboard=a.tensorboard, mmlu=mmlu,
              eval_rouge=a.eval_rouge, rouge_max_new_tokens=a.rouge_max_new_tokens,
              precision_off_cuda=p.precision_off_cuda, precision_from_flag=a.precision is not None,
              settings=config_file.render(build_parser().subcommands["run"], a), config_file=a.config,
              started=_process_start())
    result = run_job(job)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        from .report import render_report

        print(render_report(result))
        run_dir = Path(result["run_dir"])
        print(f"wrote {run_dir / 'result.json'}, {run_dir / 'report.md'} and {run_dir / 'config.toml'}")
    return 0


def _process_start() -> float | None:
    """This process's start as a time.perf_counter() reading (None where the system does not say)."""
    from .metrics import process_age

    age = process_age()
    return None if age is None else time.perf_counter() - age


def cmd_eval(a) -> int:
    import json

    from .adapter_io import read_adapter
    from .assets import TINY_MMLU, TINY_MODEL
    from .config import LoRAConfig, TrainConfig
    from .mmlu.evaluate import render_mmlu
    from .precision import default_eval_precision
    from .runner import Job, eval_job, resolve_device

    if a.model_preset is not None:
        raise ConfigError("--model: eval reads the model's shape and its tokenizer from --model-dir (with --init "
                          "random, only those)")
    model_dir = a.model_dir or TINY_MODEL
    mmlu_dir = a.mmlu or (str(TINY_MMLU) if a.model_dir is None else None)
    if mmlu_dir is None:
        raise ConfigError("--mmlu is required: the MMLU folder (dev/ and test/ CSVs, or cais/mmlu parquet)")
    precision = a.precision or default_eval_precision(resolve_device(a.device))
    lora = read_adapter(a.adapter)[0] if a.adapter else LoRAConfig()
    job = Job(train=TrainConfig(precision=precision, seq_len=a.seq_len, seed=0), lora=lora, preset="eval",
              engine=a.engine, model_dir=model_dir, init=a.init, device=a.device, attn=a.attn or "eager",
              native=native_options(a), run_dir=a.run_dir, overwrite=a.overwrite, init_adapter=a.adapter,
              default_run_dir=Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-eval",
              progress=not a.no_progress, mmlu=mmlu_options(a, mmlu_dir), precision_from_flag=True, command="eval")
    info = eval_job(job)
    if info["mmlu"] is not None:
        print(render_mmlu(info["mmlu"]))
    if info["mmlu_flagperf"] is not None:
        fp = info["mmlu_flagperf"]
        print(f"MMLU by FlagPerf's rules: acc {fp['acc']:.3f} ({fp['acc_exact']:.4f}) over {fp['questions']} "
              f"questions, prompts within {fp['seq_len']} tokens; shots dropped for {fp['shots_dropped']}, the "
              f"question itself cut for {fp['question_cut']}")
    accs = {"acc_lm-eval": info["mmlu"], "acc_flagperf": info["mmlu_flagperf"]}
    print(json.dumps({**{k: s["acc"] for k, s in accs.items() if s is not None},
                      **{k: info[k] for k in ("load_s", "eval_s", "precision", "engine")}}))
    return 0


def cmd_report(a) -> int:
    from .plots import plot_run
    from .files import write_text_atomic
    from .report import compare_runs, read_result, render_report

    results = [(str(d), read_result(d)) for d in a.run_dirs]
    if len(results) == 1:
        d, result = a.run_dirs[0], results[0][1]
        rundir.check_free(d)  # (a run still writing its folder would have its report replaced under it)
        drawn = plot_run(result, d)
        write_text_atomic(d / "report.md", render_report(result))
        print(render_report(result))
        print(drawn if isinstance(drawn, str) else "wrote " + ", ".join(str(p) for p in [d / "report.md", *drawn]))
        return 0
    if a.out is not None:
        _check_report_out(a.out)
    text = compare_runs(results)
    print(text)
    if a.out:
        write_text_atomic(a.out, text)
        print(f"wrote {a.out}")
    return 0


def _check_report_out(out: Path):
    """Refuse a comparison's --out that is a folder, or a file a run wrote in its own folder."""
    if out.is_dir():
        raise ConfigError(f"--out {out}: a folder; give a file to write, e.g. {out / 'compare.md'}")
    if rundir.is_recognised(out.parent) and rundir.is_output_name(out.name):
        raise ConfigError(f"--out {out}: {out.parent} is a lorabench folder and {out.name} one of its own files; "
                          "give another name (e.g. compare.md) or another folder")


COMMANDS = """commands:
  lorabench run      fine-tune with LoRA and measure (no flags: the bundled tiny model on the CPU, under a minute)
  lorabench eval     MMLU k-shot accuracy of a model, with or without an adapter
  lorabench bench    engines x presets side by side
  lorabench report   re-render a run's report, or put several runs side by side

lorabench COMMAND --help explains each command's flags."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_usage()
        print(COMMANDS)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run" and (args.config is not None or args.resume is not None):
            from . import config_file

            # the file's settings become defaults and flags win; --resume reads the run's own (its config.toml)
            if args.config is not None and args.resume is not None:
                raise ConfigError("--resume reads the run's own settings from RUN_DIR/config.toml; leave out --config")
            path = args.config if args.config is not None else args.resume / "config.toml"
            if args.config is not None or path.is_file():
                run = parser.subcommands["run"]
                run.set_defaults(**config_file.defaults_from(run, config_file.read(path), path))
                args = parser.parse_args(argv)
        if args.cmd == "bench":
            from .bench.command import cmd_bench

            return cmd_bench(args)
        return {"run": cmd_run, "eval": cmd_eval, "report": cmd_report}[args.cmd](args)
    except ConfigError as e:
        print(f"lorabench: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"lorabench: error: {e}", file=sys.stderr)
        return 3
    except OutOfMemory as e:
        print(f"lorabench: error: {e}", file=sys.stderr)
        return 4
    except DiskFull as e:
        print(f"lorabench: error: {e}", file=sys.stderr)
        return 6
    except Interrupted as e:
        print(f"lorabench: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("lorabench: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print("lorabench: error: out of device memory; lower --batch-size or --seq-len, or use a smaller "
                  f"precision ({str(e).splitlines()[0]})", file=sys.stderr)
            return 4
        if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            print(f"lorabench: error: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "rerun with --no-compile", file=sys.stderr)
            return 5
        raise


if __name__ == "__main__":
    sys.exit(main())
