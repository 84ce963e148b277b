"""FlagPerf's rules where the seed's rows need them: TF32 in the fp32 row (and why, in result.json), file order
without shuffling, nodes from torchrun's environment."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorabench.config import TRAIN_PRESETS, LoRAConfig, TrainConfig, resolve_preset
from lorabench.runner import TF32_OVERRIDE, Job, resolve, resolve_precision
from lorabench.train import train_loop

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def preset_job(name: str, precision: str | None = None) -> Job:
    p = resolve_preset(name, {"precision": precision}, {})
    return Job(train=p.train, lora=p.lora, preset=name, precision_off_cuda=p.precision_off_cuda,
               precision_from_flag=precision is not None)


def test_flagperf_fp32_is_tf32_on_cuda_and_true_fp32_elsewhere(monkeypatch):
    monkeypatch.delenv(TF32_OVERRIDE, raising=False)
    on_gpu, why = resolve_precision(preset_job("flagperf-fp32"), CUDA)
    assert on_gpu.name == "tf32" and why == {"on": True, "why": "preset flagperf-fp32"}
    on_cpu, why = resolve_precision(preset_job("flagperf-fp32"), CPU)
    assert on_cpu.name == "fp32" and not why["on"] and "TF32 does not apply on cpu" in why["why"]
    assert resolve_precision(preset_job("fp32"), CUDA)[0].name == "fp32"  # true fp32 under its own name
    flagged, why = resolve_precision(preset_job("flagperf-fp32", "tf32"), CUDA)
    assert flagged.name == "tf32" and why["why"] == "--precision tf32"
    with pytest.raises(Exception, match="--precision tf32 needs a CUDA device"):  # asked for: no silent fallback
        resolve_precision(preset_job("flagperf-fp32", "tf32"), CPU)


def test_cublas_tf32_override_in_the_environment_is_reported_as_tf32(monkeypatch):
    monkeypatch.setenv(TF32_OVERRIDE, "1")
    p, why = resolve_precision(preset_job("fp32"), CUDA)
    assert p.name == "tf32" and why["on"] and f"{TF32_OVERRIDE}=1 found set" in why["why"]
    assert resolve_precision(preset_job("fp32"), CPU)[0].name == "fp32"  # cuBLAS only
    monkeypatch.setenv(TF32_OVERRIDE, "0")
    assert resolve_precision(preset_job("fp32"), CUDA)[0].name == "fp32"


def test_flagperf_presets_keep_file_order_and_the_others_shuffle():
    assert not TRAIN_PRESETS["flagperf-fp32"].train.shuffle and not TRAIN_PRESETS["flagperf-fp16"].train.shuffle
    assert TRAIN_PRESETS["bf16"].train.shuffle and TRAIN_PRESETS["tiny"].train.shuffle

    class Recorder:
        """Records the first token of every chunk the loop feeds it."""

        sharded = False  # (the engine contract's: base.Engine)

        def __init__(self):
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def trainable_params(self):
            return [self.w]

        def train(self):
            pass

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

        def loss(self, ids, labels):
            self.seen += ids[:, 0].tolist()
            return self.w * 0 + 1.0

    data = np.arange(10)[:, None].repeat(4, 1).astype(np.int32)  # chunk i is all i
    orders = {}
    for shuffle in (False, True):
        eng = Recorder()
        cfg = TrainConfig(batch_size=3, seq_len=4, epochs=2, shuffle=shuffle, eval_batches=0)
        train_loop(eng, data, cfg, CPU, progress=False)
        orders[shuffle] = eng.seen
    assert orders[False] == [0, 1, 2, 3, 4, 5, 6, 7, 8] * 2  # file order; the incomplete last step dropped
    assert orders[True][:9] != orders[False][:9] and len(orders[True]) == 18


def test_nodes_come_from_torchruns_environment(monkeypatch):
    import lorabench.runner as runner

    monkeypatch.setattr(runner, "dist_info", lambda: (0, 8))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    job = Job(train=TrainConfig(seq_len=64), lora=LoRAConfig(), device="cpu")
    assert resolve(job).nnodes == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve(job).nnodes == 1


def test_seed_row_prints_the_seeds_mfu_for_its_speed():
    """The seed's fp16 row: 4,017 tok/s on Llama-2-7B is 36.1% by FlagPerf's constants, as its table prints."""
    from lorabench.metrics import mfu_flagperf
    from lorabench.report import seed_row

    result = {"metrics": {"tokens_per_s_flagperf": 4017.0, "loss_flagperf": 1.7712, "mfu_flagperf": mfu_flagperf(4017),
                          "peak_mem_device_gib": 32.04, "peak_mem_reserved_gib": 29.5,
                          "device_mem_total_gib": 40.0, "mmlu_acc": 0.4111,
                          "mmlu_acc_flagperf": 0.432},
              "config": {"nnodes": 1, "gpus_per_node": 1, "engine": "reference", "precision": "fp16",
                         "fix_hp": "precision=fp16, local_batchsize=4"},
              "env": {"device_name": "NVIDIA A100-SXM4-40GB"}}  # (the seed's card)
    assert seed_row(result) == {"config": "1x1 reference fp16", "fix_hp": "precision=fp16, local_batchsize=4",
                                "token/p/s": "4017", "loss": "1.77", "mem": "32.0/40", "acc(MMLU)": "0.432",
                                "MFU": "36.1%"}
    del result["metrics"]["mmlu_acc_flagperf"]  # lm-eval's figure alone is labelled as such
    assert seed_row(result)["acc(MMLU)"] == "0.411 (lm-eval)"
    del result["metrics"]["peak_mem_device_gib"]  # no device reading: reserved, labelled
    assert seed_row(result)["mem"] == "29.5/40 (reserved)"
    for card in ("NVIDIA H100 80GB HBM3", None):  # off an A100 (or on an unknown card) the formula is marked
        result["env"]["device_name"] = card
        assert seed_row(result)["MFU"] == "36.1%*"


def test_reference_fp16_is_flagperfs_stack_step_for_step():
    """--engine reference in fp16 is FlagPerf's fp16 row: fp16 adapters (model.half() after get_peft_model), the
    loss under autocast, GradScaler, fused AdamW. The loop's losses equal, bit for bit, that recipe written out
    here by hand on an identical model."""
    from conftest import SMALL
    from lorabench.data.synthetic import synthetic_chunks
    from lorabench.engines import build_engine

    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    cfg = TrainConfig(precision="fp16", batch_size=2, seq_len=32, epochs=1, max_steps=4, lr=1e-3, untimed_steps=0,
                      shuffle=False, eval_batches=0)
    data = synthetic_chunks(16, 32, SMALL.vocab_size, seed=1)
    ours = build_engine("reference", SMALL, lora, model_dir=None, device=CPU, precision="fp16", seed=0)
    assert {p.dtype for p in ours.trainable_params()} == {torch.float16}
    assert "model.half()" in ours.describe()["numerics"]
    plain_loss, under_autocast = ours.loss, []

    def loss(ids, labels):  # on a CPU fp16 autocast changes no op of this model, so check it is entered
        under_autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16)
        return plain_loss(ids, labels)

    ours.loss = loss
    got = train_loop(ours, data, cfg, CPU, progress=False)["series"]["loss"]
    assert under_autocast == [True] * 4

    model = build_engine("reference", SMALL, lora, model_dir=None, device=CPU, precision="fp16", seed=0).model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    want = []
    for step in range(4):
        ids = torch.from_numpy(data[2 * step:2 * step + 2]).long()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        want.append(loss.item())
    assert got == want
    assert got[-1] < got[0]


def test_progress_off_a_terminal_is_plain_lines():
    """In a log file: one whole line every tenth of the run and at the end, no carriage returns."""
    import io

    from lorabench.progress import progress as _progress

    out = io.StringIO()
    bar = _progress(42, True, stream=out)
    for step in range(42):
        bar.set_postfix(epoch=1, loss="1.0000")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and lines[0] == "train: step 4/42 (epoch 1, loss 1.0000)"
    assert lines[-1] == "train: step 42/42 (epoch 1, loss 1.0000)" and len(lines) == 11
    quiet = io.StringIO()
    off = _progress(42, False, stream=quiet)
    off.update(1)
    off.close()
    assert quiet.getvalue() == ""
    # MMLU's bar moves a subject at a time: one line each time a tenth is passed, and at the end
    mmlu = io.StringIO()
    with _progress(1000, True, desc="mmlu", unit="question", stream=mmlu) as bar:
        for n in (57, 57, 300, 6, 580):
            bar.update(n)
    assert mmlu.getvalue().splitlines() == ["mmlu: question 114/1000", "mmlu: question 414/1000",
                                            "mmlu: question 1000/1000"]  # (420 passes no tenth)
