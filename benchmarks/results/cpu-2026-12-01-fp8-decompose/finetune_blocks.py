"""The SmolLM2 LoRA fine-tune of NOTES item 43 (seed LoRA, seq 128, LBS 4, lr 1e-4, 200 steps, the bundled
dialogues in file order) in fp8 with the frozen weights' scales per 128 x 128 block instead of per output channel
(CPU emulation; activations and gradients per token as the engine does): item 57. Run from the repository root:
python benchmarks/results/cpu-2026-12-01-fp8-decompose/finetune_blocks.py MODEL_DIR OUT_DIR [--control]
(--control: the same fine-tune in bf16 with attention as two matmuls instead of SDPA's kernel, the same maths
rounded otherwise, for the noise floor of the comparison)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))
import torch  # noqa: E402

import lorabench.kernels.fp8 as F  # noqa: E402
from lorabench.cli import main  # noqa: E402

BLK = 128


def blockwise(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] through e4m3 with one scale per BLK x BLK block (a partial last block padded with zeros)."""
    n, k = w.shape
    wp = torch.nn.functional.pad(w.float(), (0, -k % BLK, 0, -n % BLK))
    tiles = wp.reshape(wp.shape[0] // BLK, BLK, -1, BLK).transpose(1, 2)
    q, s = F.quantize_rows(tiles.reshape(*tiles.shape[:2], -1))
    return (q.float() * s).reshape(tiles.shape).transpose(1, 2).reshape(wp.shape)[:n, :k]


class Blockwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        q, s = F.quantize_rows(x2)
        ctx.save_for_backward(w)
        return ((q.float() * s) @ w.t()).to(x.dtype).view(*lead, w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        (w,) = ctx.saved_tensors
        lead, g2 = gy.shape[:-1], gy.reshape(-1, gy.shape[-1])
        q, s = F.quantize_rows(g2)
        return ((q.float() * s) @ w).to(gy.dtype).view(*lead, w.shape[1]), None


DEQ = {}


class ByWeight:
    """Stands in for kernels.fp8._Fp8Linear (which every FP8 projection, adapted or not, calls through
    fp8_linear): the same call, the blockwise weight of the projection."""

    @staticmethod
    def apply(x, wq, w_scale, grad_dtype):
        return Blockwise.apply(x, DEQ[id(wq)])  # (a KeyError if a projection was missed)


# the checkpoint's bf16 weights, quantized blockwise, keyed by the engine's stored FP8 parameter after load
import lorabench.engines.native as N  # noqa: E402
from lorabench.checkpoint import native_to_hf  # noqa: E402

orig_init = N.NativeEngine.__init__


def init(self, *a, **k):
    orig_init(self, *a, **k)
    from safetensors.torch import load_file
    sd = load_file(str(Path(self.model_dir) / "model.safetensors"))
    for name, m in self.model.named_modules():
        if getattr(m, "weight_scale", None) is not None:
            DEQ[id(m.weight)] = blockwise(sd[native_to_hf(name) + ".weight"])


N.NativeEngine.__init__ = init
F._Fp8Linear = ByWeight
model_dir, out = sys.argv[1], sys.argv[2]
control = len(sys.argv) > 3 and sys.argv[3] == "--control"  # bf16, attention as two matmuls: other rounding
data = ROOT / "src" / "lorabench" / "assets" / "samsum-tiny"
sys.exit(main(["run", "--model-dir", model_dir, "--data", str(data), "--device", "cpu"] +
              (["--precision", "bf16", "--attention", "matmul"] if control else ["--precision", "fp8"]) + [
               "--max-steps", "200", "--epochs", "100", "--seq-len", "128", "--batch-size", "4", "--lr", "1e-4",
               "--no-mmlu", "--no-progress", "--no-save-adapter", "--run-dir", out, "--overwrite"]))
