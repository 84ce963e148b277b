"""Table of run_gpu.sh's results: per data set and seed, the mean loss of the last ten steps and the eval loss, fp8
and the second bf16 run against the first bf16 run.   python summarize.py RESULTS_DIR"""
import json
import statistics
import sys
from pathlib import Path

res = Path(sys.argv[1])
runs = {}
for f in sorted(res.glob("*_seed*.json")):
    name, rest = f.stem.split("_", 1)
    kind, seed = rest.rsplit("_seed", 1)
    d = json.loads(f.read_text())
    runs[(name, int(seed), kind)] = (statistics.mean(d["series"]["loss"][-10:]), d["metrics"].get("eval_loss"))
print("| data | seed | bf16 last 10 | fp8 (vs bf16) | bf16 again (vs bf16) | bf16 eval | fp8 eval (vs bf16) | bf16 again eval |")
print("|---|---|---|---|---|---|---|---|")
gaps = {}
for (name, seed, kind), (last, ev) in sorted(runs.items()):
    if kind != "bf16":
        continue
    cells = [name, str(seed), f"{last:.4f}"]
    for other in ("fp8", "bf16-again"):
        o = runs.get((name, seed, other))
        cells.append("-" if o is None else f"{o[0]:.4f} ({100 * (o[0] / last - 1):+.2f}%)")
        if o is not None:
            gaps.setdefault((name, other, "last"), []).append(100 * (o[0] / last - 1))
            if ev and o[1]:
                gaps.setdefault((name, other, "eval"), []).append(100 * (o[1] / ev - 1))
    cells.append(f"{ev:.4f}" if ev else "-")
    for other in ("fp8", "bf16-again"):
        o = runs.get((name, seed, other))
        cells.append("-" if o is None or not ev or not o[1] else f"{o[1]:.4f} ({100 * (o[1] / ev - 1):+.2f}%)")
    print("| " + " | ".join(cells) + " |")
for (name, other, what), v in sorted(gaps.items()):
    sd = statistics.stdev(v) if len(v) > 1 else float("nan")
    print(f"{name} {other} vs bf16, {what}: mean {statistics.mean(v):+.2f}% sd {sd:.2f}% over {len(v)} seeds")
