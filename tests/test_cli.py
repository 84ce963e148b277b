"""The CLI end to end on the bundled tiny default, and its errors for people."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lorabench.cli import main

REQUIRED_METRICS = ["tokens_per_s_per_chip", "tokens_per_s_per_chip_median", "mfu_flagperf", "flops_per_token",
                    "train_loss_avg", "eval_loss", "mmlu_acc"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))


def test_default_run_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| config | fix_hp | token/p/s | loss | mem | acc(MMLU) | MFU |" in out
    r = json.loads((run_dir / "result.json").read_text())
    m = r["metrics"]
    for k in REQUIRED_METRICS:
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    for k in ("mfu", "peak_mem_allocated_gib", "peak_mem_reserved_gib"):
        assert k in m and m[k] is None  # CPU: no known peak, no device memory
    for k in ("git_hash", "git_dirty", "python", "torch", "transformers", "device_name"):
        assert k in r["env"], k
    assert r["config"]["preset"] == "tiny" and r["config"]["lora_r"] == 8 and r["config"]["lora_targets"] == [
        "q_proj", "v_proj"]
    s = r["series"]
    assert len(s["step"]) == len(s["loss"]) == len(s["step_time_s"]) == m["steps"] > 10
    first, last = sum(s["loss"][:5]) / 5, sum(s["loss"][-5:]) / 5
    assert last < first, (first, last)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and r["adapter_dir"]
    assert (run_dir / "report.md").read_text().count("| 1x1 native fp32 |") == 1
    preds = (run_dir / "mmlu_predictions.jsonl").read_text().splitlines()
    assert len(preds) == m["mmlu_questions"] == 40
    assert set(json.loads(preds[0])) == {"subject", "index", "gold", "pred", "logprobs"}
    assert not list(run_dir.glob(".*"))  # no temporary files left behind


def test_second_run_uses_the_packed_cache(tmp_path):
    args = ["run", "--no-progress", "--device", "cpu", "--max-steps", "2", "--no-mmlu", "--no-save-adapter"]
    assert main(args + ["--run-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--run-dir", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "result.json").read_text())["config"]["data"]
    b = json.loads((tmp_path / "b" / "result.json").read_text())["config"]["data"]
    assert "cached" not in a and "cached" in b


@pytest.mark.parametrize("argv, message", [
    (["--model-dir", "/no/such/model", "--data", "synthetic"], "--model-dir /no/such/model"),
    (["--preset", "nope"], "--preset: unknown 'nope'"),
    (["--lora-targets", "q_proj,wq"], "--lora-targets: unknown ['wq']"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--seq-len", "100000"], "exceeds the model's max_position_embeddings"),
    (["--data", "/no/such/data.json"], "--data /no/such/data.json: no such file or folder"),
    (["--init", "random"], "--init random needs --model"),
    (["--preset", "bf16", "--tf32"], "--tf32 applies to fp32 weights"),
])
def test_bad_input_fails_with_a_clear_message(argv, message, capsys, tmp_path):
    code = main(["run", "--no-progress", "--device", "cpu", "--run-dir", str(tmp_path / "r")] + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "result.json").exists()


def test_help_explains_the_flags():
    out = subprocess.run([sys.executable, "-m", "lorabench", "run", "--help"], capture_output=True, text=True).stdout
    for flag in ("--model-dir", "--data", "--preset", "--init", "--batch-size", "--lora-targets", "--mmlu", "--tf32"):
        assert flag in out


def test_native_defaults_per_precision_and_their_overrides(monkeypatch):
    """Attention and fused projections follow the precision on a GPU, stay plain on the CPU, and a bad override
    names the variable and the choices."""
    import torch

    from lorabench.config import ConfigError
    from lorabench.runner import dropout_mask_choice, fused_projections_default, native_attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("LORABENCH_NATIVE_ATTENTION", raising=False)
    monkeypatch.delenv("LORABENCH_FUSED_PROJECTIONS", raising=False)
    assert [native_attention(p, cuda) for p in ("tf32", "bf16", "fp16", "fp32")] == ["matmul", "cudnn", "cudnn",
                                                                                      "sdpa"]
    assert native_attention("bf16", cpu) == "sdpa"
    assert [fused_projections_default(p, cuda) for p in ("tf32", "bf16")] == [True, False]
    assert not fused_projections_default("tf32", cpu)
    monkeypatch.setenv("LORABENCH_FUSED_PROJECTIONS", "0")
    assert not fused_projections_default("tf32", cuda)
    monkeypatch.setenv("LORABENCH_FUSED_PROJECTIONS", "yes")
    with pytest.raises(ConfigError, match="LORABENCH_FUSED_PROJECTIONS"):
        fused_projections_default("bf16", cuda)
    monkeypatch.setenv("LORABENCH_NATIVE_ATTENTION", "fast")
    with pytest.raises(ConfigError, match="LORABENCH_NATIVE_ATTENTION.*matmul"):
        native_attention("bf16", cuda)
    monkeypatch.delenv("LORABENCH_DROPOUT_MASK", raising=False)
    assert dropout_mask_choice() == "philox16"
    monkeypatch.setenv("LORABENCH_DROPOUT_MASK", "inline")
    assert dropout_mask_choice() == "inline"
    monkeypatch.setenv("LORABENCH_DROPOUT_MASK", "fast")
    with pytest.raises(ConfigError, match="LORABENCH_DROPOUT_MASK.*bernoulli"):
        dropout_mask_choice()
