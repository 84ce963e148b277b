"""PNG plots rendered from result.json and bench.json (never recomputed): a run's loss per step with its epoch
boundaries, its step time per step with the warm-up marked, its MMLU accuracy per category; a bench's tokens/s
and peak memory per engine and preset with the floor drawn, and the engines' loss curves overlaid.

matplotlib is an optional extra (``pip install 'lorabench[plots]'``); without it every function returns the one
line saying how to get plots, and everything else is written as usual.
"""
from __future__ import annotations

from pathlib import Path

from .files import write_bytes_atomic

NO_MATPLOTLIB = "plots: not drawn (pip install matplotlib, or 'lorabench[plots]', to get PNG plots)"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> Path:
    """Render to memory, then write whole (files.write_bytes_atomic), so a failure leaves no half-written PNG."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())
    return path


def plot_run(result: dict, out_dir: Path) -> list[Path] | str:
    """loss.png, step_time.png and (with MMLU) mmlu_categories.png in ``out_dir``; or NO_MATPLOTLIB."""
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s, c, m = result["series"], result["config"], result["metrics"]
    title = f"{c['engine']} {c['precision']}, {c.get('preset')}, LBS {c['batch_size']} x {c['seq_len']}"
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(s["step"], s["loss"], lw=1.2)
    for i in range(1, len(s["epoch"])):
        if s["epoch"][i] != s["epoch"][i - 1]:
            ax.axvline(s["step"][i] - 0.5, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="optimiser step", ylabel="train loss", title=f"loss per step (dashed: epoch boundaries)\n{title}")
    written.append(_save(fig, out_dir / "loss.png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    from .report import untimed_steps

    warm = untimed_steps(c)
    ms = [1e3 * t for t in s["step_time_s"]]
    top, over = step_time_scale(ms, warm)
    ax.plot(s["step"], [min(v, top) for v in ms], lw=1.2, marker=".")
    for i in over:  # a compiling first step would flatten the rest: drawn at the edge, its time written
        ax.plot(s["step"][i], top, marker="^", color="red", ms=7)
        ax.annotate(f"{ms[i]:,.0f} ms", (s["step"][i], top), textcoords="offset points", xytext=(4, -12),
                    fontsize=8, color="red")
    ax.set_ylim(0, top * 1.02)
    if warm:
        ax.axvspan(0.5, warm + 0.5, color="orange", alpha=0.2,
                   label=f"untimed ({warm} steps, left out of lorabench's timing)")
        ax.legend()
    ax.set(xlabel="optimiser step", ylabel="ms", title=f"step time per step\n{title}")
    written.append(_save(fig, out_dir / "step_time.png"))
    plt.close(fig)
    cats = m.get("mmlu_categories")
    if cats:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(cats)
        ax.bar(names, [cats[k]["acc"] for k in names])
        ax.axhline(0.25, color="grey", ls=":", lw=0.8, label="chance (0.25)")
        ax.set(ylabel="accuracy", ylim=(0, 1), title=f"MMLU {m.get('mmlu_shots', 5)}-shot (lm-eval) by category, "
               f"micro {m['mmlu_acc']:.3f}")
        ax.legend()
        written.append(_save(fig, out_dir / "mmlu_categories.png"))
        plt.close(fig)
    return written


def step_time_scale(ms: list[float], untimed: int) -> tuple[float, list[int]]:
    """The step-time plot's top (1.25 x the slowest timed step: the steps lorabench's timing counts) and the
    indices of the steps above it, which are drawn at the edge with their times written."""
    timed = ms[untimed:] if len(ms) > untimed else ms
    top = 1.25 * max(timed) if timed else 1.0
    return top, [i for i, v in enumerate(ms) if v > top]


def plot_bench(bench: dict, out_dir: Path) -> list[Path] | str:
    """bench_speed.png (tok/s and peak memory per engine and preset, the floor drawn) and bench_loss.png (the
    engines' loss curves overlaid, one panel per preset and LBS); or NO_MATPLOTLIB."""
    from .bench.bench import label

    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in bench["rows"] if "error" not in r]
    if not rows:
        return []
    labels = [f"{label(r)}\n{r['preset']} LBS {r['batch_size']}" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4.5))
    a1.bar(range(len(rows)), [r["tokens_per_s_per_chip"] for r in rows])
    for f in (bench.get("floors") or {}).values():
        if "tokens_per_s" in f:
            a1.axhline(f["tokens_per_s"], color="red", ls="--", lw=0.9,
                       label=f"floor {f['preset']} LBS {f['batch']}: {f['tokens_per_s']:.0f}")
    if bench.get("floors"):
        a1.legend(fontsize=7)
    a1.set(ylabel="tokens/s per chip", title="speed")
    mem = [r.get("peak_mem_allocated_gib") or 0.0 for r in rows]
    a2.bar(range(len(rows)), mem)
    a2.set(ylabel="GiB (peak allocated; 0: not measured)", title="memory")
    for ax in (a1, a2):
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
    fig.suptitle(f"lorabench bench: {bench.get('model')}, {bench.get('device_name')}")
    written = [_save(fig, out_dir / "bench_speed.png")]
    plt.close(fig)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["batch_size"]), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, ((preset, lbs), group) in zip(axes[0], groups.items()):
        for r in group:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], lw=1.2, label=label(r))
        ax.set(xlabel="optimiser step", ylabel="train loss", title=f"{preset} LBS {lbs}")
        ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "bench_loss.png"))
    plt.close(fig)
    return written
