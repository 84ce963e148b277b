import sys, time, torch
from lorabench.kernels.nf4 import quantize_nf4
t0 = time.time()
torch.manual_seed(5)
bad = 0
for shape in ((11008, 4096), (4096, 11008)):
    w = torch.randn(shape, device="cuda") * 0.02 * torch.logspace(-2, 1, shape[0], device="cuda")[:, None]
    q = quantize_nf4(w.bfloat16())
    d = int((q.dequantize(kernel=True) != q.dequantize()).sum())
    (gq, gs), (wq, ws) = q.dequantize_fp8(kernel=True), q.dequantize_fp8()
    c, s = int((gq.view(torch.uint8) != wq.view(torch.uint8)).sum()), int((gs != ws).sum())
    print(f"{shape}: bf16 kernel {d} differ; e4m3 kernel {c} codes, {s} scales differ")
    bad += d + c + s
q = quantize_nf4((torch.randn(11008, 4096, device="cuda") * 0.02).bfloat16())
for name, fn, nb in (("-> bf16 kernel", lambda: q.dequantize(kernel=True), 2.5), ("-> bf16 torch", lambda: q.dequantize(), 2.5),
                     ("-> e4m3 kernel", lambda: q.dequantize_fp8(kernel=True), 1.5)):
    for _ in range(3): fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20): fn()
    b.record(); torch.cuda.synchronize()
    us = a.elapsed_time(b) / 20 * 1e3
    print(f"{name}: {us:.0f} us, {nb * 11008 * 4096 / us / 1e3:.0f} GB/s")
print(f"check took {time.time() - t0:.0f} s")
sys.exit(1 if bad else 0)
