"""HF checkpoints in and out: the explicit name map between HF Llama and our modules, shard-by-shard loading,
and canonical random weights.

Loading reads one tensor at a time from each shard (safetensors ``safe_open``; ``torch.load(mmap=True)`` for
``pytorch_model*.bin``) and copies it into a model allocated directly on the target device and dtype, so peak
host memory stays at about one shard and device memory at one copy of the weights.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig
from .kernels.fp8 import FP8_DTYPES, quantize_weight
from .kernels.nf4 import quantize_nf4
from .shapes import hf_param_shape

# HF LlamaForCausalLM name -> our name; {i} is the layer index.
_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
_TOP_MAP = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_to_native(module: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'layers.3.attn.q_proj' (module names, no '.weight')."""
    if module in _TOP_MAP:
        return _TOP_MAP[module]
    m = _LAYER_RE.match(module)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise KeyError(module)


def native_to_hf(module: str) -> str:
    inv_top = {v: k for k, v in _TOP_MAP.items()}
    if module in inv_top:
        return inv_top[module]
    inv_layer = {v: k for k, v in _LAYER_MAP.items()}
    m = _NATIVE_LAYER_RE.match(module)
    if m and m.group(2) in inv_layer:
        return f"model.layers.{m.group(1)}.{inv_layer[m.group(2)]}"
    raise KeyError(module)


def hf_param_names(cfg: ModelConfig) -> list[str]:
    """Every HF parameter name in the canonical order (the order HF's state_dict lists them)."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            names.append(f"model.layers.{i}.{sub}.weight")
            if cfg.qkv_bias and sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                names.append(f"model.layers.{i}.{sub}.bias")
            if cfg.qk_norm and sub == "self_attn.o_proj":
                names += [f"model.layers.{i}.self_attn.q_norm.weight", f"model.layers.{i}.self_attn.k_norm.weight"]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def random_hf_weights(cfg: ModelConfig, seed: int, device, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical random weights as (HF name, tensor): N(0, 0.02) matrices (HF's initializer_range), ones for the
    norms, drawn in ``hf_param_names`` order from one generator on ``device``. Every engine that is handed this
    stream through its name map starts from identical weights, without a CPU round-trip."""
    g = torch.Generator(device=device).manual_seed(seed)
    for name in hf_param_names(cfg):
        shape = hf_param_shape(cfg, name)
        if name.endswith(".bias"):  # Qwen2's q/k/v biases: small, nonzero, so they count in every comparison
            yield name, torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=g)
        elif len(shape) == 1:
            yield name, torch.ones(shape, device=device, dtype=dtype)
        else:
            yield name, torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=g)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight shards of an HF model folder: safetensors (single or indexed) first, then pytorch_model*.bin."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ConfigError(f"--model-dir {d}: no such folder (give an HF-format Llama folder, or --init random)")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = d / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise ConfigError(f"{index}: lists shards that are missing: {', '.join(missing)}")
            return [d / f for f in files]
        if (d / single).is_file():
            return [d / single]
    raise ConfigError(f"--model-dir {d}: no model.safetensors(.index.json) or pytorch_model*.bin; "
                      "download the full HF checkpoint there, or use --init random")


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor, one shard open at a time, tensors read lazily."""
    for f in checkpoint_files(model_dir):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt", device="cpu") as sf:
                    for k in sf.keys():
                        yield k, sf.get_tensor(k)
            except unreadable_file_errors() as e:  # truncated or not safetensors at all
                raise ConfigError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); copy "
                                  "the checkpoint again") from None
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except (*unreadable_file_errors(), EOFError, pickle.UnpicklingError) as e:
                raise ConfigError(f"{f}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:120]}); copy "
                                  "the checkpoint again") from None
            for k in list(sd):
                yield k, sd.pop(k)


def unreadable_file_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged weights file raises: OS errors, torch's and safetensors' own."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors raise the builtin kinds
        return (OSError, ValueError, RuntimeError)
    return (OSError, ValueError, RuntimeError, SafetensorError)


def load_into(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], to_native: bool, source: str):
    """Copy (HF name, tensor) pairs into ``model``'s parameters, converting dtype/device on the way.
    ``to_native``: map names through ``hf_to_native`` (our engine) or use them as they are (HF model).
    A parameter stored in FP8 (convert.quantize_projections) gets the tensor quantized per output channel, its scales
    written to the buffer ``<name>_scale``; one stored as NF4 gets it quantized to NF4 (quantized.py). A
    bitsandbytes NF4 weight (its packed codes and quant state) loads as it is into an NF4 parameter and dequantized
    into any other. Fails naming the source on a missing, unexpected or mis-shaped tensor."""
    from tqdm.auto import tqdm

    from .quantized import NF4_FORMAT, Bnb4bitReader, set_nf4
    from .shard import copy_into

    # every name a parameter answers to, tied aliases included (lm_head.weight when it is the embedding)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())  # an FP8 weight's scales: <name>_scale beside it
    modules = dict(model.named_modules())
    bnb = Bnb4bitReader(source)
    seen: set[int] = set()
    # a bar only on a terminal (disable=None): a 7B checkpoint takes tens of seconds to read
    for hf_name, t in tqdm(tensors, total=len(params), desc=f"load {source}", unit="tensor", disable=None,
                           leave=False, dynamic_ncols=True):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older HF checkpoints carry; we compute it
        quantized, got = bnb.take(hf_name, t)
        if quantized:
            if got is None:
                continue  # the rest of this 4-bit weight is still to come
            hf_name, t = got
        name = hf_name
        if to_native:
            try:
                name = hf_to_native(hf_name.rsplit(".", 1)[0]) + "." + hf_name.rsplit(".", 1)[1]
            except KeyError:
                raise ConfigError(f"{source}: unexpected tensor {hf_name!r} (not a Llama weight)") from None
        if name not in params:
            raise ConfigError(f"{source}: unexpected tensor {hf_name!r}")
        p = params[name]
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        nf4 = p.dtype == NF4_FORMAT
        shape = (owner.out_features, owner.in_features) if nf4 else tuple(p.shape)
        if tuple(shape) != tuple(t.shape):
            raise ConfigError(f"{source}: {hf_name} has shape {tuple(t.shape)}, the config says {shape}; "
                              "does config.json match the weights?")
        with torch.no_grad():
            if nf4:  # quantized on its device, one tensor at a time, unless bitsandbytes did it already
                set_nf4(owner, t if quantized else quantize_nf4(t.to(p.device)))
            else:
                if quantized:
                    t = t.dequantize()
                if p.dtype in FP8_DTYPES:  # quantized on its device, one tensor at a time (kernels/fp8.py)
                    q, scale = quantize_weight(t.to(p.device), p.dtype, owner.fp8_recipe)  # (the whole tensor's)
                    copy_into(p, q)  # (a sharded parameter takes its rows)
                    buffers[name + "_scale"].copy_(scale)
                else:
                    copy_into(p, t)  # (a sharded parameter takes its part)
        seen.add(id(p))
    bnb.finish()
    missing = [n for n, p in params.items() if id(p) not in seen and ".lora_" not in n]
    if missing:
        raise ConfigError(f"{source}: missing tensors for {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}")


def write_hf_dir(out_dir: str | Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor]):
    """Write config.json + model.safetensors in HF layout (used to build the bundled tiny model and in tests)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def write_hf_shards(out_dir: str | Path, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                    dtype: torch.dtype, shard_bytes: int = 5 << 30):
    """Write (HF name, tensor) pairs as an HF folder: config.json (``torch_dtype`` = ``dtype``), safetensors shards
    of at most ``shard_bytes`` each and their index, one shard in host memory at a time."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    groups: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            groups.append(list(shard))
            save_file(shard, str(out / f"part-{len(groups)}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
        shard[name] = t.detach().to("cpu").contiguous()
        size += nbytes
    groups.append(list(shard))
    save_file(shard, str(out / f"part-{len(groups)}.safetensors"), metadata={"format": "pt"})
    weight_map = {}
    for i, group in enumerate(groups, 1):  # the final names need the shard count
        final = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(group, final))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                 indent=2))
