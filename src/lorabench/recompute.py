"""What a training forward keeps for the backward (``--activation-checkpointing``), for the native engine's blocks.

- ``block``: each decoder block's input only; the backward runs the block again (torch's non-reentrant
  checkpoint, which replays the RNG state, so the dropout masks come out the same).
- ``offload``: ``block`` with each block's input kept in host memory instead of on the GPU: copied out on a side
  stream as the forward goes on and back on it while the block after it runs its backward (``offloaded``), so
  what the GPU holds no longer grows by a [tokens, hidden] tensor a layer (it holds one, the next to be used).
  The stack most users compare with (Unsloth) does the same with its own checkpointing.
- ``matmuls``: selective checkpointing that keeps the outputs of matrix products and attention and recomputes the
  elementwise work between them (``keep_matmul_outputs``).
- ``adapter-inputs`` is not a checkpoint: lora.fresh.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.utils.checkpoint

RECOMPUTING = ("block", "offload", "matmuls")
"""The policies that run the blocks under torch's checkpoint."""


@functools.cache
def _kept_ops() -> frozenset:
    """The aten ops whose outputs ``--activation-checkpointing matmuls`` keeps (those this torch has)."""
    names = ("mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention")
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


def keep_matmul_outputs():
    """Selective checkpointing's contexts for ``--activation-checkpointing matmuls``: the outputs of matrix
    products (frozen projections, adapters, the FP8 GEMMs) and of attention kernels are saved, everything else is
    recomputed in the backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _kept_ops()

    def policy(ctx, op, *args, **kwargs):
        packet = getattr(op, "overloadpacket", op)
        return CheckpointPolicy.MUST_SAVE if packet in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class _HostCopy:
    """A tensor's copy in (pinned, on CUDA) host memory, written on ``stream`` after the work that made it.
    ``previous``: the copy of the block before this one in the forward, whose recomputation comes next in the
    backward: it is fetched back to the device on ``stream`` as soon as this one comes back (``back``), so its
    transfer overlaps this block's backward instead of stalling the next one."""

    def __init__(self, t: torch.Tensor, stream, previous: "_HostCopy | None" = None, on_fetch=None):
        self.device, self.stream, self.previous, self.on_fetch = t.device, stream, previous, on_fetch
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        self.event = self.fetched = None
        if t.is_cuda:
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            t.record_stream(stream)  # its memory is not reused before the copy is done
        else:
            self.host.copy_(t)

    def fetch(self):
        """Start the copy back to the device (once)."""
        if self.fetched is not None:
            return
        if self.on_fetch is not None:
            self.on_fetch(self)
        if self.event is None:
            self.fetched = (self.host.clone(), None)
            return
        with torch.cuda.stream(self.stream):  # after the copy out, on the same stream
            t = self.host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.fetched = (t, done)

    def back(self) -> torch.Tensor:
        """The tensor on its device, ready for the current stream; starts fetching the previous block's."""
        self.fetch()
        t, done = self.fetched
        self.fetched = None  # the device copy is the autograd graph's from here (a second backward fetches again)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            t.record_stream(torch.cuda.current_stream(self.device))  # made on the side stream, used here
        if self.previous is not None:
            self.previous.fetch()
            self.previous = None
        return t


_STREAMS: dict = {}


@contextmanager
def offloaded(like: torch.Tensor, chain: list, on_pack=None, on_fetch=None):
    """Within this context, tensors saved for the backward with ``like``'s shape and dtype (a block's input, as
    torch's checkpoint saves it) go to host memory and come back when the backward unpacks them; other saved
    tensors (RoPE tables, masks) stay where they are. ``chain``: the copies this forward made so far (in block
    order, each one made here appended): the last one is fetched back when this block's comes back.
    ``on_pack``/``on_fetch`` (tests): called with each tensor moved out and each copy as its fetch starts."""
    stream = None
    if like.is_cuda:  # one side stream a device, made once
        if like.device not in _STREAMS:
            _STREAMS[like.device] = torch.cuda.Stream(like.device)
        stream = _STREAMS[like.device]
    shape, dtype = like.shape, like.dtype

    def pack(t: torch.Tensor):
        if t.shape != shape or t.dtype != dtype:
            return t
        if on_pack is not None:
            on_pack(t)
        chain.append(_HostCopy(t, stream, chain[-1] if chain else None, on_fetch))
        return chain[-1]

    def unpack(p):
        return p.back() if isinstance(p, _HostCopy) else p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def checkpointed(layer, policy: str, x, *args, chain: list | None = None, on_pack=None, on_fetch=None):
    """``layer(x, *args)`` under ``policy`` (one of RECOMPUTING); ``chain`` (offload): one list for every block
    of a forward, so that each block's input is fetched back while the block after it runs its backward."""
    context = {"context_fn": keep_matmul_outputs} if policy == "matmuls" else {}
    if policy != "offload":
        return torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False, **context)
    chain = [] if chain is None else chain
    copies = len(chain)
    with offloaded(x, chain, on_pack, on_fetch):
        out = torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False)
    if len(chain) == copies:  # a torch whose checkpoint holds its inputs itself: they would stay on the device
        raise RuntimeError(f"--activation-checkpointing offload: torch {torch.__version__}'s checkpoint keeps its "
                           "inputs outside the saved-tensor hooks, so they cannot go to host memory; use block")
    return out
