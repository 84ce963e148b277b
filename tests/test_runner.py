"""The run pipeline: each stage alone (resolve, load data, build, measure) and their composition equal to run_job."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch

from lorabench.assets import TINY_DATA, TINY_MMLU
from lorabench.config import ConfigError, LoRAConfig, TrainConfig
from lorabench.engines import NativeOptions
from lorabench.mmlu.evaluate import MmluOptions
from lorabench.runner import Job, build, load_data, measure, resolve, run_job
from lorabench.train import train_loop


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))


def tiny_job(**kw) -> Job:
    train = TrainConfig(precision="fp32", batch_size=4, seq_len=64, epochs=1, max_steps=3, untimed_steps=1,
                        eval_batches=2)
    return Job(train=train, lora=LoRAConfig(), device="cpu", progress=False, save_adapter=False, **kw)


def test_resolve_fills_every_default_and_reads_the_questions():
    plan = resolve(tiny_job(native=NativeOptions(attention="matmul"), mmlu=MmluOptions(str(TINY_MMLU), limit=2)))
    assert plan.device == torch.device("cpu") and plan.precision.name == "fp32" and plan.world == 1
    assert plan.native == NativeOptions(attention="matmul", fused_projections=False, compile=False,
                                        compile_mode="default", dropout_mask="philox16")
    assert plan.train.activation_checkpointing == "none"
    assert [len(s.test) for s in plan.mmlu_subjects] == [2, 2]
    # MMLU's defaults for a CPU and 4 questions: 8 a batch, no token caps, tokenised inline, not compiled
    assert plan.mmlu == MmluOptions(str(TINY_MMLU), limit=2, batch_size=8, batch_tokens=0, kv_tokens=0,
                                    tokenize_workers=0, compiled_graph=False)


@pytest.mark.parametrize("change, message", [
    ({"mmlu": MmluOptions(str(TINY_MMLU), subjects=("astrology",))}, "--subjects: astrology not in"),
    ({"train": TrainConfig(seq_len=100_000)}, "exceeds the model's max_position_embeddings"),
    ({"train": TrainConfig(precision="tf32")}, "--precision tf32 needs a CUDA device"),
    ({"model_dir": None, "model_preset": "nope"}, "--model: unknown 'nope'"),
    ({"train": TrainConfig(memory_budget_gib=24)}, "--memory-budget-gib caps a CUDA device's memory; this run's "
                                                   "device is cpu"),
])
def test_resolve_refuses_before_any_data_is_read(change, message, monkeypatch):
    import lorabench.runner as runner

    monkeypatch.setattr(runner, "_load_data", lambda plan: pytest.fail("data read before the job was checked"))
    job = tiny_job()
    for k, v in change.items():
        setattr(job, k, v)
    with pytest.raises(ConfigError, match=message):
        run_job(job)


@pytest.mark.parametrize("engine, policy", [("native", "adapter-inputs"), ("reference", "none"), ("unsloth", "none")])
def test_adapter_inputs_is_the_default_of_native_compiled_blocks_at_dropout_0_only(engine, policy, monkeypatch):
    """On a GPU (here only its device, for resolve) at LoRA dropout 0 the native engine defaults to adapter-inputs;
    another engine keeps none (bench once handed the native default to its Unsloth row, which refused it)."""
    import lorabench.runner as runner

    monkeypatch.setattr(runner, "resolve_device", lambda name: torch.device("cuda"))
    job = tiny_job()
    job = replace(job, engine=engine, train=replace(job.train, precision="bf16"), lora=replace(job.lora, dropout=0.0))
    assert resolve(job).train.activation_checkpointing == policy


def test_stages_composed_by_hand_give_run_jobs_result():
    job = tiny_job(data=str(TINY_DATA))
    plan = resolve(job)
    data = load_data(plan)
    assert data.train.shape[1] == 64 and data.val is not None and "samsum-tiny" in data.description
    engine, build_s = build(plan)
    out = train_loop(engine, data.train, job.train, plan.device, val_data=data.val, progress=False)
    by_hand = measure(plan, engine, data, out, build_s)
    whole = run_job(tiny_job(data=str(TINY_DATA)))
    assert by_hand["series"]["loss"] == whole["series"]["loss"]  # bit for bit: same seeds, same stages
    assert by_hand["metrics"]["eval_loss"] == whole["metrics"]["eval_loss"]
    assert by_hand["config"] == {**whole["config"], "data_cached": False}  # (the second one: from the cache)
    assert by_hand["config"]["engine_options"]["attention"] == "sdpa"


def test_init_adapter_starts_training_from_its_weights(tmp_path):
    """A run's adapter handed to the next run: the engine starts from exactly those weights; one of another shape
    is refused before any data is read."""
    from safetensors.torch import load_file

    first = run_job(replace(tiny_job(run_dir=tmp_path / "first"), save_adapter=True))
    adapter = tmp_path / "first" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    engine, _ = build(resolve(tiny_job(init_adapter=adapter)))
    for name, (a, b) in engine.adapters().items():
        assert torch.equal(a.detach(), saved[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(b.detach(), saved[f"base_model.model.{name}.lora_B.weight"])
    assert first["series"]["loss"]  # it trained
    with pytest.raises(ConfigError, match=r"--init-adapter .*r=8.*this run has r=4"):
        resolve(replace(tiny_job(init_adapter=adapter), lora=LoRAConfig(r=4)))



def test_val_fraction_holds_out_a_fixed_share(tmp_path):
    """A single file has no validation split; --val-fraction 0.1 holds out 10% of its records, the same ones every
    time, disjoint from training; a source with its own split, or a fraction that leaves nothing, is refused."""
    from lorabench.runner import split_off

    recs = [{"text": f"r{i}"} for i in range(50)]
    train, val = split_off(recs, 0.1)
    assert len(val) == 5 and len(train) == 45 and not {r["text"] for r in train} & {r["text"] for r in val}
    assert split_off(recs, 0.1) == (train, val)
    with pytest.raises(ConfigError, match="leaves no validation"):
        split_off(recs, 0.001)
    single = tmp_path / "train.json"
    single.write_text((TINY_DATA / "train.json").read_text())
    data = load_data(resolve(tiny_job(data=str(single), val_fraction=0.2)))
    assert data.val is not None and len(data.val) > 0 and "120 held out for validation" in data.description
    with pytest.raises(ConfigError, match="has a validation split of its own"):
        load_data(resolve(tiny_job(val_fraction=0.2)))


def test_eval_every_records_each_evaluation_and_keeps_the_best_adapter(tmp_path):
    """--eval-every 2 over 6 steps: three evaluations at steps 2, 4, 6, the last equal to the final eval loss (the
    same weights, the same batches); best_adapter/ holds the adapter of the best one (here the last, as the loss
    falls on this data), equal to the final adapter; the metrics name the best step."""
    from safetensors.torch import load_file

    job = replace(tiny_job(run_dir=tmp_path / "r"), save_adapter=True,
                  train=replace(tiny_job().train, max_steps=6, eval_every=2, lr=2e-3))
    r = run_job(job)
    assert r["evals"]["step"] == [2, 4, 6]
    assert r["evals"]["eval_loss"][-1] == r["metrics"]["eval_loss"]
    best = min(range(3), key=lambda i: r["evals"]["eval_loss"][i])
    assert best == 2 and r["metrics"]["best_eval_step"] == 6  # the loss falls by ~0.2 an evaluation here
    a = load_file(tmp_path / "r" / "best_adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "r" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_jobs_native_options_are_resolved_once(monkeypatch):
    """runner.resolve fills the defaults; the engine takes them as they are (no second resolve downstream)."""
    calls = []
    real = NativeOptions.resolve

    def counted(self, *a, **kw):
        calls.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(NativeOptions, "resolve", counted)
    run_job(tiny_job())
    assert len(calls) == 1


def test_no_engine_is_named_outside_the_engines():
    """What an engine can do is read from its spec (engines/registry.py), never from its name."""
    import re
    from pathlib import Path

    import lorabench

    root = Path(lorabench.__file__).parent
    pattern = re.compile(r"""engine\s*[!=]=\s*["']|\.startswith\(["'](unsloth|reference|native)|"""
                         r"""getattr\(engine,\s*["']shard|job\.engine\s+(not\s+)?in\s""")
    found = [f"{f.relative_to(root)}:{i}" for f in root.rglob("*.py") if "engines" not in f.parts
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_eval_goes_through_the_runs_stages(monkeypatch, tmp_path):
    """`lorabench eval` resolves (once, NativeOptions with it) and builds through runner's own stages, as a run."""
    import lorabench.runner as runner
    from lorabench.cli import main

    seen = []
    for name in ("resolve", "build"):
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _real=real, _name=name, **kw: seen.append(_name) or
                            _real(*a, **kw))
    real_native = NativeOptions.resolve
    monkeypatch.setattr(NativeOptions, "resolve", lambda self, *a, **kw: seen.append("native") or
                        real_native(self, *a, **kw))
    assert main(["eval", "--run-dir", str(tmp_path / "e"), "--no-progress", "--limit", "2"]) == 0
    assert seen == ["resolve", "native", "build"]
    assert (tmp_path / "e" / "eval.json").is_file()


def test_a_runs_phases_add_up_to_its_wall_time(tmp_path):
    """result.json's phases: each stage's seconds in the order they ran, within the total; from the CLI the
    start-up (interpreter, imports) comes first, counted from the process's start."""
    from lorabench.cli import main

    job = tiny_job(mmlu=MmluOptions(str(TINY_MMLU), limit=2, protocol="both"), run_dir=tmp_path / "a")
    t0 = time.perf_counter()
    phases = run_job(job)["phases"]
    wall = time.perf_counter() - t0
    assert list(phases) == ["resolve_s", "data_s", "build_s", "train_s", "mmlu_lm_eval_s", "mmlu_flagperf_s",
                            "write_s", "total_s"]
    assert all(v >= 0 for v in phases.values())
    assert sum(v for k, v in phases.items() if k != "total_s") <= phases["total_s"] <= wall
    assert phases["train_s"] > 0 and phases["mmlu_flagperf_s"] > 0
    assert json.loads((tmp_path / "a" / "result.json").read_text())["phases"] == phases
    assert main(["run", "--no-progress", "--max-steps", "2", "--no-mmlu", "--run-dir", str(tmp_path / "b")]) == 0
    phases = json.loads((tmp_path / "b" / "result.json").read_text())["phases"]
    assert list(phases)[:2] == ["startup_s", "resolve_s"] and phases["startup_s"] > 0
    assert "time per phase: start-up" in (tmp_path / "b" / "report.md").read_text()


def test_process_age_follows_the_clock():
    from lorabench.metrics import process_age

    a = process_age()
    time.sleep(0.2)
    b = process_age()
    assert a > 0 and 0.17 <= b - a <= 1.0  # (/proc/uptime counts in hundredths)


def test_memory_budget_is_a_fraction_of_the_card_and_changes_no_number(monkeypatch):
    """--memory-budget-gib: the fraction of the card's memory it caps the allocator at, refused past the card or
    at 0; left out of fix_hp and free to change on --resume (memory, not numbers)."""
    from types import SimpleNamespace

    from lorabench.config import NOT_IN_FIX_HP
    from lorabench.outputs import RESUME_MAY_DIFFER
    from lorabench.runner import check_memory_budget

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 2**30))
    assert check_memory_budget(48, torch.device("cuda", 0)) == pytest.approx(0.6, abs=1e-12)
    with pytest.raises(ConfigError, match="--memory-budget-gib 96: more than this GPU's 80.0 GiB"):
        check_memory_budget(96, torch.device("cuda", 0))
    for bad in (0, -1, float("nan")):
        with pytest.raises(ConfigError, match="--memory-budget-gib"):
            TrainConfig(memory_budget_gib=bad)
    assert "memory_budget_gib" in NOT_IN_FIX_HP and "memory_budget_gib" in RESUME_MAY_DIFFER["train"]


@pytest.mark.parametrize("native", [False, True])
def test_a_cpu_without_bf16_instructions_is_named_before_a_bf16_run(native, monkeypatch, capsys):
    """bf16 products on a CPU without native bf16 matrix instructions run tens of times slower than fp32 (oneDNN's
    fallback): resolve says so, with the faster choice; on a CPU that has them, and for fp32 runs, it says
    nothing."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    resolve(replace(tiny_job(), train=replace(tiny_job().train, precision="bf16")))
    said = capsys.readouterr().err
    assert ("no native bf16 matrix instructions" in said and "--precision fp32" in said) != native
    resolve(tiny_job())
    assert "matrix instructions" not in capsys.readouterr().err
