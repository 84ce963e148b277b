"""Shared fixtures: a very small Llama shape, HF reference models built from it, and the MMLU data location."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorabench.config import LoRAConfig, ModelConfig

SHARED_MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"

# Grouped-query attention (4 query heads, 2 KV heads) and odd-ish sizes, so parity covers the general case.
SMALL = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)


@pytest.fixture
def small_cfg() -> ModelConfig:
    return SMALL


@pytest.fixture
def lora_cfg() -> LoRAConfig:
    return LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))


def hf_model(cfg: ModelConfig, seed: int = 0, attn: str = "eager"):
    """An HF LlamaForCausalLM with random weights (HF's own init, then non-trivial norm weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hc = LlamaConfig(**cfg.to_hf_dict())
    hc._attn_implementation = attn
    m = LlamaForCausalLM(hc).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # ones would hide a norm-weight mapping bug
    return m


def need_shared_mmlu():
    if not (SHARED_MMLU / "test").is_dir():
        pytest.skip(f"full MMLU not found at {SHARED_MMLU} (it lives in the project's shared data folder)")
    return SHARED_MMLU
