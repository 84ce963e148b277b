"""FLOPs per token, peak table, MFU and the timing statistics."""
from __future__ import annotations

import pytest

from lorabench.config import MODEL_PRESETS, LoRAConfig
from lorabench.metrics import mfu, mfu_flagperf, peak_flops, step_stats
from lorabench.precision import PRECISIONS as P
from lorabench.shapes import flops_per_token, lora_param_count

L7 = MODEL_PRESETS["llama2-7b"]


def test_flops_per_token_llama2_7b_seq512():
    lora = LoRAConfig()  # r 8 on q_proj, v_proj
    assert lora_param_count(L7, lora) == 32 * 2 * 8 * (4096 + 4096)  # 4,194,304
    # by hand: 4 * 6,607,343,616 + 6 * 4,194,304 + 12 * 32 * 32 * 128 * 512
    hand = 4 * 6_607_343_616 + 6 * 4_194_304 + 12 * 32 * 32 * 128 * 512
    assert flops_per_token(L7, lora, 512) == hand == 27_259_846_656
    # REFERENCE section 3 quotes 27.23 G (seq 512) and 32.87 G (seq 4096): the frozen-weight and attention terms;
    # its figures leave out the adapters' 6 * N_lora = 25.2 MFLOP (0.09%), which we count.
    adapters = 6 * lora_param_count(L7, lora)
    assert flops_per_token(L7, lora, 512) - adapters == pytest.approx(27.23e9, rel=1e-3)
    assert flops_per_token(L7, lora, 4096) - adapters == pytest.approx(32.87e9, rel=1e-3)


def test_peak_table_is_dtype_aware_and_says_unknown():
    assert peak_flops("NVIDIA H100 80GB HBM3", P["bf16"]) == 989.4e12
    assert peak_flops("NVIDIA H200", P["tf32"]) == 494.7e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", P["fp32"]) == 19.5e12
    assert peak_flops("NVIDIA H100 PCIe", P["bf16"]) is None
    assert peak_flops("Some Future GPU", P["bf16"]) is None
    assert peak_flops(None, P["fp32"]) is None
    assert peak_flops("Some Future GPU", P["bf16"], override_tflops=100) == 100e12
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)


def test_flagperf_mfu_reproduces_seed_with_nominal_7e9():
    # seed fp16 row: 4017 tok/s -> 36.1% with N = 7e9 (REFERENCE section 1)
    # 4017 * 2 * 7e9 / 1.56e14 = 0.36050: the seed's 36.1% is this rounded half-up
    assert f"{100 * mfu_flagperf(4017):.2f}" == "36.05"


def test_flagperf_figures_on_a_hand_worked_run():
    """Two epochs: steps of 1, 2, 3 s then 2, 2 s (FlagPerf times every step, none left out); epoch mean losses 2.0
    and 1.0; epochs of 6.5 and 4.5 s; 1,024 tokens a step on 1 process of 1 node."""
    import math

    from lorabench.metrics import flagperf_figures

    f = flagperf_figures([1.0, 2.0, 3.0, 2.0, 2.0], [2.0, 1.0], [6.5, 4.5], 1024, 1, 1, llama2_7b=True)
    assert f["loss_flagperf"] == 1.5  # mean of the epochs' means, not of all steps
    assert f["avg_train_prep"] == pytest.approx((math.exp(2.0) + math.exp(1.0)) / 2)
    assert f["avg_iter_time_s"] == 2.0 and f["avg_epoch_time_s"] == 5.5
    assert f["tokens_per_s_flagperf"] == 512.0 and f["mfu_flagperf"] == pytest.approx(512 * 1.4e10 / 1.56e14)
    two = flagperf_figures([1.0, 2.0, 3.0, 2.0, 2.0], [2.0, 1.0], [6.5, 4.5], 1024, 4, 2, llama2_7b=False)
    assert two["tokens_per_s_flagperf"] == 64.0  # / nproc / nnodes, as FlagPerf writes it
    assert two["mfu_flagperf"] is None  # 7e9 is Llama-2-7B's size: meaningless for another model



def test_step_stats_excludes_warmup():
    s = step_stats([10.0, 5.0, 1.0, 1.0, 2.0], tokens_per_step=100, warmup=2)
    assert s["timed_steps"] == 3
    assert s["tokens_per_s_per_chip"] == pytest.approx(100 / (4 / 3))
    assert s["tokens_per_s_per_chip_median"] == pytest.approx(100.0)
    # steps 5, 1, 1, 2 after one warm-up: mean 2.25, sample stdev sqrt(10.75 / 3); 1.96 stdev / 2 / mean
    s4 = step_stats([9.0, 5.0, 1.0, 1.0, 2.0], tokens_per_step=100, warmup=1)
    assert s4["step_time_ci95_rel"] == pytest.approx(1.96 * (10.75 / 3) ** 0.5 / 2 / 2.25)
    assert step_stats([1.0, 2.0], 100, warmup=1)["step_time_ci95_rel"] is None  # one timed step: no spread
    assert step_stats([1.0], 100, warmup=3)["timed_steps"] == 1  # too few steps: all are timed


def test_device_memory_peak_keeps_the_highest_reading():
    """The sampler's peak is the largest reading between entering and leaving, the last one included."""
    import threading

    from lorabench.metrics import DeviceMemoryPeak

    readings = iter([5, 9, 7] + [3] * 10_000)
    lock = threading.Lock()

    def read():
        with lock:
            return next(readings, 3)

    with DeviceMemoryPeak(None, interval=0.001, read=read) as mem:
        import time

        time.sleep(0.05)
    assert mem.peak_bytes == 9 and mem.source == "given" and mem.peak_gib == 9 / 1024 ** 3
    ends = iter([4, 6])
    with DeviceMemoryPeak(None, interval=10.0, read=lambda: next(ends)) as late:
        pass  # no sample in between: the entry and the exit readings count
    assert late.peak_bytes == 6
