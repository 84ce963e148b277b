"""Model-shape arithmetic in one place: projection shapes, parameter counts, FLOPs per token, GEMM shapes.

The model (model.py), the checkpoint name map (checkpoint.py), the MFU figures (metrics.py) and the floor
(bench/floor.py) all read their shapes from here, so the four can never disagree.

FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B, adapted to LoRA)::

    4 * N_frozen + 6 * N_lora + 12 * L * H * Q * T

A frozen matrix costs 2 FLOPs per weight forward and 2 for the input gradient, with no weight gradient; an
adapter weight costs all three (6); attention scores and values cost 2 * 2 * L * H * Q * T forward and twice that
backward (no causal discount, no recomputation counted). N_frozen excludes the input embedding (a lookup) and
includes lm_head.
"""
from __future__ import annotations

from .config import LoRAConfig, ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear layers of a Llama block, in HF's state-dict order."""


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{projection: (in_features, out_features)} of one decoder block."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    inter = cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def hf_param_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape of the HF parameter ``name`` (e.g. model.layers.0.self_attn.q_proj.weight): [out, in] for a matrix,
    [hidden] for a norm."""
    if "embed_tokens." in name or "lm_head." in name:
        return (cfg.vocab_size, cfg.hidden_size)
    if "q_norm." in name or "k_norm." in name:
        return (cfg.head_dim,)
    for proj, (i, o) in projection_shapes(cfg).items():
        if f"{proj}." in name:
            return (o,) if name.endswith(".bias") else (o, i)
    return (cfg.hidden_size,)  # the norms


def count_params(cfg: ModelConfig) -> dict:
    """Parameter counts by role, from the shape alone (used by the FLOPs formula)."""
    h = cfg.hidden_size
    shapes = projection_shapes(cfg)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h  # + the two norms
    if cfg.qkv_bias:
        per_layer += sum(shapes[p][1] for p in ("q_proj", "k_proj", "v_proj"))
    if cfg.qk_norm:
        per_layer += 2 * cfg.head_dim
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    total = embed + cfg.num_hidden_layers * per_layer + h + head
    return {"total": total, "embedding": embed, "per_layer": per_layer, "non_embedding": total - embed
            + (embed if cfg.tie_word_embeddings else 0)}


def lora_param_count(cfg: ModelConfig, lora: LoRAConfig) -> int:
    """Trainable adapter weights: r x (in + out) per adapted projection and layer."""
    return cfg.num_hidden_layers * sum(lora.r * (i + o) for t, (i, o) in projection_shapes(cfg).items()
                                       if t in lora.targets)


def flops_per_token(cfg: ModelConfig, lora: LoRAConfig, seq_len: int) -> float:
    """Training FLOPs per token by the formula in the module docstring."""
    n_frozen = count_params(cfg)["non_embedding"]
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 4 * n_frozen + 6 * lora_param_count(cfg, lora) + attn


def rows_flops(cfg: ModelConfig, lora: LoRAConfig, tokens: int, tokens_sq: int) -> float:
    """Training FLOPs of rows of their own lengths (``--packing none``): ``tokens`` = the sum of the lengths,
    ``tokens_sq`` = the sum of their squares; a row of length T costs T x flops_per_token(T), the attention term
    growing with its own length, not the padded one."""
    per_token = flops_per_token(cfg, lora, 0)
    return per_token * tokens + (flops_per_token(cfg, lora, 1) - per_token) * tokens_sq


GEMM_GROUP_NAMES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",), ("lm_head",))
"""The matrices of each of ``gemm_groups``' groups, in its order."""


def gemm_groups(cfg: ModelConfig) -> list[tuple[int, list[int], int]]:
    """(in, [out of each matrix], times per step) of the frozen matrices, grouped by shared input: q/k/v read the
    same normed hidden state, gate/up likewise, so each group can run as one GEMM or as one per matrix."""
    s = {**projection_shapes(cfg), "lm_head": (cfg.hidden_size, cfg.vocab_size)}
    return [(s[names[0]][0], [s[p][1] for p in names], 1 if names == ("lm_head",) else cfg.num_hidden_layers)
            for names in GEMM_GROUP_NAMES]
