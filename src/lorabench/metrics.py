"""Throughput and MFU, the way lorabench reports them.

MFU = tokens/s * FLOPs/token / peak, with FLOPs/token from shapes.flops_per_token (PaLM appendix B adapted to
LoRA; its derivation is there) and the peak of the dtype the matmuls run in (``Precision.peak_key``).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

from .precision import Precision

# Dense peaks in TFLOP/s from the vendors' datasheets (no sparsity). Keys are matched against the CUDA device name.
PEAK_TFLOPS = {
    "H100": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9},  # SXM
    "H200": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},  # SXM; no FP8 tensor cores
}
# FlagPerf's MFU: tokens/s * 2 * 7e9 / 1.56e14 (the A100 TF32 peak), literally these constants on every card and
# precision (FlagPerf's training/benchmarks/llama2_7b_finetune/pytorch/run_pretraining.py): 4,017 tok/s gives 36.05%,
# FlagPerf's published 36.1%.
FLAGPERF_PEAK = 1.56e14
FLAGPERF_PARAMS = 7e9


def peak_flops(device_name: str | None, precision: Precision, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for the matmuls of ``precision`` on this device; None when unknown (no guessing)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    name = device_name.upper()
    if "H100" in name and ("PCIE" in name or "NVL" in name):
        return None  # different clocks and peaks than the SXM part; give --peak-tflops
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[precision.peak_key] * 1e12 if precision.peak_key in table else None
    return None


def mfu(tokens_per_s: float, flops_tok: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_s * flops_tok / peak


def mfu_flagperf(tokens_per_s: float) -> float:
    """FlagPerf's MFU: tokens/s * 2 * 7e9 / 1.56e14, whatever the model, card and precision
    (FlagPerf's training/benchmarks/llama2_7b_finetune/pytorch/run_pretraining.py)."""
    return tokens_per_s * 2 * FLAGPERF_PARAMS / FLAGPERF_PEAK


def flagperf_figures(step_times: list[float], epoch_losses: list[float], epoch_times: list[float],
                     tokens_per_step: int, nproc: int, nnodes: int, llama2_7b: bool) -> dict:
    """The figures FlagPerf's run_pretraining.py prints for this case (its
    training/benchmarks/llama2_7b_finetune/pytorch), from the same run:

    - ``loss_flagperf``: its avg_train_loss, the mean over epochs of each epoch's mean step loss (FlagPerf's table's
      loss column);
    - ``avg_train_prep``: the mean over epochs of exp(epoch mean loss);
    - ``avg_iter_time_s``: the mean time of EVERY step of all epochs (no warm-up left out);
    - ``avg_epoch_time_s``: the mean wall time of an epoch;
    - ``tokens_per_s_flagperf``: its token/p/s, tokens per step / avg_iter_time / nproc / nnodes (the formula as
      FlagPerf writes it; tokens per step are this rank's, seq_len x LBS x GAS);
    - ``mfu_flagperf``: mfu_flagperf of that token/p/s, for the Llama-2-7B shape only (``llama2_7b``): its 7e9 is
      that model's nominal size, so for any other model the figure would mean nothing (None).
    """
    import math

    if not step_times or not epoch_losses:
        return {k: None for k in ("loss_flagperf", "avg_train_prep", "avg_iter_time_s", "avg_epoch_time_s",
                                  "tokens_per_s_flagperf", "mfu_flagperf")}
    iter_time = statistics.fmean(step_times)
    tps = tokens_per_step / iter_time / nproc / nnodes
    return {
        "loss_flagperf": statistics.fmean(epoch_losses),
        "avg_train_prep": statistics.fmean(math.exp(x) for x in epoch_losses),
        "avg_iter_time_s": iter_time,
        "avg_epoch_time_s": statistics.fmean(epoch_times) if epoch_times else None,
        "tokens_per_s_flagperf": tps,
        "mfu_flagperf": mfu_flagperf(tps) if llama2_7b else None,
    }


def first_timed(steps: int, untimed: int) -> int:
    """The index of the first step the timing counts: after the ``untimed`` ones, or 0 where no step would remain."""
    return untimed if steps > untimed else 0


def step_stats(step_times: list[float], tokens_per_step: int | list[float], warmup: int,
               resumed_at: int | None = None) -> dict:
    """Tokens/s per chip from per-step wall times (warm-up steps excluded; all steps if too few remain).
    ``tokens_per_s_per_chip`` is FlagPerf's: tokens per step / mean step time (steps of different token counts,
    a list: their tokens / their time); the median of the steps' own rates is reported too, and
    ``step_time_ci95_rel``, the half-width of a 95% interval of the mean step time (normal approximation,
    1.96 stdev / sqrt(n)) relative to the mean: how finely the run resolves a speed difference."""
    first = first_timed(len(step_times), warmup)
    keep = list(range(first, len(step_times)))
    if resumed_at:  # the resumed process warms up (compiles) again: its first ``warmup`` steps are untimed too
        again = set(range(resumed_at, resumed_at + warmup))
        keep = [i for i in keep if i not in again] or keep
    timed = [step_times[i] for i in keep]
    if not timed:
        return {"tokens_per_s_per_chip": None, "tokens_per_s_per_chip_median": None, "timed_steps": 0}
    mean, med = statistics.fmean(timed), statistics.median(timed)
    stdev = statistics.stdev(timed) if len(timed) > 1 else None
    if isinstance(tokens_per_step, list):
        tokens = [tokens_per_step[i] for i in keep]
        rate, rate_med = sum(tokens) / sum(timed), statistics.median(n / t for n, t in zip(tokens, timed))
    else:
        rate, rate_med = tokens_per_step / mean, tokens_per_step / med
    return {
        "tokens_per_s_per_chip": rate,
        "tokens_per_s_per_chip_median": rate_med,
        "step_time_mean_s": mean,
        "step_time_median_s": med,
        "step_time_stdev_s": 0.0 if stdev is None else stdev,
        "step_time_ci95_rel": None if stdev is None else 1.96 * stdev / len(timed) ** 0.5 / mean,
        "timed_steps": len(timed),
    }


class DeviceMemoryPeak:
    """The peak of the device memory in use while the ``with`` block runs, as nvidia-smi shows it (FlagPerf's mem
    column: CUDA context and the allocator's cache included, unlike torch's allocated/reserved peaks): sampled
    every ``interval`` seconds in a background thread. The reading is this process's own where NVML (pynvml) can
    tell it, else the device's whole used memory (cudaMemGetInfo: total - free), which on a GPU shared with other
    processes counts theirs too; ``source`` says which. ``read`` (bytes in use) replaces the reading in tests."""

    def __init__(self, device, interval: float = 0.02, read=None):
        self.device, self.interval = device, interval
        self.read, self.source = (read, "given") if read is not None else self._reader()
        self.peak_bytes = 0
        self._stop = None

    def _reader(self):
        import torch

        try:
            import pynvml

            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pid = os.getpid()

            def own() -> int:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                return sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid)

            own()
            return own, "nvml (this process)"
        except Exception:  # noqa: BLE001  (no pynvml, no NVML, or a container that hides the pids)
            def used() -> int:
                free, total = torch.cuda.mem_get_info(self.device)
                return total - free

            return used, "cudaMemGetInfo (whole device)"

    def _sample(self):
        self.peak_bytes = max(self.peak_bytes, int(self.read()))

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._sample()

        def loop():
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 1024 ** 3


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc, to the clock tick), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Wall-clock seconds of a job's phases in the order they ran, and its total from ``start`` (a perf_counter
    reading: the process's start where the CLI knows it). A phase that queues device work ends with the device
    synchronised by the code it times (results read back), so the seconds are the phase's own."""

    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float):
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict:
        """{phase_s: seconds, ..., "total_s": seconds from start to now}."""
        return {**{f"{k}_s": v for k, v in self.seconds.items()}, "total_s": time.perf_counter() - self.start}
