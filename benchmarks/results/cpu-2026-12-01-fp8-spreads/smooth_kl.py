"""KL(bf16 || fp8) per token on SmolLM2 with SmoothQuant-style smoothing of the FP8 projections (CPU emulation,
NOTES item 66): each projection's input divided per channel by s = amax(x_k)^a / amax(W_k)^(1-a), its weight
multiplied by s before the per-channel quantize; amax(x_k) from 32 training dialogues (train.json[200:232]) through
the fp8 model. Rows: alpha, which projections, how many, {text kind: (KL, top-1 agreement)}.
Run from the repository root: python benchmarks/results/cpu-2026-12-01-fp8-spreads/smooth_kl.py MODEL_DIR [N]"""
import sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src")); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
import fp8_realweights as R
import lorabench.kernels.fp8 as F
from lorabench.config import LoRAConfig, ModelConfig
from lorabench.engines import build_engine
from transformers import AutoTokenizer
model_dir = Path(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
tok = AutoTokenizer.from_pretrained(model_dir)
cfg = ModelConfig.from_hf_json(model_dir / "config.json")
cpu = torch.device("cpu")
bf16 = build_engine("native", cfg, LoRAConfig(), model_dir=model_dir, device=cpu, precision="bf16", seed=0)
fp8 = build_engine("native", cfg, LoRAConfig(), model_dir=model_dir, device=cpu, precision="fp8", seed=0)
bmods = dict(bf16.model.named_modules())
names = {}  # id(wq) -> name
for name, m in fp8.model.named_modules():
    if getattr(m, "weight_scale", None) is not None:
        names[id(m.weight)] = name
amax = {}
CAL = [True]

SM = {}  # id(wq) -> (1/s, wq', scale')
def setup(alpha, which):
    SM.clear()
    for wid, nm in names.items():
        if which not in ("all",) and not nm.endswith(which):
            continue
        w = bmods[nm].weight.float()
        s = (amax[nm].clamp(min=1e-5) ** alpha) / (w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha))
        q, sc = F.quantize_rows(w * s)
        SM[wid] = (1 / s, q, sc.view(-1))
orig = F._Fp8Linear.forward
def forward(ctx, x, wq, w_scale, grad_dtype):
    if CAL[0]:
        nm = names[id(wq)]; a = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(0)
        amax[nm] = torch.maximum(amax[nm], a) if nm in amax else a
    if id(wq) not in SM:
        return orig(ctx, x, wq, w_scale, grad_dtype)
    inv, q, sc = SM[id(wq)]
    lead = x.shape[:-1]
    xq, xs = F.quantize_rows(x.reshape(-1, x.shape[-1]), multiplier=inv)
    y = F.scaled_mm(xq, xs, q, sc, x.dtype)
    ctx.save_for_backward(wq, w_scale); ctx.grad_dtype = grad_dtype
    return y.view(*lead, wq.shape[0])
F._Fp8Linear.forward = staticmethod(forward)
import json as J
cal = [f"{d['dialogue']}\nSummary: {d['summary']}" for d in J.loads(R.DIALOGUES.read_text())[200:232]]
with torch.no_grad():
    for t in cal:
        fp8.logits(torch.tensor([tok(t)["input_ids"][:256]]))
CAL[0] = False
print("calibrated", len(amax))
for k in list(amax)[:7] + [k for k in amax if k.startswith("layers.10.")]:
    a = amax[k]; print(k, "act amax max/median", round((a.max()/a.median()).item(),1))
texts = R.texts(R.SHARED_MMLU, n)
ids = {src: [torch.tensor([tok(t)["input_ids"][:256]]) for t in items] for src, items in texts.items()}
refs = {src: [torch.log_softmax(bf16.logits(i)[0].double(), -1) for i in v] for src, v in ids.items()}
def kl():
    out = {}
    with torch.no_grad():
        for src in ids:
            s, tk, agree = 0.0, 0, 0
            for i, ref in zip(ids[src], refs[src]):
                lp = torch.log_softmax(fp8.logits(i)[0].double(), -1)
                s += (ref.exp() * (ref - lp)).sum().item(); tk += i.shape[1]
                agree += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
            out[src] = (round(s / tk, 5), round(agree / tk, 4))
    return out
for alpha, which in [(0, "none"), (0.5, "down_proj"), (0.5, "all"), (0.3, "all"), (0.7, "all"), (0.5, "o_proj")]:
    setup(alpha, which)
    print(alpha, which, len(SM), kl(), flush=True)
