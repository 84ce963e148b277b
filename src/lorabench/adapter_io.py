"""LoRA adapters on disk in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``): what lorabench
writes after a run, and reads back for ``--init-adapter``, ``eval --adapter`` and engines' ``load_adapter``, from
lorabench or from PEFT itself. Keys are PEFT's ``base_model.model.<HF module>.lora_{A,B}.weight``; A and B are
stored in fp32 whatever the base dtype, as PEFT keeps them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, LoRAConfig


def peft_adapter_config(cfg: LoRAConfig, base_model: str | None) -> dict:
    """The adapter_config.json PEFT writes for LoraConfig(r, lora_alpha, lora_dropout, target_modules, CAUSAL_LM)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "revision": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: LoRAConfig, out_dir: str | Path,
                 base_model: str | None = None):
    """Write a PEFT-format adapter. ``adapters`` maps HF module names (model.layers.0.self_attn.q_proj) to (A, B).
    Written into a temporary folder first and renamed, so a failure leaves nothing half-written."""
    from safetensors.torch import save

    from .files import write_folder_atomic

    tensors = {}
    for hf_name, (a, b) in adapters.items():
        tensors[f"base_model.model.{hf_name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{hf_name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    write_folder_atomic(Path(out_dir), {
        "adapter_model.safetensors": save(tensors, metadata={"format": "pt"}),
        "adapter_config.json": json.dumps(peft_adapter_config(cfg, base_model), indent=2).encode()})


def read_adapter(adapter_dir: str | Path) -> tuple[LoRAConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a PEFT LoRA adapter folder: its config and {HF module name: (A, B)}."""
    from safetensors.torch import load_file

    from .checkpoint import unreadable_file_errors

    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: missing; --adapter must be a folder written by lorabench or PEFT")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if key not in raw:
            raise ConfigError(f"{cfg_path}: no {key!r}; a PEFT LoRA adapter_config.json has r and lora_alpha")
        if isinstance(raw[key], bool) or not isinstance(raw[key], kind):
            raise ConfigError(f"{cfg_path}: {key} is {raw[key]!r}; expected a number")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not LORA")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        raise ConfigError(f"{cfg_path}: regex target_modules {targets!r} are not supported; list module names")
    cfg = LoRAConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
                     targets=tuple(targets))
    if raw.get("use_dora") or raw.get("use_rslora") or raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise ConfigError(f"{cfg_path}: DoRA, rsLoRA and per-module rank/alpha patterns are not supported")
    if w_path.is_file():
        try:
            sd = load_file(str(w_path))
        except unreadable_file_errors() as e:  # truncated or not safetensors
            raise ConfigError(f"{w_path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    elif (d / "adapter_model.bin").is_file():
        sd = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"{d}: no adapter_model.safetensors or adapter_model.bin")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if not k.startswith("base_model.model.") or ".lora_" not in k:
            raise ConfigError(f"{w_path}: unexpected key {k!r} (only LoRA A/B weights are supported)")
        mod, rest = k[len("base_model.model."):].split(".lora_", 1)
        which = rest.split(".")[0]  # "A" or "B" (PEFT may also write lora_A.default.weight)
        pairs.setdefault(mod, {})[which] = v
    out = {}
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{w_path}: module {mod} lacks lora_{'A' if 'A' not in ab else 'B'}")
        out[mod] = (ab["A"], ab["B"])
    return cfg, out
