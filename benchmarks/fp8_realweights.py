"""FP8 against bf16 (and fp32) on a real trained model: next-token distributions, MMLU 5-shot, a LoRA fine-tune.

Random weights hide outliers; this runs on SmolLM2-135M-Instruct (``bash ../shared/tools/smollm2.sh DIR`` makes its
HF folder, REFERENCE section 8) or any HF Llama folder:

    PYTHONPATH=src python benchmarks/fp8_realweights.py --model-dir DIR [--device cpu] [--questions-per-subject 18]
        [--steps 200] [--seq-len 128] [--batch-size 4] [--out benchmarks/results/...]

1. Next-token distributions on real text (MMLU questions and the bundled dialogues): mean KL(bf16 || fp8) per token
   and top-1 agreement, with fp32 as the reference of both.
2. MMLU 5-shot (``lorabench eval``) in bf16 and in fp8 over 57 x N questions: accuracy, and how many questions get
   the same letter.
3. The seed's LoRA fine-tuned for --steps steps on the bundled samsum dialogues in bf16 and in fp8 (``lorabench run``,
   same data order and init): final losses.

Off CUDA, fp8 is the emulation the GPU kernels are checked against (benchmarks/gpu_check.py). Prints one table and
writes fp8_realweights.json under --out. Not part of the test run (the model is 540 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_MMLU = ROOT.parent / "shared" / "data" / "mmlu"
DIALOGUES = ROOT / "src" / "lorabench" / "assets" / "samsum-tiny" / "train.json"


def texts(mmlu: Path, n: int) -> dict[str, list[str]]:
    """n MMLU test questions with their choices, and n bundled dialogues with their summaries."""
    import csv

    qs = []
    for f in sorted((mmlu / "test").glob("*.csv")):
        with open(f, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                qs.append(f"{row[0]}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer: {row[5]}")
                break  # one a subject, so every subject is in
    dialogues = [f"{d['dialogue']}\nSummary: {d['summary']}" for d in json.loads(DIALOGUES.read_text())[:n]]
    return {"MMLU questions": qs[:n], "dialogues": dialogues}


def distributions(model_dir: Path, device: torch.device, mmlu: Path, n: int, max_len: int) -> dict:
    from transformers import AutoTokenizer

    from lorabench.config import LoRAConfig, ModelConfig
    from lorabench.engines import build_engine

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = ModelConfig.from_hf_json(model_dir / "config.json")
    engines = {p: build_engine("native", cfg, LoRAConfig(), model_dir=model_dir, device=device, precision=p, seed=0)
               for p in ("fp32", "bf16", "fp8")}
    out = {}
    for source, items in texts(mmlu, n).items():
        sums = {k: 0.0 for k in ("kl_bf16_fp8", "kl_fp32_bf16", "kl_fp32_fp8", "top1_fp8_bf16", "top1_fp8_fp32",
                                  "top1_bf16_fp32")}
        tokens = 0
        for text in items:
            ids = torch.tensor([tok(text)["input_ids"][:max_len]], device=device)
            with torch.no_grad():
                logp = {p: torch.log_softmax(e.logits(ids)[0].double(), -1) for p, e in engines.items()}

            def kl(a, b):
                return (logp[a].exp() * (logp[a] - logp[b])).sum(-1).sum().item()

            def top1(a, b):
                return (logp[a].argmax(-1) == logp[b].argmax(-1)).sum().item()

            sums["kl_bf16_fp8"] += kl("bf16", "fp8")
            sums["kl_fp32_bf16"] += kl("fp32", "bf16")
            sums["kl_fp32_fp8"] += kl("fp32", "fp8")
            sums["top1_fp8_bf16"] += top1("fp8", "bf16")
            sums["top1_fp8_fp32"] += top1("fp8", "fp32")
            sums["top1_bf16_fp32"] += top1("bf16", "fp32")
            tokens += ids.shape[1]
        out[source] = {**{k: v / tokens for k, v in sums.items()}, "tokens": tokens, "texts": len(items)}
    return out


def lorabench(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "lorabench"] + args, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"lorabench {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def mmlu_runs(model_dir: Path, device: str, mmlu: Path, per_subject: int, out: Path) -> dict:
    res = {}
    for p in ("bf16", "fp8"):
        d = out / f"mmlu_{p}"
        t = time.time()
        lorabench(["eval", "--model-dir", str(model_dir), "--device", device, "--mmlu", str(mmlu), "--limit",
                   str(per_subject), "--precision", p, "--no-progress", "--run-dir", str(d), "--overwrite"])
        preds = [json.loads(line) for line in (d / "mmlu_predictions.jsonl").read_text().splitlines()]
        res[p] = {"accuracy": sum(q["pred"] == q["gold"] for q in preds) / len(preds), "questions": len(preds),
                  "preds": {(q["subject"], q["index"]): q["pred"] for q in preds}, "seconds": time.time() - t}
    same = sum(res["fp8"]["preds"][k] == v for k, v in res["bf16"]["preds"].items())
    for p in res:
        del res[p]["preds"]
    return {**res, "same_letter": same}


def finetunes(model_dir: Path, device: str, steps: int, seq: int, batch: int, lr: float, out: Path) -> dict:
    res = {}
    for p in ("bf16", "fp8"):
        d = out / f"finetune_{p}"
        lorabench(["run", "--model-dir", str(model_dir), "--data", str(DIALOGUES.parent), "--device", device,
                   "--precision", p, "--max-steps", str(steps), "--epochs", "100", "--seq-len", str(seq),
                   "--batch-size", str(batch), "--lr", str(lr), "--no-mmlu", "--no-progress", "--no-save-adapter",
                   "--run-dir", str(d), "--overwrite"])
        r = json.loads((d / "result.json").read_text())
        loss = r["series"]["loss"]
        res[p] = {"first": loss[0], "last": loss[-1], "last10_mean": sum(loss[-10:]) / 10,
                  "eval_loss": r["metrics"].get("eval_loss"), "steps": len(loss)}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mmlu", type=Path, default=SHARED_MMLU)
    ap.add_argument("--texts", type=int, default=32, help="texts of each source for the distributions")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--questions-per-subject", type=int, default=18, help="57 subjects x this many (18: 1,026)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: distributions, mmlu, finetune")
    ap.add_argument("--out", type=Path, default=Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-fp8-realweights")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    dev = torch.device(a.device)
    result = {"model_dir": str(a.model_dir), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              "cpu (fp8 emulated)", "torch": torch.__version__}
    if "distributions" not in skip:
        result["distributions"] = distributions(a.model_dir, dev, a.mmlu, a.texts, a.max_len)
        print("| text | tokens | KL(bf16 || fp8) | KL(fp32 || bf16) | KL(fp32 || fp8) | top-1 fp8 = bf16 | "
              "fp8 = fp32 | bf16 = fp32 |\n|---|---|---|---|---|---|---|---|")
        for src, r in result["distributions"].items():
            print(f"| {src} | {r['tokens']} | {r['kl_bf16_fp8']:.2e} | {r['kl_fp32_bf16']:.2e} | "
                  f"{r['kl_fp32_fp8']:.2e} | {r['top1_fp8_bf16']:.1%} | {r['top1_fp8_fp32']:.1%} | "
                  f"{r['top1_bf16_fp32']:.1%} |", flush=True)
    if "mmlu" not in skip:
        m = result["mmlu"] = mmlu_runs(a.model_dir, a.device, a.mmlu, a.questions_per_subject, a.out)
        print(f"\nMMLU 5-shot, {m['bf16']['questions']} questions: bf16 {m['bf16']['accuracy']:.2%}, fp8 "
              f"{m['fp8']['accuracy']:.2%} ({100 * (m['fp8']['accuracy'] - m['bf16']['accuracy']):+.2f} points); "
              f"same letter on {m['same_letter']}", flush=True)
    if "finetune" not in skip:
        f = result["finetune"] = finetunes(a.model_dir, a.device, a.steps, a.seq_len, a.batch_size, a.lr, a.out)
        gap = (f["fp8"]["last10_mean"] - f["bf16"]["last10_mean"]) / f["bf16"]["last10_mean"]
        print(f"\nLoRA fine-tune, {f['bf16']['steps']} steps: loss {f['bf16']['first']:.4f} -> mean of the last 10 "
              f"steps bf16 {f['bf16']['last10_mean']:.4f}, fp8 {f['fp8']['last10_mean']:.4f} ({100 * gap:+.2f}%); "
              f"eval loss bf16 {f['bf16']['eval_loss']:.4f}, fp8 {f['fp8']['eval_loss']:.4f}")
    (a.out / "fp8_realweights.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
