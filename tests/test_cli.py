"""The CLI end to end on the bundled tiny default, and its errors for people."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lorabench.cli import main

REQUIRED_METRICS = ["tokens_per_s_per_chip", "tokens_per_s_per_chip_median", "tokens_per_s_flagperf",
                    "flops_per_token", "loss_flagperf", "train_loss_last_epoch_avg", "avg_train_prep",
                    "avg_iter_time_s", "avg_epoch_time_s", "eval_loss", "mmlu_acc"]


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
    for k in ("mfu", "peak_mem_allocated_gib", "peak_mem_reserved_gib", "mfu_flagperf"):
        assert k in m and m[k] is None  # CPU: no known peak, no device memory; FlagPerf's MFU is for 7B only
    for k in ("git_hash", "git_dirty", "python", "torch", "transformers", "device_name"):
        assert k in r["env"], k
    assert r["config"]["preset"] == "tiny" and r["config"]["lora_r"] == 8 and r["config"]["lora_targets"] == [
        "q_proj", "v_proj"]
    s = r["series"]
    assert len(s["step"]) == len(s["loss"]) == len(s["step_time_s"]) == m["steps"] > 10
    first, last = sum(s["loss"][:5]) / 5, sum(s["loss"][-5:]) / 5
    assert last < first, (first, last)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and r["adapter_dir"]
    report = (run_dir / "report.md").read_text()
    assert report.count("| 1x1 native fp32 |") == 1 and "lorabench's own measurements" in report
    assert f"| {m['tokens_per_s_flagperf']:.0f} (CPU) | {m['loss_flagperf']:.2f} |" in report  # (a CPU's, said so)
    preds = (run_dir / "mmlu_predictions.jsonl").read_text().splitlines()
    assert len(preds) == m["mmlu_questions"] == 40
    assert set(json.loads(preds[0])) == {"subject", "index", "gold", "pred", "logprobs"}
    from lorabench.rundir import LOCK, MARKER

    assert sorted(p.name for p in run_dir.glob(".*")) == sorted([MARKER, LOCK])  # no temporary files left behind


def test_second_run_uses_the_packed_cache(tmp_path):
    args = ["run", "--no-progress", "--device", "cpu", "--max-steps", "2", "--no-mmlu", "--no-save-adapter"]
    assert main(args + ["--run-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--run-dir", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "result.json").read_text())["config"]
    b = json.loads((tmp_path / "b" / "result.json").read_text())["config"]
    assert (a["data_cached"], b["data_cached"]) == (False, True) and a["data"] == b["data"]
    assert "packed data from the cache" in (tmp_path / "b" / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--model-dir", "/no/such/model", "--data", "synthetic"], "--model-dir /no/such/model"),
    (["--preset", "nope"], "--preset: unknown 'nope'"),
    (["--lora-targets", "q_proj,wq"], "--lora-targets: unknown ['wq']"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--seq-len", "100000"], "exceeds the model's max_position_embeddings"),
    (["--data", "/no/such/data.json"], "--data /no/such/data.json: no such file or folder"),
    (["--init", "random"], "--init random needs --model"),
    (["--precision", "tf32"], "--precision tf32 needs a CUDA device"),
    (["--precision", "fp4"], "--precision must be one of fp32, tf32, fp16, bf16, fp8"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--mmlu-batch-size", "0"], "--mmlu-batch-size must be positive"),
    (["--mmlu-batch-tokens", "-1"], "--mmlu-batch-tokens must be >= 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr-gamma", "-2"], "--lr-gamma must be a finite number > 0, got -2"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
    (["--adam-beta1", "-0.1"], "--adam-beta1 must be in [0, 1), got -0.1"),
    (["--precision", "fp8", "--fp8-skip", "down_proj,mlp"], "--fp8-skip mlp: not a block projection"),
    (["--precision", "bf16", "--fp8-skip", "down_proj"], "--fp8-skip applies to --precision fp8 only, not bf16"),
    (["--lora-alpha", "-32"], "--lora-alpha must be a finite number > 0"),
    (["--eval-batches", "-1"], "--eval-batches must be >= 0"),
])
def test_bad_input_fails_with_a_clear_message(argv, message, capsys, tmp_path):
    """Refused before anything runs: one line, no traceback, and no run folder made."""
    code = main(["run", "--no-progress", "--device", "cpu", "--run-dir", str(tmp_path / "r")] + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_help_explains_the_flags():
    out = subprocess.run([sys.executable, "-m", "lorabench", "run", "--help"], capture_output=True, text=True).stdout
    for flag in ("--model-dir", "--data", "--preset", "--init", "--batch-size", "--lora-targets", "--mmlu",
                 "native engine tuning", "--attention", "--fused-projections", "--compile-mode", "--dropout-mask",
                 "--prefix-attention", "--tokenize-workers", "--mmlu-batch-tokens"):
        assert flag in out, flag


def test_native_defaults_follow_the_precision_and_device():
    """Attention and fused projections follow the precision on a GPU and stay plain on the CPU; compile is on
    with CUDA; a field the user set is kept whatever the precision."""
    import torch

    from lorabench.engines import NativeOptions
    from lorabench.precision import PRECISIONS as P

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = NativeOptions()
    assert [auto.resolve(P[p], cuda).attention for p in ("tf32", "bf16", "fp16", "fp32")] == ["matmul", "cudnn",
                                                                                             "cudnn", "sdpa"]
    assert auto.resolve(P["bf16"], cpu).attention == "sdpa"
    assert [auto.resolve(P[p], cuda).fused_projections for p in ("tf32", "bf16")] == [True, False]
    assert not auto.resolve(P["tf32"], cpu).fused_projections
    assert auto.resolve(P["bf16"], cuda).compile and not auto.resolve(P["bf16"], cpu).compile
    assert auto.resolve(P["bf16"], cpu).dropout_mask == "philox16"
    assert auto.resolve(P["bf16"], cpu).compile_mode == "default"
    from lorabench.engines import checkpointing_policy

    assert [checkpointing_policy(e, None, auto.resolve(P["bf16"], d), p) for e, d, p in (
        ("native", cuda, 0.0), ("native", cuda, 0.05), ("native", cpu, 0.0), ("reference", cuda, 0.0))] == \
        ["adapter-inputs", "none", "none", "none"]
    assert checkpointing_policy("native", "block", auto.resolve(P["bf16"], cuda), 0.0) == "block"
    mine = NativeOptions(attention="flash", fused_projections=False, compile=False, compile_mode="reduce-overhead",
                         dropout_mask="inline")
    assert mine.resolve(P["tf32"], cuda) == mine


def test_each_native_flag_changes_what_it_should(monkeypatch):
    """Flag -> NativeOptions -> the engine as built: the layers' attention, the fused weights, the compiled blocks
    and their mode, the adapters' mask generator."""
    import torch

    from lorabench import model as model_mod
    from lorabench.assets import TINY_MODEL
    from lorabench.cli import build_parser, native_options
    from lorabench.config import LoRAConfig, ModelConfig
    from lorabench.engines import build_engine
    from lorabench.lora import lora_modules

    def engine(*flags):
        opts = native_options(build_parser().parse_args(["run", *flags]))
        return build_engine("native", ModelConfig.from_hf_json(TINY_MODEL), LoRAConfig(), model_dir=None,
                            device=torch.device("cpu"), precision="fp32", seed=0, native=opts)

    plain = engine()
    assert {layer.attn.impl for layer in plain.model.layers} == {"sdpa"}
    assert plain.model.layers[0].attn.qkv_weight is None and plain.model.compiled_layers is None
    assert {m.mask_impl for m in lora_modules(plain.model).values()} == {"philox16"}
    assert {layer.attn.impl for layer in engine("--attention", "matmul").model.layers} == {"matmul"}
    assert engine("--fused-projections").model.layers[0].attn.qkv_weight is not None
    assert {m.mask_impl for m in lora_modules(engine("--dropout-mask", "inline").model).values()} == {"inline"}
    modes = []
    monkeypatch.setattr(model_mod.torch, "compile", lambda fn, mode=None, **kw: modes.append(mode) or fn)
    compiled = engine("--compile", "--compile-mode", "max-autotune")
    assert compiled.model.compiled_layers is not None
    assert modes[:len(compiled.model.layers)] == ["max-autotune"] * len(compiled.model.layers)
    assert compiled.describe()["compile_mode"] == "max-autotune"


def test_each_mmlu_flag_reaches_its_option():
    from lorabench.cli import build_parser, mmlu_options
    from lorabench.mmlu.evaluate import MmluOptions

    a = build_parser().parse_args(["eval", "--subjects", "anatomy, virology", "--shots", "3", "--limit", "7",
                                   "--mmlu-batch-size", "5", "--mmlu-batch-tokens", "0", "--no-prefix-cache",
                                   "--prefix-attention", "copy", "--mmlu-kv-tokens", "99", "--tokenize-workers",
                                   "2", "--no-mmlu-compiled-graph", "--mmlu-protocol", "both", "--seq-len", "300"])
    assert mmlu_options(a, "d") == MmluOptions("d", subjects=("anatomy", "virology"), shots=3, limit=7,
                                              batch_size=5, batch_tokens=0, kv_tokens=99, prefix_cache=False,
                                              prefix_attention="copy", tokenize_workers=2, compiled_graph=False,
                                              protocol="both", seq_len=300)
    assert mmlu_options(build_parser().parse_args(["eval"]), "d") == MmluOptions("d", seq_len=512)
    run = build_parser().parse_args(["run", "--seq-len", "64"])  # run's --seq-len is training's: MMLU takes it
    assert mmlu_options(run, "d", "both") == MmluOptions("d", protocol="both")  # from the run, not as an option


def test_bench_passes_its_overrides_to_every_row_and_native_tuning_to_native_rows():
    """bench's flags become typed run settings, and those become the row process's flags, which run's parser reads
    back as the same values."""
    from lorabench.bench.command import bench_settings, run_flags
    from lorabench.cli import build_parser

    a = build_parser().parse_args(["bench", "--precision", "bf16", "--seq-len", "64", "--attention", "matmul",
                                   "--no-fused-projections", "--compile", "--dropout-mask", "bernoulli",
                                   "--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "q_proj,down_proj",
                                   "--activation-checkpointing", "block", "--fp8-skip", "down_proj,o_proj"])
    common, native = bench_settings(a)
    assert common == {"precision": "bf16", "seq_len": 64, "lora_r": 16, "lora_alpha": 32.0,
                      "lora_targets": "q_proj,down_proj", "activation_checkpointing": "block"}
    assert native == {"attention": "matmul", "fused_projections": False, "compile": True,
                      "dropout_mask": "bernoulli", "fp8_skip": ("down_proj", "o_proj")}
    flags = run_flags({**common, **native})
    assert flags[:2] == ["--precision", "bf16"] and "--no-fused-projections" in flags and "--compile" in flags
    back = vars(build_parser().parse_args(["run", *flags]))
    assert {k: back[k] for k in native} == native
    assert {k: back[k] for k in common if k != "lora_targets"} == {k: v for k, v in common.items()
                                                                  if k != "lora_targets"}
    assert back["lora_targets"] == ("q_proj", "down_proj")
    assert bench_settings(build_parser().parse_args(["bench"])) == ({}, {})


def test_bench_gives_native_tuning_to_native_rows_only(tmp_path, monkeypatch):
    """A reference row never receives --attention & co. (it would refuse them); a native row does."""
    import lorabench.bench.bench as bb

    seen = {}
    monkeypatch.setattr(bb, "run_row", lambda engine, preset, *args, **kw: seen.setdefault(engine, args[5]) and
                        {"engine": engine, "preset": preset, "error": "not run"})
    from lorabench.bench.command import run_flags

    bb.run_bench(["native", "reference"], ["fp32"], "tiny", 2, 1, "cpu", tmp_path, {"seq_len": 32}, 10,
                 log=lambda *a, **k: None, floor=False, native_overrides={"attention": "matmul"}, to_flags=run_flags)
    assert seen == {"native": ["--seq-len", "32", "--attention", "matmul"], "reference": ["--seq-len", "32"]}


def test_run_records_the_resolved_settings(tmp_path):
    """result.json says what ran: the native options as resolved and whether TF32 was on, and why."""
    assert main(["run", "--no-progress", "--device", "cpu", "--max-steps", "2", "--no-mmlu", "--no-save-adapter",
                 "--attention", "matmul", "--run-dir", str(tmp_path / "run")]) == 0
    c = json.loads((tmp_path / "run" / "result.json").read_text())["config"]
    options = {k: v for k, v in c["engine_options"].items() if k != "numerics"}
    assert options == {"attention": "matmul", "fused_projections": False, "compile": False,
                       "compile_mode": "default", "dropout_mask": "philox16", "fp8_grad": None, "fp8_skip": None,
                       "fp8_recipe": None, "nf4_dequant": None, "checkpoint_blocks": None,
                       "activation_checkpointing": "none"}
    assert "fp32 master weights" in c["engine_options"]["numerics"]
    assert c["tf32"] == {"on": False, "why": "preset tiny"} and c["precision"] == "fp32"


def test_no_product_code_reads_lorabench_environment_variables():
    """One settings channel: flags and typed options; the environment only names the cache location."""
    import re
    from pathlib import Path

    import lorabench

    found = set()
    for f in Path(lorabench.__file__).parent.rglob("*.py"):
        found |= set(re.findall(r"LORABENCH_[A-Z_]+", f.read_text()))
    assert found == {"LORABENCH_CACHE"}, found


def test_flagperf_preset_run_reports_both_mmlu_protocols(tmp_path):
    """A flagperf-* preset with MMLU: lm-evaluation-harness's accuracy and FlagPerf's (3 decimals), each with
    its own files; the seed's table shows FlagPerf's."""
    assert main(["run", "--no-progress", "--device", "cpu", "--preset", "flagperf-fp32", "--seq-len", "128",
                 "--max-steps", "2", "--no-save-adapter", "--run-dir", str(tmp_path / "run")]) == 0
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    m, c = r["metrics"], r["config"]
    assert c["precision"] == "fp32" and not c["tf32"]["on"] and "does not apply on cpu" in c["tf32"]["why"]
    assert c["shuffle"] is False
    assert isinstance(m["mmlu_acc"], float) and m["mmlu_acc_flagperf"] == round(m["mmlu_acc_flagperf_exact"], 3)
    assert m["mmlu_flagperf_seq_len"] == 128 and m["mmlu_flagperf_questions"] == m["mmlu_questions"] == 40
    for f in ("mmlu_predictions.jsonl", "mmlu_flagperf_predictions.jsonl", "mmlu_flagperf.json"):
        assert (tmp_path / "run" / f).is_file(), f
    assert f"| {m['mmlu_acc_flagperf']:.3f} |" in (tmp_path / "run" / "report.md").read_text()


def test_eval_by_flagperfs_rules(tmp_path, capsys):
    assert main(["eval", "--device", "cpu", "--no-progress", "--run-dir", str(tmp_path), "--limit", "3",
                 "--mmlu-protocol", "flagperf", "--seq-len", "256"]) == 0
    e = json.loads((tmp_path / "eval.json").read_text())
    assert e["mmlu"] is None and e["mmlu_flagperf"]["questions"] == 6 and e["mmlu_flagperf"]["seq_len"] == 256
    assert "MMLU by FlagPerf's rules" in capsys.readouterr().out


def test_run_folders_are_never_shared(tmp_path, monkeypatch, capsys):
    """A --run-dir holding anything is refused (--overwrite replaces it whole); default names stay unique within
    one second; a file where the folder should be is named; results honour the umask."""
    import os

    args = ["run", "--no-progress", "--device", "cpu", "--max-steps", "2", "--no-mmlu", "--no-save-adapter"]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    assert main(args + ["--run-dir", str(tmp_path / "r")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "r" / "notes.txt").read_text() == "mine"
    assert main(args + ["--run-dir", str(tmp_path / "r"), "--overwrite"]) == 2  # not a lorabench folder
    assert "did not write (notes.txt)" in capsys.readouterr().err and (tmp_path / "r" / "notes.txt").is_file()
    (tmp_path / "r" / "notes.txt").unlink()
    old = os.umask(0o022)
    try:
        assert main(args[:-1] + ["--run-dir", str(tmp_path / "r")]) == 0
        assert main(args[:-1] + ["--run-dir", str(tmp_path / "r"), "--overwrite"]) == 0
    finally:
        os.umask(old)
    for f in ("result.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "loss.png",
              "config.toml", "metrics.jsonl"):
        assert (tmp_path / "r" / f).stat().st_mode & 0o777 == 0o644, f
    assert (tmp_path / "r" / "adapter").stat().st_mode & 0o777 == 0o755
    (tmp_path / "f").write_text("")
    assert main(args + ["--run-dir", str(tmp_path / "f")]) == 2 and "is a file" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")  # two runs in the same second
    assert main(args) == 0 and main(args) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20260101-000000-tiny-native",
                                                                     "20260101-000000-tiny-native-2"]


def _tiny_copy(tmp_path):
    import shutil

    from lorabench.assets import TINY_MODEL

    d = tmp_path / "model"
    shutil.copytree(TINY_MODEL, d)
    return d


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "abc", "hidden_size is 'abc'; expected an integer"),
    ("num_hidden_layers", 4.5, "num_hidden_layers is 4.5; expected an integer"),
    ("rms_norm_eps", -1, "rms_norm_eps must be positive"),
    ("tie_word_embeddings", "no", "tie_word_embeddings is 'no'; expected bool"),
])
def test_bad_model_config_values_are_named(tmp_path, capsys, field, value, message):
    d = _tiny_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["run", "--no-progress", "--device", "cpu", "--model-dir", str(d), "--data", "synthetic",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "config.json" in err and "Traceback" not in err, err


def test_corrupt_weights_and_adapters_are_one_line_errors(tmp_path, capsys):
    d = _tiny_copy(tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])  # truncated
    assert main(["run", "--no-progress", "--device", "cpu", "--model-dir", str(d), "--data", "synthetic",
                 "--max-steps", "1", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: not a readable safetensors file" in err and "Traceback" not in err, err
    a = tmp_path / "adapter"
    a.mkdir()
    for text, message in (("{not json", "not valid JSON"), ('{"lora_alpha": 16}', "no 'r'"),
                          ('{"r": "eight", "lora_alpha": 16}', "r is 'eight'; expected a number")):
        (a / "adapter_config.json").write_text(text)
        assert main(["eval", "--device", "cpu", "--no-progress", "--adapter", str(a), "--limit", "1",
                     "--run-dir", str(tmp_path / f"e{len(message)}")]) == 2
        err = capsys.readouterr().err
        assert "adapter_config.json" in err and message in err and "Traceback" not in err, err


def test_version():
    import lorabench

    out = subprocess.run([sys.executable, "-m", "lorabench", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"lorabench {lorabench.__version__}"


def test_config_file_round_trip_and_errors(tmp_path, capsys):
    """A run's config.toml runs it again (same settings, same losses); flags win over the file; a key that is no
    flag, or a value of the wrong kind, is one error naming the file and the key."""
    first = tmp_path / "first"
    assert main(["run", "--no-progress", "--device", "cpu", "--max-steps", "3", "--no-mmlu", "--lora-targets",
                 "q_proj,k_proj", "--lr", "3e-3", "--run-dir", str(first)]) == 0
    cfg = first / "config.toml"
    assert 'lora-targets = ["q_proj", "k_proj"]' in cfg.read_text() and "\nrun-dir" not in cfg.read_text()
    again = tmp_path / "again"
    assert main(["run", "--config", str(cfg), "--run-dir", str(again)]) == 0
    a, b = (json.loads((d / "result.json").read_text()) for d in (first, again))
    assert a["series"]["loss"] == b["series"]["loss"]
    assert {k: v for k, v in a["config"].items() if k != "data_cached"} == {k: v for k, v in b["config"].items()
                                                                             if k != "data_cached"}
    override = tmp_path / "override"
    assert main(["run", "--config", str(cfg), "--max-steps", "2", "--run-dir", str(override)]) == 0
    assert json.loads((override / "result.json").read_text())["metrics"]["steps"] == 2
    capsys.readouterr()
    for text, message in (("batch-sise = 4\n", "'batch-sise' is not a setting of lorabench run"),
                          ('max-steps = "three"\n', "max-steps = 'three' is not what --max-steps takes"),
                          ("no-mmlu = 1\n", "no-mmlu = 1; --no-mmlu takes true or false"),
                          ('precision = "fp4"\n', "--precision must be one of fp32, tf32, fp16, bf16, fp8"),
                          ("max-steps = [\n", "not valid TOML")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        assert main(["run", "--config", str(bad), "--run-dir", str(tmp_path / "never")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "never").exists()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma"}, 'model_type = "gemma" is not supported; supported: llama, mistral, qwen2, qwen3'),
    ({"model_type": "qwen3_moe"}, 'model_type = "qwen3_moe" is not supported'),
    ({"architectures": ["GemmaForCausalLM"]}, 'architectures = ["GemmaForCausalLM"] is not supported'),
    ({"hidden_act": "gelu_pytorch_tanh"}, 'hidden_act = "gelu_pytorch_tanh" is not supported'),
    ({"attention_bias": True}, "attention_bias = true is not supported"),
    ({"mlp_bias": True}, "mlp_bias = true is not supported"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping = 30.0 is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping = 50.0 is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported (supported: "
     "default, linear, llama3)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling needs low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5 is not supported"),
    ({"hidden_size": None}, "no hidden_size; a Llama config.json gives the model's sizes"),
    ({"max_position_embeddings": None}, "no max_position_embeddings"),
])
def test_config_fields_that_change_the_math_are_refused_by_name(tmp_path, capsys, change, message):
    """Every config.json field whose math the model does not implement ends the run before anything is built, with
    the file, the field, its value and what is supported; a missing size is never taken from Llama-2-7B."""
    d = _tiny_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["run", "--no-progress", "--device", "cpu", "--model-dir", str(d), "--data", "synthetic",
                 "--max-steps", "1", "--no-mmlu", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(d / "config.json") in err and message in err, err
    assert not (tmp_path / "r").exists()


def test_supported_variants_still_load(tmp_path):
    """What the check must let through: Mistral without a window (or a window as long as the context), an explicit
    head_dim equal to hidden / heads, use_sliding_window false (Qwen's switch), both architecture names."""
    from lorabench.config import ModelConfig

    d = _tiny_copy(tmp_path)
    base = json.loads((d / "config.json").read_text())
    for change in ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None},
                   {"model_type": "mistral", "sliding_window": 16},
                   {"model_type": "mistral", "sliding_window": base["max_position_embeddings"]},
                   {"head_dim": base["hidden_size"] // base["num_attention_heads"]},
                   {"sliding_window": 16, "use_sliding_window": False}):
        (d / "config.json").write_text(json.dumps({**base, **change}))
        assert ModelConfig.from_hf_json(d).hidden_size == base["hidden_size"]


def test_run_on_alpaca_records_and_a_template(tmp_path, capsys):
    """run end to end on alpaca-format JSONL (detected), and on other columns through --prompt-template; a
    template naming a column the rows lack is one error naming file, line and column."""
    from lorabench.assets import TINY_MODEL

    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} " * 12}) for i in range(30)))
    common = ["run", "--no-progress", "--device", "cpu", "--model-dir", str(TINY_MODEL), "--seq-len", "32",
              "--batch-size", "2", "--max-steps", "2", "--no-mmlu", "--no-save-adapter"]
    assert main(common + ["--data", str(f), "--run-dir", str(tmp_path / "alpaca")]) == 0
    g = tmp_path / "qa.csv"
    g.write_text("question,answer\n" + "\n".join(f"what is {i},it is {i} {i} {i}" for i in range(60)) + "\n")
    assert main(common + ["--data", str(g), "--prompt-template", "Q: {question}\nA: {answer}",
                          "--run-dir", str(tmp_path / "qa")]) == 0
    capsys.readouterr()
    assert main(common + ["--data", str(g), "--prompt-template", "{question} {reply}",
                          "--run-dir", str(tmp_path / "bad")]) == 2
    assert "qa.csv: row 2: missing column 'reply'" in capsys.readouterr().err


@pytest.mark.slow
def test_every_module_imports_first():
    """Each top-level module of the package imports in a fresh interpreter as the first one (precision.py once
    failed so, on config.py's presets needing precision.py half-way through its own import); the subpackages'
    modules import through these."""
    import pkgutil
    import subprocess
    import sys

    import lorabench

    names = [m.name for m in pkgutil.iter_modules(lorabench.__path__, "lorabench.") if m.name != "lorabench.__main__"]
    assert "lorabench.precision" in names and "lorabench.runner" in names
    procs = {n: subprocess.Popen([sys.executable, "-c", f"import {n}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE) for n in names}
    bad = {n: p.communicate()[1].decode().strip().splitlines()[-1:] for n, p in procs.items()}
    assert not {n: e for n, e in bad.items() if procs[n].returncode}


def test_ctrl_c_while_the_cli_imports_is_one_line(monkeypatch, capsys):
    """Ctrl-C during the seconds `import torch` takes stops with one line and exit 130, not a traceback."""
    import sys

    from lorabench.__main__ import run

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "lorabench.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "lorabench.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    assert run() == 130
    assert capsys.readouterr().err == "lorabench: interrupted\n"


def test_engine_flags_name_every_engine():
    """--engine (run) and --engines (bench) list every registered engine in their help."""
    from lorabench.cli import build_parser
    from lorabench.engines import ENGINES

    parsers = build_parser().subcommands
    for command, dest in (("run", "engine"), ("bench", "engines")):
        text = next(a.help for a in parsers[command]._actions if a.dest == dest)
        assert [e for e in ENGINES if e not in text.replace(",", " ").split()] == [], command
