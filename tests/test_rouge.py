"""--eval-rouge: greedy generation (native KV cache = full reruns = the reference engine), ROUGE by hand, the run."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lorabench.cli import main
from lorabench.config import LoRAConfig
from lorabench.engines import build_engine
from lorabench.engines.base import Engine

from conftest import SMALL

CPU = torch.device("cpu")


def test_cached_generation_equals_full_reruns_and_the_reference_engine():
    """Greedy tokens from the native engine's KV cache equal the base class's full reruns and those of the
    reference engine (transformers + PEFT) from the same weights, with non-zero adapters so LoRA takes part, and
    a RoPE base of 4 so that a position off by one changes the greedy tokens."""
    cfg = dataclasses.replace(SMALL, rope_theta=4.0)
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    engines = {n: build_engine(n, cfg, lora, model_dir=None, device=CPU, precision="fp32", seed=0)
               for n in ("native", "reference")}
    g = torch.Generator().manual_seed(3)
    adapters = {k: (a, torch.randn(b.shape, generator=g) * 0.3) for k, (a, b) in
                engines["native"].adapters().items()}
    for e in engines.values():
        e.set_adapters(adapters, "test")
    prompt = [5, 17, 90, 3, 42, 7, 25, 11]
    with engines["native"].evaluating(False), engines["reference"].evaluating(False):
        cached = engines["native"].generate(prompt, 24, eos_id=-1)
        rerun = Engine.generate(engines["native"], prompt, 24, eos_id=-1)
        ref = engines["reference"].generate(prompt, 24, eos_id=-1)
        assert cached == rerun == ref and len(cached) == 24
        stop = cached[5]  # an EOS ends it there, not returned
        assert engines["native"].generate(prompt, 24, eos_id=stop) == cached[:cached.index(stop)]


def test_rouge_scores_a_hand_worked_pair():
    """"the cat sat" against the reference "the cat": unigram P 2/3, R 1, F 0.8; bigram P 1/2, R 1, F 2/3;
    LCS 2: F 0.8 (x100)."""
    pytest.importorskip("rouge_score")
    from lorabench.rouge import score

    got = score([("prompt", "the cat")], ["the cat sat"])
    assert got == pytest.approx({"rouge1": 80.0, "rouge2": 200 / 3, "rougeL": 80.0})


def test_a_run_reports_rouge_before_and_after(tmp_path, monkeypatch):
    pytest.importorskip("rouge_score")
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "run"
    assert main(["run", "--no-progress", "--device", "cpu", "--no-mmlu", "--max-steps", "3", "--eval-rouge", "3",
                 "--rouge-max-new-tokens", "8", "--run-dir", str(d)]) == 0
    r = json.loads((d / "result.json").read_text())["rouge"]
    assert r["records"] == 3 and r["max_new_tokens"] == 8 and set(r["before"]) == set(r["after"]) == {
        "rouge1", "rouge2", "rougeL"}
    lines = [json.loads(x) for x in (d / "rouge_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(set(x) == {"reference", "before", "after"} for x in lines)
    assert "ROUGE-1 / 2 / L on 3 validation records" in (d / "report.md").read_text()
    assert main(["run", "--no-progress", "--device", "cpu", "--no-mmlu", "--data", "synthetic", "--init", "random",
                 "--model", "tiny", "--eval-rouge", "3", "--run-dir", str(tmp_path / "bad")]) == 2
