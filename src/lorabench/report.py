"""Run reports: ``result.json`` is the data (an interface other tools read); ``report.md`` and the console table
are rendered from it, never computed twice. Files are written to a temporary name and renamed into place."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
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


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _fmt(v, spec: str, missing: str = "/") -> str:
    return missing if v is None else format(v, spec)


def seed_row(result: dict) -> dict[str, str]:
    """The seed's table columns (config, fix_hp, token/p/s, loss, mem, acc(MMLU), MFU) for one result."""
    m, c = result["metrics"], result["config"]
    mem = "/"
    if m.get("peak_mem_reserved_gib") is not None:
        mem = f"{m['peak_mem_reserved_gib']:.1f}/{m['device_mem_total_gib']:.0f}"
    return {
        "config": f"{c['nnodes']}x{c['world_size']} {c['engine']} {c['precision']}",
        "fix_hp": c.get("fix_hp") or "/",
        "token/p/s": _fmt(m.get("tokens_per_s_per_chip"), ".0f"),
        "loss": _fmt(m.get("train_loss_avg"), ".2f"),
        "mem": mem,
        "acc(MMLU)": _fmt(m.get("mmlu_acc"), ".3f"),
        "MFU": "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%",
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


def render_report(result: dict) -> str:
    m, c, e = result["metrics"], result["config"], result["env"]
    extra = [
        f"- device: {e['device_name']}; torch {e['torch']}, transformers {e['transformers']}; "
        f"git {str(e['git_hash'])[:10]}{' (dirty)' if e['git_dirty'] else ''}",
        f"- model: {c['model']}, {c['n_params']:,} parameters ({c['n_trainable']:,} trainable); "
        f"LoRA r={c['lora_r']} alpha={c['lora_alpha']} dropout={c['lora_dropout']} on {','.join(c['lora_targets'])}",
        f"- data: {c['data']} -> {c['train_chunks']} chunks of {c['seq_len']} tokens; LBS {c['batch_size']}, "
        f"GAS {c['grad_accum']}, {m['steps']} steps",
        f"- tokens/s per chip: mean {_fmt(m['tokens_per_s_per_chip'], '.1f')}, median "
        f"{_fmt(m['tokens_per_s_per_chip_median'], '.1f')} ({m['timed_steps']} timed steps after "
        f"{c['warmup_steps']} warm-up; mean step time ±{_fmt(_pct(m.get('step_time_ci95_rel')), '.1f', 'n/a')}% "
        f"at 95%)",
        f"- FLOPs/token {m['flops_per_token'] / 1e9:.3f} G; MFU "
        f"{'n/a (unknown peak; give --peak-tflops)' if m['mfu'] is None else format(m['mfu'], '.1%')}; "
        f"FlagPerf-formula MFU {m['mfu_flagperf']:.1%}",
        f"- peak memory: allocated {_fmt(m['peak_mem_allocated_gib'], '.2f', 'n/a')} GiB, reserved "
        f"{_fmt(m['peak_mem_reserved_gib'], '.2f', 'n/a')} GiB",
        f"- train loss: first step {_fmt(m['train_loss_first'], '.4f')}, last step "
        f"{_fmt(m['train_loss_final'], '.4f')}, last-epoch average {_fmt(m['train_loss_avg'], '.4f')}; "
        f"eval loss {_fmt(m['eval_loss'], '.4f', 'n/a')}",
    ]
    if m.get("skipped_steps"):
        extra.append(f"- fp16 GradScaler skipped {m['skipped_steps']} steps")
    if m.get("mmlu_acc") is not None:
        extra.append(f"- MMLU {m.get('mmlu_shots', 5)}-shot: {m['mmlu_acc']:.4f} micro over "
                     f"{m['mmlu_questions']} questions (see mmlu.md)")
    if result.get("adapter_dir"):
        extra.append(f"- adapter: {result['adapter_dir']}")
    return "# lorabench run\n\n" + markdown_table([seed_row(result)]) + "\n\n" + "\n".join(extra) + "\n"
