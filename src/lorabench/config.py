"""Typed configs for lorabench: the model shape, the LoRA adapter and the training run.

Every config is a dataclass with a docstring per field and validation in ``__post_init__``; named presets live
in small dicts (``MODEL_PRESETS``, ``TRAIN_PRESETS``) and are plain data. The CLI exposes every field as a flag.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError
from .precision import get_precision

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as an HF config.json's ``rope_scaling`` / ``rope_parameters`` gives it: ``linear`` divides
    every frequency by ``factor``; ``llama3`` (Llama 3.1-3.3) divides the low frequencies by ``factor``, keeps the
    high ones and blends between them (model.rope_inv_freq)."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES[1:]:
            raise ConfigError(f"model config: rope scaling {self.rope_type!r} is not supported (supported: linear, "
                              "llama3)")
        if not self.factor > 0:
            raise ConfigError(f"model config: rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3":
            for f in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if getattr(self, f) is None:
                    raise ConfigError(f"model config: llama3 rope scaling needs {f}")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ConfigError("model config: llama3 rope scaling needs high_freq_factor > low_freq_factor > 0")

    def to_hf(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (the fields of an HF ``config.json`` that matter)."""

    vocab_size: int = 32000
    """Number of token ids."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    intermediate_size: int = 11008
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 32
    """Number of decoder blocks."""
    num_attention_heads: int = 32
    """Query heads."""
    num_key_value_heads: int = 32
    """Key/value heads (fewer than query heads means grouped-query attention)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model was trained for."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    tie_word_embeddings: bool = False
    """Whether lm_head shares the input embedding (Llama-2: no)."""
    rope_scaling: RopeScaling | None = None
    """RoPE scaling (Llama 3.1's llama3, or linear); None: plain RoPE."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections (Qwen2 / Qwen2.5; HF model_type qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE (Qwen3; HF model_type qwen3)."""
    sliding_window: int | None = None
    """Mistral's attention window, where it is shorter than max_position_embeddings: in training each query sees
    itself and the window - 1 tokens before it (model.training_mask); evaluation with a KV cache stops at it
    (``context_limit``)."""
    explicit_head_dim: int | None = None
    """config.json's head_dim where it is given (Qwen3-0.6B: 128 with hidden 1024 / 16 heads); None:
    hidden_size / num_attention_heads."""
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"model config: {f} must be positive, got {getattr(self, f)}")
        for f in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"model config: {f} must be positive, got {getattr(self, f)}")
        if self.explicit_head_dim is not None and self.explicit_head_dim <= 0:
            raise ConfigError(f"model config: head_dim must be positive, got {self.explicit_head_dim}")
        if self.qkv_bias and self.qk_norm:
            raise ConfigError("model config: q/k/v biases with q/k norms is no supported architecture")
        if self.sliding_window is not None and (self.qkv_bias or self.qk_norm):
            raise ConfigError("model config: a sliding window is supported for Mistral only")
        if self.explicit_head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"model config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "ModelConfig":
        """Read an HF ``config.json`` (or the folder holding it)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"--model-dir {path}: no such folder (give an HF-format Llama folder, or --init random "
                              "--model llama2-7b)")
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json; --model-dir must be an HF-format model folder")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        check_supported(raw, path)
        known = {f.name: f for f in fields(cls)}
        kw = {k: v for k, v in raw.items() if k in known and v is not None}
        for k, v in kw.items():  # a value of the wrong type is named, never passed on to the model
            want = known[k].type if isinstance(known[k].type, str) else known[k].type.__name__
            ok = {"int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                  "bool": isinstance(v, bool)}.get(want, True)
            if k == "eos_token_id" and isinstance(v, list):
                ok = all(isinstance(x, int) for x in v)
            if not ok:
                raise ConfigError(f"{path}: {k} is {v!r}; expected {'an integer' if want == 'int' else want}")
        kw.setdefault("num_key_value_heads", raw.get("num_attention_heads", cls.num_key_value_heads))
        kw.pop("rope_scaling", None)
        for k in ("qkv_bias", "qk_norm", "explicit_head_dim", "sliding_window"):
            kw.pop(k, None)
        window = raw.get("sliding_window")
        if window is not None and raw.get("use_sliding_window", True) and window < raw["max_position_embeddings"]:
            if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
                raise ConfigError(f"{path}: sliding_window is {window!r}; expected a positive integer")
            kw["sliding_window"] = window
        if raw.get("model_type") == "qwen2":  # Qwen2 / Qwen2.5: q, k and v projections with biases
            kw["qkv_bias"] = True
        if raw.get("model_type") == "qwen3":  # Qwen3: RMSNorm on each head's q and k, head_dim given
            kw["qk_norm"] = True
        if raw.get("head_dim") is not None:
            if isinstance(raw["head_dim"], bool) or not isinstance(raw["head_dim"], int):
                raise ConfigError(f"{path}: head_dim is {raw['head_dim']!r}; expected an integer")
            if raw["head_dim"] != raw["hidden_size"] // raw["num_attention_heads"]:  # else the derived value
                kw["explicit_head_dim"] = raw["head_dim"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{path}: rope_scaling is {rope!r}; expected an object")
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type", "default")) or "default"
        if kind not in ROPE_TYPES:
            raise ConfigError(f"{path}: rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if kind != "default":
            try:
                kw["rope_scaling"] = RopeScaling(kind, rope.get("factor"), rope.get("low_freq_factor"),
                                                 rope.get("high_freq_factor"),
                                                 rope.get("original_max_position_embeddings"))
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"{path}: rope_scaling {json.dumps(rope)}: "
                                  f"{str(e).removeprefix('model config: ')}") from None
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {str(e).removeprefix('model config: ')}") from None

    @property
    def context_limit(self) -> int:
        """The longest prompt evaluation with a KV cache (MMLU, ROUGE) computes exactly: max_position_embeddings, or
        a shorter sliding window (training attends within the window at any length)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @property
    def hf_model_type(self) -> str:
        """The HF model_type of this shape: qwen2 where q/k/v carry biases, qwen3 with q/k norms, else llama."""
        if self.qkv_bias or self.qk_norm:
            return "qwen2" if self.qkv_bias else "qwen3"
        return "mistral" if self.sliding_window is not None else "llama"

    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` content for this shape (LlamaForCausalLM, or Qwen2ForCausalLM with qkv_bias)."""
        d = asdict(self)
        for k in ("qkv_bias", "qk_norm", "explicit_head_dim"):
            d.pop(k)
        window = d.pop("sliding_window")
        d["head_dim"] = self.head_dim
        d["rope_scaling"] = self.rope_scaling.to_hf() if self.rope_scaling is not None else None
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "mistral": "MistralForCausalLM"}.get(self.hf_model_type, "LlamaForCausalLM")
        d.update(architectures=[arch], model_type=self.hf_model_type, hidden_act="silu", initializer_range=0.02,
                 torch_dtype="float32", pad_token_id=None)
        if not self.qkv_bias:
            d.update(attention_bias=False, mlp_bias=False)
        if self.hf_model_type in ("qwen2", "qwen3"):
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        if self.hf_model_type == "mistral":
            d["sliding_window"] = window
        return d

    def hf_config(self):
        """This shape as a transformers config object of its model_type."""
        from transformers import AutoConfig

        d = self.to_hf_dict()
        return AutoConfig.for_model(d.pop("model_type"), **d)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Llama-2-7B / 13B: the published config.json values (meta-llama/Llama-2-7b-hf and -13b-hf).
    "llama2-7b": ModelConfig(),
    "llama2-13b": ModelConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40),
    # Llama-2-70B: 80 layers, hidden 8192, 64 heads over 8 KV heads, intermediate 28672, vocab 32000 (its published
    # config.json; the FP8 issue's shape).
    "llama2-70b": ModelConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8),
    # MLPerf Training's llama2_70b_lora shape: Llama-2-70B trained on sequences of 8,192 tokens (GovReport packed to
    # 8,192): the published config with max_position_embeddings 8,192, RoPE as published (no scaling).
    "llama2-70b-8k": ModelConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192),
    # Llama-3-8B and Llama-3.1-8B: their published config.json values (vocab 128,256, GQA 32/8, intermediate 14,336,
    # rope_theta 500,000; 3.1: 131,072 positions with llama3 RoPE scaling factor 8, low 1, high 4, original 8,192).
    "llama3-8b": ModelConfig(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                             max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
                             eos_token_id=128001),
    "llama3.1-8b": ModelConfig(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                               max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=128000,
                               eos_token_id=128001,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),
    # Mistral-7B v0.3 and Qwen2.5-7B: their published config.json values (Mistral: vocab 32,768, GQA 32/8,
    # intermediate 14,336, rope_theta 1e6, no sliding window; Qwen2.5: vocab 152,064, hidden 3,584, 28 layers, GQA
    # 28/4, intermediate 18,944, rms_norm_eps 1e-6, rope_theta 1e6, q/k/v biases).
    "mistral-7b": ModelConfig(vocab_size=32768, intermediate_size=14336, num_key_value_heads=8,
                              max_position_embeddings=32768, rope_theta=1e6),
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                              rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, bos_token_id=151643,
                              eos_token_id=151643),
    # The bundled tiny model (src/lorabench/assets/tiny-llama); grouped-query attention on purpose so the
    # parity tests cover it.
    "tiny": ModelConfig(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512),
}


REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings")
"""config.json fields without which the shape is unknown (never borrowed from another model's defaults)."""
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def check_supported(raw: dict, path: Path):
    """Refuse a config.json whose math this model does not implement, naming the field, its value and what is
    supported: every field that changes the computation is either checked here or read into ModelConfig."""
    def refuse(field: str, what: str):
        raise ConfigError(f"{path}: {field} = {json.dumps(raw.get(field))} {what}")

    missing = [f for f in REQUIRED_FIELDS if raw.get(f) is None]
    if missing:
        raise ConfigError(f"{path}: no {', '.join(missing)}; a Llama config.json gives the model's sizes "
                          "(lorabench never takes them from another model)")
    if raw.get("model_type", "llama") not in MODEL_TYPES:
        refuse("model_type", f"is not supported; supported: {', '.join(MODEL_TYPES)} (the Llama architecture; "
                             "qwen2 with its q/k/v biases, qwen3 with its q/k norms)")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or any(a not in ARCHITECTURES for a in archs):
        refuse("architectures", f"is not supported; supported: {', '.join(ARCHITECTURES)}")
    if raw.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "is not supported; the Llama MLP is SwiGLU (silu)")
    for name in ("attention_bias", "mlp_bias"):
        if raw.get(name):
            refuse(name, "is not supported (projections without bias only)")
    if raw.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        refuse("partial_rotary_factor", "is not supported (rotary embedding over the whole head only)")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if raw.get(name) is not None:
            refuse(name, "is not supported (no logit soft-capping in the Llama architecture)")
    quant = raw.get("quantization_config")
    if quant is not None:  # bitsandbytes' NF4 checkpoints are read (quantized.py); other formats are not
        if not isinstance(quant, dict) or quant.get("quant_method", "bitsandbytes") != "bitsandbytes" \
                or quant.get("load_in_8bit") or quant.get("bnb_4bit_quant_type", "nf4") != "nf4":
            refuse("quantization_config", "is not supported: lorabench reads unquantized checkpoints and "
                                          "bitsandbytes' 4-bit NF4 ones (load_in_4bit, bnb_4bit_quant_type nf4)")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapter settings (FlagPerf's case: r 8, alpha 32, dropout 0.05 on q_proj and v_proj)."""

    r: int = 8
    """Rank of the adapter."""
    alpha: float = 32.0
    """Scale numerator: the adapter output is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Projection names that get an adapter (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)."""

    def __post_init__(self):
        if self.r <= 0:
            raise ConfigError(f"--lora-r must be positive, got {self.r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"--lora-alpha must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        twice = sorted({t for t in self.targets if self.targets.count(t) > 1})
        if twice:
            raise ConfigError(f"--lora-targets: {', '.join(twice)} given more than once; name each projection once")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"--lora-targets: unknown {bad or 'empty list'}; choose from {', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data shape, optimiser, precision and bookkeeping."""

    precision: str = "fp32"
    """A name of precision.PRECISIONS: fp32 (weights and math in fp32), tf32 (fp32 weights, TF32 matmuls), fp16
    (fp16 weights + GradScaler, as FlagPerf's model.half()), bf16 (bf16 weights), fp8 (bf16 with the blocks'
    frozen projections in FP8), nf4 (bf16 with them in 4-bit NF4: QLoRA). Adapter weights stay fp32, as PEFT keeps
    them."""
    batch_size: int = 2
    """Local batch size (LBS): packed sequences per micro-batch per chip."""
    seq_len: int = 512
    """Tokens per packed sequence (FlagPerf's MPE)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (GAS)."""
    epochs: int = 3
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (None: run all epochs)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW's decay rate of the gradient's running mean (torch's and FlagPerf's default 0.9)."""
    adam_beta2: float = 0.999
    """AdamW's decay rate of the squared gradient's running mean (default 0.999, FlagPerf's; 0.95, common in LLM
    training, lets the step size follow a gradient that grows suddenly instead of lagging ~1000 steps behind)."""
    lr_gamma: float = 0.85
    """StepLR decay applied after every epoch (lr_schedule "step")."""
    lr_schedule: str = "step"
    """"step": FlagPerf's StepLR, x lr_gamma after every epoch; "cosine": from lr down to 0 over the run's steps,
    per step; "constant"."""
    lr_warmup_steps: int = 0
    """Optimiser steps over which the learning rate rises linearly from lr / lr_warmup_steps to lr (any schedule)."""
    untimed_steps: int = 3
    """Optimiser steps left out of the timing statistics (compilation, allocator warm-up)."""
    eval_batches: int | None = 16
    """Validation batches for eval loss after training (0: skip; None: all)."""
    eval_every: int | None = None
    """Also compute the eval loss every this many steps during training (series "evals"); the run keeps the
    adapter of the best one as best_adapter/."""
    max_grad_norm: float | None = None
    """Clip the adapters' gradient to this global L2 norm before each optimiser step (None: no clipping); each
    step's norm before clipping is recorded (series "grad_norm")."""
    checkpoint_every: int | None = None
    """Write a checkpoint every this many optimiser steps (resume.py; None: only when stopped by a signal)."""
    checkpoint_minutes: float | None = None
    """Also write one whenever this many minutes have passed since the last (resume.py)."""
    loss_on: str = "all"
    """Which tokens the loss covers: "all" (FlagPerf's: labels = inputs) or "response" (the answer tokens only, the
    loss summed over the optimiser step's label tokens and divided by their number, across gradient accumulation
    and ranks)."""
    packing: str = "flagperf"
    """How records become chunks: "flagperf" (concatenated across documents under one causal mask, positions
    running on: FlagPerf's), "documents" (the same chunks, positions restarting and attention held within each
    document) or "none" (one record a row, each batch padded to its longest row, padding never counted)."""
    shard: str = "none"
    """"fsdp": the model sharded over the torchrun ranks with FSDP2 (shard.py); "hsdp": sharded within groups of
    ranks, replicated across them; "none": each rank holds the whole model (data parallel)."""
    shard_group_size: int | None = None
    """--shard hsdp: ranks per sharded group (default: the ranks of one node)."""
    keep_checkpoints: int = 1
    """How many of the newest checkpoints stay in <run dir>/checkpoint (``--resume`` takes the newest)."""
    seed: int = 42
    """Seed for weights made at random, adapter init, shuffling and dropout."""
    shuffle: bool = True
    """Shuffle the packed chunks each epoch (from ``seed`` + epoch); False: file order, as FlagPerf's DataLoader
    (no shuffling; an incomplete last step is dropped either way)."""
    activation_checkpointing: str | None = None
    """What the training forward keeps for the backward, one of ACTIVATION_CHECKPOINTING (None: the engine's
    default, which runner.resolve fills in: "adapter-inputs" for the native engine's compiled blocks with LoRA
    dropout 0, else "none"). It changes memory and speed, never the numbers. "none" keeps every activation the
    backward needs; "block" keeps only each decoder block's input and recomputes the block in the backward (about
    one more forward pass of the blocks per step, for a fraction of the activation memory: long sequences, large
    models); "offload" is "block" with the blocks' inputs in host memory (copied out and back on a side stream;
    recompute.py), so the GPU's share no longer grows with the layers; "matmuls" keeps the outputs of the block's
    matrix products and attention, cheap to keep and costly to recompute, and recomputes only the elementwise work
    between them (norms, RoPE, SwiGLU, dropout masks: model.py); "adapter-inputs" keeps what "none" keeps but the
    inputs of adapters without dropout (the norms' outputs, SwiGLU's), which the compiled block recomputes in the
    backward (lora.fresh; native engine, needs its --compile): about a fifth of the peak memory saved for under 1%
    of the speed with all seven projections adapted (benchmarks/NOTES.md). Each engine declares the policies it
    takes (engines/registry.py)."""
    memory_budget_gib: float | None = None
    """Cap the CUDA caching allocator at this many GiB (torch.cuda.set_per_process_memory_fraction) for the whole
    run, to measure what fits a smaller card on a larger one ("70B on a 48 GB card"); a step that needs more fails
    as out of memory. None: the whole device."""

    def __post_init__(self):
        get_precision(self.precision)
        if self.memory_budget_gib is not None and not (math.isfinite(self.memory_budget_gib)
                                                       and self.memory_budget_gib > 0):
            raise ConfigError(f"--memory-budget-gib {self.memory_budget_gib}: give the GiB a run may use, more than 0")
        if self.activation_checkpointing is not None and self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(f"--activation-checkpointing {self.activation_checkpointing!r}: choose from "
                              f"{', '.join(ACTIVATION_CHECKPOINTING)}")
        for name in ("batch_size", "seq_len", "grad_accum", "epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len {self.seq_len}: a sequence needs at least 2 tokens (an input and the "
                              "target after it)")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"--max-steps must be positive, got {self.max_steps}")
        for flag, v, low in (("--lr", self.lr, "> 0"), ("--lr-gamma", self.lr_gamma, "> 0"),
                             ("--weight-decay", self.weight_decay, ">= 0")):
            if not math.isfinite(v) or (v <= 0 if low == "> 0" else v < 0):
                raise ConfigError(f"{flag} must be a finite number {low}, got {v}")
        for flag, v in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0 <= v < 1:
                raise ConfigError(f"{flag} must be in [0, 1), got {v}")
        if self.eval_batches is not None and self.eval_batches < 0:
            raise ConfigError(f"--eval-batches must be >= 0 (0 skips the eval loss), got {self.eval_batches}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"--max-grad-norm must be a finite number > 0, got {self.max_grad_norm}")
        if self.eval_every is not None and self.eval_every <= 0:
            raise ConfigError(f"--eval-every must be positive, got {self.eval_every}")
        if self.checkpoint_minutes is not None and not (math.isfinite(self.checkpoint_minutes)
                                                         and self.checkpoint_minutes > 0):
            raise ConfigError(f"--checkpoint-minutes must be a finite number > 0, got {self.checkpoint_minutes}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ConfigError(f"--checkpoint-every must be positive, got {self.checkpoint_every}")
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        if self.packing not in PACKINGS:
            raise ConfigError(f"--packing must be one of {', '.join(PACKINGS)}, got {self.packing!r}")
        if self.keep_checkpoints <= 0:
            raise ConfigError(f"--keep-checkpoints must be positive, got {self.keep_checkpoints}")
        if self.untimed_steps < 0:
            raise ConfigError(f"--untimed-steps must be >= 0, got {self.untimed_steps}")


MAX_SEED = 2 ** 31 - 1
"""The largest --seed (numpy's and torch's generators take it with the epoch added)."""
ACTIVATION_CHECKPOINTING = ("none", "block", "offload", "matmuls", "adapter-inputs")
"""What the training forward keeps for the backward (TrainConfig.activation_checkpointing)."""
LR_SCHEDULES = ("step", "cosine", "linear", "constant")
LOSS_ON = ("all", "response")
PACKINGS = ("flagperf", "documents", "none")


@dataclass(frozen=True)
class Preset:
    """A named starting point: training settings plus the LoRA config (FlagPerf's rows, and the tiny default)."""

    train: TrainConfig
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    fix_hp: str = "/"
    """What the preset changes from the case's defaults, as FlagPerf's table words it."""
    precision_off_cuda: str | None = None
    """The precision to run where there is no CUDA device, when the preset's own needs one (and --precision was
    not given): flagperf-fp32's TF32 becomes true fp32 on a CPU, and result.json says so."""


# FlagPerf's DataLoader: file order, drop_last (FlagPerf's training/benchmarks/llama2_7b_finetune/pytorch)
_FLAGPERF = {"seq_len": 512, "shuffle": False}

TRAIN_PRESETS: dict[str, Preset] = {
    # The seed's first row: fp32 weights, LBS 2, seq 512, run by NGC PyTorch images with
    # TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, so the matmuls ran in TF32 (2,788 tok/s on an A100 is beyond true fp32;
    # FlagPerf's training/benchmarks/llama2_7b_finetune/pytorch).
    "flagperf-fp32": Preset(TrainConfig(precision="tf32", batch_size=2, **_FLAGPERF), precision_off_cuda="fp32"),
    # The seed's second row: fp16 weights (model.half()) + GradScaler, LBS 4.
    "flagperf-fp16": Preset(TrainConfig(precision="fp16", batch_size=4, **_FLAGPERF),
                            fix_hp="precision=fp16, local_batchsize=4"),
    # The first row's shape in true fp32 (no TF32 anywhere).
    "fp32": Preset(TrainConfig(precision="fp32", batch_size=2, seq_len=512), fix_hp="true fp32 (no TF32)"),
    "bf16": Preset(TrainConfig(precision="bf16", batch_size=4, seq_len=512),
                   fix_hp="precision=bf16, local_batchsize=4"),
    # bf16's row with the blocks' frozen projections in FP8 (precision.py, kernels/fp8.py).
    "fp8": Preset(TrainConfig(precision="fp8", batch_size=4, seq_len=512), fix_hp="precision=fp8, local_batchsize=4"),
    # QLoRA: the seed's LoRA over a 4-bit NF4 base, bf16 compute (precision.py, quantized.py).
    "qlora": Preset(TrainConfig(precision="nf4", batch_size=4, seq_len=512),
                    fix_hp="precision=nf4 (QLoRA), local_batchsize=4"),
    # QLoRA's 4-bit base with fp8's products (precision.py).
    "qlora-fp8": Preset(TrainConfig(precision="nf4-fp8", batch_size=4, seq_len=512),
                        fix_hp="precision=nf4-fp8 (NF4 base, FP8 products), local_batchsize=4"),
    # The bundled tiny default: short sequences and a larger lr so that a CPU run shows learning in seconds.
    "tiny": Preset(TrainConfig(precision="fp32", batch_size=8, seq_len=128, epochs=2, lr=2e-3, untimed_steps=2,
                               eval_batches=None),
                   fix_hp="tiny model, seq_len=128, LBS 8, lr 2e-3"),
}


def resolve_preset(name: str, train_overrides: dict, lora_overrides: dict) -> Preset:
    """A preset with the user's flags applied (only keys whose value is not None)."""
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"--preset: unknown {name!r}; choose from {', '.join(TRAIN_PRESETS)}")
    p = TRAIN_PRESETS[name]
    t = {k: v for k, v in train_overrides.items() if v is not None}
    lo = {k: v for k, v in lora_overrides.items() if v is not None}
    train, lora = replace(p.train, **t), replace(p.lora, **lo)
    return Preset(train, lora, fix_hp_label(name, train, lora), None if "precision" in t else p.precision_off_cuda)


NOT_IN_FIX_HP = ("untimed_steps", "eval_batches", "eval_every", "checkpoint_every", "checkpoint_minutes",
                 "keep_checkpoints", "activation_checkpointing", "memory_budget_gib")
"""Settings that change neither the training nor FlagPerf's figures, left out of the fix_hp label."""
FIX_HP_NAMES = {"batch_size": "local_batchsize", "r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                "targets": "lora_targets"}


def fix_hp_label(name: str, train: TrainConfig, lora: LoRAConfig) -> str:
    """The seed table's fix_hp cell: the preset's own words where the run kept its settings, otherwise the preset
    and every setting the run changed, with the values that ran."""
    p = TRAIN_PRESETS[name]
    changed = [(f, getattr(train, f)) for f in (x.name for x in fields(TrainConfig))
               if f not in NOT_IN_FIX_HP and getattr(train, f) != getattr(p.train, f)]
    changed += [(f, getattr(lora, f)) for f in (x.name for x in fields(LoRAConfig))
                if getattr(lora, f) != getattr(p.lora, f)]
    if not changed:
        return p.fix_hp
    return f"{name} with " + ", ".join(f"{FIX_HP_NAMES.get(f, f)}={'+'.join(v) if isinstance(v, tuple) else v}"
                                       for f, v in changed)
