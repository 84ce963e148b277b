"""lorabench bench on CPU with the tiny shape: one process per row, side-by-side table, failures kept in rows."""
from __future__ import annotations

import importlib.util
import json

from lorabench.cli import main


def test_bench_native_vs_reference_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    engines = "native,reference"
    liger_missing = importlib.util.find_spec("liger_kernel") is None
    if liger_missing:
        engines += ",reference+liger"  # must fail in its own row, the others go on
    code = main(["bench", "--device", "cpu", "--model", "tiny", "--presets", "flagperf-fp32", "--engines", engines,
                 "--steps", "4", "--warmup-steps", "1", "--seq-len", "64", "--lora-dropout", "0",
                 "--run-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| engine | preset | tok/s/chip |" in out
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
