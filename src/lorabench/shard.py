"""``--shard fsdp``: the native engine's model sharded across the ranks of a torchrun job with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``), so no rank holds all of the frozen weights while it trains.

Each decoder block is one FSDP unit and the root (embeddings, final norm, lm_head) another: a block's weights are
all-gathered just before its forward (and again for its backward) and freed after, the adapters' gradients are
reduce-scattered and averaged over the ranks, as data parallel's all-reduce averages them, so N ranks train as one
process with N times the gradient accumulation. The adapters and their AdamW state are sharded with the rest.
Under bf16 and fp16 the units gather in the run's dtype and reduce gradients in fp32 (``MixedPrecisionPolicy``):
the fp32 adapters are computed in the activations' dtype, as they are without sharding.

What this first form does not do, and refuses with a message rather than doing half: FP8 weights (held as plain
tensors beside their scales, which FSDP does not shard), MMLU and ROUGE after training (they run on rank 0 alone,
and a sharded model needs every rank for each forward), checkpoints and ``--resume`` (the state is sharded; a
signal stops the run without one). Every rank builds the whole model before it is sharded: loading each shard
straight to its owner is not done yet.
"""
from __future__ import annotations

import torch

from .config import ConfigError

SHARDINGS = ("none", "fsdp")


def check(shard: str, engine: str, precision: str, world: int, mmlu: bool, rouge: bool, checkpoints: bool,
          resume: bool):
    """Refuse what --shard fsdp does not run (see the module docstring), before any work."""
    if shard not in SHARDINGS:
        raise ConfigError(f"--shard must be one of {', '.join(SHARDINGS)}, got {shard!r}")
    if shard == "none":
        return
    why = None
    if world < 2:
        why = "needs a torchrun job of 2 or more processes (torchrun --nproc_per_node N -m lorabench run ...)"
    elif engine != "native":
        why = f"shards the native engine; --engine {engine} is not sharded"
    elif precision == "fp8":
        why = "does not shard FP8 weights yet; use --precision bf16"
    elif mmlu or rouge:
        why = "cannot evaluate on rank 0 alone (a sharded model needs every rank); add --no-mmlu and leave out " \
              "--eval-rouge, then run lorabench eval on the adapter"
    elif checkpoints or resume:
        why = "does not checkpoint sharded state yet; leave out --checkpoint-every, --checkpoint-minutes and --resume"
    if why:
        raise ConfigError(f"--shard fsdp {why}")


def apply_fsdp(model: torch.nn.Module, dtype: torch.dtype):
    """Shard ``model`` in place: each decoder block, then the root."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # a block returns its (k, v) as views beside its output; nothing writes into them in place (the warning's case)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype in (
        torch.bfloat16, torch.float16) else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "loss")  # the loop calls loss(), not forward(): gather the root there too


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter or gradient (a collective: every rank calls it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
