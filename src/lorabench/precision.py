"""Training and evaluation precisions: one type that says everything a precision means.

A precision owns the dtype the base weights are stored and computed in, whether matmuls run in TF32, whether the
loss is scaled (GradScaler), and which column of the peak-FLOPs table MFU divides by. ``run``, ``eval`` and
``bench`` take the same names (``PRECISIONS``); every other module asks the ``Precision`` instead of comparing
strings.

No precision autocasts: fp16 and bf16 store the frozen base in that dtype (FlagPerf's ``model.half()``) and the
native engine computes its adapter path in the activations' dtype over fp32 master weights (lora.py). fp8 stores
the blocks' frozen projections in float8 e4m3 and runs everything else as bf16 does; nf4 stores them as 4-bit
NormalFloat (QLoRA) and computes in bf16; nf4-fp8 stores them as nf4 does and runs their products as fp8 does.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """What one precision name means for the weights, the matmuls, the loss scaling and MFU."""

    name: str
    """The name users give (``--precision``) and result.json records."""
    dtype: torch.dtype
    """dtype of the frozen base weights and the activations."""
    tf32: bool = False
    """Matmuls and convolutions of fp32 tensors run in TF32 on the tensor cores (CUDA only)."""
    grad_scaler: bool = False
    """Scale the loss with a GradScaler and skip steps whose gradients overflow (fp16)."""
    peak_key: str = ""
    """The column of metrics.PEAK_TFLOPS that this precision's matmuls run at."""
    needs_cuda: bool = False
    """Only meaningful on a CUDA device (TF32 is an NVIDIA tensor-core mode)."""
    fp8_weights: bool = False
    """The decoder blocks' frozen projections are stored in FP8 with per-channel scales (kernels/fp8.py);
    ``dtype`` is then the activations', the embeddings' and lm_head's."""
    nf4_weights: bool = False
    """The decoder blocks' frozen projections are stored as 4-bit NF4 (QLoRA; quantized.py, kernels/nf4.py) and
    dequantized to ``dtype`` for each product; ``dtype`` is the activations', the embeddings' and lm_head's."""
    fp8_gemms: bool = False
    """The blocks' frozen projections' forward and input-gradient products are FP8 GEMMs (kernels/fp8.py;
    emulated off CUDA; Ada/Hopper GPUs), over the FP8 weights or NF4 ones quantized per row for each product."""

    @property
    def weights(self) -> str | None:
        """The quantized format of the blocks' frozen projections ("fp8", "nf4"), None for plain ``dtype``."""
        return "fp8" if self.fp8_weights else "nf4" if self.nf4_weights else None

    @contextmanager
    def matmul_mode(self):
        """TF32 on for this precision only, off otherwise; the previous switches restored afterwards."""
        cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        old = (cuda.allow_tf32, cudnn.allow_tf32)
        cuda.allow_tf32 = cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            cuda.allow_tf32, cudnn.allow_tf32 = old

    def check_device(self, device: torch.device):
        if self.needs_cuda and device.type != "cuda":
            raise ConfigError(f"--precision {self.name} needs a CUDA device (TF32 is a GPU matmul mode); "
                              "use --precision fp32 on this device")
        if self.fp8_gemms:
            from .kernels.fp8 import fp8_gemm_supported

            why = fp8_gemm_supported(device)
            if why:
                raise ConfigError(why)


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", torch.float32, peak_key="fp32"),
    "tf32": Precision("tf32", torch.float32, tf32=True, peak_key="tf32", needs_cuda=True),
    "fp16": Precision("fp16", torch.float16, grad_scaler=True, peak_key="fp16"),
    "bf16": Precision("bf16", torch.bfloat16, peak_key="bf16"),
    "fp8": Precision("fp8", torch.bfloat16, peak_key="fp8", fp8_weights=True, fp8_gemms=True),
    # the products run in bf16 over weights dequantized from NF4: bf16's peak
    "nf4": Precision("nf4", torch.bfloat16, peak_key="bf16", nf4_weights=True),
    # NF4 storage, FP8 products: the memory of QLoRA at the speed of fp8 (FP8's peak)
    "nf4-fp8": Precision("nf4-fp8", torch.bfloat16, peak_key="fp8", nf4_weights=True, fp8_gemms=True),
}


def get_precision(name: str) -> Precision:
    """The ``Precision`` called ``name``; a ConfigError naming the choices otherwise."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}") from None


def slow_on_cpu(precision: Precision, device: torch.device) -> str | None:
    """Why ``precision`` will run slowly on ``device``, or None: on a CPU where oneDNN reports no native bf16
    (fp16) support, PyTorch computes bf16 (fp16) matrix products through a fallback tens of times slower than its
    fp32 ones (an AVX2 EPYC, 2026-12-07: 1.2 GFLOP/s in bf16 against 37 in fp32 at [512, 576] x [576, 1536])."""
    if device.type != "cpu" or precision.dtype not in (torch.bfloat16, torch.float16):
        return None
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    try:
        native = getattr(torch.ops.mkldnn, probe[precision.dtype])()
    except (AttributeError, RuntimeError):  # a torch without the probe: say nothing rather than guess
        return None
    if native:
        return None
    kind = "bf16" if precision.dtype == torch.bfloat16 else "fp16"
    return (f"note: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native {kind} matrix instructions, "
            f"so --precision {precision.name}'s {kind} products run tens of times slower than fp32's here; "
            "--precision fp32 is the fast choice on it")


def default_eval_precision(device: torch.device) -> str:
    """Evaluation without --precision: bf16 on a GPU, fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"
