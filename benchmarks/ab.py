"""A/B two source trees of lorabench on one workload: every round runs A then B, each as its own ``lorabench
run`` process (``bench.run_row``), so a machine that drifts slows both alike; prints each round's tokens/s, the
median round of each, and B / A as the median of the ratios within rounds (``bench.speedup``).

    git worktree add /tmp/before <commit>      # or: git archive <commit> src | tar -x -C /tmp/before
    PYTHONPATH=src python benchmarks/ab.py --a /tmp/before/src --b src --preset bf16 --batch-size 16 --rounds 3

Exits 1 if any row failed. Flags after ``--`` go to every row (e.g. ``-- --lora-dropout 0``); ``--b-flags`` go to
B's rows only, so one tree against itself measures a flag (``--a src --b src --b-flags="--activation-checkpointing
adapter-inputs"``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from lorabench.bench.bench import combine_rounds, run_row, speedup


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="source folder of A (holding lorabench/)")
    ap.add_argument("--b", type=Path, required=True, help="source folder of B")
    ap.add_argument("--preset", default="bf16")
    ap.add_argument("--engine", default="native")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--batch-size", type=int, help="override the preset's LBS")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--untimed-steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--run-dir", type=Path, default=Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-ab")
    ap.add_argument("--b-flags", default="", help="more `lorabench run` flags for B's rows only (one string)")
    ap.add_argument("extra", nargs="*", help="more `lorabench run` flags for every row (after --)")
    a = ap.parse_args(argv)
    for src in (a.a, a.b):
        if not (src / "lorabench" / "__init__.py").is_file():
            ap.error(f"{src}: no lorabench/ package here (give the src/ folder of a checkout)")
    overrides = a.extra + (["--batch-size", str(a.batch_size)] if a.batch_size else [])
    flags = {"A": overrides, "B": overrides + shlex.split(a.b_flags)}
    rows = []
    for k in range(1, a.rounds + 1):
        for label, src in (("A", a.a), ("B", a.b)):
            env = {**os.environ, "PYTHONPATH": str(src.resolve())}
            row = run_row(a.engine, a.preset, a.model, a.steps, a.untimed_steps, a.device,
                          a.run_dir / f"{label}_round{k}", flags[label], a.timeout, env=env)
            row = {**row, "engine": label, "round": k}
            print(f"round {k} {label}: {row.get('error') or format(row['tokens_per_s_per_chip'], ',.0f') + ' tok/s'}",
                  flush=True)
            rows.append(row)
    failed = [r for r in rows if "error" in r]
    best = {r["engine"]: r for r in combine_rounds(rows) if "error" not in r}
    summary = {"a": str(a.a), "b": str(a.b), "preset": a.preset, "overrides": overrides, "b_flags": a.b_flags,
               "rows": rows}
    if len(best) == 2:
        ratio, each = speedup(best["B"], best["A"])
        summary.update(ratio_b_over_a=ratio, round_ratios=each)
        for label in ("A", "B"):
            r = best[label]
            peak = r["peak_mem_allocated_gib"]
            print(f"{label}: {r['tokens_per_s_per_chip']:,.0f} tok/s (median round; rounds "
                  f"{', '.join(f'{t:,.0f}' for t in r['rounds_tokens_per_s'] if t)}), peak "
                  f"{'n/a' if peak is None else format(peak, '.1f')} GiB, {r['device_name']}")
        print(f"B / A: {ratio:.4f} (rounds: {', '.join(f'{x:.4f}' for x in each)})")
    a.run_dir.mkdir(parents=True, exist_ok=True)
    (a.run_dir / "ab.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
