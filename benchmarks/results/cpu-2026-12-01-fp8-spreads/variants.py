"""The spreads' fine-tune (run.sh: SmolLM2-135M-Instruct, seed LoRA, seq 128, LBS 4, lr 1e-4, 200 steps, shuffled
by --seed) in fp8 variants the engine does not have, CPU emulation, for NOTES item 63:

- block: weights per 128 x 128 block, activations and input gradients per 1 x 128 group (cuBLASLt's blockwise
  scheme; benchmarks/fp8_blocks.py);
- down-bf16: the engine's per-channel FP8 everywhere but down_proj, which stays bf16 (its input, SwiGLU's output,
  is where trained models keep their largest activations).
- smooth: every projection's input divided per channel by s = amax(x_k)^0.5 / amax(W_k)^0.5 before its per-row
  quantize and the weight multiplied by s before its per-channel quantize (SmoothQuant's migration), amax(x_k)
  calibrated once on 32 training dialogues (train.json[200:232]) through the fp8 model; the input gradient is
  (dy W') / s.
- down-e5m2: the engine's scheme, but down_proj's input (SwiGLU's output) quantized to e5m2 instead of e4m3 (two
  exponent bits more range below each row's largest value, one mantissa bit less); the gradient as the engine's.
- ends-bf16: the engine's scheme, but every projection of the first and the last decoder block in bf16 (the
  blocks quantization studies find most sensitive).
- ends-down-bf16: ends-bf16 and down-bf16 together.
- fwd-only: the engine's FP8 forward, the input gradient in bf16 through the dequantized weight (Unsloth's
  load_in_fp8 scheme): which direction the fine-tune's gap comes from.

Run from the repository root:
    python benchmarks/results/cpu-2026-12-01-fp8-spreads/variants.py MODEL_DIR VARIANT SEED OUT.json
"""
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402

import fp8_blocks as B  # noqa: E402
import lorabench.engines.native as N  # noqa: E402
import lorabench.kernels.fp8 as F  # noqa: E402
from lorabench.checkpoint import native_to_hf  # noqa: E402
from lorabench.cli import main  # noqa: E402

model_dir, variant, seed, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
WEIGHT = {}  # id(stored FP8 weight) -> what the variant computes with instead
engine_fp8 = F._Fp8Linear


class ForwardOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, w_scale):
        xq, xs = F.quantize_rows(x.reshape(-1, x.shape[-1]))
        ctx.save_for_backward(wq, w_scale)
        return F.scaled_mm(xq, xs, wq, w_scale, x.dtype).view(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, gy):
        wq, w_scale = ctx.saved_tensors
        return gy @ F.dequantize(wq, w_scale).to(gy.dtype), None, None


class Smooth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inv, wq, w_scale, grad_dtype):
        xq, xs = F.quantize_rows(x.reshape(-1, x.shape[-1]), multiplier=inv)
        ctx.save_for_backward(inv, wq, w_scale)
        ctx.grad_dtype = grad_dtype
        return F.scaled_mm(xq, xs, wq, w_scale, x.dtype).view(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, gy):
        inv, wq, w_scale = ctx.saved_tensors
        gq, gs = F.quantize_rows(gy.reshape(-1, gy.shape[-1]), ctx.grad_dtype, multiplier=w_scale)
        ones = torch.ones(wq.shape[1], dtype=torch.float32)
        gx = F.scaled_mm(gq, gs, wq.t().contiguous(), ones, torch.float32) * inv
        return gx.to(gy.dtype).view(*gy.shape[:-1], wq.shape[1]), None, None, None, None


class InputE5M2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, w_scale, grad_dtype):
        xq, xs = F.quantize_rows(x.reshape(-1, x.shape[-1]), torch.float8_e5m2)
        ctx.save_for_backward(wq, w_scale)
        ctx.grad_dtype = grad_dtype
        return F.scaled_mm(xq, xs, wq, w_scale, x.dtype).view(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, gy):
        wq, w_scale = ctx.saved_tensors
        gq, gs = F.quantize_rows(gy.reshape(-1, gy.shape[-1]), ctx.grad_dtype, multiplier=w_scale)
        ones = torch.ones(wq.shape[1], dtype=torch.float32)
        gx = F.scaled_mm(gq, gs, wq.t().contiguous(), ones, gy.dtype)
        return gx.view(*gy.shape[:-1], wq.shape[1]), None, None, None


AMAX = {}  # id(stored FP8 weight) -> per-channel amax of its input, while calibrating


class Variant:
    """Stands in for kernels.fp8._Fp8Linear, which every FP8 projection calls through fp8_linear."""

    @staticmethod
    def apply(x, wq, w_scale, grad_dtype):
        if variant == "fwd-only":
            return ForwardOnly.apply(x, wq, w_scale)
        if variant == "smooth" and not WEIGHT:  # calibrating
            a = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(0)
            AMAX[id(wq)] = torch.maximum(AMAX[id(wq)], a) if id(wq) in AMAX else a
        if id(wq) not in WEIGHT:
            return engine_fp8.apply(x, wq, w_scale, grad_dtype)
        w = WEIGHT[id(wq)]
        if variant == "block":
            return B.block_linear(x, *w, grad_dtype)
        if variant == "smooth":
            return Smooth.apply(x, *w, grad_dtype)
        if variant == "down-e5m2":
            return InputE5M2.apply(x, wq, w_scale, grad_dtype)
        return torch.nn.functional.linear(x, w)  # down-bf16


orig_init = N.NativeEngine.__init__


def init(self, *a, **k):
    orig_init(self, *a, **k)
    from safetensors.torch import load_file
    sd = load_file(str(Path(self.model_dir) / "model.safetensors"))
    if variant == "smooth":
        import json

        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(self.model_dir)
        rows = json.loads((ROOT / "src/lorabench/assets/samsum-tiny/train.json").read_text())[200:232]
        with torch.no_grad():
            for d in rows:
                self.logits(torch.tensor([tok(f"{d['dialogue']}\nSummary: {d['summary']}")["input_ids"][:256]]))
    for name, m in self.model.named_modules():
        if getattr(m, "weight_scale", None) is None:
            continue
        w = sd[native_to_hf(name) + ".weight"]
        if variant == "block":
            WEIGHT[id(m.weight)] = B.quantize_weight_blocks(w.float())
        elif variant == "smooth":
            sm = (AMAX[id(m.weight)].clamp(min=1e-5) / w.float().abs().amax(0).clamp(min=1e-5)).sqrt()
            q, sc = F.quantize_rows(w.float() * sm)
            WEIGHT[id(m.weight)] = (1 / sm, q, sc.view(-1))
        elif variant == "down-bf16" and name.endswith("down_proj"):
            WEIGHT[id(m.weight)] = w.to(torch.bfloat16)
        elif variant in ("ends-bf16", "ends-down-bf16") and \
                name.split(".")[1] in ("0", str(len(self.model.layers) - 1)):
            WEIGHT[id(m.weight)] = w.to(torch.bfloat16)
        elif variant == "ends-down-bf16" and name.endswith("down_proj"):
            WEIGHT[id(m.weight)] = w.to(torch.bfloat16)
        elif variant == "down-e5m2" and name.endswith("down_proj"):
            WEIGHT[id(m.weight)] = True  # marks the projection; its stored FP8 weight is used as it is
    assert WEIGHT or variant == "fwd-only", "no projection replaced"


N.NativeEngine.__init__ = init
F._Fp8Linear = Variant
run_dir = Path(f"/tmp/variant_{variant}_{seed}")
rc = main(["run", "--model-dir", model_dir, "--data", str(ROOT / "src" / "lorabench" / "assets" / "samsum-tiny"),
           "--device", "cpu", "--precision", "fp8", "--max-steps", "200", "--epochs", "100", "--seq-len", "128",
           "--batch-size", "4", "--lr", "1e-4", "--seed", seed, "--no-mmlu", "--no-progress", "--no-save-adapter",
           "--no-tensorboard", "--run-dir", str(run_dir), "--overwrite"])
if rc == 0:
    shutil.copy(run_dir / "result.json", out)
sys.exit(rc)
