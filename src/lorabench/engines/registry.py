"""What each engine is and can do, declared in one place: every check of a job against an engine reads its spec
here, so the rest of lorabench never compares engine names, and an engine is added as one file (its builder) plus
one ``EngineSpec`` in ``SPECS``.

A spec names the engine's builder, the precisions it runs, its activation-checkpointing policies, whether it takes
the native engine's tuning (``NativeOptions``), and its capabilities (``CAPABILITIES``). ``spec(name)`` returns it
or refuses an unknown name; ``EngineSpec.refuse`` words a refusal with the engine's own name and what does run it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError

CAPABILITIES = {
    "shard": "sharding with FSDP2 / HSDP (--shard fsdp, hsdp)",
    "shard-at-build": "built straight into shards on the meta device (no rank holds the whole model)",
    "evaluate-sharded": "MMLU and --eval-rouge on a sharded model (every rank in each forward)",
    "packing-documents": "--packing documents (positions and attention within each record)",
    "beyond-sliding-window": "training past a sliding window (checked against transformers at any --seq-len)",
    "fp8-weights": "FP8 frozen weights (--precision fp8)",
    "nf4-weights": "4-bit NF4 frozen weights, QLoRA (--precision nf4)",
    "native-options": "the native engine's tuning flags (NativeOptions)",
    "cuda-only": "runs on CUDA devices only",
}
"""Capability -> what it means, for messages and --help."""


@dataclass(frozen=True)
class EngineSpec:
    """One engine: how it is built and what it can do."""

    name: str
    builder: str
    """``module:function`` under lorabench.engines building it (lazy: optional stacks import only when used)."""
    summary: str
    precisions: tuple[str, ...]
    """The precision names it runs (precision.PRECISIONS)."""
    checkpointing: tuple[str, ...]
    """The --activation-checkpointing policies it takes."""
    capabilities: frozenset[str] = frozenset()

    def can(self, capability: str) -> bool:
        assert capability in CAPABILITIES, capability
        return capability in self.capabilities

    def refuse(self, what: str, capability: str) -> ConfigError:
        """``what`` (a flag, a setting) refused for this engine, naming the engines that have ``capability``."""
        able = [s.name for s in SPECS.values() if s.can(capability)]
        return ConfigError(f"{what}: {CAPABILITIES[capability]} runs on {either(able)}; --engine {self.name} "
                           "does not have it")

    def check_checkpointing(self, policy: str):
        if policy not in self.checkpointing:
            able = [s.name for s in SPECS.values() if policy in s.checkpointing]
            raise ConfigError(f"--activation-checkpointing {policy} runs on {either(able)}; --engine {self.name} "
                              f"has {', '.join(self.checkpointing)}")


def either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


NATIVE_CHECKPOINTING = ("none", "block", "offload", "matmuls", "adapter-inputs")
_NON_FP8 = ("fp32", "tf32", "fp16", "bf16")

SPECS: dict[str, EngineSpec] = {s.name: s for s in (
    EngineSpec("native", "native:build", "ours: model.py + lora.py, tuned by NativeOptions",
               (*_NON_FP8, "fp8", "nf4", "nf4-fp8"), NATIVE_CHECKPOINTING,
               frozenset({"shard", "shard-at-build", "evaluate-sharded", "packing-documents",
                          "beyond-sliding-window", "fp8-weights", "nf4-weights", "native-options"})),
    EngineSpec("reference", "reference:build", "transformers + PEFT, FlagPerf's stack", _NON_FP8,
               ("none", "block"), frozenset({"shard", "packing-documents", "beyond-sliding-window"})),
    EngineSpec("reference+liger", "reference:build", "transformers + PEFT with Liger's kernels", _NON_FP8,
               ("none", "block"), frozenset({"packing-documents", "beyond-sliding-window"})),
    EngineSpec("reference+compile", "reference:build", "transformers + PEFT under torch.compile", _NON_FP8,
               ("none", "block"), frozenset({"packing-documents", "beyond-sliding-window"})),
    EngineSpec("reference+bnb", "reference:build", "transformers + PEFT over bitsandbytes' NF4 (QLoRA's stack)",
               ("nf4",), ("none", "block"), frozenset({"nf4-weights", "packing-documents",
                                                       "beyond-sliding-window"})),
    EngineSpec("unsloth", "unsloth:build", "Unsloth's FastLanguageModel + get_peft_model", ("fp16", "bf16"),
               ("none", "block", "offload"), frozenset({"cuda-only"})),
    EngineSpec("unsloth-fp8", "unsloth:build", "Unsloth with load_in_fp8 (its FP8 LoRA)", ("fp8",),
               ("none", "block", "offload"), frozenset({"cuda-only", "fp8-weights"})),
    EngineSpec("unsloth-4bit", "unsloth:build", "Unsloth with load_in_4bit (QLoRA: bitsandbytes NF4)", ("nf4",),
               ("none", "block", "offload"), frozenset({"cuda-only", "nf4-weights"})),
)}

OURS = "native"
"""The engine lorabench is measuring: bench sets every other engine's row against it."""
BASELINE = "reference"
"""The plain stack of FlagPerf's case (transformers + PEFT): bench's speed-ups and loss gaps are against it."""


def spec(name: str) -> EngineSpec:
    """The spec of engine ``name``; a ConfigError listing the engines otherwise."""
    if name not in SPECS:
        raise ConfigError(f"--engine: unknown {name!r}; choose from {', '.join(SPECS)}")
    return SPECS[name]
