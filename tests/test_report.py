"""Reports rendered from result.json: PNG plots (and the one line without matplotlib), `lorabench report` on one
run (re-rendered) and on two (side by side)."""
from __future__ import annotations

import json

import pytest

from lorabench.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def run(tmp_path, name, *flags):
    assert main(["run", "--no-progress", "--device", "cpu", "--max-steps", "6", "--no-save-adapter",
                 "--run-dir", str(tmp_path / name), *flags]) == 0
    return tmp_path / name


def test_run_writes_readable_plots(tmp_path):
    pytest.importorskip("matplotlib")
    d = run(tmp_path, "a", "--limit", "2")
    r = json.loads((d / "result.json").read_text())
    assert r["plots"] == ["loss.png", "step_time.png", "mmlu_categories.png"]
    for name in r["plots"]:
        w, h = png_size(d / name)
        assert w > 300 and h > 200
    assert "- plots: loss.png, step_time.png, mmlu_categories.png" in (d / "report.md").read_text()
    from lorabench.rundir import LOCK, MARKER

    assert sorted(p.name for p in d.glob(".*")) == sorted([MARKER, LOCK])  # no temporary files left


def test_without_matplotlib_everything_else_is_written(tmp_path, monkeypatch):
    from lorabench import plots

    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    d = run(tmp_path, "a", "--no-mmlu")
    r = json.loads((d / "result.json").read_text())
    assert r["plots"] == plots.NO_MATPLOTLIB and not list(d.glob("*.png"))
    assert "pip install matplotlib" in (d / "report.md").read_text()


def test_report_re_renders_one_run_and_compares_two(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = run(tmp_path, "a", "--no-mmlu")
    b = run(tmp_path, "b", "--no-mmlu", "--lora-r", "4")
    (a / "report.md").unlink()
    (a / "loss.png").unlink()
    assert main(["report", str(a)]) == 0
    assert "| 1x1 native fp32 |" in (a / "report.md").read_text() and png_size(a / "loss.png")[0] > 300
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp.md")]) == 0
    text = (tmp_path / "cmp.md").read_text()
    assert f"| setting | {a} | {b} |" in text and "| lora_r | 8 | 4 |" in text
    ra, rb = (json.loads((d / "result.json").read_text())["metrics"]["tokens_per_s_per_chip"] for d in (a, b))
    assert f"| tok/s / first run | 1.000x | {rb / ra:.3f}x |" in text
    assert "| seed |" not in text  # equal settings are not listed
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no result.json" in capsys.readouterr().err
    # a comparison never replaces a run's own file, and a folder is no file to write
    before = (a / "result.json").read_bytes()
    for out, says in ((a / "result.json", "one of its own files"), (tmp_path, "a folder")):
        assert main(["report", str(a), str(b), "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
    assert (a / "result.json").read_bytes() == before
    from lorabench import rundir

    held = rundir.lock(a)  # a run still writing the folder: its report is not rendered under it
    try:
        assert main(["report", str(a)]) == 2
        assert "in use by" in capsys.readouterr().err
    finally:
        held.release()


def test_bench_draws_speed_and_loss_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from lorabench.plots import plot_bench

    rows = [{"engine": e, "preset": "bf16", "batch_size": 4, "tokens_per_s_per_chip": t, "peak_mem_allocated_gib": m,
             "losses": [2.0, 1.5, 1.2]} for e, t, m in (("native", 200.0, 1.0), ("reference", 120.0, 2.0))]
    rows.append({"engine": "unsloth", "preset": "bf16", "error": "needs a CUDA GPU"})
    floors = {"bf16": {"preset": "bf16", "batch": 4, "tokens_per_s": 250.0}}
    drawn = plot_bench({"model": "tiny", "device_name": "cpu", "rows": rows, "floors": floors}, tmp_path)
    assert [p.name for p in drawn] == ["bench_speed.png", "bench_loss.png"]
    assert all(png_size(p)[0] > 300 for p in drawn)
