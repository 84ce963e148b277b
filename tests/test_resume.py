"""Checkpoints and resuming (resume.py): a run stopped by a signal and resumed equals the run that never stopped,
bit for bit; a checkpoint of another job is refused; a finished run leaves no checkpoint."""
from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lorabench.train as train_mod
from lorabench.cli import main

FLAGS = ["run", "--no-progress", "--device", "cpu", "--max-steps", "6", "--no-mmlu", "--seq-len", "64",
         "--batch-size", "4"]  # the tiny preset: dropout 0.05 (masks from the RNG), shuffled epochs


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))


def signal_after(monkeypatch, steps: int, signum=signal.SIGINT):
    """The run receives ``signum`` while its step ``steps`` runs (delivered from the progress bar's update)."""
    from interrupt_at import signalling_progress

    monkeypatch.setattr(train_mod, "_progress", signalling_progress(train_mod._progress, steps, signum))


def stop_after(monkeypatch, tmp_path, steps: int, flags: list[str]):
    """Run FLAGS + flags, stopped by SIGINT after ``steps`` steps (exit 130), then undo the signal and keep the
    test's cache, so the next run in the test resumes it."""
    signal_after(monkeypatch, steps)
    assert main(FLAGS + flags) == 130
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))


def tensorboard_scalars(folder, tag):
    """(steps, values) of one scalar, read with TensorBoard's own reader."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator(str(folder))
    ea.Reload()
    events = ea.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def names(run_dir, pattern):
    return sorted(p.name for p in (run_dir / "checkpoint").glob(pattern))


def outputs(run_dir):
    r = json.loads((run_dir / "result.json").read_text())
    return r, load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_and_resumed_run_equals_the_run_that_never_stopped(tmp_path, monkeypatch, capsys, signum):
    assert main(FLAGS + ["--run-dir", str(tmp_path / "straight")]) == 0
    signal_after(monkeypatch, 3, signum)
    stopped = tmp_path / "stopped"
    assert main(FLAGS + ["--run-dir", str(stopped)]) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 3" in err and f"--resume {stopped}" in err
    assert names(stopped, "state-*") == ["state-3.pt"] and not (stopped / "result.json").exists()
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    assert main(FLAGS + ["--resume", str(stopped)]) == 0
    (a, wa), (b, wb) = outputs(tmp_path / "straight"), outputs(stopped)
    assert a["series"]["loss"] == b["series"]["loss"] and len(b["series"]["loss"]) == 6
    assert a["series"]["lr"] == b["series"]["lr"] and a["metrics"]["eval_loss"] == b["metrics"]["eval_loss"]
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b["resumed_at_step"] == 3 and not (stopped / "checkpoint").exists()  # done: the checkpoint goes
    # the step stream: every step once, in order, the same records as the run that never stopped
    lines = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert [r["loss"] for r in lines] == [r["loss"] for r in straight] == a["series"]["loss"]


def test_periodic_checkpoints_resume_from_the_last_one(tmp_path, monkeypatch):
    assert main(FLAGS + ["--run-dir", str(tmp_path / "straight")]) == 0
    d = tmp_path / "every2"  # checkpoints after steps 2 and 4, then one at the stop after 5
    stop_after(monkeypatch, tmp_path, 5, ["--checkpoint-every", "2", "--run-dir", str(d)])
    assert names(d, "state-*") == ["state-5.pt"]  # one kept by default
    assert torch.load(d / "checkpoint" / "state-5.pt", weights_only=True)["step"] == 5
    assert main(FLAGS + ["--checkpoint-every", "2", "--resume", str(d)]) == 0
    assert outputs(tmp_path / "straight")[0]["series"]["loss"] == outputs(d)[0]["series"]["loss"]


def test_a_run_resumes_under_another_checkpointing_policy(tmp_path, monkeypatch, capsys):
    """What the backward keeps is not part of the job: a run stopped (say for memory) resumes with
    --activation-checkpointing block and some --checkpoint-blocks, and ends as the run that never stopped (block
    recomputes bit for bit); one started so resumes without them, given --checkpoint-blocks all over the number its
    config.toml holds."""
    assert main(FLAGS + ["--run-dir", str(tmp_path / "straight")]) == 0
    d = tmp_path / "stopped"
    stop_after(monkeypatch, tmp_path, 3, ["--run-dir", str(d)])
    assert main(FLAGS + ["--activation-checkpointing", "block", "--checkpoint-blocks", "3", "--resume", str(d)]) == 0
    assert outputs(tmp_path / "straight")[0]["series"]["loss"] == outputs(d)[0]["series"]["loss"]
    d = tmp_path / "partial"
    stop_after(monkeypatch, tmp_path, 3, ["--activation-checkpointing", "block", "--checkpoint-blocks", "3",
                                          "--run-dir", str(d)])
    assert main(FLAGS + ["--activation-checkpointing", "none", "--resume", str(d)]) == 2
    assert "give --checkpoint-blocks all" in capsys.readouterr().err
    assert main(FLAGS + ["--activation-checkpointing", "none", "--checkpoint-blocks", "all", "--resume", str(d)]) == 0
    assert outputs(tmp_path / "straight")[0]["series"]["loss"] == outputs(d)[0]["series"]["loss"]


def test_keep_checkpoints_keeps_the_newest_and_a_corrupt_one_names_the_one_before(tmp_path, monkeypatch, capsys):
    """--keep-checkpoints 2: the two newest states (and one random state more) stay; the newest made unreadable is
    refused, naming it and the step before; with it removed, the run resumes from that step bit for bit."""
    assert main(FLAGS + ["--run-dir", str(tmp_path / "straight")]) == 0
    d = tmp_path / "keep2"  # checkpoints after steps 2 and 4, then one at the stop after 5
    stop_after(monkeypatch, tmp_path, 5, ["--checkpoint-every", "2", "--keep-checkpoints", "2", "--tensorboard",
                                          "--run-dir", str(d)])
    assert names(d, "state-*") == ["state-4.pt", "state-5.pt"]
    assert names(d, "rng-*") == ["rng-0-2.pt", "rng-0-4.pt", "rng-0-5.pt"]
    (d / "checkpoint" / "state-5.pt").write_bytes(b"half a file")
    assert main(FLAGS + ["--resume", str(d)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint/state-5.pt cannot be read" in err and "to resume from step 4 instead, remove it" in err
    (d / "checkpoint" / "state-5.pt").unlink()
    assert main(FLAGS + ["--tensorboard", "--resume", str(d)]) == 0
    assert outputs(d)[0]["resumed_at_step"] == 4
    loss = outputs(tmp_path / "straight")[0]["series"]["loss"]
    assert loss == outputs(d)[0]["series"]["loss"]
    # TensorBoard: step 5 of the first process dropped on resume, every step once, the losses as float32
    steps, values = tensorboard_scalars(d / "tensorboard", "train/loss")
    assert steps == list(range(1, 7)) and values == [float(np.float32(x)) for x in loss]
    assert main(FLAGS + ["--keep-checkpoints", "0", "--run-dir", str(tmp_path / "bad")]) == 2
    assert "--keep-checkpoints must be positive" in capsys.readouterr().err


def test_resume_refuses_another_job_and_a_folder_without_checkpoint(tmp_path, monkeypatch, capsys):
    d = tmp_path / "r"
    stop_after(monkeypatch, tmp_path, 2, ["--run-dir", str(d)])
    assert main(FLAGS + ["--lr", "1e-3", "--resume", str(d)]) == 2
    assert "made with lr = 0.002, this run has 0.001" in capsys.readouterr().err
    assert main(FLAGS + ["--precision", "bf16", "--resume", str(d)]) == 2
    assert "precision = 'fp32'" in capsys.readouterr().err
    assert main(FLAGS + ["--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint/state-<step>.pt" in capsys.readouterr().err
    assert main(FLAGS + ["--resume", str(d), "--run-dir", str(tmp_path / "elsewhere")]) == 2
    assert "leave out --run-dir" in capsys.readouterr().err
    (d / "checkpoint" / "state-2.pt").write_bytes(b"truncated")
    assert main(FLAGS + ["--resume", str(d)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint/state-2.pt cannot be read" in err and "instead" not in err  # no older one to offer


def test_a_loss_that_becomes_nan_names_the_step_the_last_finite_loss_and_the_checkpoint(tmp_path, capsys):
    d = tmp_path / "diverged"
    assert main(FLAGS + ["--lr", "1e4", "--checkpoint-every", "1", "--run-dir", str(d)]) == 3  # step 1 is finite
    err = capsys.readouterr().err
    assert "loss became nan at step" in err and "the last finite loss:" in err
    last = int(re.search(r"the last finite loss: \S+ at step (\d+)", err).group(1))
    assert f"the last checkpoint is in {d / 'checkpoint'}" in err and names(d, "state-*") == [f"state-{last}.pt"]
    assert not (d / "result.json").exists()


def test_a_write_killed_half_way_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    """The random states of step 4 written, its state not (killed between the two renames): the resume continues
    from step 2, bit for bit."""
    import shutil

    assert main(FLAGS + ["--run-dir", str(tmp_path / "straight")]) == 0
    signal_after(monkeypatch, 4)
    d = tmp_path / "r"
    assert main(FLAGS + ["--checkpoint-every", "2", "--run-dir", str(d)]) == 130  # checkpoints after 2 and 4
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    ck = d / "checkpoint"
    assert sorted(p.name for p in ck.glob("rng-*")) == ["rng-0-2.pt", "rng-0-4.pt"]
    # rebuild state.pt of step 2 from a second run stopped there
    signal_after(monkeypatch, 2)
    e = tmp_path / "e"
    assert main(FLAGS + ["--run-dir", str(e)]) == 130
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    shutil.copy(e / "checkpoint" / "state-2.pt", ck / "state-2.pt")  # as if the step-4 rename never happened
    (ck / "state-4.pt").unlink()
    assert main(FLAGS + ["--resume", str(d)]) == 0
    assert outputs(tmp_path / "straight")[0]["series"]["loss"] == outputs(d)[0]["series"]["loss"]


def test_checkpoint_minutes_writes_by_the_clock(tmp_path, monkeypatch):
    """--checkpoint-minutes: a tiny interval writes after every step (the last two steps' random states are there
    when a signal stops the run at step 3: a stop alone would leave step 3's only); refused under a bad value."""
    signal_after(monkeypatch, 3)
    d = tmp_path / "clock"
    assert main(FLAGS + ["--checkpoint-minutes", "1e-9", "--run-dir", str(d)]) == 130
    assert sorted(p.name for p in (d / "checkpoint").glob("rng-*")) == ["rng-0-2.pt", "rng-0-3.pt"]
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    assert main(FLAGS + ["--checkpoint-minutes", "0", "--run-dir", str(tmp_path / "bad")]) == 2


def test_out_of_memory_names_the_step_the_shape_what_to_try_and_keeps_the_steps_so_far(tmp_path, monkeypatch,
                                                                                          capsys):
    """The device's OOM error in step 4 (raised here where the engine computes its loss): exit 4 and one line with
    the step, the batch shape and the settings that lower memory; metrics.jsonl keeps the 3 steps that ended."""
    from lorabench.engines.native import NativeEngine

    real, calls = NativeEngine.loss, [0]

    def loss(self, ids, labels):
        calls[0] += 1
        if calls[0] == 4:  # grad-accum 1: the 4th micro-batch is step 4's
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, ids, labels)

    monkeypatch.setattr(NativeEngine, "loss", loss)
    d = tmp_path / "oom"
    assert main(FLAGS + ["--run-dir", str(d)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorabench: error: out of device memory in step 4 (")
    assert "--batch-size 4, --seq-len 64, --grad-accum 1" in err[0] and "Tried to allocate 2.00 GiB" in err[0]
    assert "try --batch-size 2 --grad-accum 2 (the same global batch) or --activation-checkpointing block" in err[0]
    assert f"the 3 steps so far are in {d / 'metrics.jsonl'}" in err[0]
    assert [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (d / "result.json").exists()
    calls[0] = 3  # the next micro-batch fails: with only some blocks recomputing, more of them is what to try
    assert main(FLAGS + ["--run-dir", str(tmp_path / "oom2"), "--activation-checkpointing", "block",
                         "--checkpoint-blocks", "1"]) == 4
    err = capsys.readouterr().err
    assert "--activation-checkpointing block --checkpoint-blocks 1); try" in err
    assert "or --checkpoint-blocks 2 or more (now 1 of 4 blocks recompute)" in err


def test_tensorboard_without_its_package_is_refused_by_name(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert main(FLAGS + ["--tensorboard", "--run-dir", str(tmp_path / "a")]) == 2
    assert "pip install 'lorabench[tensorboard]'" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(FLAGS + ["--run-dir", str(tmp_path / "b")]) == 0  # the default: without it, no event files
    assert not (tmp_path / "b" / "tensorboard").exists() and (tmp_path / "b" / "metrics.jsonl").is_file()
