"""``--packing documents`` against FlagPerf's packing on one GPU: correctness of the GPU path, then tok/s.

    PYTHONPATH=src python benchmarks/documents_packing.py [--model llama2-7b] [--seq-len 4096] [--batch-size 2]
        [--steps 12] [--rounds 2] [--out DIR]

1. Check: a small Llama shape in fp32 on the GPU, documents packing (FlexAttention with a block mask there)
   against the same chunks on the CPU (SDPA with a dense mask, which the tests check against transformers): the
   loss and every adapter gradient, relative to their size.
2. Speed: ``lorabench run --init random`` over a folder holding the shape's config.json and the bundled tokenizer,
   on records made from the bundled dialogues (repeated with a counter so no two are alike), once per packing mode
   and round, the modes alternating; prints each round's tok/s and the ratio documents / flagperf per round.
The tok/s of both modes count every token of the chunks (the same chunks: only attention and positions differ).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorabench.assets import TINY_DATA, TINY_MODEL  # noqa: E402
from lorabench.cli import main as lorabench  # noqa: E402
from lorabench.config import MODEL_PRESETS, LoRAConfig, ModelConfig  # noqa: E402


def check_gpu_path() -> dict:
    """fp32 loss and adapter gradients of one documents-packed batch, the same weights everywhere: CUDA (flex;
    compiled blocks and eager) vs CPU (dense mask)."""
    from lorabench.data.packing import pack_documents
    from lorabench.engines import build_engine
    from lorabench.train import batch_tensors

    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    g = np.random.default_rng(0)
    data = pack_documents([g.integers(3, 512, size=int(k)).tolist() for k in g.integers(5, 300, size=40)],
                          None, 512)[:2]
    out, weights = {}, None
    from lorabench.engines import NativeOptions

    for key, dev, compiled in (("cpu", "cpu", False), ("cuda", "cuda", True), ("cuda_eager", "cuda", False)):
        eng = build_engine("native", cfg, LoRAConfig(r=8, alpha=16, dropout=0.0), model_dir=None,
                           device=torch.device(dev), precision="fp32", seed=0,
                           native=NativeOptions(compile=compiled))
        with torch.no_grad():
            if weights is None:  # (random weights come from each device's own generator: the CPU's, copied)
                for _, b in eng.adapters().values():
                    b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
                weights = {k: v.detach().clone() for k, v in eng.model.state_dict().items()}
            else:
                eng.model.load_state_dict(weights)
        ids, labels, _, extra = batch_tensors(data, torch.device(dev))
        loss = eng.loss(ids, labels, **extra)
        loss.backward()
        out[key] = (loss.item(), [p.grad.detach().cpu().double() for p in eng.trainable_params()])
    res = {"loss_cpu": out["cpu"][0]}
    for key in ("cuda", "cuda_eager"):
        res[f"{key}_loss_rel_err"] = abs(out[key][0] - out["cpu"][0]) / out["cpu"][0]
        res[f"{key}_grad_rel_err_max"] = max(((a - b).norm() / b.norm()).item()
                                             for a, b in zip(out[key][1], out["cpu"][1]))
    return res


def make_inputs(model: str, n_copies: int, where: Path) -> tuple[Path, Path]:
    """A model folder (the shape's config.json + the bundled tokenizer) and a JSONL of distinct dialogues."""
    mdir = where / f"{model}-config"
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "config.json").write_text(json.dumps(MODEL_PRESETS[model].to_hf_dict()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(TINY_MODEL) / name, mdir / name)
    rows = json.loads((Path(TINY_DATA) / "train.json").read_text())
    data = where / "dialogues.jsonl"
    with open(data, "w") as f:
        for c in range(n_copies):
            for r in rows:
                f.write(json.dumps({"dialogue": f"{r['dialogue']}\n(copy {c})", "summary": r["summary"]}) + "\n")
    return mdir, data


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--untimed-steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--copies", type=int, default=12, help="times the 600 bundled dialogues are repeated")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-documents")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not a.skip_check:
        result["check"] = check_gpu_path()
        print("check (fp32, CUDA flex vs CPU dense mask):", json.dumps(result["check"]), flush=True)
    mdir, data = make_inputs(a.model, a.copies, a.out)
    rows = {"flagperf": [], "documents": []}
    for rnd in range(a.rounds):
        for mode in rows:
            d = a.out / f"{mode}_round{rnd + 1}"
            code = lorabench(["run", "--init", "random", "--model-dir", str(mdir), "--data", str(data),
                              "--val-fraction", "0.01", "--preset", a.precision, "--batch-size", str(a.batch_size),
                              "--seq-len", str(a.seq_len), "--max-steps", str(a.steps), "--untimed-steps",
                              str(a.untimed_steps), "--packing", mode, "--no-mmlu", "--no-save-adapter",
                              "--no-progress", "--eval-batches", "0", "--cache-dir", str(a.out / "cache"),
                              "--run-dir", str(d), "--overwrite"])
            r = json.loads((d / "result.json").read_text()) if code == 0 else None
            rows[mode].append(None if r is None else {"tok_s": r["metrics"]["tokens_per_s_per_chip"],
                                                       "peak_gib": r["metrics"]["peak_mem_allocated_gib"],
                                                       "loss": r["series"]["loss"][-1]})
            print(f"round {rnd + 1} {mode}: {rows[mode][-1]}", flush=True)
    ratios = [d["tok_s"] / f["tok_s"] for f, d in zip(rows["flagperf"], rows["documents"]) if f and d]
    result.update({"model": a.model, "seq_len": a.seq_len, "batch_size": a.batch_size, "precision": a.precision,
                   "rows": rows, "ratios": ratios})
    if ratios:
        print(f"documents / flagperf tok/s per round: {', '.join(f'{x:.3f}' for x in ratios)} (median "
              f"{statistics.median(ratios):.3f})")
    (a.out / "documents_packing.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
