"""Checkpoints and resuming (resume.py): a run stopped by a signal and resumed equals the run that never stopped,
bit for bit; a checkpoint of another job is refused; a finished run leaves no checkpoint."""
from __future__ import annotations

import json
import signal

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
    real = train_mod._progress

    def progress(total, enabled, stream=None):
        bar = real(total, enabled, stream)
        update, seen = bar.update, [0]

        def counted(k=1):
            update(k)
            seen[0] += k
            if seen[0] == steps:
                signal.raise_signal(signum)

        bar.update = counted
        return bar

    monkeypatch.setattr(train_mod, "_progress", progress)


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
    assert (stopped / "checkpoint" / "state.pt").is_file() and not (stopped / "result.json").exists()
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
    signal_after(monkeypatch, 5)  # checkpoints after steps 2 and 4, then one at the stop after 5
    d = tmp_path / "every2"
    assert main(FLAGS + ["--checkpoint-every", "2", "--run-dir", str(d)]) == 130
    state = torch.load(d / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 5
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    assert main(FLAGS + ["--checkpoint-every", "2", "--resume", str(d)]) == 0
    assert outputs(tmp_path / "straight")[0]["series"]["loss"] == outputs(d)[0]["series"]["loss"]


def test_resume_refuses_another_job_and_a_folder_without_checkpoint(tmp_path, monkeypatch, capsys):
    signal_after(monkeypatch, 2)
    d = tmp_path / "r"
    assert main(FLAGS + ["--run-dir", str(d)]) == 130
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    assert main(FLAGS + ["--lr", "1e-3", "--resume", str(d)]) == 2
    assert "made with lr = 0.002, this run has 0.001" in capsys.readouterr().err
    assert main(FLAGS + ["--precision", "bf16", "--resume", str(d)]) == 2
    assert "precision = 'fp32'" in capsys.readouterr().err
    assert main(FLAGS + ["--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint/state.pt" in capsys.readouterr().err
    assert main(FLAGS + ["--resume", str(d), "--run-dir", str(tmp_path / "elsewhere")]) == 2
    assert "leave out --run-dir" in capsys.readouterr().err
    (d / "checkpoint" / "state.pt").write_bytes(b"truncated")
    assert main(FLAGS + ["--resume", str(d)]) == 2
    assert "the checkpoint cannot be read" in capsys.readouterr().err


def test_a_loss_that_becomes_nan_names_the_step_the_last_finite_loss_and_the_checkpoint(tmp_path, capsys):
    d = tmp_path / "diverged"
    assert main(FLAGS + ["--lr", "1e4", "--checkpoint-every", "1", "--run-dir", str(d)]) == 3  # step 1 is finite
    err = capsys.readouterr().err
    assert "loss became nan at step" in err and "the last finite loss:" in err
    assert f"the last checkpoint is in {d / 'checkpoint'}" in err and (d / "checkpoint" / "state.pt").is_file()
    assert not (d / "result.json").exists()


def test_a_write_killed_half_way_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    """The random states of step 4 written, state.pt still at step 2 (killed between the two renames): the resume
    continues from step 2, bit for bit."""
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
    shutil.copy(e / "checkpoint" / "state.pt", ck / "state.pt")  # as if the step-4 rename never happened
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
