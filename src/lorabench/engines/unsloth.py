"""The Unsloth engines: Unsloth's ``FastLanguageModel`` + its ``get_peft_model``, the stack most users would pick
instead of ours, driven by the same loop, timing and report as every engine.

``unsloth`` loads the base in the run's dtype (bf16 or fp16); ``unsloth-fp8`` with ``load_in_fp8=True`` (Unsloth's
FP8 LoRA: rowwise FP8 forward GEMMs via torchao, input gradients through the dequantized weight, as
Unsloth's source reads); ``unsloth-4bit`` with ``load_in_4bit=True`` (QLoRA through bitsandbytes' NF4, bf16
compute: the row --precision nf4 is set against). Unsloth reads an HF model folder: ``--model-dir`` as given, or
for ``--init random`` a folder of the canonical random weights (checkpoint.random_hf_weights, the same every engine
starts from) written once per shape, seed and dtype and reused, to /dev/shm where it fits, else to the cache
folder. Gradient checkpointing only as ``--activation-checkpointing`` says: ``block`` is Unsloth's
``use_gradient_checkpointing=True`` (each decoder layer recomputed), ``offload`` its ``"unsloth"`` mode (each
layer's input also kept in host memory); the adapters start from the canonical values as in every engine.

Optional and CUDA-only: absent, or on a CPU, building it fails with one line saying what to do. Offline:
HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE and UNSLOTH_DISABLE_STATISTICS are set before Unsloth is imported.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import ConfigError, LoRAConfig, ModelConfig
from .base import canonical_adapters
from .reference import PeftEngine

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
INSTALL_HINT = "pip install unsloth (on a GPU machine with internet; offline, see README 'Benchmarking on a GPU')"


def _import_unsloth(device: torch.device, name: str):
    if device.type != "cuda":
        raise ConfigError(f"--engine {name} needs a CUDA GPU (Unsloth runs on CUDA only); use --device cuda")
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)  # Unsloth would otherwise try the hub at import and at load
    try:
        import unsloth  # noqa: F401  (patches transformers and peft: import it before them)
        from unsloth import FastLanguageModel
    except ImportError as e:
        raise ConfigError(f"--engine {name} needs unsloth ({e.name or e} is missing): {INSTALL_HINT}") from None
    return FastLanguageModel


def random_hf_dir(cfg: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device) -> Path:
    """An HF folder holding the canonical random weights of ``cfg`` (seed, dtype) and a placeholder tokenizer of
    cfg.vocab_size tokens, written once and reused (a ``complete`` marker is written last, so a folder left by an
    interrupted write is rewritten). /dev/shm when it has room for the weights, else the data cache folder."""
    from ..checkpoint import random_hf_weights, write_hf_shards
    from ..shapes import count_params

    key = hashlib.sha256(json.dumps([asdict(cfg), seed, str(dtype)]).encode()).hexdigest()[:16]
    size = count_params(cfg)["total"] * torch.empty((), dtype=dtype).element_size()
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * size:
        root = shm
    else:
        from ..data.packing import default_cache_dir

        root = default_cache_dir()
    out = root / f"lorabench-random-hf-{key}"
    if (out / "complete").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    write_hf_shards(out, cfg, random_hf_weights(cfg, seed, device, dtype), dtype)
    write_placeholder_tokenizer(out, cfg)
    (out / "complete").write_text("")
    return out


def write_placeholder_tokenizer(out: Path, cfg: ModelConfig):
    """A word-level tokenizer with exactly cfg.vocab_size tokens (<unk>, <s>, </s>, then t3, t4, ...): random weights
    have no real vocabulary, and a loader that checks the tokenizer against the embedding must find them equal.
    The pad token is <unk> (as for Llama-2), so no token is added and no embedding resized."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {0: "<unk>", cfg.bos_token_id: "<s>", cfg.eos_token_id: "</s>"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "add_bos_token": True, "model_max_length": cfg.max_position_embeddings}))


def build(spec, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir, device, precision, seed: int,
          native, attn: str, checkpointing: str | None, sharder=None) -> "UnslothEngine":
    """The Unsloth engines (engines.build_engine): its FP8 or 4-bit weights where the spec has them."""
    return UnslothEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype, seed=seed,
                         fp8=spec.can("fp8-weights"), four_bit=spec.can("nf4-weights"),
                         checkpointing=checkpointing or "none")


class UnslothEngine(PeftEngine):
    name = "unsloth"

    def __init__(self, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir, device, dtype, seed: int,
                 fp8: bool = False, four_bit: bool = False, checkpointing: str = "none"):
        self.name = "unsloth-fp8" if fp8 else "unsloth-4bit" if four_bit else "unsloth"
        FastLanguageModel = _import_unsloth(device, self.name)
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"--engine {self.name} runs bf16 or fp16 base weights; use --precision bf16 or fp16")
        self.model_cfg, self.lora_cfg, self.model_dir = model_cfg, lora, model_dir
        self.fp8, self.four_bit = fp8, four_bit
        source = Path(model_dir) if model_dir is not None else random_hf_dir(model_cfg, seed, dtype, device)
        kw = {"load_in_fp8": True} if fp8 else {}
        self.checkpointing = checkpointing
        recompute = {"none": False, "block": True, "offload": "unsloth"}[checkpointing]
        model, _ = FastLanguageModel.from_pretrained(
            str(source), max_seq_length=model_cfg.max_position_embeddings, dtype=dtype, load_in_4bit=four_bit,
            use_gradient_checkpointing=recompute, device_map={"": device.index or 0}, **kw)
        self.model = FastLanguageModel.get_peft_model(
            model, r=lora.r, target_modules=list(lora.targets), lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            bias="none", use_gradient_checkpointing=recompute, random_state=seed)
        self.set_adapters(canonical_adapters(model_cfg, lora, seed), source="canonical init")
        self._fwd = self.model
        self._source = source

    def describe(self) -> dict:
        import unsloth

        return {"unsloth": getattr(unsloth, "__version__", None), "load_in_fp8": self.fp8,
                "load_in_4bit": self.four_bit,
                "activation_checkpointing": self.checkpointing,
                "weights": str(self._source), "numerics": "Unsloth's (its get_peft_model's adapter dtype)"}
