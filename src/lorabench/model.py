"""Our Llama decoder in plain PyTorch: RMSNorm, rotary embeddings, SDPA attention (GQA-capable), SwiGLU MLP.

The maths follows the HF ``LlamaForCausalLM`` reference so that the two agree to 1e-5 in fp32 (tests/test_model.py):
RMSNorm normalises in fp32 and casts back before the weight; rotary cos/sin are computed in fp32; the logits are
upcast to fp32 before the cross-entropy. Weights come in through ``checkpoint.py`` (explicit HF name map).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kernels.attention import ATTENTION_IMPLS, attend, sdpa_priority
from .kernels.cross_entropy import frozen_head_cross_entropy
from .lora import Adapter, LoRALinear, shared_input_deltas
from .recompute import RECOMPUTING, checkpointed
from .shapes import projection_shapes


def _under_priority(layer, attention: str):
    """``layer`` run under ``attention``'s SDPA kernel priority, also when the backward's checkpoint runs it again
    (outside the forward's context): else the recomputation may pick another kernel (flash for cuDNN, on an H200
    in eager mode), whose saved tensors differ in shape, and torch's checkpoint stops the backward."""
    def run(*args):
        with sdpa_priority(attention):
            return layer(*args)
    return run


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling=None, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2i/d) (fp32), scaled as ``scaling`` (config.RopeScaling) says:

    - linear: all divided by factor (positions stretched by it);
    - llama3 (Meta's Llama 3.1 recipe, as HF's ``rope_type: llama3``): with L the original context and wavelength
      w = 2 pi / f, frequencies with w < L / high_freq_factor stay, those with w > L / low_freq_factor are divided by
      factor, and in between f' = (1 - s) f / factor + s f with s = (L / w - low_freq_factor) / (high_freq_factor -
      low_freq_factor)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    old = scaling.original_max_position_embeddings
    low, high = old / scaling.low_freq_factor, old / scaling.high_freq_factor  # wavelength bounds
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high) & (wavelen <= low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype, offset: int = 0, scaling=None):
    """cos, sin of shape [seq_len, head_dim] for positions offset..offset+seq_len-1 (computed in fp32)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device)
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def training_mask(positions: torch.Tensor | None, window: int | None, t: int, device):
    """Which keys each query sees when it is not plain causal attention, or None: key j for query i where j <= i,
    both in one document (with ``positions`` [B, T], a document starting at each 0: packed documents) and
    i - j < ``window`` (a sliding window, as Mistral's: the query and the window - 1 tokens before it). On a GPU a
    FlexAttention block mask (blocks outside it skipped, not computed); elsewhere a boolean mask for SDPA
    ([B or 1, 1, T, T]; FlexAttention has no CPU backward)."""
    window = window if window is not None and window < t else None
    if positions is None and window is None:
        return None
    doc = None if positions is None else torch.cumsum(positions == 0, dim=1)
    if torch.device(device).type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask

        def visible(b, h, q, k):
            ok = k <= q
            if doc is not None:
                ok = ok & (doc[b, q] == doc[b, k])
            if window is not None:
                ok = ok & (q - k < window)
            return ok

        return create_block_mask(visible, None if doc is None else doc.shape[0], None, t, t, device=device)
    i = torch.arange(t, device=device)
    ok = (i[None, :] <= i[:, None])
    if window is not None:
        ok = ok & (i[:, None] - i[None, :] < window)
    ok = ok[None]
    if doc is not None:
        ok = ok & (doc[:, :, None] == doc[:, None, :])
    return ok[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by position: x*cos + rotate_half(x)*sin, rotate_half(x) = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        shapes = projection_shapes(cfg)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(*shapes[name], bias=cfg.qkv_bias and name != "o_proj"))
        self.impl = "sdpa"
        self.register_buffer("qkv_weight", None, persistent=False)  # set by convert.fuse_projections
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None  # Qwen3
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None):
        """x [B, T, C] -> (output [B, T, C], this call's rotated (k, v)); kv_cache and attn_mask as
        kernels.attention.attend takes them."""
        B, T, _ = x.shape
        if self.qkv_weight is None:
            q, k, v = shared_input(x, (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = fused_projections(x, self.qkv_weight, (self.q_proj, self.k_proj, self.v_proj),
                                        bias=getattr(self, "qkv_weight_bias", None))
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, self.n_heads // self.n_kv, self.impl, attn_mask, kv_cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


def fused_projections(x, weight, parts, interleaved: bool = False, bias=None):
    """x W_fused^T in one GEMM, split back into the parts' outputs (contiguous blocks, or every len(parts)-th
    column when ``interleaved``), each plus its adapter's delta if it has one."""
    y = F.linear(x, weight, bias)
    if interleaved:
        outs = [y[..., i::len(parts)] for i in range(len(parts))]
    else:
        outs = y.split([p.weight.shape[0] for p in parts], dim=-1)
    return with_deltas(x, outs, parts)


def shared_input(x, parts) -> tuple:
    """The outputs of projections ``parts`` that all read ``x`` (q/k/v, gate/up), one frozen GEMM each, plus
    their adapters' deltas."""
    return with_deltas(x, [p.base_forward(x) if isinstance(p, LoRALinear) else p(x) for p in parts], parts)


def with_deltas(x, outs, parts) -> tuple:
    """Each frozen output in ``outs`` plus its projection's adapter delta where it has an enabled one; adapters
    without dropout in this mode share one product with x (lora.shared_input_deltas)."""
    live = [i for i, p in enumerate(parts) if isinstance(p, Adapter) and p.enabled]
    plain = [i for i in live if isinstance(parts[i], LoRALinear) and not parts[i].drops]
    deltas = dict(zip(plain, shared_input_deltas(x, [parts[i] for i in plain]))) if len(plain) > 1 else {}
    return tuple(o + (deltas[i] if i in deltas else parts[i].delta(x)) if i in live else o
                 for i, o in enumerate(outs))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shapes = projection_shapes(cfg)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, nn.Linear(*shapes[name], bias=False))
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by convert.fuse_projections

    def forward(self, x):
        if self.gate_up_weight is None:
            g, u = shared_input(x, (self.gate_proj, self.up_proj))
        else:
            g, u = fused_projections(x, self.gate_up_weight, (self.gate_proj, self.up_proj), interleaved=True)
        return self.down_proj(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None):
        a, new_kv = self.attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), new_kv


class Llama(nn.Module):
    """Decoder-only Llama. ``forward(ids)`` gives fp32-upcast logits; ``loss(ids, labels)`` the causal-LM loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.compiled_layers: tuple | None = None
        self.eval_layers: tuple | None = None
        self.eval_graph_enabled = True  # evaluation may run eval_layers (a short evaluation turns it off)
        self.attention = "sdpa"
        self.activation_checkpointing = "none"
        """"block": training keeps each decoder block's input only and recomputes the block in the backward."""
        self.checkpoint_blocks: int | None = None
        """Of a recomputing policy: the first this many blocks run under it (None: all)."""
        self._window_masks: dict = {}
        """A sliding window's training masks by (length, device): the same for every batch of a length."""

    def set_attention(self, impl: str):
        """Pick the training attention (one of ATTENTION_IMPLS)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention {impl!r}: choose from {', '.join(ATTENTION_IMPLS)}")
        self.attention = impl
        for layer in self.layers:
            layer.attn.impl = impl

    def hidden(self, ids: torch.Tensor, attn_mask=None, kv_caches=None, position_offset: int = 0,
               return_kv: bool = False, positions: torch.Tensor | None = None):
        """Final-norm hidden states [B, T, C]; optionally with each layer's (k, v) for prefix caching.
        ``positions`` [B, T] (packed documents): each token's position in its document, a 0 starting a document;
        RoPE rotates by these and attention stays within each document; a sequence longer than a sliding window
        attends within it (training_mask)."""
        x = self.embed(ids)
        cos, sin = rope_cos_sin(ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta, ids.device, x.dtype,
                                offset=position_offset, scaling=self.cfg.rope_scaling)
        documents = positions is not None
        if documents:  # [B, 1, T, D]: broadcast over heads
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        windowed = kv_caches is None and attn_mask is None and self.cfg.sliding_window is not None and \
            ids.shape[1] > self.cfg.sliding_window
        if documents:
            attn_mask = training_mask(positions, self.cfg.sliding_window, ids.shape[1], ids.device)
        elif windowed:  # the same for every batch of a length: built once
            key = (ids.shape[1], str(ids.device))
            if key not in self._window_masks:
                self._window_masks[key] = training_mask(None, self.cfg.sliding_window, *key)
            attn_mask = self._window_masks[key]
        kvs = []
        layers = self.layers
        if self.compiled_layers is not None:
            training = torch.is_grad_enabled() and kv_caches is None and not return_kv and (
                attn_mask is None or documents or windowed)
            # evaluation (no grad, caches, masks) runs the shape-generic graphs unless a short run turned them
            # off; a prefix whose K/V are kept (once per MMLU subject) runs eagerly: a graph of its own would cost
            # more to compile (seconds) than it saves
            if training:
                layers = self.compiled_layers
            elif not return_kv and self.eval_graph_enabled:
                layers = self.eval_layers
        if layers is self.eval_layers:  # a batch size equal to a fixed size of the model (e.g. head_dim) would
            torch._dynamo.maybe_mark_dynamic(x, 0)  # otherwise be taken for it and specialised: a second graph
        with sdpa_priority(self.attention):
            recompute = self.activation_checkpointing in RECOMPUTING and torch.is_grad_enabled() and \
                kv_caches is None
            recomputed = len(layers) if self.checkpoint_blocks is None else self.checkpoint_blocks
            chain = []  # offload: the blocks' host copies, each fetched back during the next one's backward
            for i, layer in enumerate(layers):
                if recompute and i < recomputed:  # keep each block's input (and with "matmuls" its products); the
                    # backward runs the rest of the block again, drawing the same dropout masks (the RNG state is
                    # replayed). The later blocks keep everything: the backward frees theirs before it recomputes
                    x, kv = checkpointed(_under_priority(layer, self.attention), self.activation_checkpointing, x,
                                         cos, sin, attn_mask, None, chain=chain)
                else:
                    x, kv = layer(x, cos, sin, attn_mask, None if kv_caches is None else kv_caches[i])
                if return_kv:
                    kvs.append(kv)
        x = self.norm(x)
        return (x, kvs) if return_kv else x

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(ids)).float()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final-norm hidden states (a method of the model, so a sharded model gathers lm_head)."""
        return self.lm_head(h).float()

    def loss(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy; labels are aligned with ids (shifted here), -100 is ignored; ``positions``
        as in ``hidden``. With a frozen lm_head the logits are never kept (kernels/cross_entropy.py)."""
        h = self.hidden(ids, positions=positions)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
        if not self.lm_head.weight.requires_grad:
            return frozen_head_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets,
                                             compiled=self.compiled_layers is not None)
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=-100)
