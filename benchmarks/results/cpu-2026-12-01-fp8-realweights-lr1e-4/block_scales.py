"""KL(bf16||fp8) on SmolLM2 with the forward's activations quantized per 1 x BLK block instead of per row (CPU
emulation; NOTES item 43). Run from the repository root: python block_scales.py row | block 64 | block 32."""
import sys, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src")); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
import lorabench.kernels.fp8 as F
mode = sys.argv[1]
BLK = int(sys.argv[2]) if len(sys.argv) > 2 else 128
if mode == "block":
    def forward(ctx, x, wq, w_scale, grad_dtype):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        M, K = x2.shape
        xb = x2.reshape(M, K // BLK, BLK)
        q, s = F.quantize_rows(xb)  # per block
        # emulated 1xBLK x (per-channel) GEMM: sum over blocks of fp32 products, each scaled by its block's scale
        prod = torch.einsum("mbk,nbk->mbn", q.float(), wq.float().reshape(wq.shape[0], K // BLK, BLK))
        y = ((prod * s).sum(1) * w_scale.view(1, -1)).to(x.dtype)
        ctx.save_for_backward(wq, w_scale); ctx.grad_dtype = grad_dtype
        return y.view(*lead, wq.shape[0])
    F._Fp8Linear.forward = staticmethod(forward)
import fp8_realweights as R
from pathlib import Path
r = R.distributions(Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/smollm2"), torch.device("cpu"), R.SHARED_MMLU, 16, 256)
print(mode, BLK, json.dumps({k: {m: round(v, 5) if isinstance(v, float) else v for m, v in d.items()} for k, d in r.items()}))
