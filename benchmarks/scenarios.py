"""The benchmark scenarios: the results table's rows (each one ``lorabench bench`` call with its flags kept here
as data), the loss-curve check, and the seed's whole case end to end.

    PYTHONPATH=src python benchmarks/scenarios.py table [--rows bf16-lbs16,tf32] [--rounds 3] [--out DIR]
    PYTHONPATH=src python benchmarks/scenarios.py curves [--dropout 0.05] [--steps 50] [--max-gap 0.002]
    PYTHONPATH=src python benchmarks/scenarios.py case [--epochs 3] [--scale 1.0] [--model-dir DIR] [--mmlu DIR]
    PYTHONPATH=src python benchmarks/scenarios.py mlperf [--nproc 8] [--steps 6] [--untimed-steps 2]

``table``: the results table's rows (engines alternating in rounds), then one line per row with native's ratio.
``curves``: native and reference from identical weights and batches, bf16 at lr 3e-4; exits 1 if their per-step
losses part by more than ``--max-gap`` (relative) at any step. ``case``: the seed's case as a user runs it,
`lorabench run --preset flagperf-fp16 --mmlu-protocol both` on Llama-2-7B's config and Llama-2's real tokenizer
(random weights; the folder made by ../shared/tools/llama2-dir.sh where --model-dir is not given) and samsum-sized
data in samsum's layout generated here (14,732 / 818 / 819 dialogues of samsum-like length, times ``--scale``;
samsum's own text is not redistributable), then the seed's table and the time per phase. ``mlperf``: MLPerf
Training's llama2_70b_lora shape (Llama-2-70B at 8,192 tokens, LoRA r 16 / alpha 32 / dropout 0.1 on q/k/v/o,
global batch 8) in fp8 on ``--nproc`` GPUs of this host (``--shard fsdp`` for more than one), random weights and
synthetic tokens: tokens/s per GPU, MFU, peak memory, and the time one pass over MLPerf's 3,901 training samples
would take at that pace. Extra flags go after ``--`` (to ``lorabench bench``, or to ``lorabench run`` for ``case``
and ``mlperf``).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from lorabench.cli import main as lorabench

TABLE = {  # row -> lorabench bench flags (docs/results.md)
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


SAMSUM_SPLITS = {"train": 14732, "val": 818, "test": 819}
"""samsum's split sizes (the dataset card)."""
NAMES = ["Anna", "Tom", "Maria", "Lukas", "Sara", "Ben", "Olga", "Raj", "Emma", "Jonas", "Lea", "Omar", "Nina"]
TURNS = ["Are we still meeting on {day}?", "Yes! At {place}?", "Sure, around {hour} pm.", "Have you seen {thing}?",
         "I think I left {thing} at {place} yesterday.", "Can you bring it tomorrow morning?",
         "Ok, I will, no worries.",
         "I can't come on {day}, sorry, something came up at work.", "No problem. Maybe next week then?",
         "I'm ordering food for everyone, what do you want?", "Whatever you're having, thanks a lot :)",
         "Did you talk to the landlord about the heating?", "Not yet, I'll call him after lunch.",
         "The train is delayed again, I'll be twenty minutes late.", "Don't worry, we'll wait for you at {place}."]


def samsum_like(n: int, rng: random.Random) -> list[dict]:
    """``n`` samsum-layout records (id, dialogue of "Name: text" turns joined by CRLF, summary), of samsum's length
    spread: 2 to 30 turns, about 11 on average (~200 Llama-2 tokens a record with FlagPerf's prompt)."""
    out = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        k = min(30, max(2, round(rng.expovariate(1 / 9)) + 2))
        fill = {"day": rng.choice(["Monday", "Friday", "Sunday"]), "place": rng.choice(["the cafe", "the gym"]),
                "hour": rng.randint(1, 11), "thing": rng.choice(["the keys", "the charger", "the tickets"])}
        turns = [f"{(a, b)[i % 2]}: {rng.choice(TURNS).format(**fill)}" for i in range(k)]
        summary = f"{a} and {b} talk about {fill['thing']} and meeting at {fill['place']} on {fill['day']}."
        out.append({"id": f"{rng.getrandbits(32):08x}", "summary": summary, "dialogue": "\r\n".join(turns)})
    return out


def case(a, extra: list[str]) -> int:
    out = a.out / "case"
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in SAMSUM_SPLITS.items():
        (data / f"{split}.json").write_text(json.dumps(samsum_like(max(8, round(n * a.scale)), rng)))
    model_dir = a.model_dir
    if model_dir is None:
        model_dir = out / "llama2-7b"
        if not (model_dir / "tokenizer.json").is_file():
            tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "llama2-dir.sh"
            subprocess.run(["bash", str(tool), str(model_dir), "7b"], check=True)
    run_dir = out / "run"
    code = lorabench(["run", "--init", "random", "--model-dir", str(model_dir), "--data", str(data),
                      "--preset", "flagperf-fp16", "--epochs", str(a.epochs), "--mmlu", str(a.mmlu),
                      "--mmlu-protocol", "both", "--run-dir", str(run_dir), "--overwrite", *extra])
    if code == 0:
        r = json.loads((run_dir / "result.json").read_text())
        epochs = f"{a.epochs} epoch{'s' if a.epochs != 1 else ''}"
        print(f"case: {r['config']['data']}; {epochs}, {r['metrics']['steps']} steps, "
              f"{r['env']['device_name']}")
        print("case: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in r["phases"].items()))
    return code


MLPERF_SAMPLES = 3901
"""Training samples (GovReport sequences of 8,192 tokens) in MLPerf Training's llama2_70b_lora."""
MLPERF_RUN = ["--init", "random", "--data", "synthetic", "--precision", "fp8", "--batch-size", "1", "--lora-r", "16",
              "--lora-alpha", "32", "--lora-dropout", "0.1", "--lora-targets", "q_proj,k_proj,v_proj,o_proj",
              "--no-mmlu", "--no-save-adapter"]


def mlperf(a, extra: list[str]) -> int:
    if a.nproc < 1 or 8 % a.nproc:
        raise SystemExit(f"--nproc {a.nproc}: a divisor of MLPerf's global batch of 8 (1, 2, 4 or 8)")
    run_dir = a.out / f"mlperf-{a.nproc}"
    flags = ["run", "--model", a.model, "--seq-len", str(a.seq_len), "--grad-accum", str(8 // a.nproc),
             "--max-steps", str(a.steps), "--untimed-steps", str(a.untimed_steps), *MLPERF_RUN,
             *(["--shard", "fsdp"] if a.nproc > 1 else []), "--run-dir", str(run_dir), "--overwrite", *extra]
    if a.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               "-m", "lorabench", *flags]
        code = subprocess.run(cmd).returncode
    else:
        code = lorabench(flags)
    if code == 0:
        r = json.loads((run_dir / "result.json").read_text())
        m, c = r["metrics"], r["config"]
        per_gpu = m["tokens_per_s_per_chip"]
        pass_min = MLPERF_SAMPLES * a.seq_len / (per_gpu * a.nproc) / 60
        mfu = "n/a" if m["mfu"] is None else f"{m['mfu']:.1%}"
        mem = "n/a" if m["peak_mem_allocated_gib"] is None else f"{m['peak_mem_allocated_gib']:.1f} GiB"
        print(f"mlperf: {c['model']} seq {a.seq_len}, {a.nproc} x {r['env']['device_name']}, global batch 8: "
              f"{per_gpu:,.0f} tok/s per GPU, MFU {mfu}, peak allocated {mem}; one pass over {MLPERF_SAMPLES:,} "
              f"samples: {pass_min:.1f} min")
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-scenarios")
    sub = ap.add_subparsers(dest="scenario", required=True)
    t = sub.add_parser("table", help="the results table's rows (docs/results.md)")
    t.add_argument("--rows", default=",".join(TABLE), help=f"comma-separated of {', '.join(TABLE)}")
    t.add_argument("--rounds", type=int, default=3)
    c = sub.add_parser("curves", help="loss-curve agreement of native and reference")
    c.add_argument("--dropout", type=float, default=0.05)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--max-gap", type=float, default=2e-3, help="largest relative per-step gap allowed (2026-11-28: "
                   "0.085%% with dropout 0.05, 0.064%% with dropout 0, H200)")
    k = sub.add_parser("case", help="the seed's case end to end: training, both MMLU protocols, time per phase")
    k.add_argument("--epochs", type=int, default=3, help="the seed's 3 by default")
    k.add_argument("--scale", type=float, default=1.0, help="this share of samsum's record counts")
    k.add_argument("--model-dir", type=Path, help="a Llama-2 folder (config + tokenizer; default: made here by "
                   "../shared/tools/llama2-dir.sh, which needs npm)")
    k.add_argument("--mmlu", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu")
    m = sub.add_parser("mlperf", help="MLPerf's llama2_70b_lora shape in fp8 on N GPUs: tok/s per GPU, time a pass")
    m.add_argument("--nproc", type=int, default=1, help="GPUs of this host (1, 2, 4 or 8; fsdp past one)")
    m.add_argument("--steps", type=int, default=6)
    m.add_argument("--untimed-steps", type=int, default=2)
    m.add_argument("--model", default="llama2-70b-8k", help="shape preset (a small one to try the scenario)")
    m.add_argument("--seq-len", type=int, default=8192)
    a = ap.parse_args(argv)
    return {"table": table, "curves": curves, "case": case, "mlperf": mlperf}[a.scenario](a, extra)


if __name__ == "__main__":
    sys.exit(main())
