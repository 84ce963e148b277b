"""lorabench bench on CPU with the tiny shape: one process per row, side-by-side table, failures kept in rows."""
from __future__ import annotations

import importlib.util
import json

import pytest

from lorabench.cli import main


@pytest.mark.slow
def test_bench_native_vs_reference_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    engines = "native,reference"
    liger_missing = importlib.util.find_spec("liger_kernel") is None
    if liger_missing:
        engines += ",reference+liger"  # must fail in its own row, the others go on
    code = main(["bench", "--device", "cpu", "--model", "tiny", "--presets", "flagperf-fp32", "--engines", engines,
                 "--steps", "4", "--untimed-steps", "1", "--seq-len", "64", "--lora-dropout", "0",
                 "--run-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| engine | preset | LBS | tok/s/chip |" in out
    assert "- native / reference, flagperf-fp32 LBS 2: " in out
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["engine"]: r for r in data["rows"]}
    nat, ref = rows["native"], rows["reference"]
    for r in (nat, ref):
        assert r["preset"] == "flagperf-fp32" and len(r["losses"]) == 4 and r["tokens_per_s_per_chip"] > 0
    assert nat["speedup_vs_reference"] == nat["tokens_per_s_per_chip"] / ref["tokens_per_s_per_chip"]
    # identical weights and batches, dropout 0, fp32: the engines train the same thing
    assert nat["max_rel_loss_gap_vs_reference"] < 1e-5
    if liger_missing:
        assert "liger-kernel" in rows["reference+liger"]["error"]


@pytest.mark.slow
def test_fp8_only_flags_go_to_the_fp8_rows_alone(tmp_path, monkeypatch):
    """One bench of an fp32 and an fp8 row with --fp8-skip and --fp8-grad: the fp8 row runs with both (its
    numerics say so), the fp32 row runs without them instead of refusing them."""
    from lorabench.bench.bench import native_settings_for

    native = {"attention": "matmul", "fp8_skip": ("down_proj",), "compile": False, "fp8_grad": "e5m2"}
    assert native_settings_for("bf16", {}, native) == {"attention": "matmul", "compile": False}
    assert native_settings_for("fp8", {}, native) == native
    assert native_settings_for("bf16", {"precision": "fp8"}, native) == native
    nf4 = {"compile": False, "nf4_dequant": "triton", "fp8_grad": "e5m2"}  # each to its own precision's rows
    assert native_settings_for("qlora", {}, nf4) == {"compile": False, "nf4_dequant": "triton"}
    assert native_settings_for("fp8", {}, nf4) == {"compile": False, "fp8_grad": "e5m2"}
    assert native_settings_for("qlora-fp8", {}, nf4) == nf4  # NF4 storage and FP8 products take both
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    code = main(["bench", "--device", "cpu", "--model", "tiny", "--presets", "fp32,fp8", "--engines", "native",
                 "--steps", "3", "--untimed-steps", "1", "--seq-len", "32", "--batch-size", "2",
                 "--fp8-skip", "down_proj", "--fp8-grad", "e5m2", "--run-dir", str(tmp_path / "b")])
    assert code == 0
    rows = {r["preset"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]}
    assert "error" not in rows["fp32"] and rows["fp32"]["fp8_skip"] == []
    assert rows["fp8"]["fp8_skip"] == ["down_proj"] and "norms, down_proj, lm_head bf16" in rows["fp8"]["numerics"]
    assert "input gradients per token e5m2" in rows["fp8"]["numerics"]


def test_floor_counts_every_frozen_matrix():
    """The floor's GEMM groups cover each frozen linear weight once (q and k share a shape; GQA shrinks k/v)."""
    from lorabench.config import MODEL_PRESETS
    from lorabench.shapes import count_params, gemm_groups

    from conftest import SMALL

    for cfg in (MODEL_PRESETS["llama2-7b"], SMALL):
        norms = cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)  # non_embedding counts lm_head, tied or not
        assert sum(i * sum(outs) * n for i, outs, n in gemm_groups(cfg)) == count_params(cfg)["non_embedding"] - norms


def test_attention_work_time_is_the_busy_time_unless_the_profile_fails(monkeypatch):
    """The floor's attention term: the kernels' busy time when the profile gives one within the CUDA-event wall
    time, else that wall time (no kernels seen, a busy time longer than the wall, no profiler)."""
    import lorabench.bench.floor as floor

    monkeypatch.setattr(floor, "timed", lambda fn: 0.69e-3)
    for busy, want in ((0.4e-3, 0.4e-3), (0.0, 0.69e-3), (0.8e-3, 0.69e-3)):
        monkeypatch.setattr(floor, "busy", lambda fn, b=busy, **kw: b)
        assert floor.work_time(lambda: None) == want

    def no_profiler(fn, **kw):
        raise RuntimeError("no CUPTI")

    monkeypatch.setattr(floor, "busy", no_profiler)
    assert floor.work_time(lambda: None) == 0.69e-3


def test_rows_get_their_share_of_the_floor(monkeypatch):
    import lorabench.bench.floor
    from lorabench.bench.bench import add_floors, floor_lines, table

    calls = []

    def fake_floor(cfg, batch, seq, precision, fp8_skip=()):
        calls.append((batch, seq, precision))
        return {"batch": batch, "seq": seq, "tokens_per_s": 2000.0, "gemm_tflops": 700.0, "precision": precision,
                "attn_by_kernel_ms": {"flash": 1.3, "cudnn": 0.7}}

    monkeypatch.setattr(lorabench.bench.floor, "floor_for_precision", fake_floor)
    base = {"batch_size": 4, "seq_len": 512, "precision": "bf16", "mfu": None, "peak_mem_allocated_gib": 1.0,
            "loss_final": 1.0}
    rows = [{**base, "engine": "native", "preset": "bf16", "tokens_per_s_per_chip": 1500.0},
            {**base, "engine": "reference", "preset": "bf16", "tokens_per_s_per_chip": 1000.0},
            {"engine": "reference+liger", "preset": "bf16", "error": "no liger"}]
    floors = add_floors(rows, "llama2-7b", log=lambda *a, **k: None)
    assert calls == [(4, 512, "bf16")]  # once per preset
    assert rows[0]["of_floor"] == 0.75 and rows[1]["of_floor"] == 0.5 and "of_floor" not in rows[2]
    assert "75.0%" in table(rows)
    assert floor_lines(floors) == ("- floor, bf16 (LBS 4, seq 512): 2000 tok/s (frozen GEMMs at 700 TFLOP/s + "
                                   "cudnn attention; nothing else)")


def test_fp8_floor_keeps_the_skipped_projections_in_bf16(monkeypatch):
    """--fp8-skip: a native row's floor is timed with those projections in bf16, an Unsloth FP8 row of the same
    preset against the plain fp8 floor; which matrices floor() runs in FP8 follows the skip."""
    import lorabench.bench.floor
    from lorabench.bench.bench import add_floors, floor_lines
    from lorabench.bench.floor import fp8_matrices

    assert fp8_matrices(True) == [[True] * 3, [True], [True, True], [True], [False]]
    assert fp8_matrices(True, ("down_proj", "k_proj")) == [[True, False, True], [True], [True, True], [False],
                                                           [False]]
    assert fp8_matrices(False, ("down_proj",)) == [[False] * 3, [False], [False] * 2, [False], [False]]
    calls = []

    def fake_floor(cfg, batch, seq, precision, fp8_skip=()):
        calls.append(fp8_skip)
        return {"batch": batch, "seq": seq, "tokens_per_s": 3000.0 if fp8_skip else 4000.0, "gemm_tflops": 1e3,
                "precision": precision, "attn_by_kernel_ms": {"cudnn": 0.7}}

    monkeypatch.setattr(lorabench.bench.floor, "floor_for_precision", fake_floor)
    base = {"batch_size": 16, "seq_len": 512, "precision": "fp8", "preset": "fp8", "tokens_per_s_per_chip": 2400.0}
    rows = [{**base, "engine": "native", "fp8_skip": ["down_proj"]}, {**base, "engine": "unsloth-fp8"}]
    floors = add_floors(rows, "llama2-7b", log=lambda *a, **k: None)
    assert calls == [("down_proj",), ()]
    assert rows[0]["of_floor"] == 0.8 and rows[1]["of_floor"] == 0.6
    assert "seq 512, down_proj in bf16): 3000 tok/s" in floor_lines(floors)


def test_batch_size_sweep_compares_like_with_like_and_names_each_engines_best(capsys):
    """With several LBS, a row's speed-up is against the reference at the same LBS, and each engine's best row
    (over the sizes) is what native is judged against; a bad list names the flag."""
    from lorabench.bench.bench import best_lines, compare, native_lines

    def row(engine, lbs, tps):
        return {"engine": engine, "preset": "bf16", "lbs": lbs, "batch_size": lbs, "tokens_per_s_per_chip": tps,
                "losses": [1.0]}

    rows = [row("native", 4, 190.0), row("reference", 4, 110.0), row("reference+compile", 4, 170.0),
            row("native", 16, 200.0), row("reference", 16, 125.0), row("reference+compile", 16, 180.0),
            {"engine": "reference+liger", "preset": "bf16", "lbs": 16, "error": "no liger"}]
    rows[2]["losses"] = [1.01]  # a curve 1% off native's
    compare(rows)
    assert rows[0]["speedup_vs_reference"] == 190 / 110 and rows[3]["speedup_vs_reference"] == 200 / 125
    assert native_lines(rows).splitlines() == [  # like with like, every other engine, the failed row left out
        "- native / reference, bf16 LBS 4: 1.727x; loss gap 0.000%",
        "- native / reference+compile, bf16 LBS 4: 1.118x; loss gap 1.000%",
        "- native / reference, bf16 LBS 16: 1.600x; loss gap 0.000%",
        "- native / reference+compile, bf16 LBS 16: 1.111x; loss gap 0.000%"]
    assert best_lines(rows) == ("- best LBS, bf16: native 200 (LBS 16); reference 125 (LBS 16); reference+compile "
                                "180 (LBS 16); native / best other: 1.11x")
    assert main(["bench", "--device", "cpu", "--batch-size", "4,zero"]) == 2
    assert "--batch-size '4,zero'" in capsys.readouterr().err


def test_rounds_alternate_engines_and_compare_within_each_round(tmp_path, monkeypatch, capsys):
    """--rounds runs every row once per round, engines alternating; a row reports its median round and the spread,
    and its speed-up is the median of the ratios within rounds (robust to a machine that drifts between rounds),
    not the ratio of the medians."""
    import lorabench.bench.bench as bench

    speeds = {("native", 1): 200.0, ("reference", 1): 100.0,  # the machine is 10% slower in round 2
              ("native", 2): 180.0, ("reference", 2): 90.0,
              ("native", 3): 210.0, ("reference", 3): None}  # the reference fails in round 3
    calls = []

    def fake_row(engine, preset, model, steps, warmup, device, row_dir, overrides, timeout, nproc=1):
        k = int(row_dir.name.rsplit("round", 1)[1])
        calls.append((engine, k))
        tps = speeds.get((engine, k))
        row = {"engine": engine, "preset": preset}
        if tps is None:
            return {**row, "error": f"{engine} failed"}
        return {**row, "tokens_per_s_per_chip": tps, "losses": [2.0, 1.0], "batch_size": 4, "mfu": None,
                "peak_mem_allocated_gib": 1.0, "loss_final": 1.0, "step_time_ci95_rel": 0.01, "device_name": "cpu",
                "seen_in_round": k}

    monkeypatch.setattr(bench, "run_row", fake_row)
    rows, _ = bench.run_bench(["native", "reference", "reference+liger"], ["bf16"], "tiny", 4, 1, "cpu", tmp_path,
                              {}, 60.0, log=lambda *a, **k: None, floor=False, rounds=3, to_flags=lambda s: [])
    assert calls == [(e, k) for k in (1, 2, 3) for e in ("native", "reference", "reference+liger")]
    nat, ref, liger = rows
    assert nat["rounds_tokens_per_s"] == [200.0, 180.0, 210.0] and nat["seen_in_round"] == 1  # the median round
    assert nat["tokens_per_s_per_chip"] == 200.0 and abs(nat["rounds_spread"] - 30 / 200) < 1e-12
    assert ref["rounds_tokens_per_s"] == [100.0, 90.0, None] and ref["tokens_per_s_per_chip"] == 90.0  # lower middle
    assert nat["speedup_vs_reference"] == 2.0  # both rounds with two rows say 2.0; the medians' ratio says 2.22
    assert liger["error"] == "reference+liger failed"
    assert bench.best_lines(rows).endswith("native / best other: 2.00x")  # within rounds here too
    md = (tmp_path / "bench.md").read_text()
    assert "median of 3 rounds" in md and "| 15.0% (3/3) |" in md and "| 11.1% (2/3) |" in md
    assert "- native / reference, bf16 LBS 4: 2.000x (rounds: 2.000, 2.000); loss gap 0.000%\n" in md  # none against
    # the failed row
    assert json.loads((tmp_path / "bench.json").read_text())["rounds"] == 3
    assert main(["bench", "--device", "cpu", "--rounds", "0"]) == 2
    assert "--rounds 0" in capsys.readouterr().err


def test_variants_are_native_rows_with_their_own_settings_compared_within_rounds(tmp_path, monkeypatch):
    """--variant NAME:FLAGS adds a native row per preset named native[NAME], run with the plain native settings
    and its own over them, kept apart from plain native through the rounds, and compared with it and the other
    engines (not plain native with it, which would say the same twice); a variant whose settings do not apply to a
    preset's precision is left out there, not run as a copy of plain native."""
    import lorabench.bench.bench as bench

    speeds = {"native": [100.0, 90.0], "native_rw": [110.0, 99.0], "unsloth-fp8": [50.0, 45.0]}
    seen = []

    def fake_row(engine, preset, model, steps, warmup, device, row_dir, overrides, timeout, nproc=1):
        key, k = row_dir.name.split("__")[1], int(row_dir.name.rsplit("round", 1)[-1] if "round" in row_dir.name else 1)
        seen.append((preset, key, overrides))
        return {"engine": engine, "preset": preset, "tokens_per_s_per_chip": speeds[key][k - 1], "losses": [2.0],
                "batch_size": 4, "mfu": None, "peak_mem_allocated_gib": 1.0, "loss_final": 1.0,
                "step_time_ci95_rel": 0.01, "device_name": "cpu"}

    monkeypatch.setattr(bench, "run_row", fake_row)
    logs = []
    rows, _ = bench.run_bench(["native", "unsloth-fp8"], ["fp8", "bf16"], "tiny", 4, 1, "cpu", tmp_path, {}, 60.0,
                              log=lambda *a, **k: logs.append(a[0]), floor=False, rounds=2,
                              native_overrides={"attention": "matmul"},
                              variants={"rw": {"fp8_recipe": "tensorwise", "attention": "sdpa"}},
                              to_flags=lambda s: sorted(f"{k}={v}" for k, v in s.items() if v is not None))
    assert seen[:3] == [("fp8", "native", ["attention=matmul"]), ("fp8", "unsloth-fp8", []),
                        ("fp8", "native_rw", ["attention=sdpa", "fp8_recipe=tensorwise"])]
    assert ("bf16", "native_rw", ["attention=sdpa"]) in seen  # its attention applies to bf16 too
    assert [bench.label(r) for r in rows] == ["native", "unsloth-fp8", "native[rw]", "native", "native[rw]"]
    fp8 = [r for r in rows if r["preset"] == "fp8"]
    assert [r["rounds_tokens_per_s"] for r in fp8] == [[100.0, 90.0], [50.0, 45.0], [110.0, 99.0]]
    lines = bench.native_lines(fp8).splitlines()
    assert lines == ["- native / unsloth-fp8, fp8 LBS 4: 2.000x (rounds: 2.000, 2.000); loss gap 0.000%",
                     "- native[rw] / native, fp8 LBS 4: 1.100x (rounds: 1.100, 1.100); loss gap 0.000%",
                     "- native[rw] / unsloth-fp8, fp8 LBS 4: 2.200x (rounds: 2.200, 2.200); loss gap 0.000%"]
    assert "| native[rw] | fp8 | 4 | 99 (CPU) |" in bench.table(fp8)  # its median round (the lower middle)
    assert bench.best_lines(fp8) == ("- best LBS, fp8: native 90 (LBS 4); unsloth-fp8 45 (LBS 4); native[rw] 99 "
                                     "(LBS 4); native / best other: 2.00x")  # the other stacks, not its variants
    rows, _ = bench.run_bench(["native"], ["bf16"], "tiny", 4, 1, "cpu", tmp_path / "b", {}, 60.0,
                              log=lambda *a, **k: logs.append(a[0]), floor=False,
                              variants={"rw": {"fp8_recipe": "tensorwise"}}, to_flags=lambda s: [])
    assert [bench.label(r) for r in rows] == ["native"]
    assert any(line.startswith("bench: native[rw] / bf16 skipped: its settings do not apply to this precision")
               for line in logs)


def test_variant_flags_are_checked_before_any_row_runs(tmp_path, capsys):
    """--variant takes NAME:FLAGS of the native engine's tuning; a bad name, a repeated one, a flag that is not
    native tuning, a bad value or no flags fail at once with the --variant named."""
    from lorabench.bench.command import parse_variants
    from lorabench.config import ConfigError

    got = parse_variants(["tw:--fp8-recipe tensorwise --no-compile", "dq.t:--nf4-dequant triton"])
    assert got == {"tw": {"fp8_recipe": "tensorwise", "compile": False}, "dq.t": {"nf4_dequant": "triton"}}
    for spec, said in (("--fp8-recipe tensorwise", "NAME:FLAGS"), ("a b:--compile", "NAME:FLAGS"),
                       ("x:--lr 1", "unrecognized arguments: --lr 1"), ("x:--fp8-recipe sideways", "invalid choice"),
                       ("x:", "no flags")):
        with pytest.raises(ConfigError, match="--variant") as e:
            parse_variants([spec])
        assert said in str(e.value)
    with pytest.raises(ConfigError, match="given twice"):
        parse_variants(["x:--compile", "x:--no-compile"])
    assert main(["bench", "--device", "cpu", "--engines", "reference", "--variant", "x:--compile",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "put native in --engines" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    for flags, said in ((["--variant", "ck:--checkpoint-blocks 2"], "--variant ck: --checkpoint-blocks 2 applies to "
                         "--activation-checkpointing block or matmuls, not none (the default here)"),
                        (["--activation-checkpointing", "block", "--checkpoint-blocks", "5"],
                         "--checkpoint-blocks 5: the model has 4 decoder blocks")):
        assert main(["bench", "--device", "cpu", "--model", "tiny", "--engines", "native", *flags,
                     "--run-dir", str(tmp_path / "r")]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "r").exists()


def test_bench_skips_rows_an_engine_cannot_run():
    """unsloth-fp8 only under fp8, the reference stacks never under fp8: such rows are skipped, not run mislabelled."""
    from lorabench.bench.bench import _cannot_run

    assert "--precision fp8" in _cannot_run("unsloth-fp8", "bf16", {})
    assert _cannot_run("unsloth-fp8", "fp8", {}) is None
    assert "no FP8 weights" in _cannot_run("reference", "fp8", {})
    assert "no FP8 weights" in _cannot_run("reference", "bf16", {"precision": "fp8"})
    assert _cannot_run("native", "fp8", {}) is None
    assert "no NF4 weights" in _cannot_run("reference", "qlora", {})
    assert _cannot_run("unsloth-4bit", "qlora", {}) is None and _cannot_run("native", "qlora", {}) is None
    assert _cannot_run("native", "qlora-fp8", {}) is None
    assert "NF4 weights but not --precision nf4-fp8's products; --precision nf4-fp8 runs on native" in \
        _cannot_run("unsloth-4bit", "qlora-fp8", {})


def test_an_out_of_memory_row_is_a_row_result(tmp_path, monkeypatch):
    """A row whose run exits 4 (its out-of-memory message) reads "out of memory" in the table and keeps the run's
    line; the row after it still runs."""
    import subprocess

    from lorabench.bench import bench as B

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 4, "", "lorabench: error: out of device memory in step 1 (...)\n")

    monkeypatch.setattr(B.subprocess, "run", fake_run)
    rows = [B.run_row(e, "bf16", "tiny", 3, 1, "cpu", tmp_path / e, [], 60) for e in ("native", "reference")]
    assert len(calls) == 2 and all(r["error"] == "out of memory" for r in rows)
    assert rows[0]["oom"] == "lorabench: error: out of device memory in step 1 (...)"
    assert "| out of memory |" in B.table(rows)


def test_a_failed_row_names_the_exception_and_keeps_the_whole_log(tmp_path, monkeypatch):
    """A run that dies with a traceback whose message spans several lines: the row's error is the exception's
    line (not the advice the message ends with), and the whole stderr is kept beside the row."""
    import subprocess

    from lorabench.bench import bench as B

    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              "torch.utils.checkpoint.CheckpointError: torch.utils.checkpoint: Recomputed values for the following "
              "tensors have different metadata than during the forward pass.\ntensor at position 12:\n"
              "saved metadata: {'shape': torch.Size([8])}\n\nTo narrow down, enable checkpoint-debug mode globally.\n")
    monkeypatch.setattr(B.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    row = B.run_row("native", "qlora", "tiny", 3, 1, "cpu", tmp_path / "r", [], 60)
    assert row["error"].startswith("torch.utils.checkpoint.CheckpointError: torch.utils.checkpoint: Recomputed")
    assert (tmp_path / "r" / "stderr.log").read_text() == stderr and row["log"] == str(tmp_path / "r" / "stderr.log")
    assert B.failure_line(["x", "lorabench: error: --model-dir d: no such folder", "y"]).endswith("no such folder")
    assert B.failure_line(["just this"]) == "just this"
    torchrun = ["[rank0]: Traceback (most recent call last):", "[rank0]: RuntimeError: NCCL timed out", "",
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "]
    assert B.failure_line(torchrun) == "RuntimeError: NCCL timed out"


@pytest.mark.slow
def test_rows_of_several_processes_run_under_torchrun(tmp_path, monkeypatch):
    """bench --nproc 2 --shard fsdp: each row is one torchrun job of two processes with the row's --shard."""
    import subprocess

    from lorabench.bench import bench as B

    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 2, "", "lorabench: error: stop here\n")

    monkeypatch.setattr(B.subprocess, "run", fake_run)
    B.run_row("native", "bf16", "tiny", 3, 1, "cpu", tmp_path / "r", ["--shard", "fsdp"], 60, nproc=2)
    B.run_row("native", "bf16", "tiny", 3, 1, "cpu", tmp_path / "s", [], 60)
    assert seen[0][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert seen[0][6:8] == ["lorabench", "run"] and seen[0][-2:] == ["--shard", "fsdp"]
    assert seen[1][1:4] == ["-m", "lorabench", "run"]
