"""``--shard fsdp``: the native engine's model (or the reference engine's, for the bench) sharded across the ranks
of a torchrun job with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), so no rank holds all of the frozen
weights while it trains.

Each decoder block is one FSDP unit and the root (embeddings, final norm, lm_head) another: a block's weights are
all-gathered just before its forward (and again for its backward) and freed after, the adapters' gradients are
reduce-scattered and averaged over the ranks, as data parallel's all-reduce averages them, so N ranks train as one
process with N times the gradient accumulation. The adapters and their AdamW state are sharded with the rest.
Under bf16 and fp16 the units gather in the run's dtype and reduce gradients in fp32 (``MixedPrecisionPolicy``):
the fp32 adapters are computed in the activations' dtype, as they are without sharding.

``--shard hsdp``: the same within groups of ``--shard-group-size`` ranks (default: one node's), the groups
replicas of each other whose gradients are averaged across them (hybrid sharding: the all-gathers stay inside a
node, only the gradient reduction crosses nodes).

Checkpoints: each rank writes its shards of the adapters and of their AdamW state beside its random states
(``local_state``), so ``--resume`` continues on the same world size (a different one is refused by the job's
fingerprint). FP8 weights are sharded by rows like any weight and gathered as FP8 (``gather_as_stored``: half of
bf16's bytes), their per-row scales held whole on every rank (non-persistent buffers, which FSDP leaves alone; a
checkpoint tensor's scales are computed from the whole tensor as it is read, then its rows cut to the shard). What
this form does not do, and refuses with a message rather than doing half: NF4 weights (their block constants
would have to be cut with them), MMLU and ROUGE on the reference engine.
On the native engine both run on every rank, the same questions in the same batches and the same prompts token by
token (a sharded model needs every rank in each forward; each generated token is rank 0's, broadcast), rank 0
writing the results.

Loading: the native engine shards its model while it is on the meta device and cuts every checkpoint tensor to
this rank's shard as it is read (one whole tensor in memory at a time), so no rank holds the whole model; the
reference engine is built whole by transformers and sharded after.
"""
from __future__ import annotations

import torch

from .config import ConfigError

SHARDINGS = ("none", "fsdp", "hsdp")


def check(shard: str, engine: str, precision, world: int, mmlu: bool, rouge: bool,
          group: int | None = None):
    """Refuse what --shard fsdp / hsdp does not run (see the module docstring; the engine's capabilities from its
    spec), before any work."""
    from .engines.registry import SPECS, spec

    if shard not in SHARDINGS:
        raise ConfigError(f"--shard must be one of {', '.join(SHARDINGS)}, got {shard!r}")
    if shard == "none":
        if group is not None:
            raise ConfigError("--shard-group-size goes with --shard hsdp")
        return
    why = None
    if shard == "hsdp" and group is not None and (group < 1 or world % group):
        raise ConfigError(f"--shard-group-size {group} must divide the world size {world}")
    if world < 2:
        why = "needs a torchrun job of 2 or more processes (torchrun --nproc_per_node N -m lorabench run ...)"
    elif not spec(engine).can("shard"):
        able = " and ".join(s.name for s in SPECS.values() if s.can("shard"))
        why = f"shards the {able} engines; --engine {engine} is not sharded"
    elif precision.nf4_weights:
        why = "does not shard NF4 weights yet (their quantization state would need sharding with them); use " \
              "--precision bf16 or fp8"
    elif (mmlu or rouge) and not spec(engine).can("evaluate-sharded"):
        able = " and ".join(s.name for s in SPECS.values() if s.can("evaluate-sharded"))
        why = (f"evaluates (MMLU, --eval-rouge) with the {able} engine only (every rank takes part in each "
               "forward)")
    if why:
        raise ConfigError(f"--shard {shard} {why}")


def mesh(shard: str, world: int, group: int, device: torch.device):
    """The ranks' layout: one dimension for fsdp (every rank holds a shard); for hsdp, replicas of ``group`` ranks
    each (``--shard-group-size``, default the ranks of one node): sharded within a group, the gradients averaged
    across the groups as data parallel averages them."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard == "fsdp":
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))


def native_sharder(dtype: torch.dtype, device_mesh=None, gather_as_stored: bool = False):
    """What the native engine calls on its model while it is still on the meta device (engines/native.py): the
    blocks and root sharded before any weight exists, so each rank allocates only its shards and each checkpoint
    tensor is cut to them as it is read (copy_into): no rank holds the whole model."""
    def shard(model):
        apply_fsdp(model, model.layers, dtype, methods=("loss", "hidden", "head"), device_mesh=device_mesh,
                   gather_as_stored=gather_as_stored)
    return shard


def shard_engine(engine, dtype: torch.dtype, device_mesh=None):
    """Shard the reference engine's model in place (after it is built: transformers loads it whole): the decoder
    layers of transformers' model under PEFT, then the PEFT model."""
    apply_fsdp(engine.model, engine.model.get_base_model().model.layers, dtype, device_mesh=device_mesh)


def apply_fsdp(root: torch.nn.Module, blocks, dtype: torch.dtype, methods: tuple[str, ...] = (), device_mesh=None,
               gather_as_stored: bool = False):
    """Shard in place: each of ``blocks``, then ``root`` (``methods``: root methods the loop calls instead of
    forward, gathered as a forward is), over ``device_mesh`` (None: every rank, one dimension).
    ``gather_as_stored`` (FP8 weights): every parameter all-gathered in its own dtype (the FP8 weights as FP8
    bytes, half of bf16's; the fp32 adapters cast to the activations' dtype where they are used, as without
    sharding), not cast to ``dtype``."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # a block returns its (k, v) as views beside its output; nothing writes into them in place (the warning's case)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    policy = MixedPrecisionPolicy(param_dtype=None if gather_as_stored else dtype, reduce_dtype=torch.float32) \
        if dtype in (torch.bfloat16, torch.float16) else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=device_mesh, mp_policy=policy)
    fully_shard(root, mesh=device_mesh, mp_policy=policy)
    for name in methods:
        register_fsdp_forward_method(root, name)


def local_state(params: list, opt: torch.optim.Optimizer) -> dict:
    """This rank's shards of the adapters and of their AdamW state, as plain CPU tensors (its checkpoint part)."""
    def local(t):
        return (t.to_local() if hasattr(t, "to_local") else t).detach().cpu().clone()

    osd = opt.state_dict()
    return {"params": [local(p) for p in params],
            "opt": {"state": {k: {n: local(v) if torch.is_tensor(v) else v for n, v in st.items()}
                              for k, st in osd["state"].items()}, "param_groups": osd["param_groups"]}}


def load_local_state(params: list, opt: torch.optim.Optimizer, saved: dict):
    """Put a checkpoint's shards back (``local_state``'s, written by a job of the same world size)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for p, t in zip(params, saved["params"], strict=True):
            p.to_local().copy_(t)
    state = {}
    for k, st in saved["opt"]["state"].items():
        p = params[int(k)]
        state[k] = {n: DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())
                    if torch.is_tensor(v) and v.dim() > 0 else v for n, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": saved["opt"]["param_groups"]})


def copy_into(dst: torch.Tensor, src: torch.Tensor):
    """``dst.copy_(src)`` for a plain parameter, or, for a sharded one, this rank's part of the whole ``src``
    (every rank holds the same ``src``: cut locally, nothing sent)."""
    if hasattr(dst, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(src)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter or gradient (a collective: every rank calls it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
