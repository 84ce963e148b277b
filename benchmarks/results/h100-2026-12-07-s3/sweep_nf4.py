"""Launch sizes of the NF4 kernels at Llama-2-7B's MLP shapes: bit-exact vs the PyTorch path, time per config;
writes /tmp/sc/sitecustomize.py with the best (where it beats the defaults by >3%)."""
import os, sys, torch
from lorabench.kernels import nf4
from lorabench.kernels.nf4 import quantize_nf4, launch_dequantize, launch_dequantize_fp8, _triton_kernel

def t(fn, n=30):
    for _ in range(3): fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1e3

torch.manual_seed(0)
k, kf = _triton_kernel(), _triton_kernel("dequantize_fp8_kernel")
best = {}
miss = 0
for shape in ((11008, 4096), (4096, 11008)):
    w = (torch.randn(shape, device="cuda") * 0.02 * torch.logspace(-2, 1, shape[0], device="cuda")[:, None]).bfloat16()
    q = quantize_nf4(w)
    args = q.kernel_args()
    want = q.dequantize()
    wq, ws = q.dequantize_fp8()
    torch_us = t(lambda: q.dequantize())
    print(f"{shape}: bf16 PyTorch ops {torch_us:.0f} us")
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    for by in (1024, 2048, 4096, 8192):
        for wp in (2, 4, 8):
            f = lambda: launch_dequantize(k, *args, q.block, q.nested_block, out.view(-1), by, wp)
            out.zero_(); f(); torch.cuda.synchronize()
            d = int((out != want).sum())
            us = t(f)
            miss |= bool(d)
            best.setdefault(("bf16", by, wp), []).append(us)
            print(f"  bf16 bytes={by} warps={wp}: {us:.0f} us {2.5*w.numel()/us/1e3:.0f} GB/s differ={d}")
    o8 = torch.empty(shape, dtype=torch.float8_e4m3fn, device="cuda")
    sc = torch.empty(shape[0], dtype=torch.float32, device="cuda")
    for ch in (256, 512, 1024, 2048):
        for wp in (1, 2, 4, 8):
            f = lambda: launch_dequantize_fp8(kf, *args, q.block, q.nested_block, o8, sc, ch, wp)
            f(); torch.cuda.synchronize()
            d = int((o8.view(torch.uint8) != wq.view(torch.uint8)).sum()) + int((sc != ws).sum())
            us = t(f)
            miss |= bool(d)
            best.setdefault(("e4m3", ch, wp), []).append(us)
            print(f"  e4m3 chunk={ch} warps={wp}: {us:.0f} us {1.5*w.numel()/us/1e3:.0f} GB/s differ={d}")
tot = {key: sum(v) for key, v in best.items()}
b16 = min((k_ for k_ in tot if k_[0] == "bf16"), key=tot.get)
b8 = min((k_ for k_ in tot if k_[0] == "e4m3"), key=tot.get)
d16, d8 = ("bf16", nf4.DEQUANTIZE_BYTES, nf4.DEQUANTIZE_WARPS), ("e4m3", nf4.FP8_ROW_CHUNK, nf4.FP8_ROW_WARPS)
print(f"best bf16 {b16} {tot[b16]:.0f} (default {tot[d16]:.0f}); best e4m3 {b8} {tot[b8]:.0f} (default {tot[d8]:.0f})")
if not miss and (tot[b16] < 0.97 * tot[d16] or tot[b8] < 0.97 * tot[d8]):
    os.makedirs("/tmp/sc", exist_ok=True)
    open("/tmp/sc/sitecustomize.py", "w").write(
        "from lorabench.kernels import nf4\n"
        f"nf4.DEQUANTIZE_BYTES, nf4.DEQUANTIZE_WARPS = {b16[1]}, {b16[2]}\n"
        f"nf4.FP8_ROW_CHUNK, nf4.FP8_ROW_WARPS = {b8[1]}, {b8[2]}\n")
    print("wrote /tmp/sc/sitecustomize.py")
sys.exit(1 if miss else 0)
