"""GPU numerics check: each custom op and the compiled native engine against plain PyTorch on the device.

Prints relative errors per dtype (CPU tests cover fp32/bf16/fp16 on the CPU; this runs the same comparisons with
CUDA kernels, Inductor-generated code and cuBLAS) and exits 1 if any exceeds its bound in ``LIMITS``:

    PYTHONPATH=src python benchmarks/gpu_check.py [check ...]   (all by default; names at the bottom)
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from lorabench.config import LoRAConfig, ModelConfig
from lorabench.data.synthetic import synthetic_chunks
from lorabench.engines import NativeOptions, build_engine
from lorabench.kernels.cross_entropy import frozen_head_cross_entropy
from lorabench.kernels.fp8 import GRAD_FORMATS, fp8_linear, quantize_rows
from lorabench.precision import get_precision

LIMITS = {
    # (check, dtype, quantity): largest relative error (norm) allowed. Each is about 4x what an H200 measured
    # (2026-11-28, benchmarks/results/h200-2026-11-28-s3 and -s4): the bound says "as before", not "anything".
    ("cross_entropy", "float32", "loss"): 1e-6, ("cross_entropy", "float32", "dh"): 2e-5,      # 8.5e-8, 1.9e-6
    ("cross_entropy", "bfloat16", "loss"): 5e-5, ("cross_entropy", "bfloat16", "dh"): 1e-2,    # 2.9e-6, 2.4e-3
    ("cross_entropy", "float16", "loss"): 1e-5, ("cross_entropy", "float16", "dh"): 1.2e-2,    # 5.1e-7, 3.0e-3
    ("prefix_attention", "bfloat16", "out"): 1.6e-2, ("prefix_attention", "float16", "out"): 2e-3,  # 4.0e-3, 5.0e-4
    ("compiled_engine", "fp32", "loss"): 1e-6, ("compiled_engine", "fp32", "grad"): 2e-5,  # 0, 3.8e-6
    ("compiled_engine", "tf32", "loss"): 1e-5, ("compiled_engine", "tf32", "grad"): 5e-3,  # 1.35e-6, 1.3e-3
    ("compiled_engine", "bf16", "loss"): 5e-5, ("compiled_engine", "bf16", "grad"): 5e-2,  # 9.0e-6, 1.3e-2
    # FP8 (H200, 2026-12-01, two machines; benchmarks/NOTES.md item 38). cuBLASLt's kernel vs its emulation differs
    # by the order of the fp32 sums, so by one bf16 rounding of an output where a sum crosses a rounding boundary:
    # measured 5.9-7.1e-4 fwd, 7.0-8.5e-4 dx, bound ~4x. Against plain bf16 the error is e4m3's own (3 mantissa
    # bits; REFERENCE 6b: 3.7e-2 for one product of Gaussians), not noise: measured 3.7-4.0e-2 fwd, 3.5-5.6e-2 dx
    # (e4m3, e5m2), bound 1.5x. The compiled fp8 engine vs the fp32 reference: loss 4.1e-5, grad 1.5e-1.
    ("fp8_gemm", "kernel", "fwd"): 3e-3, ("fp8_gemm", "kernel", "dx"): 3.5e-3,
    ("fp8_gemm", "vs bf16", "fwd"): 6e-2, ("fp8_gemm", "vs bf16", "dx"): 8e-2,
    ("compiled_engine", "fp8", "loss"): 2e-4, ("compiled_engine", "fp8", "grad"): 2e-1,
}
MISSES: list[str] = []


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def within(check: str, dtype: str, quantity: str, err: float, where: str) -> str:
    """``err`` formatted, with a miss recorded (and marked) if it exceeds LIMITS."""
    limit = LIMITS[(check, dtype, quantity)]
    if not err <= limit:  # NaN misses too
        MISSES.append(f"{check} {dtype} {quantity} {where}: {err:.2e} > {limit:.0e}")
        return f"{err:.2e} **MISS** (> {limit:.0e})"
    return f"{err:.2e}"


def check_cross_entropy(dev):
    print("| op | dtype | shape | loss rel err | dh rel err |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, c, v in ((4096, 4096, 32000), (1001, 512, 50257)):
            h0 = torch.randn(n, c, device=dev).to(dtype)
            w = (torch.randn(v, c, device=dev) * 0.02).to(dtype)
            labels = torch.randint(0, v, (n,), device=dev)
            labels[::7] = -100
            h1, h2 = h0.clone().requires_grad_(), h0.double().requires_grad_()
            ours = frozen_head_cross_entropy(h1, w, labels)
            ref = F.cross_entropy(h2 @ w.double().t(), labels, ignore_index=-100)  # float64 reference
            ours.backward()
            ref.backward()
            d, where = str(dtype)[6:], f"{n}x{c}x{v}"
            print(f"| frozen-head CE | {d} | {where} | {within('cross_entropy', d, 'loss', rel(ours, ref), where)} | "
                  f"{within('cross_entropy', d, 'dh', rel(h1.grad, h2.grad), where)} |")


def check_prefix_attention(dev):
    """MMLU's attention to a cached prefix on the device: SDPA over per-row copies (the default) and the flash
    split merged by log-sum-exp (kernels.attention.prefix_suffix_attention), each against float64."""
    from lorabench.kernels.attention import prefix_suffix_attention

    print("\n| prefix attention | dtype | B x T after P | rel err vs float64 |\n|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16):
        for B, T, P in ((37, 101, 613), (2, 11, 19)):
            q = torch.randn(B, 32, T, 128, device=dev)
            k, v = torch.randn(B, 32, T, 128, device=dev), torch.randn(B, 32, T, 128, device=dev)
            kp, vp = torch.randn(1, 32, P, 128, device=dev), torch.randn(1, 32, P, 128, device=dev)
            mask = torch.ones(T, P + T, dtype=torch.bool, device=dev).tril(diagonal=P)
            keys = torch.cat((kp.expand(B, -1, -1, -1), k), 2)
            values = torch.cat((vp.expand(B, -1, -1, -1), v), 2)
            want = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), attn_mask=mask)
            low = [t.to(dtype) for t in (q, k, v, kp, vp, keys, values)]
            copy = F.scaled_dot_product_attention(low[0], low[5], low[6], attn_mask=mask)
            split = prefix_suffix_attention(*low[:5], 1)
            for name, got in (("copy (SDPA, mask)", copy), ("split (flash + log-sum-exp)", split)):
                d, where = str(dtype)[6:], f"{name} {B}x{T} after {P}"
                print(f"| {name} | {d} | {B} x {T} after {P} | "
                      f"{within('prefix_attention', d, 'out', rel(got, want), where)} |")


def check_dropout_masks(dev):
    """The Triton philox16 mask (packed bits, unpacked here) against its plain-PyTorch reference (bit for bit: the
    kernel's seed is the next draw of torch's CPU generator), its rate, and each mask kernel's time at the adapters'
    bf16 LBS 16 shape."""
    from lorabench.kernels.dropout import MASK_IMPLS, keep_mask, philox_keep_mask, unpack_mask

    print("\n| mask | shape | p | elements differing from the reference | kept |\n|---|---|---|---|---|")
    for shape in ((8192, 4096), (3, 5, 1999)):
        for p in (0.05, 0.5):
            torch.manual_seed(7)
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            torch.manual_seed(7)
            got = unpack_mask(keep_mask(torch.empty(shape, device=dev, dtype=torch.bfloat16), p, "philox16"),
                              shape).cpu()
            want = philox_keep_mask(shape, p, seed)
            differ, kept = int((got != want).sum()), got.float().mean().item()
            sd = (p * (1 - p) / got.numel()) ** 0.5
            if differ or abs(kept - (1 - p)) > 5 * sd + 2 ** -16:  # p is kept to 1/65536
                MISSES.append(f"dropout_masks {shape} p {p}: {differ} elements differ, kept {kept:.5f}")
            print(f"| philox16 | {shape} | {p} | {differ} | {kept:.5f} |")
    x = torch.empty(8192, 4096, device=dev, dtype=torch.bfloat16)
    print("\n| mask | us per [8192, 4096] |\n|---|---|")
    for impl in MASK_IMPLS:
        for _ in range(3):
            keep_mask(x, 0.05, impl)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            keep_mask(x, 0.05, impl)
        end.record()
        torch.cuda.synchronize()
        print(f"| {impl} (eager) | {start.elapsed_time(end) / 50 * 1e3:.1f} |")


def _emulated(a, a_scale, b, b_scale):
    """The FP8 GEMM as kernels/fp8.py defines it, in fp32 on the device (TF32 off): a b^T * scales, bf16."""
    return ((a.float() @ b.float().t()) * a_scale * b_scale.view(1, -1)).bfloat16()


def check_fp8_gemm(dev):
    """cuBLASLt's rowwise FP8 GEMMs (fp8_linear's forward and input gradient) against their emulation, and the
    FP8 projection against the bf16 one, at Llama-2-7B shapes and odd token counts."""
    print("\n| shape M x K -> N | grad | fwd vs emulation | dx vs emulation | fwd vs bf16 | dx vs bf16 |\n"
          "|---|---|---|---|---|---|")
    for m, k, n in ((8192, 4096, 4096), (1001, 4096, 11008), (7, 11008, 4096)):
        x = torch.randn(m, k, device=dev).bfloat16()
        w = (torch.randn(n, k, device=dev) * 0.02).bfloat16()
        w[3] *= 40  # an outlier row: its own scale
        g = torch.randn(m, n, device=dev).bfloat16()
        wq, ws = quantize_rows(w)
        ws = ws.view(-1)
        for fmt, dt in GRAD_FORMATS.items():
            xi = x.clone().requires_grad_()
            y = fp8_linear(xi, wq, ws, dt)
            y.backward(g)
            xq, xs = quantize_rows(x)
            y_emu = _emulated(xq, xs, wq, ws)
            gq, gs = quantize_rows(g, dt, multiplier=ws)
            dx_emu = _emulated(gq, gs, wq.t().contiguous(), torch.ones(k, device=dev))
            y_bf, dx_bf = x.float() @ w.float().t(), g.float() @ w.float()
            where = f"{m}x{k}->{n} {fmt}"
            print(f"| {m} x {k} -> {n} | {fmt} | {within('fp8_gemm', 'kernel', 'fwd', rel(y, y_emu), where)} | "
                  f"{within('fp8_gemm', 'kernel', 'dx', rel(xi.grad, dx_emu), where)} | "
                  f"{within('fp8_gemm', 'vs bf16', 'fwd', rel(y, y_bf), where)} | "
                  f"{within('fp8_gemm', 'vs bf16', 'dx', rel(xi.grad, dx_bf), where)} |")


def check_fp8_blocks(dev):
    """cuBLASLt's blockwise FP8 GEMMs (benchmarks/fp8_blocks.py: 1 x 128 activation groups by 128 x 128 weight
    blocks) against their emulation and against bf16, at Llama-2-7B shapes (11008 = 86 blocks), odd token counts and
    SmolLM2-135M's sizes (576, 192: partial blocks), with the block scales as torch checks them and as cuBLASLt reads
    them (``padded_ld``). The bounds are the rowwise ones (LIMITS' fp8_gemm): the kernel may differ from the
    emulation only in its fp32 sums' order, and from bf16 by e4m3's own error."""
    from fp8_blocks import block_linear, dequantize_blocks, dequantize_groups, quantize_groups, quantize_weight_blocks

    print("\n| blockwise M x K -> N | scales | grad | fwd vs emulation | dx vs emulation | fwd vs bf16 | dx vs bf16 |\n"
          "|---|---|---|---|---|---|---|")
    for m, k, n in ((8192, 4096, 4096), (1001, 4096, 11008), (7, 11008, 4096), (8190, 576, 192), (33, 1536, 576)):
        x = torch.randn(m, k, device=dev).bfloat16()
        w = (torch.randn(n, k, device=dev) * 0.02).bfloat16()
        w[3] *= 40  # an outlier row: its blocks' own scales
        g = torch.randn(m, n, device=dev).bfloat16()
        wq, ws = quantize_weight_blocks(w)
        w_deq = dequantize_blocks(wq, ws)
        y_emu = (dequantize_groups(*quantize_groups(x)) @ w_deq.t()).bfloat16()
        dx_emus = {fmt: (dequantize_groups(*quantize_groups(g, dt)) @ w_deq).bfloat16()
                   for fmt, dt in GRAD_FORMATS.items()}
        y_bf, dx_bf = x.float() @ w.float().t(), g.float() @ w.float()
        for padded_ld in (False, True):
            for fmt, dt in GRAD_FORMATS.items():
                where = f"blockwise {m}x{k}->{n} {'padded' if padded_ld else 'plain'} {fmt}"
                xi = x.clone().requires_grad_()
                y = block_linear(xi, wq, ws, dt, padded_ld)
                y.backward(g)
                dx_emu = dx_emus[fmt]
                print(f"| {m} x {k} -> {n} | {'padded' if padded_ld else 'plain'} | {fmt} | "
                      f"{within('fp8_gemm', 'kernel', 'fwd', rel(y, y_emu), where)} | "
                      f"{within('fp8_gemm', 'kernel', 'dx', rel(xi.grad, dx_emu), where)} | "
                      f"{within('fp8_gemm', 'vs bf16', 'fwd', rel(y, y_bf), where)} | "
                      f"{within('fp8_gemm', 'vs bf16', 'dx', rel(xi.grad, dx_bf), where)} |")


def check_compiled_engine(dev):
    cfg = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
    lora = LoRAConfig(dropout=0.0)
    data = torch.from_numpy(synthetic_chunks(8, 512, cfg.vocab_size)).long().to(dev)
    print("\n| dtype | engine | loss | rel err vs reference (fp32 eager) | adapter grad rel err |\n"
          "|---|---|---|---|---|")
    base = build_engine("reference", cfg, lora, model_dir=None, device=dev, precision="fp32", seed=0)
    for m in base.adapters().values():
        with torch.no_grad():
            m[1].normal_(0, 0.01, generator=torch.Generator(device=dev).manual_seed(1))
    ref_adapters = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in base.adapters().items()}
    ref_loss = base.loss(data[:4], data[:4])
    ref_loss.backward()
    ref_grad = torch.cat([p.grad.flatten() for p in base.trainable_params()])
    variants = [(p, compile_, "sdpa", False) for p in ("fp32", "bf16") for compile_ in (False, True)]
    variants += [("fp32", True, "matmul", False), ("tf32", True, "matmul", True), ("bf16", True, "cudnn", False),
                 ("bf16", True, "cudnn", True), ("fp8", False, "cudnn", False), ("fp8", True, "cudnn", False)]
    # the tf32, bf16 and fp8 defaults; fused projections
    for precision, compile_, attention, fuse in variants:
        eng = build_engine("native", cfg, lora, model_dir=None, device=dev, precision=precision, seed=0,
                           native=NativeOptions(compile=compile_, attention=attention, fused_projections=fuse))
        eng.set_adapters(ref_adapters, "check")
        eng.train()
        with get_precision(precision).matmul_mode():
            loss = eng.loss(data[:4], data[:4])
            loss.backward()
        grad = torch.cat([p.grad.flatten() for p in eng.trainable_params()])
        name = f"native{' compiled' if compile_ else ''}, {attention}{', fused' if fuse else ''}"
        print(f"| {precision} | {name} | {loss.item():.5f} | "
              f"{within('compiled_engine', precision, 'loss', rel(loss, ref_loss), name)} | "
              f"{within('compiled_engine', precision, 'grad', rel(grad, ref_grad), name)} |")


def check_nf4(dev):
    """The Triton NF4 dequantization against the plain-PyTorch one on the device (bit for bit, each output dtype,
    double-quantized and plain absmax), against bitsandbytes' dequantize_4bit of the same state where it is
    installed (bit for bit), the NF4 -> e4m3 kernel of --precision nf4-fp8 against quantize_rows of the PyTorch
    dequantization (bit for bit), and the time of each at Llama-2-7B's gate_proj shape."""
    from lorabench.kernels.nf4 import NF4Tensor, quantize_nf4

    print("\n| weight | dtype | double | elements differing from PyTorch's | from bitsandbytes' |\n"
          "|---|---|---|---|---|")
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        bnb = None
    torch.manual_seed(5)
    for shape in ((11008, 4096), (4096, 11008), (3, 2112), (7, 1000)):  # the last: a last block part full
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for double in (True, False):
                w = (torch.randn(shape, device=dev) * 0.02).to(dtype)
                q = quantize_nf4(w, double_quant=double)
                got, want = q.dequantize(kernel=True), q.dequantize()
                differ, theirs = int((got != want).sum()), "-"
                if bnb is not None:
                    packed, state = bnb.quantize_4bit(w, quant_type="nf4", compress_statistics=double)
                    mine = NF4Tensor(packed.reshape(-1), state.absmax, shape, dtype, 64, state.code,
                                     *((state.state2.absmax, state.state2.code, state.offset) if double else ()))
                    theirs = int((mine.dequantize() != bnb.dequantize_4bit(packed, state)).sum())
                if differ or theirs not in ("-", 0):
                    MISSES.append(f"nf4 {shape} {dtype} double={double}: {differ} from PyTorch's, {theirs} from "
                                  "bitsandbytes'")
                print(f"| {shape} | {str(dtype)[6:]} | {double} | {differ} | {theirs} |")
    print("\n| weight -> e4m3 per row (nf4-fp8) | double | codes differing from quantize_rows(PyTorch's) | scales |\n"
          "|---|---|---|---|")
    for shape in ((11008, 4096), (4096, 11008), (3, 2112)):
        for double in (True, False):
            w = torch.randn(shape, device=dev) * 0.02 * torch.logspace(-2, 1, shape[0], device=dev)[:, None]
            q = quantize_nf4(w.bfloat16(), double_quant=double)
            (gq, gs), (wq, ws) = q.dequantize_fp8(kernel=True), q.dequantize_fp8()
            codes, scales = int((gq.view(torch.uint8) != wq.view(torch.uint8)).sum()), int((gs != ws).sum())
            if codes or scales:
                MISSES.append(f"nf4 -> e4m3 {shape} double={double}: {codes} codes, {scales} scales differ")
            print(f"| {shape} | {double} | {codes} | {scales} |")
    from lorabench.kernels.nf4 import _triton_kernel, launch_dequantize, launch_dequantize_fp8

    q = quantize_nf4((torch.randn(11008, 4096, device=dev) * 0.02).bfloat16())
    q.fp8_scale = q.fp8_row_scales(kernel=True)  # as a loaded weight keeps them
    args = q.kernel_args()
    print("\n| dequantize [11008, 4096] | us | GB/s (0.5 B read, 2 B (bf16) or 1 B (e4m3) written a weight) |\n"
          "|---|---|---|")
    # the kernels launched alone and through the op a step calls eagerly: this loop is host-bound where the op's
    # dispatch takes longer than the kernel (inside a step the launches queue ahead; a compiled block launches
    # the kernel from its generated code: benchmarks/nf4_launch.py times that)
    for name, fn, nbytes in (("-> bf16, Triton kernel launched alone", lambda: launch_dequantize(
                                 _triton_kernel(), *args, q.block, q.nested_block, torch.bfloat16), 2.5),
                             ("-> bf16, Triton kernel through the op", lambda: q.dequantize(kernel=True), 2.5),
                             ("-> bf16, PyTorch ops", lambda: q.dequantize(), 2.5),
                             ("-> bf16, PyTorch ops, compiled", torch.compile(lambda: q.dequantize()), 2.5),
                             ("-> e4m3, Triton kernel launched alone", lambda: launch_dequantize_fp8(
                                 _triton_kernel("dequantize_fp8_kernel"), *args, q.block, q.nested_block,
                                 q.fp8_scale), 1.5),
                             ("-> e4m3, Triton kernel through the op", lambda: q.dequantize_fp8(kernel=True),
                              1.5),
                             ("-> e4m3, PyTorch ops, compiled", torch.compile(lambda: q.dequantize_fp8()), 1.5)):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) / 20 * 1e3
        print(f"| {name} | {us:.0f} | {nbytes * 11008 * 4096 / us / 1e3:.0f} |")


def check_offload(dev):
    """--activation-checkpointing offload against block on the device (bf16, eager, 8 layers of the 7B width,
    seq 4096, dropout 0.05): loss and adapter gradients as block's to within block's own run-to-run difference
    (bit for bit where block repeats itself: the same kernels, only where the blocks' inputs wait differs), block
    within 0.1 of no checkpointing (the dropout masks replayed: masks drawn afresh change the dropped input by
    ~sqrt(2p) = 0.32 of its norm at p = 0.05, while on an H200 the same policy run twice differed by 0.7-1.1e-2,
    the attention backward not being deterministic), and the peak memory lower by about the inputs' size (8 x 32
    MiB here)."""
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    data = torch.from_numpy(synthetic_chunks(1, 4096, cfg.vocab_size)).long().to(dev)
    print("\n| policy | loss | peak allocated MiB | step ms (3rd) |\n|---|---|---|---|")
    out = {}
    for name in ("none", "block", "block again", "offload"):
        eng = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=dev, precision="bf16", seed=0,
                           native=NativeOptions(compile=False), checkpointing=name.split()[0])
        eng.train()
        for k in range(3):
            for p in eng.trainable_params():
                p.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            torch.manual_seed(7)
            t0.record()
            loss = eng.loss(data, data)
            loss.backward()
            t1.record()
            torch.cuda.synchronize()
        grad = torch.cat([p.grad.flatten() for p in eng.trainable_params()]).float()
        out[name] = (loss.item(), grad, torch.cuda.max_memory_allocated(dev) / 2**20)
        print(f"| {name} | {loss.item():.6f} | {out[name][2]:.0f} | {t0.elapsed_time(t1):.1f} |")
        del eng
        torch.cuda.empty_cache()

    def rel(a, b):
        return ((out[a][1] - out[b][1]).norm() / out[b][1].norm()).item()

    noise, off, replay = rel("block again", "block"), rel("offload", "block"), rel("block", "none")
    print(f"adapter gradients, relative: block again vs block {noise:.1e}, offload vs block {off:.1e} "
          f"(bit for bit: {torch.equal(out['offload'][1], out['block'][1])}), block vs none {replay:.1e}; "
          f"offload's peak {out['block'][2] - out['offload'][2]:.0f} MiB below block's")
    if off > 2 * noise or (noise == 0 and out["offload"][0] != out["block"][0]):
        MISSES.append(f"offload: adapter gradients {off:.1e} from block's, past block's own {noise:.1e}")
    if replay > 0.1:
        MISSES.append(f"block: adapter gradients {replay:.1e} from no checkpointing's (masks not replayed?)")


if __name__ == "__main__":
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    checks = {"cross_entropy": check_cross_entropy, "prefix_attention": check_prefix_attention,
              "dropout_masks": check_dropout_masks, "fp8_gemm": check_fp8_gemm,
              "fp8_blocks": check_fp8_blocks, "nf4": check_nf4,
              "compiled_engine": check_compiled_engine, "offload": check_offload}
    for name in sys.argv[1:] or checks:  # e.g. `gpu_check.py dropout_masks compiled_engine`
        checks[name](dev)
    if MISSES:
        print(f"\n{len(MISSES)} checks missed their bound:\n" + "\n".join(f"- {m}" for m in MISSES))
        sys.exit(1)
    print("\nall checks within their bounds")
