"""The spreads table: per seed, bf16 and fp8 (mean of the last ten steps' losses, eval loss), then the mean and
sample standard deviation over seeds and the paired fp8 - bf16 differences; then every other run in DIR
(<variant>_seed<s>.json: the control, variants.py's) against bf16 of its seed.

    python summarize.py DIR        (the OUT_DIR of run.sh)
"""
from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path


def read(path: Path) -> tuple[float, float]:
    d = json.loads(path.read_text())
    loss = d["series"]["loss"]
    return sum(loss[-10:]) / 10, d["metrics"]["eval_loss"]


def main(where: Path):
    seeds = sorted(int(p.stem.removeprefix("bf16_seed")) for p in where.glob("bf16_seed*.json")
                   if (where / f"fp8_seed{p.stem.removeprefix('bf16_seed')}.json").exists())
    rows = {s: (read(where / f"bf16_seed{s}.json"), read(where / f"fp8_seed{s}.json")) for s in seeds}
    print("| seed | bf16 last 10 | fp8 last 10 (vs bf16) | bf16 eval | fp8 eval (vs bf16) |\n|---|---|---|---|---|")
    for s, ((bl, be), (fl, fe)) in rows.items():
        print(f"| {s} | {bl:.4f} | {fl:.4f} ({100 * (fl - bl) / bl:+.2f}%) | {be:.4f} | {fe:.4f} "
              f"({100 * (fe - be) / be:+.2f}%) |")
    for i, what in ((0, "last 10"), (1, "eval")) if len(rows) > 1 else ():  # a spread needs two seeds
        b = [r[0][i] for r in rows.values()]
        f = [r[1][i] for r in rows.values()]
        d = [100 * (y - x) / x for x, y in zip(b, f)]
        print(f"{what}: bf16 {st.mean(b):.4f} +- {st.stdev(b):.4f} ({100 * st.stdev(b) / st.mean(b):.2f}%), "
              f"fp8 {st.mean(f):.4f} +- {st.stdev(f):.4f} ({100 * st.stdev(f) / st.mean(f):.2f}%); means "
              f"{100 * (st.mean(f) - st.mean(b)) / st.mean(b):+.2f}% apart; paired fp8 - bf16 "
              f"{st.mean(d):+.2f}% +- {st.stdev(d):.2f}% (n = {len(d)})")


def others(where: Path):
    print("\n| run | seed | last 10 (vs bf16) | eval (vs bf16) |\n|---|---|---|---|")
    for p in sorted(where.glob("*_seed*.json")):
        name, seed = p.stem.rsplit("_seed", 1)
        if name in ("bf16", "fp8") or not (where / f"bf16_seed{seed}.json").exists():
            continue
        (bl, be), (vl, ve) = read(where / f"bf16_seed{seed}.json"), read(p)
        print(f"| {name} | {seed} | {vl:.4f} ({100 * (vl - bl) / bl:+.2f}%) | {ve:.4f} ({100 * (ve - be) / be:+.2f}%) |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    others(Path(sys.argv[1]))
