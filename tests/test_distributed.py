"""Data parallel under torchrun (gloo on CPU): 2 ranks train exactly as 1 process with twice the grad_accum."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

COMMON = ["run", "--device", "cpu", "--no-progress", "--no-mmlu", "--max-steps", "4", "--lora-dropout", "0",
          "--eval-batches", "2", "--batch-size", "2", "--seq-len", "64"]


def lorabench(args, tmp_path, nproc=1):
    env = {**os.environ, "LORABENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lorabench"]
    else:
        cmd = [sys.executable, "-m", "lorabench"]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("precision", ["fp32", "fp8", "nf4", "fp32 --loss-on response"])
def test_two_ranks_equal_one_process_with_double_grad_accum(tmp_path, precision):
    """fp8 and nf4 too: each micro-batch's forward and backward is the same computation on a rank as in one process; and
    a loss on the responses only, whose micro-batches hold different numbers of label tokens: normalised by the
    whole step's count, two ranks still equal one process. Losses to 1e-5; the adapters as assert_adapters_match
    says (AdamW can turn a rounding-sized difference in a near-zero gradient into most of lr)."""
    prec = ["--precision", *precision.split()]
    dp = lorabench(COMMON + prec + ["--grad-accum", "1", "--run-dir", str(tmp_path / "dp")], tmp_path, nproc=2)
    lorabench(COMMON + prec + ["--grad-accum", "2", "--run-dir", str(tmp_path / "one")], tmp_path)
    assert dp.stdout.count("# lorabench run") == 1  # only rank 0 reports
    r_dp = json.loads((tmp_path / "dp" / "result.json").read_text())
    r_one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert r_dp["config"]["world_size"] == 2 and r_one["config"]["world_size"] == 1
    np.testing.assert_allclose(r_dp["series"]["loss"], r_one["series"]["loss"], atol=1e-5, rtol=0)
    assert r_dp["metrics"]["eval_loss"] == pytest.approx(r_one["metrics"]["eval_loss"], abs=1e-5)
    a = load_file(tmp_path / "dp" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert_adapters_match(a, b, lr=r_dp["config"]["lr"], steps=r_dp["config"]["max_steps"])
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("shard", ["none", "fsdp", "fsdp --precision fp8"])
def test_two_ranks_stopped_by_sigterm_resume_bit_for_bit(tmp_path, shard):
    """SIGTERM to torchrun once the first checkpoint exists: both ranks stop after the same step (the flag rides the
    gradient all-reduce), each writes its random states (and under --shard fsdp its shards of the adapters and of
    AdamW's state; FP8 weights too), and the resumed job ends exactly as the uninterrupted one."""
    import signal
    import time

    from lorabench.resume import states

    flags = COMMON[:COMMON.index("--max-steps")] + ["--max-steps", "40"] + COMMON[COMMON.index("--max-steps") + 2:] \
        + ["--checkpoint-every", "2", "--shard", *shard.split()]
    lorabench(flags + ["--run-dir", str(tmp_path / "straight")], tmp_path, nproc=2)
    env = {**os.environ, "LORABENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorabench"]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(cmd + flags + ["--run-dir", str(stopped)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not states(stopped / "checkpoint") and time.time() - t0 < 300 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    state = torch.load(states(stopped / "checkpoint")[-1], weights_only=True)
    assert 2 <= state["step"] < 40 and not (stopped / "result.json").exists()
    assert {f"rng-{r}-{state['step']}.pt" for r in (0, 1)} <= {p.name for p in (stopped / "checkpoint").iterdir()}
    lorabench(flags + ["--resume", str(stopped)], tmp_path, nproc=2)
    a = json.loads((tmp_path / "straight" / "result.json").read_text())
    b = json.loads((stopped / "result.json").read_text())
    assert a["series"]["loss"] == b["series"]["loss"] and len(b["series"]["loss"]) == 40
    assert b["resumed_at_step"] == state["step"]


def sharded_copy_of_the_tiny_model(where):
    """The bundled model rewritten as an HF folder of several safetensors shards and their index."""
    import shutil

    from lorabench.assets import TINY_MODEL
    from lorabench.checkpoint import iter_checkpoint, write_hf_shards
    from lorabench.config import ModelConfig

    write_hf_shards(where, ModelConfig.from_hf_json(TINY_MODEL), iter_checkpoint(TINY_MODEL), torch.float32,
                    shard_bytes=2_000_000)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{TINY_MODEL}/{name}", where / name)
    assert len(json.loads((where / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    return where


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("nproc, sharded_dir, engine, shard, precision", [
    (2, False, "native", "fsdp", "fp32"), (4, False, "native", "fsdp", "fp32"), (2, True, "native", "fsdp", "fp32"),
    (2, False, "reference", "fsdp", "fp32"), (4, False, "native", "hsdp --shard-group-size 2", "fp32"),
    (2, False, "native", "fsdp --activation-checkpointing block", "fp32"),
    (2, False, "native", "fsdp --compile --activation-checkpointing offload", "fp32"),
    (2, False, "native", "fsdp", "fp8"), (2, True, "native", "fsdp", "fp8"),
    (4, False, "native", "hsdp --shard-group-size 2 --activation-checkpointing block", "fp8"),
    (2, False, "native", "fsdp --activation-checkpointing matmuls", "fp8"),
    (2, False, "native", "fsdp", "fp8 --compile")])
@pytest.mark.slow
def test_fsdp_ranks_equal_one_process_with_matching_grad_accum(tmp_path, nproc, sharded_dir, engine, shard,
                                                               precision):
    """--shard fsdp (FSDP2 over gloo; hsdp: two replicas of two shards; compiled blocks with their inputs offloaded,
    against one eager process; FP8 weights sharded as FP8, read from a folder of safetensors shards straight into
    FP8 shards, compiled against one compiled process, whose fused quantization rounds otherwise than eager's): N
    ranks holding a shard of every block each train as one process with N micro-batches of
    accumulation: losses, eval loss, each step's gradient norm (recorded under a clip that never bites; AdamW's
    steps hide a gradient's scale, the norm does not) and the whole adapters gathered from the shards.
    Tolerances: float32 sums in another order (~1e-7 relative); the adapters as assert_adapters_match says."""
    flags = COMMON + ["--max-grad-norm", "1e9", "--engine", engine, "--precision", *precision.split()]
    if sharded_dir:  # weights read from a folder of safetensors shards
        from lorabench.assets import TINY_DATA

        flags += ["--model-dir", str(sharded_copy_of_the_tiny_model(tmp_path / "model")), "--preset", "tiny",
                  "--data", str(TINY_DATA)]
    fsdp = lorabench(flags + ["--shard", *shard.split(), "--run-dir", str(tmp_path / "fsdp")], tmp_path,
                     nproc=nproc)
    lorabench(flags + ["--grad-accum", str(nproc), "--run-dir", str(tmp_path / "one")], tmp_path)
    assert fsdp.stdout.count("# lorabench run") == 1
    a = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    b = json.loads((tmp_path / "one" / "result.json").read_text())
    assert a["config"]["shard"] == shard.split()[0] and a["config"]["world_size"] == nproc
    assert a["config"]["shard_mesh"] == ([2, 2] if shard.startswith("hsdp") else [nproc])
    assert a["config"]["n_trainable"] == b["config"]["n_trainable"]  # counted whole, not per shard
    np.testing.assert_allclose(a["series"]["loss"], b["series"]["loss"], atol=1e-5, rtol=0)
    assert a["metrics"]["eval_loss"] == pytest.approx(b["metrics"]["eval_loss"], abs=1e-5)
    np.testing.assert_allclose(a["series"]["grad_norm"], b["series"]["grad_norm"], rtol=1e-5)
    wa = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert_adapters_match(wa, wb, lr=a["config"]["lr"], steps=a["config"]["max_steps"])


def assert_adapters_match(wa: dict, wb: dict, lr: float, steps: int):
    """Two runs' adapters after ``steps`` AdamW steps at ``lr`` (betas 0.9/0.999, no weight decay) whose gradients
    differ by float32 rounding alone. AdamW moves each element by lr * m / (sqrt(v) + eps) a step, with
    |m / sqrt(v)| <= ~1.007 in the first four steps (Cauchy-Schwarz over the bias-corrected averages), so where an
    element's gradient is itself at the rounding level (a near-zero gradient), the two runs may move it apart by up
    to ~2 lr a step; elsewhere the rounding's ~1e-6 relative leaves them within 1% of lr. So: every element within
    2 * steps * lr of the other run, and all but 1% of each tensor's elements (at least one) within 1% of lr. A
    shard gathered into the wrong place, or not trained, moves whole rows: far more than 1% of the elements."""
    assert steps <= 4, "the 1.01 bound on |m / sqrt(v)| holds for four steps at the most (1.0068; 1.0108 at five)"
    assert set(wa) == set(wb)
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        diff = (wa[k].double() - wb[k].double()).abs()
        assert float(diff.max()) <= 2 * steps * lr * 1.01, (k, float(diff.max()))
        far = int((diff > 0.01 * lr).sum())
        assert far <= max(1, diff.numel() // 100), (k, far, diff.numel(), float(diff.max()))


def test_assert_adapters_match_catches_misplaced_rows_and_allows_a_few_noisy_elements():
    torch.manual_seed(0)
    a = {"lora_A": torch.randn(8, 192) * 0.07, "lora_B": torch.randn(192, 8) * 8e-3}
    noisy = {k: v + 1e-7 * torch.randn_like(v) for k, v in a.items()}
    noisy["lora_A"][5, 184] += 1.5e-3  # a near-zero gradient's element, moved most of lr by rounding
    assert_adapters_match(a, noisy, lr=2e-3, steps=4)
    swapped = dict(a, lora_A=a["lora_A"].roll(4, dims=0))  # the two ranks' row shards in each other's place
    with pytest.raises(AssertionError):
        assert_adapters_match(a, swapped, lr=2e-3, steps=4)
    many = {k: v.clone() for k, v in a.items()}
    many["lora_B"].view(-1)[::40] += 1e-4  # 2.5% of the elements off by 5% of lr
    with pytest.raises(AssertionError):
        assert_adapters_match(a, many, lr=2e-3, steps=4)
    with pytest.raises(AssertionError):
        assert_adapters_match(a, dict(a, lora_B=torch.full_like(a["lora_B"], float("nan"))), lr=2e-3, steps=4)


def test_fsdp_refuses_what_it_does_not_run(tmp_path, capsys):
    from lorabench.cli import main

    base = COMMON + ["--shard", "fsdp", "--run-dir", str(tmp_path / "x")]
    assert main(base) == 2
    assert "--shard fsdp needs a torchrun job of 2 or more processes" in capsys.readouterr().err
    from lorabench import shard
    from lorabench.config import ConfigError

    from lorabench.precision import get_precision

    for kw, msg in ((dict(engine="reference+liger"), "shards the native and reference engines"),
                    (dict(precision=get_precision("nf4")), "NF4"),
                    (dict(engine="reference", mmlu=True), "with the native engine only"),
                    (dict(engine="reference", rouge=True), "with the native engine only")):
        args = dict(shard="fsdp", engine="native", precision=get_precision("fp32"), world=2, mmlu=False, rouge=False)
        with pytest.raises(ConfigError, match=msg):
            shard.check(**{**args, **kw})
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_fsdp_evaluates_mmlu_and_rouge_on_every_rank_as_one_process_does(tmp_path):
    """MMLU and ROUGE after a --shard fsdp run (the bundled sample, both MMLU protocols): every rank runs the
    evaluations' forwards, rank 0 writes; the accuracies, every question's prediction and every generation equal
    one process's."""
    pytest.importorskip("rouge_score")
    flags = [f for f in COMMON if f != "--no-mmlu"] + ["--mmlu-protocol", "both", "--eval-rouge", "3",
                                                        "--rouge-max-new-tokens", "8"]
    lorabench(flags + ["--shard", "fsdp", "--run-dir", str(tmp_path / "fsdp")], tmp_path, nproc=2)
    lorabench(flags + ["--grad-accum", "2", "--run-dir", str(tmp_path / "one")], tmp_path)
    a = json.loads((tmp_path / "fsdp" / "result.json").read_text())["metrics"]
    b = json.loads((tmp_path / "one" / "result.json").read_text())["metrics"]
    assert a["mmlu_questions"] == b["mmlu_questions"] > 0
    assert a["mmlu_acc"] == b["mmlu_acc"] and a["mmlu_acc_flagperf"] == b["mmlu_acc_flagperf"]
    ra = json.loads((tmp_path / "fsdp" / "result.json").read_text())["rouge"]
    assert ra == json.loads((tmp_path / "one" / "result.json").read_text())["rouge"] and ra["records"] == 3
    assert (tmp_path / "fsdp" / "rouge_predictions.jsonl").read_text() == \
        (tmp_path / "one" / "rouge_predictions.jsonl").read_text()
    for name in ("mmlu_predictions.jsonl", "mmlu_flagperf_predictions.jsonl"):
        pa = [json.loads(x) for x in (tmp_path / "fsdp" / name).read_text().splitlines()]
        pb = [json.loads(x) for x in (tmp_path / "one" / name).read_text().splitlines()]
        assert [p.get("pred", p.get("pred_token_id")) for p in pa] == [p.get("pred", p.get("pred_token_id"))
                                                                        for p in pb]


SHARDED_FP8 = """
import torch, torch.distributed as dist
from lorabench.config import LoRAConfig, ModelConfig
from lorabench.engines import build_engine
from lorabench.shard import mesh, native_sharder

dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
cpu = torch.device("cpu")
sharder = native_sharder(torch.bfloat16, mesh("fsdp", 2, 2, cpu), gather_as_stored=True)
sharded = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=cpu, precision="fp8", seed=0,
                       sharder=sharder)
whole = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=cpu, precision="fp8", seed=0)
for name in ("layers.0.attn.q_proj", "layers.1.mlp.down_proj"):
    s, w = sharded.model.get_submodule(name), whole.model.get_submodule(name)
    local = s.weight.to_local()
    assert local.dtype == torch.float8_e4m3fn and local.shape[0] == w.weight.shape[0] // 2, (name, local.shape)
    assert torch.equal(local.view(torch.uint8), w.weight.chunk(2)[rank].view(torch.uint8)), name
    assert torch.equal(s.weight_scale, w.weight_scale), name  # every rank: the whole tensor's per-row scales
seen = []  # the dtype a projection's weight has in the forward: what the all-gather brought
for name in ("layers.0.attn.k_proj", "layers.0.mlp.up_proj"):  # (plain projections: called as modules)
    sharded.model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    assert torch.equal(sharded.loss(ids, ids), whole.loss(ids, ids))
assert seen == [torch.float8_e4m3fn] * 2, seen
print("rank", rank, "ok")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_fp8_weights_are_sharded_as_fp8(tmp_path):
    """--shard fsdp --precision fp8: each of 2 ranks holds half of every FP8 weight's rows, as FP8 bytes equal to the
    unsharded model's, with the whole tensor's per-row scales beside them; the all-gather brings them to the forward
    as FP8 (half of bf16's bytes; a cast to bf16 would also compute the same loss on a CPU, so the dtype is
    checked); the loss of the sharded model is the unsharded one's, bit for bit."""
    script = tmp_path / "sharded_fp8.py"
    script.write_text(SHARDED_FP8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == 2, done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_mlperf_scenario_runs_its_shape_sharded(tmp_path):
    """benchmarks/scenarios.py mlperf on 2 CPU ranks with a small shape: MLPerf's LoRA (r 16, alpha 32, dropout 0.1
    on q/k/v/o) in fp8 over FSDP, global batch 8 (LBS 1 x 4 micro-batches x 2 ranks), and the pass-time line."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LORABENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root / "src")}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "scenarios.py"), "--out", str(tmp_path), "mlperf",
                           "--nproc", "2", "--model", "tiny", "--seq-len", "64", "--steps", "3", "--untimed-steps", "1",
                           "--", "--device", "cpu", "--no-progress"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "mlperf-2" / "result.json").read_text())["config"]
    assert (r["precision"], r["shard"], r["world_size"], r["batch_size"], r["grad_accum"]) == ("fp8", "fsdp", 2, 1, 4)
    assert (r["lora_r"], r["lora_alpha"], r["lora_dropout"]) == (16, 32.0, 0.1)
    assert r["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and r["seq_len"] == 64
    assert "global batch 8" in done.stdout and "one pass over 3,901 samples" in done.stdout
