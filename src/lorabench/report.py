"""Run reports: ``result.json`` is the data (an interface other tools read); ``report.md`` and the console table
are rendered from it, never computed twice. Files are written to a temporary name and renamed into place."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch


GIB = 1024 ** 3


def environment(device: torch.device) -> dict:
    """git hash + dirty flag of the lorabench source, library versions, device name."""
    src = Path(__file__).resolve().parent
    git_hash, dirty = None, None
    try:
        git_hash = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        if git_hash and len(git_hash) != 40:
            git_hash = None  # not a checkout with commits
        if git_hash:
            dirty = bool(subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "git_hash": git_hash, "git_dirty": dirty, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": tf_version, "cuda": torch.version.cuda, "device": str(device),
        "device_name": device_name(device), "hostname": platform.node(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def untimed_steps(config: dict) -> int:
    """The steps a run left out of its timing (result.json files before the flag's rename call it warmup_steps)."""
    return config.get("untimed_steps", config.get("warmup_steps", 0))


def timing_words(m: dict, c: dict) -> str:
    """Which steps the timing covers: "N timed steps after U untimed", or all of them where the run had too few."""
    u, timed = untimed_steps(c), m["timed_steps"]
    if u and timed == m.get("steps", timed + u):
        return f"all {timed} steps timed: too few to leave out --untimed-steps {u}"
    return f"{timed} timed steps after {u} untimed"


def _fmt(v, spec: str, missing: str = "/") -> str:
    return missing if v is None else format(v, spec)


def on_a100(result: dict) -> bool:
    """Whether the run's card is an A100, the card whose TF32 peak (156 TFLOP/s) FlagPerf's MFU formula divides
    by."""
    return "A100" in str(result.get("env", {}).get("device_name") or "")


def on_cpu(result: dict) -> bool:
    return str(result["config"].get("device", "")).startswith("cpu")


MFU_FOOTNOTE = ("* FlagPerf's MFU formula (token/p/s x 2 x 7e9 / 1.56e14, an A100's TF32 peak) as FlagPerf prints "
                "it; this run's card ({card}) is not known to be an A100, so the figure is not a utilisation of "
                "this card (lorabench's own MFU below is)")
CPU_NOTE = "throughput measured on a CPU ({card}): not comparable with GPU figures"


def seed_row(result: dict) -> dict[str, str]:
    """The columns of FlagPerf's table for the case (config, fix_hp, token/p/s, loss, mem, acc(MMLU), MFU) by its
    rules: token/p/s over every step's mean time, avg_train_loss, FlagPerf's MFU constants
    (metrics.flagperf_figures)."""
    m, c = result["metrics"], result["config"]
    mem = "/"
    if m.get("peak_mem_device_gib") is not None:  # as nvidia-smi shows it, as FlagPerf read it
        mem = f"{m['peak_mem_device_gib']:.1f}/{m['device_mem_total_gib']:.0f}"
    elif m.get("peak_mem_reserved_gib") is not None:
        mem = f"{m['peak_mem_reserved_gib']:.1f}/{m['device_mem_total_gib']:.0f} (reserved)"
    return {
        "config": f"{c['nnodes']}x{c['gpus_per_node']} {c['engine']} {c['precision']}",
        "fix_hp": c.get("fix_hp") or "/",
        "token/p/s": _fmt(m.get("tokens_per_s_flagperf"), ".0f")
        + (" (CPU)" if on_cpu(result) and m.get("tokens_per_s_flagperf") is not None else ""),
        "loss": _fmt(m.get("loss_flagperf"), ".2f"),
        "mem": mem,
        "acc(MMLU)": _fmt(m["mmlu_acc_flagperf"], ".3f") if m.get("mmlu_acc_flagperf") is not None
        else _fmt(m.get("mmlu_acc"), ".3f") + (" (lm-eval)" if m.get("mmlu_acc") is not None else ""),
        "MFU": "/" if m.get("mfu_flagperf") is None else
        f"{_half_up(100 * m['mfu_flagperf'], 1)}%" + ("" if on_a100(result) else "*"),
    }


def seed_table(result: dict) -> str:
    """FlagPerf's table for the case and, where its MFU cell is marked, the footnote that says why."""
    row = seed_row(result)
    text = markdown_table([row])
    if row["MFU"].endswith("*"):
        text += "\n\n" + MFU_FOOTNOTE.format(card=result["env"].get("device_name"))
    return text


def _half_up(v: float, places: int) -> str:
    """``v`` rounded half up as a person (and FlagPerf's table) rounds: 36.05 -> 36.1, where format() gives 36.0
    for the binary 36.0499999... that 4,017 x 2 x 7e9 / 1.56e14 x 100 is in floating point."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(repr(round(v, 9))).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def own_row(result: dict) -> dict[str, str]:
    """lorabench's own measurements of the same run, each column named for what it is."""
    m, c = result["metrics"], result["config"]
    peak = f"MFU (of the card's {c['precision']} peak)"
    cpu = " (CPU)" if on_cpu(result) and m.get("tokens_per_s_per_chip") is not None else ""
    return {
        "tok/s/chip (mean, untimed steps out)": _fmt(m.get("tokens_per_s_per_chip"), ".0f") + cpu,
        "median": _fmt(m.get("tokens_per_s_per_chip_median"), ".0f"),
        "±95%": _fmt(_pct(m.get("step_time_ci95_rel")), ".1f", "n/a") + ("%" if m.get("step_time_ci95_rel") else ""),
        peak: "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%",
        "peak allocated GiB": _fmt(m.get("peak_mem_allocated_gib"), ".1f", "n/a"),
        "peak reserved GiB": _fmt(m.get("peak_mem_reserved_gib"), ".1f", "n/a"),
        "last-epoch loss": _fmt(m.get("train_loss_last_epoch_avg"), ".4f"),
        "eval loss": _fmt(m.get("eval_loss"), ".4f", "n/a"),
        "TF32": "on" if c["tf32"]["on"] else "off",
    }


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _pct(v):
    return None if v is None else 100 * v


PHASE_NAMES = {"startup": "start-up (interpreter, imports, flags)", "resolve": "checks (settings, MMLU questions)",
               "data": "data (read, tokenise, pack; or the cache)", "build": "model build or load",
               "train": "training (compiling included)", "rouge": "ROUGE generation", "save_adapter": "adapter",
               "mmlu_lm_eval": "MMLU lm-eval", "mmlu_flagperf": "MMLU FlagPerf", "write": "writing results"}
"""What each phase of result.json's phases covers, in words."""


def phase_words(phases: dict) -> str:
    """result.json's phases as one line: each phase's seconds, then the total."""
    parts = [f"{PHASE_NAMES.get(k[:-2], k[:-2])} {v:.1f} s" for k, v in phases.items() if k != "total_s"]
    return ", ".join(parts) + f"; {phases['total_s']:.1f} s in all"


def render_report(result: dict) -> str:
    m, c, e = result["metrics"], result["config"], result["env"]
    extra = [
        f"- device: {e['device_name']}; torch {e['torch']}, transformers {e['transformers']}; "
        f"git {str(e['git_hash'])[:10]}{' (dirty)' if e['git_dirty'] else ''}",
        f"- model: {c['model']}, {c['n_params']:,} parameters ({c['n_trainable']:,} trainable); "
        f"LoRA r={c['lora_r']} alpha={c['lora_alpha']} dropout={c['lora_dropout']} on {','.join(c['lora_targets'])}",
        f"- data: {c['data']}{', packed data from the cache' if c.get('data_cached') else ''} -> "
        f"{c['train_chunks']} chunks of {c['seq_len']} tokens, "
        f"{'shuffled each epoch' if c.get('shuffle', True) else 'in file order'}; LBS {c['batch_size']}, "
        f"GAS {c['grad_accum']}, {m['steps']} steps",
        f"- TF32 {'on' if c['tf32']['on'] else 'off'}: {c['tf32']['why']}; numerics: "
        f"{c['engine_options'].get('numerics', 'n/a')}",
        f"- FlagPerf's figures: token/p/s {_fmt(m.get('tokens_per_s_flagperf'), '.1f')} (every step, untimed "
        f"ones included: avg_iter_time {_fmt(m.get('avg_iter_time_s'), '.4f')} s), avg_train_loss "
        f"{_fmt(m.get('loss_flagperf'), '.4f')}, avg_train_prep {_fmt(m.get('avg_train_prep'), '.3f')}, "
        f"avg_epoch_time {_fmt(m.get('avg_epoch_time_s'), '.2f')} s, MFU with its constants (tok/s x 2 x 7e9 / "
        f"1.56e14) " + ("/ (its 7e9 is Llama-2-7B's size; not this model's)" if m.get("mfu_flagperf") is None
                        else f"{100 * m['mfu_flagperf']:.1f}%"),
        f"- lorabench's tokens/s per chip: mean {_fmt(m['tokens_per_s_per_chip'], '.1f')}, median "
        f"{_fmt(m['tokens_per_s_per_chip_median'], '.1f')} ({timing_words(m, c)}; mean step time "
        f"±{_fmt(_pct(m.get('step_time_ci95_rel')), '.1f', 'n/a')}% "
        f"at 95%); FLOPs/token {m['flops_per_token'] / 1e9:.3f} G; MFU "
        f"{'n/a (unknown peak; give --peak-tflops)' if m['mfu'] is None else format(m['mfu'], '.1%')}",
        f"- peak memory: allocated {_fmt(m['peak_mem_allocated_gib'], '.2f', 'n/a')} GiB, reserved "
        f"{_fmt(m['peak_mem_reserved_gib'], '.2f', 'n/a')} GiB, the device's as nvidia-smi shows it "
        f"{_fmt(m.get('peak_mem_device_gib'), '.2f', 'n/a')} GiB ({m.get('peak_mem_device_source') or 'no GPU'}; "
        f"FlagPerf's mem column)" + ("" if c.get("memory_budget_gib") is None else
                                     f"; run under a budget of {c['memory_budget_gib']:g} GiB (--memory-budget-gib)"),
        f"- train loss: first step {_fmt(m['train_loss_first'], '.4f')}, last step "
        f"{_fmt(m['train_loss_final'], '.4f')}, last-epoch average {_fmt(m['train_loss_last_epoch_avg'], '.4f')}; "
        f"eval loss {_fmt(m['eval_loss'], '.4f', 'n/a')}",
    ]
    if m.get("resumed_at_step"):
        extra.append(f"- resumed from a checkpoint at step {m['resumed_at_step']}: the {untimed_steps(c)} steps "
                     "after it (the new process's warm-up) are left out of lorabench's timing too")
    if m.get("skipped_steps"):
        extra.append(f"- fp16 GradScaler skipped {m['skipped_steps']} steps")
    if m.get("mmlu_acc") is not None:
        extra.append(f"- MMLU {m.get('mmlu_shots', 5)}-shot (lm-evaluation-harness's protocol): {m['mmlu_acc']:.4f} "
                     f"micro over {m['mmlu_questions']} questions (see mmlu.md)")
    if m.get("mmlu_acc_flagperf") is not None:
        extra.append(f"- MMLU {m.get('mmlu_shots', 5)}-shot by FlagPerf's rules (its prompt, prompts within "
                     f"{m['mmlu_flagperf_seq_len']} tokens, whole-vocabulary argmax; eval mode, where FlagPerf leaves "
                     f"LoRA dropout on): {m['mmlu_acc_flagperf']:.3f} over {m['mmlu_flagperf_questions']} questions "
                     f"(mmlu_flagperf.json)")
    if result.get("rouge"):
        r = result["rouge"]

        def trio(d):
            return "n/a (a resumed run)" if d is None else " / ".join(f"{d[k]:.2f}" for k in ("rouge1", "rouge2",
                                                                                               "rougeL"))
        skipped = f"; {r['skipped_too_long']} longer than the context left out" if r["skipped_too_long"] else ""
        extra.append(f"- ROUGE-1 / 2 / L on {r['records']} validation records (greedy, at most {r['max_new_tokens']} "
                     f"new tokens{skipped}): before training {trio(r['before'])}, after {trio(r['after'])} "
                     "(rouge_predictions.jsonl)")
    if result.get("phases"):
        extra.append(f"- time per phase: {phase_words(result['phases'])}")
    if result.get("adapter_dir"):
        extra.append(f"- adapter: {result['adapter_dir']}")
    if isinstance(result.get("plots"), list) and result["plots"]:
        extra.append("- plots: " + ", ".join(result["plots"]))
    elif isinstance(result.get("plots"), str):
        extra.append(f"- {result['plots']}")
    if on_cpu(result):
        extra.insert(0, "- " + CPU_NOTE.format(card=e["device_name"]))
    return ("# lorabench run\n\nFlagPerf's table for the llama2_7b_finetune case, by FlagPerf's rules:\n\n"
            + seed_table(result)
            + "\n\nlorabench's own measurements of the same run:\n\n" + markdown_table([own_row(result)])
            + "\n\n" + "\n".join(extra) + "\n")


KEY_METRICS = (("tokens_per_s_per_chip", "tok/s/chip", ".0f"), ("tokens_per_s_flagperf", "token/p/s (FlagPerf)", ".0f"),
               ("mfu", "MFU", ".1%"), ("peak_mem_allocated_gib", "peak alloc GiB", ".1f"),
               ("loss_flagperf", "loss (FlagPerf)", ".4f"), ("train_loss_final", "last step loss", ".4f"),
               ("eval_loss", "eval loss", ".4f"), ("mmlu_acc", "MMLU (lm-eval)", ".4f"),
               ("mmlu_acc_flagperf", "MMLU (FlagPerf)", ".3f"))


def read_result(run_dir: Path) -> dict:
    """A run folder's result.json; a ConfigError naming the folder if it has none or it is not valid JSON."""
    from .config import ConfigError

    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no result.json (give folders written by lorabench run)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


NOT_COMPARED = ("data_cached",)
"""Settings that differ between identical runs (whether the packed data came from the cache)."""


def _data_words(text):
    """A run's data description without its cache status (result.json files before data_cached said it there)."""
    return text.replace(", cached)", ")") if isinstance(text, str) else text


def _not_comparable(run: dict, base: dict) -> str | None:
    """Why ``run``'s tok/s cannot be set against ``base``'s (another model or another card), or None."""
    if run["config"].get("model_config") != base["config"].get("model_config"):
        return "another model"
    if run["env"].get("device_name") != base["env"].get("device_name"):
        return "another device"
    return None


def compare_runs(runs: list[tuple[str, dict]]) -> str:
    """Several runs side by side: the settings that differ, the key metrics, and each run's tok/s as a ratio to
    the first run's where the two ran the same model on the same kind of device (else "n/a" and why)."""
    names = [name for name, _ in runs]
    configs = [_flat({**{k: v for k, v in r["config"].items() if k not in NOT_COMPARED},
                      "data": _data_words(r["config"].get("data")), "device": r["env"]["device_name"]})
               for _, r in runs]
    keys = sorted(set().union(*configs))
    differ = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    diff_rows = [{"setting": k, **{n: str(c.get(k, "-")) for n, c in zip(names, configs)}} for k in differ]
    metric_rows = []
    for key, label, spec in KEY_METRICS:
        values = [r["metrics"].get(key) for _, r in runs]
        if all(v is None for v in values):
            continue
        metric_rows.append({"metric": label, **{n: _fmt(v, spec, "n/a") for n, v in zip(names, values)}})
    first = runs[0][1]
    base = first["metrics"].get("tokens_per_s_per_chip")
    ratios, caveats = {"metric": "tok/s / first run"}, []
    for n, (_, r) in zip(names, runs):
        v = r["metrics"].get("tokens_per_s_per_chip")
        why = _not_comparable(r, first)
        ratios[n] = f"n/a ({why})" if why else "n/a" if not (v and base) else f"{v / base:.3f}x"
        if why:
            caveats.append(f"- {n}: {why} than {names[0]}; its tok/s is not set against the first run's")
    if any(on_cpu(r) for _, r in runs):
        caveats.append("- runs on a CPU: their tok/s are not comparable with GPU figures")
    metric_rows.append(ratios)
    return ("# lorabench runs side by side\n\n## Settings that differ\n\n"
            + (markdown_table(diff_rows) if diff_rows else "none") + "\n\n## Key metrics\n\n"
            + markdown_table(metric_rows) + "\n" + ("\n" + "\n".join(caveats) + "\n" if caveats else ""))
