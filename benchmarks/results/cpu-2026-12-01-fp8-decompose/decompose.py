"""KL(bf16 || variant) on SmolLM2 with FP8 applied to the weights only (per output channel as stored, or from the bf16
weights per row, per 1 x 128 / 32 / 16 block along K, per 128 x 128 block; a partial last block padded with zeros), to the activations only (per token), or to both (the fp8 engine as it is), CPU emulation (benchmarks/NOTES.md item 57). Run from the repository root:
python benchmarks/results/cpu-2026-12-01-fp8-decompose/decompose.py [MODEL_DIR] [TEXTS]"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src")); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402

import fp8_realweights as R  # noqa: E402
import lorabench.kernels.fp8 as F  # noqa: E402
from lorabench.config import LoRAConfig, ModelConfig  # noqa: E402
from lorabench.engines import build_engine  # noqa: E402

model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
from transformers import AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(model_dir)
cfg = ModelConfig.from_hf_json(model_dir / "config.json")
cpu = torch.device("cpu")
bf16 = build_engine("native", cfg, LoRAConfig(), model_dir=model_dir, device=cpu, precision="bf16", seed=0)
fp8 = build_engine("native", cfg, LoRAConfig(), model_dir=model_dir, device=cpu, precision="fp8", seed=0)
plain = {}  # id of an FP8 weight -> the bf16 weight of the same projection
bmods = dict(bf16.model.named_modules())
for name, m in fp8.model.named_modules():
    if getattr(m, "weight_scale", None) is not None:
        plain[id(m.weight)] = bmods[name].weight
assert plain, "no FP8 projections found"
MODE = ["full"]
original = F._Fp8Linear.forward


def forward(ctx, x, wq, w_scale, grad_dtype):
    if MODE[0] == "full":
        return original(ctx, x, wq, w_scale, grad_dtype)
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if MODE[0] == "weights":  # the activations as they are, the weights as stored in FP8
        y = x2.float() @ F.dequantize(wq, w_scale).t()
    elif MODE[0].startswith("weights-"):  # from the bf16 weight: a scale per row, per 1 x BLK or BLK x BLK block
        w = plain[id(wq)].float()
        kind = MODE[0][8:].removesuffix("+acts")
        blk = w.shape[1] if kind == "rows" else int(kind.split("x")[-1])
        rows = blk if "x" in kind else 1
        n, k = w.shape
        wp = torch.nn.functional.pad(w, (0, -k % blk, 0, -n % rows))  # zeros pad the last blocks, exactly
        tiles = wp.reshape(wp.shape[0] // rows, rows, -1, blk).transpose(1, 2)  # [N/rows, K/blk, rows, blk]
        q, s = F.quantize_rows(tiles.reshape(*tiles.shape[:2], -1))
        deq = (q.float() * s).reshape(tiles.shape).transpose(1, 2).reshape(wp.shape)[:n, :k]
        if MODE[0].endswith("+acts"):  # and the activations per token, as the engine does
            xq, xs = F.quantize_rows(x2)
            y = (xq.float() * xs) @ deq.t()
        else:
            y = x2.float() @ deq.t()
    else:  # "acts": the activations quantized per row, the weights in bf16
        q, s = F.quantize_rows(x2)
        y = (q.float() * s) @ plain[id(wq)].float().t()
    ctx.save_for_backward(wq, w_scale)
    ctx.grad_dtype = grad_dtype
    return y.to(x.dtype).view(*lead, wq.shape[0])


F._Fp8Linear.forward = staticmethod(forward)
out = {}
for source, items in R.texts(R.SHARED_MMLU, n).items():
    sums, tokens = {m: 0.0 for m in ("full", "weights", "weights-rows", "weights-128", "weights-128x128", "weights-32", "weights-16",
                                      "acts", "weights-rows+acts", "weights-128x128+acts")}, 0
    for text in items:
        ids = torch.tensor([tok(text)["input_ids"][:256]])
        with torch.no_grad():
            ref = torch.log_softmax(bf16.logits(ids)[0].double(), -1)
            for m in sums:
                MODE[0] = m
                lp = torch.log_softmax(fp8.logits(ids)[0].double(), -1)
                sums[m] += (ref.exp() * (ref - lp)).sum().item()
        tokens += ids.shape[1]
    out[source] = {**{f"kl_bf16_{m}": round(v / tokens, 5) for m, v in sums.items()}, "tokens": tokens}
print(json.dumps(out))
