"""Runs that lose no data and print no wrong number: --resume continues exactly the recorded job, a stop at any
point leaves a resumable state, a full disk is one line with nothing half-written, bad input is refused before
any work, and every label says what ran."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorabench import files
from lorabench.cli import main

ARGS = ["run", "--no-progress", "--device", "cpu", "--seq-len", "64", "--batch-size", "4"]
HELPER = Path(__file__).with_name("interrupt_at.py")
SAME = ("loss_flagperf", "avg_train_prep", "train_loss_last_epoch_avg", "train_loss_epoch_avgs", "train_loss_first",
        "train_loss_final", "eval_loss", "eval_perplexity", "steps", "skipped_steps", "mmlu_acc", "mmlu_acc_macro",
        "mmlu_questions", "mmlu_acc_flagperf", "mmlu_flagperf_questions", "flops_per_token")
"""The metrics a resumed run must share with the run that never stopped (the others are clock readings)."""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))


def result(d: Path) -> dict:
    return json.loads((d / "result.json").read_text())


def assert_same_run(a: dict, b: dict):
    """Every series and every metric that is no clock reading, equal; every metric present in one, in both."""
    for k in ("step", "epoch", "loss", "lr", "grad_norm", "label_tokens"):
        assert a["series"].get(k) == b["series"].get(k), k
    for k in SAME:
        assert a["metrics"].get(k) == b["metrics"].get(k), k
    assert [k for k, v in a["metrics"].items() if v is None] == [k for k, v in b["metrics"].items() if v is None]
    from lorabench.outputs import RESUME_MAY_DIFFER

    differ = ("data_cached", *RESUME_MAY_DIFFER["train"])  # (the cache, the checkpoint cadence)
    assert {k: v for k, v in a["config"].items() if k not in differ} == \
        {k: v for k, v in b["config"].items() if k not in differ}


def killed(tmp_path, at: int, argv: list[str], signum: str = "SIGKILL") -> subprocess.CompletedProcess:
    env = {**os.environ, "LORABENCH_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(HELPER), signum, str(at), *argv], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_bare_resume_after_sigkill_continues_the_recorded_job(tmp_path, capsys):
    """Issue: --resume with no other flags forgot --max-steps, --checkpoint-every and --no-mmlu. The killed run's
    settings come back from its config.toml; a cut last line and the steps past the checkpoint are dropped."""
    job = ARGS + ["--max-steps", "24", "--checkpoint-every", "4", "--no-mmlu", "--lr-schedule", "cosine"]
    assert main(job + ["--run-dir", str(tmp_path / "straight")]) == 0
    d = tmp_path / "killed"
    assert killed(tmp_path, 10, job + ["--run-dir", str(d)]).returncode == -signal.SIGKILL
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "epoch": 1, "lo')  # a write cut short by the kill
    capsys.readouterr()
    assert main(["run", "--resume", str(d)]) == 0
    err = capsys.readouterr().err
    assert "dropped 2 lines: 1 incomplete" in err and "1 past the checkpoint's step 8" in err  # (step 9)
    a, b = result(tmp_path / "straight"), result(d)
    assert b["resumed_at_step"] == 8 and b["metrics"]["steps"] == 24 and b["metrics"]["mmlu_acc"] is None
    assert_same_run(a, b)
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 25))
    assert [r["loss"] for r in lines] == a["series"]["loss"]


CHANGES = [
    (["--max-grad-norm", "0.01"], "max_grad_norm = None, this run has 0.01"),
    (["--max-steps", "40"], "max_steps = 20, this run has 40"),
    (["--epochs", "5"], "epochs = 2, this run has 5"),
    (["--lora-dropout", "0.1"], "lora_dropout = 0.05, this run has 0.1"),
    (["--seed", "7"], "seed = 42, this run has 7"),
    (["--eval-batches", "1"], "eval_batches = None, this run has 1"),
    (["--untimed-steps", "5"], "untimed_steps = 2, this run has 5"),
    (["--mmlu-protocol", "both"], "mmlu.protocol = 'lm-eval', this run has 'both' (--mmlu-protocol)"),
    (["--no-mmlu"], "mmlu = {"),
    (["--shots", "2"], "mmlu.shots = 5, this run has 2 (--shots)"),
    (["--lora-r", "4"], "lora_r = 8, this run has 4 (--lora-r)"),
    (["--peak-tflops", "100"], "peak_tflops = None, this run has 100.0"),
]


def test_resume_refuses_each_setting_that_changes_the_numbers(tmp_path, monkeypatch, capsys):
    d = tmp_path / "r"
    job = ARGS + ["--max-steps", "20", "--lr-schedule", "cosine", "--limit", "2"]
    from test_resume import signal_after

    signal_after(monkeypatch, 5)
    assert main(job + ["--run-dir", str(d)]) == 130
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    state = sorted((d / "checkpoint").iterdir())
    stamp = {p.name: p.read_bytes() for p in state}
    for change, message in CHANGES:
        assert main(["run", "--resume", str(d), *change]) == 2, change
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (change, err)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"dialogue": f"A: hello {i}", "summary": f"hi {i}"} for i in range(400)]))
    assert main(["run", "--resume", str(d), "--data", str(other)]) == 2
    assert "made with data = " in (err := capsys.readouterr().err) and "chunks" not in err
    assert {p.name: p.read_bytes() for p in sorted((d / "checkpoint").iterdir())} == stamp  # nothing changed
    # what cannot change the numbers may change
    assert main(["run", "--resume", str(d), "--no-progress", "--no-tensorboard",
                 "--checkpoint-every", "3", "--cache-dir", str(tmp_path / "cache2")]) == 0
    straight = tmp_path / "straight"
    assert main(job + ["--run-dir", str(straight)]) == 0
    assert_same_run(result(straight), result(d))


@pytest.mark.slow
def test_ctrl_c_in_the_last_step_then_resume_gives_every_metric(tmp_path, monkeypatch, capsys):
    """Issue: after --resume, loss_flagperf, the last epoch's loss and FlagPerf's token/p/s were null."""
    from test_resume import signal_after

    job = ARGS + ["--max-steps", "6", "--no-mmlu"]
    assert main(job + ["--run-dir", str(tmp_path / "straight")]) == 0
    for at, name in ((6, "last"), (5, "before-last")):
        d = tmp_path / name
        signal_after(monkeypatch, at)
        assert main(job + ["--run-dir", str(d)]) == 130
        monkeypatch.undo()
        monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
        assert main(["run", "--resume", str(d)]) == 0
        b = result(d)
        assert b["metrics"]["tokens_per_s_flagperf"] is not None and b["metrics"]["loss_flagperf"] is not None
        assert_same_run(result(tmp_path / "straight"), b)
        from lorabench.report import seed_row

        row = seed_row(b)
        assert row["token/p/s"] != "/" and row["loss"] != "/"
    # the same at an epoch's end mid-run: the epoch's books are closed once, with the same losses
    job = ARGS + ["--epochs", "2", "--max-steps", "100", "--no-mmlu", "--batch-size", "16"]
    assert main(job + ["--run-dir", str(tmp_path / "straight2")]) == 0
    per_epoch = result(tmp_path / "straight2")["series"]["epoch"].count(1)
    d = tmp_path / "epoch-end"
    signal_after(monkeypatch, per_epoch)
    assert main(job + ["--run-dir", str(d)]) == 130
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--resume", str(d)]) == 0
    assert_same_run(result(tmp_path / "straight2"), result(d))


def test_ctrl_c_during_mmlu_leaves_a_resumable_run(tmp_path, monkeypatch, capsys):
    """Issue: Ctrl-C in the MMLU after training exited 130 with no result.json and nothing to resume."""
    import lorabench.runner as runner

    job = ARGS + ["--max-steps", "4", "--limit", "2", "--mmlu-protocol", "both", "--eval-rouge", "2"]
    pytest.importorskip("rouge_score")
    assert main(job + ["--run-dir", str(tmp_path / "straight")]) == 0
    real = runner.evaluate

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "evaluate", interrupted)
    d = tmp_path / "stopped"
    capsys.readouterr()
    assert main(job + ["--run-dir", str(d)]) == 130
    err = capsys.readouterr().err
    assert "interrupted while evaluating after training after step 4" in err and f"--resume {d}" in err
    assert (d / "checkpoint").is_dir() and not (d / "result.json").exists()
    monkeypatch.setattr(runner, "evaluate", real)
    assert main(["run", "--resume", str(d)]) == 0
    a, b = result(tmp_path / "straight"), result(d)
    assert_same_run(a, b)
    assert a["rouge"] == b["rouge"] and b["metrics"]["mmlu_acc_flagperf"] is not None
    assert not (d / "checkpoint").exists()  # the results written, the checkpoint goes
    monkeypatch.setattr(runner, "write", interrupted)  # Ctrl-C while the results are written: said so
    capsys.readouterr()
    assert main(job + ["--run-dir", str(tmp_path / "writing")]) == 130
    assert "interrupted while writing the results after step 4" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    # a run with nothing after training writes no extra checkpoint at its end
    assert main(ARGS + ["--max-steps", "2", "--no-mmlu", "--run-dir", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "checkpoint").exists()


def out_of_space_at(monkeypatch, name: str):
    """Make the write of the file called ``name`` (in any folder) run out of space, as a full disk would."""
    real = files._write

    def write(path, f, data):
        if path.name == name or path.name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, f, data)

    monkeypatch.setattr(files, "_write", write)


def temporaries(d: Path) -> list[str]:
    from lorabench.rundir import LOCK, MARKER

    return sorted(str(p.relative_to(d)) for p in d.rglob(".*") if p.name not in (MARKER, LOCK))


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "loss.png", "result.json", "report.md",
                                  "mmlu.json", "config.toml", "metrics.jsonl"])
def test_a_full_disk_at_each_write_is_one_line_and_leaves_no_debris(name, tmp_path, monkeypatch, capsys):
    d = tmp_path / "r"
    out_of_space_at(monkeypatch, name)
    assert main(ARGS + ["--max-steps", "2", "--limit", "1", "--run-dir", str(d)]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on the device to write" in err and name in err, err
    assert "bytes" in err and temporaries(d) == [] if d.exists() else True
    if name in ("loss.png", "report.md"):  # written after result.json: the results are kept whole
        r = result(d)
        assert r["metrics"]["train_loss_final"] is not None and r["metrics"]["mmlu_acc"] is not None


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    job = ARGS + ["--max-steps", "6", "--no-mmlu", "--checkpoint-every", "2"]
    assert main(job + ["--run-dir", str(tmp_path / "straight")]) == 0
    d = tmp_path / "r"
    out_of_space_at(monkeypatch, "state-4.pt")
    assert main(job + ["--run-dir", str(d)]) == 6
    assert "state-4.pt" in capsys.readouterr().err
    assert sorted(p.name for p in (d / "checkpoint").iterdir()) == ["rng-0-2.pt", "state-2.pt"]
    assert temporaries(d) == []
    monkeypatch.undo()
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--resume", str(d)]) == 0  # space again: on from step 2
    assert result(d)["resumed_at_step"] == 2
    assert_same_run(result(tmp_path / "straight"), result(d))


def test_a_real_full_disk(tmp_path, capsys):
    """A tmpfs too small for a checkpoint: exit 6, the file named, no temporary file left to keep the disk
    full."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount here")
    try:
        d = small / "r"
        assert main(ARGS + ["--max-steps", "4", "--no-mmlu", "--checkpoint-every", "2", "--run-dir", str(d)]) == 6
        err = capsys.readouterr().err
        assert "no space left on the device to write" in err and "checkpoint" in err, err
        assert temporaries(d) == [] and not list((d / "checkpoint").glob("state-*"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


@pytest.mark.parametrize("argv, message", [
    (ARGS + ["--seq-len", "1"], "--seq-len 1: a sequence needs at least 2 tokens"),
    (["bench", "--seq-len", "1", "--device", "cpu"], "--seq-len 1: a sequence needs at least 2 tokens"),
    (["bench", "--timeout", "0", "--device", "cpu"], "--timeout 0"),
    (ARGS + ["--seed", "-1"], "--seed must be between 0 and"),
    (ARGS + ["--peak-tflops", "0"], "--peak-tflops 0.0: give the device's peak"),
    (ARGS + ["--seed", str(2 ** 40)], "--seed must be between 0 and"),
    (ARGS + ["--lora-targets", "q_proj,q_proj"], "q_proj given more than once"),
    (ARGS + ["--shots", "100", "--limit", "1"], "--shots 100"),
    (["eval", "--shots", "6", "--limit", "1"], "give --shots 5 or less"),
])
def test_impossible_settings_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] in ([], ["cache"])  # no run folder claimed


def test_records_without_content_are_counted_or_refused(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([{"dialogue": "", "summary": " "}] * 600))
    assert main(ARGS + ["--max-steps", "2", "--no-mmlu", "--data", str(empty), "--run-dir",
                        str(tmp_path / "a")]) == 2
    assert "every one of its 600 records is empty" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    some = tmp_path / "some.json"
    some.write_text(json.dumps([{"dialogue": "", "summary": ""}] * 5 +
                               [{"dialogue": f"A: hi {i}\nB: yo", "summary": f"greet {i}"} for i in range(200)]))
    assert main(ARGS + ["--max-steps", "2", "--no-mmlu", "--data", str(some), "--run-dir",
                        str(tmp_path / "b")]) == 0
    assert "5 records without content left out" in result(tmp_path / "b")["config"]["data"]


def test_config_file_numbers_must_be_what_the_flag_takes(tmp_path, capsys):
    for text, message in (("max-steps = 3.7\n", "max-steps = 3.7; --max-steps takes a whole number"),
                          ("max_steps = 3\nmax-steps = 4\n", "'max_steps' and 'max-steps' are the same setting"),
                          ("seed = 1e23\n", "--seed must be between 0 and"),
                          ("data = 5\n", "data = 5; --data takes text (in quotes)"),
                          ("subjects = 5\n", "subjects = 5; --subjects takes text")):
        cfg = tmp_path / "c.toml"
        cfg.write_text(text)
        assert main(["run", "--config", str(cfg), "--run-dir", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    cfg.write_text("max-steps = 2.0\nno-mmlu = true\nno-progress = true\n")  # a whole number written as a float
    assert main(["run", "--config", str(cfg), "--run-dir", str(tmp_path / "y")]) == 0
    assert result(tmp_path / "y")["metrics"]["steps"] == 2


def test_a_bare_lorabench_prints_the_usage_and_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: lorabench") and all(f"lorabench {c} " in out for c in ("run", "eval", "bench",
                                                                                       "report"))


def test_the_labels_say_what_ran(tmp_path):
    """fix_hp names the settings that ran; the CPU's tok/s is marked; FlagPerf's MFU off an A100 is marked."""
    from lorabench.report import render_report, seed_row

    d = tmp_path / "r"
    assert main(ARGS + ["--max-steps", "3", "--lr", "1e-3", "--no-mmlu", "--run-dir", str(d)]) == 0
    r = result(d)
    assert r["config"]["fix_hp"] == "tiny with local_batchsize=4, seq_len=64, max_steps=3, lr=0.001"
    assert "not comparable with GPU figures" in r["metrics"]["throughput_note"]
    report = (d / "report.md").read_text()
    assert "tiny with local_batchsize=4, seq_len=64" in report and " (CPU) |" in report
    for card, marked in (("NVIDIA H100 80GB HBM3", True), ("NVIDIA A100-SXM4-40GB", False)):
        r2 = {**r, "env": {**r["env"], "device_name": card},
              "metrics": {**r["metrics"], "mfu_flagperf": 1.434}}
        assert seed_row(r2)["MFU"] == ("143.4%*" if marked else "143.4%")
        assert ("* FlagPerf's MFU formula" in render_report(r2)) == marked
        assert (f"this run's card ({card}) is not known to be an A100" in render_report(r2)) == marked


def test_report_compares_only_what_is_comparable(tmp_path):
    from lorabench.report import compare_runs

    args = ARGS + ["--max-steps", "3", "--no-mmlu"]
    assert main(args + ["--run-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--run-dir", str(tmp_path / "b")]) == 0  # the same run, its data from the cache
    a, b = result(tmp_path / "a"), result(tmp_path / "b")
    assert (a["config"]["data_cached"], b["config"]["data_cached"]) == (False, True)
    text = compare_runs([("a", a), ("b", b)])
    assert "## Settings that differ\n\nnone" in text and "n/a (" not in text
    other = {**b, "config": {**b["config"], "model_config": {**b["config"]["model_config"], "hidden_size": 1}}}
    text = compare_runs([("a", a), ("other", other)])
    assert "n/a (another model)" in text and "- other: another model than a" in text
    old = {**b, "config": {**b["config"], "data": b["config"]["data"].replace(" samples)", " samples, cached)")}}
    old["config"].pop("data_cached")  # a result.json written before data_cached existed
    assert "## Settings that differ\n\nnone" in compare_runs([("a", a), ("old", old)])


def test_the_step_time_plot_is_scaled_to_the_timed_steps():
    from lorabench.plots import step_time_scale

    top, over = step_time_scale([20000.0, 300.0, 110.0, 111.0, 112.0], untimed=2)
    assert top == pytest.approx(1.25 * 112) and over == [0, 1]
    assert step_time_scale([5.0, 6.0], untimed=3) == (pytest.approx(7.5), [])  # too few: every step timed


def test_a_resumed_runs_warm_up_is_left_out_of_its_timing():
    """The resumed process compiles again: its first steps are untimed as the run's first were (a review found a
    resumed compiled run's mean tok/s at a seventh of its median)."""
    from lorabench.metrics import step_stats

    times = [10.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0]
    assert step_stats(times, 100, 1)["step_time_mean_s"] == pytest.approx(10 / 6)
    s = step_stats(times, 100, 1, resumed_at=4)
    assert s["step_time_mean_s"] == 1.0 and s["timed_steps"] == 5 and s["tokens_per_s_per_chip"] == 100.0
    tokens = [100.0, 100.0, 100.0, 100.0, 900.0, 100.0, 100.0]
    assert step_stats(times, tokens, 1, resumed_at=4)["tokens_per_s_per_chip"] == 100.0


def test_config_toml_names_existing_paths_absolutely(tmp_path, monkeypatch):
    """A run given relative paths writes them absolute in its config.toml, so a bare --resume (or --config) reads the
    same files from any folder; a dataset name stays as given."""
    import shutil

    from lorabench.assets import TINY_DATA

    shutil.copytree(TINY_DATA, tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    assert main(ARGS + ["--data", "d", "--max-steps", "1", "--no-mmlu", "--run-dir", "r"]) == 0
    text = (tmp_path / "r" / "config.toml").read_text()
    assert f'data = "{tmp_path / "d"}"' in text


def test_ctrl_c_before_the_first_step_gives_the_new_folder_back(tmp_path, monkeypatch, capsys):
    import lorabench.runner as runner

    def interrupted(plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "build", interrupted)
    assert main(ARGS + ["--max-steps", "2", "--no-mmlu", "--run-dir", str(tmp_path / "r")]) == 130
    assert not (tmp_path / "r").exists()  # nothing to resume, so nothing left: the same command runs again


def test_resume_refuses_mmlu_for_a_run_started_without_it(tmp_path, capsys):
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.toml").write_text("no-mmlu = true\nmax-steps = 2\n")
    assert main(["run", "--resume", str(d), "--mmlu", str(tmp_path)]) == 2
    assert "was started with --no-mmlu" in capsys.readouterr().err
