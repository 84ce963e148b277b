"""The engine contract: every call the training loop, the MMLU evaluation, the runner and the bench make of a
model stack, declared in one abstract class. A new engine (another stack, another model family) is added by
implementing these, never by teaching the loop about it.

The loop calls ``trainable_params``, ``train``, ``eval``, ``autocast``, ``loss``; MMLU calls ``evaluating``,
``forward_hidden``, ``head`` (and ``prefix_kv`` where ``supports_prefix_cache``); ROUGE calls ``generate``; the
runner calls
``save_adapter``, ``describe`` and ``dtype``; ``eval`` calls ``load_adapter``; the tests also ``logits``,
``adapters`` and ``set_adapters``.
"""
from __future__ import annotations

import abc
import contextlib
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import ConfigError, LoRAConfig, ModelConfig
from ..adapter_io import read_adapter, save_adapter


class Engine(abc.ABC):
    """A model with LoRA adapters that lorabench can train, evaluate and save. Subclasses set ``name``,
    ``model_cfg``, ``lora_cfg``, ``model_dir`` (None for random weights) and ``model`` (the nn.Module)."""

    name: str = "engine"
    model_cfg: ModelConfig
    lora_cfg: LoRAConfig
    model_dir: Path | str | None
    model: torch.nn.Module
    supports_prefix_cache: bool = False
    """Whether forward_hidden takes kv_caches / position_offset / attn_mask and prefix_kv exists (MMLU reuses
    each subject's shared prompt prefix)."""
    sharded: bool = False
    """Whether the model is sharded over the ranks (FSDP2): every rank then takes part in each forward, and the
    loop leaves the gradients' averaging to FSDP."""
    shard_mesh: list | None = None
    """The ranks' layout of a sharded model ([ranks] for fsdp, [replicas, ranks a group] for hsdp)."""

    def mark_sharded(self, mesh_shape: list[int]):
        self.sharded, self.shard_mesh = True, list(mesh_shape)

    # -- training -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32 scalar) of ``labels`` (aligned with ``ids``, shifted inside;
        -100 ignored). ``positions`` [B, T] (``--packing documents``): each token's position in its document, 0
        where one starts; RoPE takes these and attention stays within each document."""

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self):
        """The context the loop runs each forward pass in (autocast for stacks that train under it; none here)."""
        return contextlib.nullcontext()

    def train(self):
        self.model.train()

    def eval(self):
        self.model.eval()

    # -- evaluation -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, T, V]."""

    @abc.abstractmethod
    def forward_hidden(self, ids: torch.Tensor, kv_caches=None, position_offset: int = 0,
                       attn_mask=None) -> torch.Tensor:
        """Final-norm hidden states [B, T, C]. The prefix-cache arguments only where ``supports_prefix_cache``."""

    @abc.abstractmethod
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states ``h`` [..., C]."""

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy continuation of ``prompt`` (token ids) until ``eos_id`` (not returned) or ``max_new_tokens``;
        call inside ``evaluating``. This default runs the whole sequence again for every token (any engine);
        engines with a KV cache override it with the same result."""
        device = next(self.model.parameters()).device
        ids, out = torch.tensor([prompt], device=device), []
        for _ in range(max_new_tokens):
            with self.autocast():
                nxt = int(self.head(self.forward_hidden(ids)[:, -1]).argmax(-1))
            if nxt == eos_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
        return out

    def prefix_kv(self, ids: torch.Tensor):
        """Per-layer (k, v) of a prefix [1, T], for forward_hidden(kv_caches=..., position_offset=T)."""
        raise NotImplementedError(f"engine {self.name} has no prefix cache")

    @contextmanager
    def evaluating(self, compiled: bool):
        """Evaluation mode for the duration (dropout off), training mode after. ``compiled``: whether a compiled
        evaluation graph pays for its compile time here (the caller knows how much work follows); engines
        without one ignore it."""
        self.eval()
        try:
            yield
        finally:
            self.train()

    # -- adapters -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{HF module name: (A, B)} of every adapter."""

    @abc.abstractmethod
    def set_adapters(self, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], source: str):
        """Copy (A, B) into the adapters; a ConfigError naming ``source`` if they do not fit."""

    def save_adapter(self, out_dir: str | Path, adapters: dict | None = None):
        """The adapters (``adapters``: these instead, e.g. gathered from a sharded model) in PEFT format."""
        save_adapter(self.adapters() if adapters is None else adapters, self.lora_cfg, out_dir,
                     base_model=None if self.model_dir is None else str(self.model_dir))

    def load_adapter(self, adapter_dir: str | Path):
        cfg, adapters = read_adapter(adapter_dir)
        if (cfg.r, cfg.alpha, set(cfg.targets)) != (self.lora_cfg.r, self.lora_cfg.alpha, set(self.lora_cfg.targets)):
            raise ConfigError(f"{adapter_dir}: adapter has r={cfg.r}, alpha={cfg.alpha}, targets={cfg.targets}; "
                              "build the engine with the same LoRA settings")
        self.set_adapters(adapters, source=str(adapter_dir))

    # -- reporting ------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen base weights."""
        return next(p for p in self.model.parameters() if not p.requires_grad).dtype

    @abc.abstractmethod
    def describe(self) -> dict:
        """This engine's settings as resolved, for result.json (what a reader needs to rerun it)."""


def canonical_adapters(cfg: ModelConfig, lora: LoRAConfig, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Initial adapter weights as {HF module name: (A, B)}, drawn from one seed in HF module order:
    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a = sqrt 5), B = 0. Every engine starts here."""
    from ..checkpoint import hf_param_names
    from ..shapes import hf_param_shape

    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name in hf_param_names(cfg):
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in lora.targets and name.endswith(".weight"):  # (not Qwen2's biases)
            fan_out, fan_in = hf_param_shape(cfg, name)
            bound = fan_in ** -0.5
            a = torch.empty(lora.r, fan_in).uniform_(-bound, bound, generator=g)
            out[module] = (a, torch.zeros(fan_out, lora.r))
    return out
