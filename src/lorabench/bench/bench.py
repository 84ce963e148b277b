"""``lorabench bench``: engines x presets side by side on random weights of the exact architecture.

Every row is ``lorabench run --init random --data synthetic`` in its own process (a crash or OOM is reported in
its row and the rest go on), so a row measures exactly what users run. Rows of one preset start from identical
weights (canonical random weights and adapters from one seed) and see identical batches, so their per-step losses
must agree: the table prints the largest gap between each engine and the reference. On a GPU the bench then times
the floor (floor.py) at each preset's shape in the same run and prints each row's share of it.

With ``rounds`` > 1 every row runs that many times, round after round (all engines once, then all again), so a
machine that drifts (an H200 gave the same row 5% apart two minutes later, 2026-11-28) slows every engine alike; each
row reports its median round, the spread over the rounds, and its speed-up as the median of the ratios taken within
one round.
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..engines.registry import BASELINE, OURS, spec
from ..files import write_json_atomic, write_text_atomic
from ..report import markdown_table


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)(:|$)")
"""A traceback's last line names the exception: ``module.SomeError: its message`` (or the bare name)."""
_RANK = re.compile(r"^\[rank\d+\]:\s*")
"""torchrun's prefix on a worker's lines."""


def failure_line(lines: list[str]) -> str:
    """The line that says why a run failed: its own ``lorabench: error:`` line, else the exception line that ends
    a traceback (a message of several lines ends with its advice, not with the error), a worker's rather than
    torchrun's own ChildFailedError, else the last line."""
    bare = [_RANK.sub("", ln) for ln in lines]
    for ln in reversed(bare):
        if ln.startswith("lorabench: error:"):
            return ln
    raised = [ln for ln in bare if _RAISED.match(ln) and "ChildFailedError" not in ln]
    return raised[-1] if raised else lines[-1]


def run_row(engine: str, preset: str, model: str, steps: int, warmup: int, device: str, row_dir: Path,
            overrides: list[str], timeout: float, env: dict | None = None, nproc: int = 1) -> dict:
    """One ``lorabench run`` process for ``engine`` x ``preset`` (``env``: its environment, e.g. a PYTHONPATH
    naming another source tree; default this process's; ``nproc`` > 1: a torchrun job of that many processes on
    this host), read back from its result.json."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
              "lorabench"] if nproc > 1 else [sys.executable, "-m", "lorabench"]
    cmd = [*launch, "run", "--init", "random", "--model", model, "--data", "synthetic",
           "--preset", preset, "--engine", engine, "--max-steps", str(steps), "--untimed-steps", str(warmup),
           "--device", device, "--run-dir", str(row_dir), "--no-mmlu", "--no-save-adapter", "--no-progress",
           "--eval-batches", "0", *overrides]
    row = {"engine": engine, "preset": preset, "model": model, "cmd": " ".join(cmd[1:])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    row["wall_s"] = time.perf_counter() - t0
    result_path = row_dir / "result.json"
    if proc.returncode != 0 or not result_path.is_file():
        text = proc.stderr or proc.stdout or ""
        row_dir.mkdir(parents=True, exist_ok=True)
        (row_dir / "stderr.log").write_text(proc.stderr or "")  # the whole of it; the table keeps one line
        row["log"] = str(row_dir / "stderr.log")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        if proc.returncode == 4:  # the run's out-of-memory message: a result of this row, the others go on
            return {**row, "error": "out of memory", "oom": lines[-1] if lines else ""}
        return {**row, "error": failure_line(lines)[:300] if lines else f"exit code {proc.returncode}"}
    r = json.loads(result_path.read_text())
    m = r["metrics"]
    keep = ("tokens_per_s_per_chip", "tokens_per_s_per_chip_median", "mfu", "mfu_flagperf", "flops_per_token",
            "peak_mem_allocated_gib", "peak_mem_reserved_gib", "step_time_mean_s", "step_time_stdev_s",
            "step_time_ci95_rel", "skipped_steps", "build_s")
    return {**row, **{k: m.get(k) for k in keep}, "loss_final": m["train_loss_final"], "losses": r["series"]["loss"],
            "batch_size": r["config"]["batch_size"], "seq_len": r["config"]["seq_len"],
            "precision": r["config"]["precision"], "device_name": r["env"]["device_name"],
            "numerics": r["config"]["engine_options"].get("numerics"), "tf32": r["config"]["tf32"],
            "fp8_skip": r["config"]["engine_options"].get("fp8_skip") or []}


def label(row: dict) -> str:
    """A row's engine as the tables name it: ``native[NAME]`` for a row of the variant NAME (--variant)."""
    return row["engine"] + (f"[{row['variant']}]" if row.get("variant") else "")


def combine_rounds(rows: list[dict]) -> list[dict]:
    """One row per engine x preset x LBS from its rounds (rows with a ``round``): the median round (the lower of
    the two middle ones for an even count, so the row is one that was measured), with every round's tok/s
    (None where it failed) and their spread, (max - min) / median. A row that failed in every round keeps its
    first error."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r.get("lbs"), label(r)), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if "error" not in r]
        if not ok:
            out.append(group[0])
            continue
        tps = [r["tokens_per_s_per_chip"] for r in ok]
        mid = statistics.median_low(tps)
        out.append({**next(r for r in ok if r["tokens_per_s_per_chip"] == mid),
                    "rounds_tokens_per_s": [r.get("tokens_per_s_per_chip") for r in group],
                    "rounds_spread": (max(tps) - min(tps)) / mid})
    return out


def speedup(row: dict, base: dict) -> tuple[float, list[float]]:
    """``row``'s tok/s over ``base``'s, and the ratios within each round where both ran: with rounds, the median
    of those (both engines saw the machine in the same state), else the plain ratio."""
    ratios = [a / b for a, b in zip(row.get("rounds_tokens_per_s", []), base.get("rounds_tokens_per_s", []))
              if a and b]
    if ratios:
        return statistics.median(ratios), ratios
    return row["tokens_per_s_per_chip"] / base["tokens_per_s_per_chip"], []


def compare(rows: list[dict]) -> None:
    """Add speed-up (``speedup``) and largest per-step loss gap against the plain reference row of the same
    preset and LBS."""
    refs = {(r["preset"], r.get("lbs")): r for r in rows if label(r) == BASELINE and "error" not in r}
    for r in rows:
        ref = refs.get((r["preset"], r.get("lbs")))
        if ref is None or "error" in r or r is ref:
            continue
        r["speedup_vs_reference"] = speedup(r, ref)[0]
        r["max_rel_loss_gap_vs_reference"] = loss_gap(r, ref)


def loss_gap(row: dict, base: dict) -> float | None:
    """Largest relative gap between two rows' per-step losses over the steps both ran (None: no steps)."""
    gaps = [abs(a - b) / abs(b) for a, b in zip(row["losses"], base["losses"])]
    return max(gaps) if gaps else None


def native_lines(rows: list[dict]) -> str:
    """Native against every other engine of the same preset and LBS (the targets compare it with the optimised
    stacks, not only the plain reference), and each native variant against plain native and the other engines;
    with rounds, the ratio of each round in parentheses; then the largest per-step loss gap between the two (same
    weights and batches: bf16 rounding, and the engines' own dropout masks where dropout > 0)."""
    out = []
    for nat in (r for r in rows if r["engine"] == OURS and "error" not in r):
        for other in rows:
            if (other is nat or "error" in other
                    or (other["preset"], other.get("lbs")) != (nat["preset"], nat.get("lbs"))
                    or (other["engine"] == OURS and (other.get("variant") or not nat.get("variant")))):
                continue
            value, ratios = speedup(nat, other)
            each = f" (rounds: {', '.join(f'{x:.3f}' for x in ratios)})" if ratios else ""
            gap = loss_gap(other, nat)
            gap = "" if gap is None else f"; loss gap {100 * gap:.3f}%"
            out.append(f"- {label(nat)} / {label(other)}, {nat['preset']} LBS {nat['batch_size']}: {value:.3f}x"
                       f"{each}{gap}")
    return "\n".join(out)


def add_floors(rows: list[dict], model: str, log=print) -> dict:
    """Time the floor (floor.py) at each preset's shape and precision on this process's GPU; each row gets its
    share of it. Returns {preset: floor result or error}."""
    from ..config import MODEL_PRESETS
    from .floor import floor_for_precision

    floors: dict[str, dict] = {}
    for r in rows:
        if "error" in r or _floor_key(r) in floors:
            continue
        log(f"bench: floor for {_floor_key(r)} ...", flush=True)
        try:
            f = floor_for_precision(MODEL_PRESETS[model], r["batch_size"], r["seq_len"], r["precision"],
                                    fp8_skip=tuple(r.get("fp8_skip") or ()))
        except Exception as e:  # out of memory, a dtype the card cannot run: the rows still get written
            f = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                 "batch": r["batch_size"], "seq": r["seq_len"]}
        floors[_floor_key(r)] = {**f, "preset": r["preset"], "fp8_skip": list(r.get("fp8_skip") or ())}
    for r in rows:
        f = floors.get(_floor_key(r), {}) if "error" not in r else {}
        if "tokens_per_s" in f:
            r["of_floor"] = r["tokens_per_s_per_chip"] / f["tokens_per_s"]
    return floors


def _floor_key(row: dict) -> str:
    """The floor a row is measured against: its preset's shape and precision, and the projections its FP8 keeps in
    bf16 (--fp8-skip: native rows only)."""
    skip = "".join(f", {p} bf16" for p in row.get("fp8_skip") or ())
    return f"{row['preset']}, LBS {row['batch_size']}, seq {row['seq_len']}{skip}"


def floor_lines(floors: dict) -> str:
    out = []
    for f in floors.values():
        kept = "".join(f", {p} in bf16" for p in f.get("fp8_skip") or ())
        where = f"- floor, {f['preset']} (LBS {f['batch']}, seq {f['seq']}{kept})"
        if "error" in f:
            out.append(f"{where}: failed ({f['error']})")
            continue
        kernel = min(f["attn_by_kernel_ms"], key=f["attn_by_kernel_ms"].get)
        out.append(f"{where}: {f['tokens_per_s']:.0f} tok/s (frozen GEMMs at {f['gemm_tflops']:.0f} TFLOP/s + "
                   f"{kernel} attention; nothing else)")
    return "\n".join(out)


def best_lines(rows: list[dict]) -> str:
    """Per preset, each engine's fastest row over the batch sizes tried, and native's best against the best of
    the other engines (how the targets compare stacks: each at its best LBS)."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        best: dict[str, dict] = {}
        for r in rows:
            if r["preset"] == preset and "error" not in r and (
                    label(r) not in best or r["tokens_per_s_per_chip"] > best[label(r)]["tokens_per_s_per_chip"]):
                best[label(r)] = r
        if not best:
            continue
        line = f"- best LBS, {preset}: " + "; ".join(f"{e} {r['tokens_per_s_per_chip']:.0f} (LBS {r['batch_size']})"
                                                     for e, r in best.items())
        others = [r for r in best.values() if r["engine"] != OURS]  # other stacks: native's variants are not
        if OURS in best and others:  # within rounds where both ran, as every speed-up here
            top = max(others, key=lambda r: r["tokens_per_s_per_chip"])
            line += f"; {OURS} / best other: {speedup(best[OURS], top)[0]:.2f}x"
        out.append(line)
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    rounds = any("rounds_tokens_per_s" in r for r in rows)
    out = []
    for r in rows:
        if "error" in r:
            line = {"engine": label(r), "preset": r["preset"], "LBS": r.get("lbs") or "", "tok/s/chip": "error",
                    "±95%": "", "MFU": "", "peak alloc GiB": "", "loss@N": "", "vs reference": r["error"][:80],
                    "max loss gap": "", "of floor": ""}
        else:
            line = {
                "engine": label(r), "preset": r["preset"], "LBS": r["batch_size"],
                "tok/s/chip": f(r["tokens_per_s_per_chip"], ".0f")
                + (" (CPU)" if str(r.get("device_name", "")).startswith("cpu") else ""),
                "±95%": "-" if r.get("step_time_ci95_rel") is None else f"{100 * r['step_time_ci95_rel']:.1f}%",
                "MFU": "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                "peak alloc GiB": f(r["peak_mem_allocated_gib"], ".1f"), "loss@N": f(r["loss_final"], ".4f"),
                "vs reference": f(r.get("speedup_vs_reference"), ".2f") + ("x" if r.get("speedup_vs_reference")
                                                                             else ""),
                "max loss gap": "-" if r.get("max_rel_loss_gap_vs_reference") is None
                else f"{100 * r['max_rel_loss_gap_vs_reference']:.3f}%",
                "of floor": "-" if r.get("of_floor") is None else f"{100 * r['of_floor']:.1f}%",
            }
        if rounds:
            line["rounds spread"] = rounds_cell(r)
        out.append(line)
    return markdown_table(out)


def rounds_cell(row: dict) -> str:
    """'2.1% (3/3)': the spread of a row's tok/s over its rounds and how many rounds ran without an error."""
    tps = row.get("rounds_tokens_per_s")
    if not tps:
        return ""
    return f"{100 * row['rounds_spread']:.1f}% ({sum(1 for t in tps if t)}/{len(tps)})"


def _row_precision(preset: str, settings: dict) -> str | None:
    """The precision a row of ``preset`` runs in: the precision among its ``settings``, else the preset's (None for
    an unknown preset, which the row itself reports)."""
    from ..config import TRAIN_PRESETS

    if settings.get("precision") is not None:
        return settings["precision"]
    return TRAIN_PRESETS[preset].train.precision if preset in TRAIN_PRESETS else None


def _cannot_run(engine: str, preset: str, settings: dict) -> str | None:
    """Why ``engine`` cannot run ``preset``'s precision (or the precision among ``settings``), else None."""
    from ..engines import precision_problem
    from ..precision import get_precision

    name = _row_precision(preset, settings)
    return None if name is None else precision_problem(engine, get_precision(name))


PRECISION_ONLY = {"fp8_grad": ("fp8", "nf4-fp8"), "fp8_skip": ("fp8",), "fp8_recipe": ("fp8",),
                  "nf4_dequant": ("nf4", "nf4-fp8")}
"""Native settings that only rows of some precisions take: bench gives them to those rows alone, so one bench can
set them and still run the bf16 rows beside."""


def native_settings_for(preset: str, settings: dict, native: dict) -> dict:
    """``native`` (the native rows' settings) for a row of ``preset``, less the PRECISION_ONLY ones of other
    precisions."""
    precision = _row_precision(preset, settings)
    return {k: v for k, v in native.items() if precision in PRECISION_ONLY.get(k, (precision,))}


def _entries(engines: list[str], variants: dict[str, dict]) -> list[tuple[str, str | None, dict]]:
    """(engine, variant name or None, the variant's native settings) of every row of a preset x LBS: the engines,
    then native once per variant."""
    return [(e, None, {}) for e in engines] + [(OURS, name, s) for name, s in variants.items()]


def run_bench(engines: list[str], presets: list[str], model: str, steps: int, warmup: int, device: str,
              run_dir: Path, overrides: list[str], timeout: float, log=print, floor: bool = True,
              batch_sizes: list[int | None] = (None,), rounds: int = 1, nproc: int = 1,
              native_overrides: dict | None = None, variants: dict[str, dict] | None = None, *, to_flags):
    """Run every engine x preset x batch size row (None: the preset's own), ``rounds`` times round after round,
    compare them, and (on a GPU, unless ``floor`` is False) time the floor. ``overrides``: settings ({dest:
    value}, as ``lorabench run`` names them) of every row; ``native_overrides``: of the native rows alone (the
    native engine's tuning, which other engines refuse; the FP8-only ones of the fp8 rows alone); ``variants``:
    {name: native settings}, each one more native row (``native[name]``) with those settings over
    ``native_overrides`` (left out of a preset whose precision they do not apply to); ``to_flags``: a row's
    settings as its process's flags (config_file.as_flags over run's parser).
    Returns (rows, floors); writes bench.json and bench.md to ``run_dir``."""
    rows = []
    entries = _entries(engines, variants or {})
    for k in range(1, rounds + 1):
        for preset in presets:
            for lbs in batch_sizes:
                first = k == 1 and lbs == batch_sizes[0]
                for engine, variant, settings in entries:
                    name = engine + (f"[{variant}]" if variant else "")
                    why = _cannot_run(engine, preset, overrides)
                    native = (native_settings_for(preset, overrides, {**(native_overrides or {}), **settings})
                              if spec(engine).can("native-options") else {})
                    if not why and variant and native == native_settings_for(preset, overrides,
                                                                            native_overrides or {}):
                        why = "its settings do not apply to this precision (the row would be plain native's)"
                    if why:
                        if first:
                            log(f"bench: {name} / {preset} skipped: {why}", flush=True)
                        continue
                    title = (f"{name} / {preset}" + (f" / LBS {lbs}" if lbs else "")
                             + (f" / round {k} of {rounds}" if rounds > 1 else ""))
                    log(f"bench: {title} ...", flush=True)
                    row_dir = run_dir / (f"{preset}__{engine.replace('+', '_')}" + (f"_{variant}" if variant else "")
                                         + (f"__lbs{lbs}" if lbs else "") + (f"__round{k}" if rounds > 1 else ""))
                    flags = to_flags({**overrides, **native, "batch_size": lbs})
                    row = run_row(engine, preset, model, steps, warmup, device, row_dir, flags, timeout, nproc=nproc)
                    row["lbs"] = lbs
                    if variant:
                        row["variant"] = variant
                    log(f"  -> {row.get('error') or format(row['tokens_per_s_per_chip'], '.0f') + ' tok/s/chip'}",
                        flush=True)
                    rows.append({**row, "round": k} if rounds > 1 else row)
    if rounds > 1:
        rows = combine_rounds(rows)
    compare(rows)
    gpu = device != "cpu" and torch.cuda.is_available()
    floors = add_floors(rows, model, log) if floor and gpu else {}
    dev = next((r["device_name"] for r in rows if "device_name" in r), None)
    write_json_atomic(run_dir / "bench.json", {"device_name": dev, "model": model, "steps": steps, "warmup": warmup,
                                               "overrides": overrides,
                                               "native_overrides": native_overrides or {},
                                               "variants": variants or {},
                                               "batch_sizes": list(batch_sizes),
                                               "rounds": rounds, "rows": rows, "floors": floors})
    each = f", median of {rounds} rounds" if rounds > 1 else ""
    text = f"# lorabench bench: {model}, {steps} steps ({warmup} warm-up){each}, {dev}\n\n{table(rows)}\n"
    versus = native_lines(rows)
    if versus:
        text += "\n" + versus + "\n"
    if floors:
        text += "\n" + floor_lines(floors) + "\n"
    if len(batch_sizes) > 1:
        text += "\n" + best_lines(rows) + "\n"
    from ..plots import plot_bench

    drawn = plot_bench({"model": model, "device_name": dev, "rows": rows, "floors": floors}, run_dir)
    text += "\n" + (drawn if isinstance(drawn, str) else "plots: " + ", ".join(p.name for p in drawn)) + "\n"
    write_text_atomic(run_dir / "bench.md", text)
    return rows, floors
