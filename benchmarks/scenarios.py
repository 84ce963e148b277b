"""The README's benchmark scenarios, each one ``lorabench bench`` call with its flags kept here as data.

    PYTHONPATH=src python benchmarks/scenarios.py table [--rows bf16-lbs16,tf32] [--rounds 3] [--out DIR]
    PYTHONPATH=src python benchmarks/scenarios.py curves [--dropout 0.05] [--steps 50] [--max-gap 0.002]

``table``: the results table's rows (engines alternating in rounds), then one line per row with native's ratio.
``curves``: native and reference from identical weights and batches, bf16 at lr 3e-4; exits 1 if their per-step
losses part by more than ``--max-gap`` (relative) at any step. Extra ``lorabench bench`` flags go after ``--``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lorabench.cli import main as lorabench

TABLE = {  # row -> lorabench bench flags (README, "Results")
    "fp16": ["--presets", "flagperf-fp16", "--engines", "native,reference", "--steps", "16", "--untimed-steps", "4",
             "--no-floor"],
    "tf32": ["--presets", "flagperf-fp32", "--engines", "native,reference,reference+liger", "--steps", "12",
             "--untimed-steps", "4"],
    "bf16-lbs16": ["--presets", "bf16", "--engines", "native,reference+compile", "--batch-size", "16", "--steps",
                   "16", "--untimed-steps", "4"],
    "bf16-seq4096": ["--presets", "bf16", "--engines", "native,reference+liger", "--batch-size", "2", "--seq-len",
                     "4096", "--steps", "12", "--untimed-steps", "4"],
    "unsloth": ["--presets", "bf16", "--engines", "native,unsloth,unsloth-fp8", "--batch-size", "16", "--steps",
                "14", "--untimed-steps", "4", "--no-floor"],
    "unsloth-all-linear": ["--presets", "bf16", "--engines", "native,unsloth", "--batch-size", "16", "--steps", "14",
                           "--untimed-steps", "4", "--no-floor", "--lora-targets",
                           "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--lora-r", "16",
                           "--lora-alpha", "32", "--lora-dropout", "0"],
}
for _seq in (16384, 32768, 65536, 131072):  # Llama-3.1-8B long context, both stacks keeping inputs on the host
    TABLE[f"long-{_seq // 1024}k"] = ["--model", "llama3.1-8b", "--presets", "bf16", "--engines", "native,unsloth",
                                     "--batch-size", "1", "--seq-len", str(_seq), "--activation-checkpointing",
                                     "offload", "--steps", "4" if _seq < 131072 else "3", "--untimed-steps",
                                     "2" if _seq < 131072 else "1", "--no-floor"]


def table(a, extra: list[str]) -> int:
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in TABLE]
    if bad:
        sys.exit(f"scenarios.py: unknown rows {bad}; choose from {', '.join(TABLE)}")
    code = 0
    for row in rows:
        print(f"== {row}: lorabench bench {' '.join(TABLE[row])} --rounds {a.rounds}", flush=True)
        code |= lorabench(["bench", *TABLE[row], "--rounds", str(a.rounds), "--run-dir", str(a.out / row), *extra])
    return code


def curves(a, extra: list[str]) -> int:
    run_dir = a.out / f"curves-dropout{a.dropout}"
    code = lorabench(["bench", "--presets", "bf16", "--engines", "native,reference", "--steps", str(a.steps),
                      "--untimed-steps", "5", "--lr", "3e-4", "--lora-dropout", str(a.dropout), "--no-floor",
                      "--run-dir", str(run_dir), *extra])
    rows = json.loads((run_dir / "bench.json").read_text())["rows"]
    native = next((r for r in rows if r["engine"] == "native" and "error" not in r), None)
    if code or native is None or native.get("max_rel_loss_gap_vs_reference") is None:
        print("curves: a row failed; no comparison")
        return 1
    gap = native["max_rel_loss_gap_vs_reference"]
    print(f"curves: largest per-step loss gap native vs reference {100 * gap:.4f}% over {len(native['losses'])} "
          f"steps (bound {100 * a.max_gap:.3f}%); final loss {native['loss_final']:.4f}")
    return 0 if gap <= a.max_gap else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-scenarios")
    sub = ap.add_subparsers(dest="scenario", required=True)
    t = sub.add_parser("table", help="the README's results table")
    t.add_argument("--rows", default=",".join(TABLE), help=f"comma-separated of {', '.join(TABLE)}")
    t.add_argument("--rounds", type=int, default=3)
    c = sub.add_parser("curves", help="loss-curve agreement of native and reference")
    c.add_argument("--dropout", type=float, default=0.05)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--max-gap", type=float, default=2e-3, help="largest relative per-step gap allowed (2026-11-28: "
                   "0.085%% with dropout 0.05, 0.064%% with dropout 0, H200)")
    a = ap.parse_args(argv)
    return {"table": table, "curves": curves}[a.scenario](a, extra)


if __name__ == "__main__":
    sys.exit(main())
