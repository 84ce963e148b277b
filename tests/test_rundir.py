"""Output folders (rundir.py): --overwrite replaces only a lorabench folder that holds no input of the job, a
folder is locked for the whole life of the process that writes it, and every refusal leaves the file system as it
was (file listings and hashes before and after)."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabench import rundir
from lorabench.assets import TINY_DATA, TINY_MODEL
from lorabench.cli import main
from lorabench.config import ConfigError

ARGS = ["run", "--no-progress", "--device", "cpu", "--max-steps", "2", "--no-mmlu", "--seq-len", "64",
        "--batch-size", "4"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))


def tree(folder: Path) -> dict:
    """{relative path: sha256 of a file, or "dir"} of everything under ``folder``."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def a_run_folder(path: Path) -> Path:
    """A folder as a finished run leaves it (what --overwrite may replace)."""
    assert main(ARGS + ["--no-save-adapter", "--run-dir", str(path)]) == 0
    return path


def refused(argv, capsys, *words) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err  # one line, naming what
    return err


def test_overwrite_onto_the_working_directory_deletes_nothing(tmp_path, monkeypatch, capsys):
    here = tmp_path / "work"
    here.mkdir()
    (here / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(here)
    before = tree(here)
    refused(ARGS + ["--run-dir", ".", "--overwrite"], capsys, "--overwrite .", "the working directory")
    assert tree(here) == before
    # even a folder that is a lorabench run is refused while it is where the user stands, or above it
    run = a_run_folder(tmp_path / "run")
    (run / "sub").mkdir()
    monkeypatch.chdir(run / "sub")
    before = tree(run)
    refused(ARGS + ["--run-dir", str(run), "--overwrite"], capsys, "an ancestor of the working directory")
    assert tree(run) == before


def test_overwrite_onto_the_model_or_the_data_deletes_nothing(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    data = tmp_path / "data"
    shutil.copytree(TINY_DATA, data)
    before = tree(tmp_path)
    refused(ARGS + ["--model-dir", str(model), "--data", str(data), "--run-dir", str(model), "--overwrite"], capsys,
            f"--overwrite {model}", "is this job's --model-dir")
    refused(ARGS + ["--model-dir", str(model), "--data", str(data), "--run-dir", str(data), "--overwrite"], capsys,
            "--data")
    refused(ARGS + ["--model-dir", str(model), "--data", str(data / "train.json"), "--run-dir", str(data),
                    "--overwrite"], capsys, "holds this job's --data")
    refused(ARGS + ["--run-dir", str(tmp_path), "--overwrite", "--model-dir", str(model), "--data", str(data)],
            capsys, "holds this job's --model-dir")
    assert tree(tmp_path) == before


def test_overwrite_onto_a_folder_with_a_foreign_file_deletes_nothing(tmp_path, capsys):
    run = a_run_folder(tmp_path / "r")
    (run / "notes.txt").write_text("mine")
    before = tree(run)
    refused(ARGS + ["--run-dir", str(run), "--overwrite"], capsys, "files lorabench did not write (notes.txt)")
    assert tree(run) == before
    other = tmp_path / "photos"
    other.mkdir()
    (other / ".hidden").write_text("x")
    refused(ARGS + ["--run-dir", str(other), "--overwrite"], capsys, "did not write (.hidden)")
    assert (other / ".hidden").read_text() == "x"


@pytest.mark.slow
def test_overwrite_replaces_a_lorabench_run_folder_whole(tmp_path, capsys):
    run = a_run_folder(tmp_path / "r")
    (run / "loss.png").write_bytes(b"an old plot")
    old = (run / "result.json").read_text()
    assert main(ARGS + ["--max-steps", "3", "--run-dir", str(run), "--overwrite"]) == 0
    assert (run / "result.json").read_text() != old and (run / "loss.png").read_bytes() != b"an old plot"
    # a folder lorabench did not mark, holding only what lorabench writes (an older version's run), too
    (run / rundir.MARKER).unlink()
    assert main(ARGS + ["--run-dir", str(run), "--overwrite"]) == 0
    # a bench folder: its rows are run folders of their own
    bench = tmp_path / "bench"
    assert main(["bench", "--engines", "native", "--presets", "tiny", "--steps", "3", "--untimed-steps", "1",
                 "--device", "cpu", "--run-dir", str(bench)]) == 0
    assert main(["bench", "--engines", "native", "--presets", "tiny", "--steps", "3", "--untimed-steps", "1",
                 "--device", "cpu", "--run-dir", str(bench), "--overwrite"]) == 0
    (bench / "tiny__native" / "mine.csv").write_text("1,2")
    refused(["bench", "--engines", "native", "--presets", "tiny", "--steps", "3", "--untimed-steps", "1",
             "--device", "cpu", "--run-dir", str(bench), "--overwrite"], capsys, "tiny__native")


def test_check_replaceable_refuses_each_case_on_its_own(tmp_path, monkeypatch):
    """Each rule alone, on a folder that is otherwise a lorabench run folder."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "inputs" / "run"
    run.mkdir(parents=True)
    (run / "result.json").write_text("{}")
    rundir.check_replaceable(run, {})  # replaceable as it is
    with pytest.raises(ConfigError, match="lies inside this job's --model-dir"):
        rundir.check_replaceable(run, {"--model-dir": tmp_path / "inputs"})
    with pytest.raises(ConfigError, match="is this job's --config"):
        rundir.check_replaceable(run, {"--config": run})
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match="the working directory"):
        rundir.check_replaceable(run, {})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the file system's root"):
        rundir.check_replaceable(Path("/"), {})
    monkeypatch.setenv("HOME", str(run))
    with pytest.raises(ConfigError, match="your home folder"):
        rundir.check_replaceable(run, {})
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    (run / "result.json").unlink()
    (run / "report.md").write_text("")
    with pytest.raises(ConfigError, match="not a lorabench output folder"):
        rundir.check_replaceable(run, {})


def holder_process(folder: Path) -> subprocess.Popen:
    """Another process that takes ``folder``'s lock and keeps it until killed."""
    code = ("import sys, time; from lorabench import rundir; rundir.lock(sys.argv[1]); print('held', flush=True); "
            "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_locked_folder_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    run = a_run_folder(tmp_path / "r")
    empty = tmp_path / "empty"
    empty.mkdir()
    p = holder_process(run)
    q = holder_process(empty)
    try:
        before = tree(tmp_path)
        refused(ARGS + ["--run-dir", str(run), "--overwrite"], capsys, f"in use by process {p.pid}")
        refused(ARGS + ["--run-dir", str(empty)], capsys, f"in use by process {q.pid}")
        refused(ARGS + ["--resume", str(run)], capsys, f"in use by process {p.pid}")
        refused(["eval", "--run-dir", str(empty), "--limit", "1"], capsys, f"in use by process {q.pid}")
        assert tree(tmp_path) == before  # nothing written, nothing removed
    finally:
        for proc in (p, q):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert main(ARGS + ["--run-dir", str(empty)]) == 0  # the kernel dropped the killed holder's lock


@pytest.mark.slow
def test_two_runs_at_once_on_one_folder_one_is_refused(tmp_path):
    """Two processes started together on one --run-dir: exactly one runs, the other is refused and writes
    nothing, whichever order they reach the folder in."""
    d = tmp_path / "shared"
    cmd = [sys.executable, "-m", "lorabench", *ARGS, "--max-steps", "20", "--no-save-adapter", "--run-dir", str(d)]
    env = {**os.environ, "LORABENCH_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    errs = " ".join(e for _, e in outs)
    assert codes == [0, 2], errs
    assert "in use by process" in errs or "not empty" in errs
    lines = (d / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == list(range(1, 21))


def test_the_lock_is_held_while_the_run_trains(tmp_path, monkeypatch):
    """Mutation check of the lock's life: while the loop runs, another claim of the folder is refused."""
    import lorabench.train as train_mod

    seen = []
    real = train_mod.train_loop

    def spy(*a, **kw):
        with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
            rundir.claim(tmp_path / "r", overwrite=True)
        seen.append(True)
        return real(*a, **kw)

    monkeypatch.setattr("lorabench.runner.train_loop", spy)
    assert main(ARGS + ["--run-dir", str(tmp_path / "r")]) == 0 and seen
    rundir.claim(tmp_path / "r", overwrite=True)[1].release()  # and free once the run ended


def test_a_refused_job_claims_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(ARGS + ["--engine", "nonsense"], capsys, "--engine")
    refused(ARGS + ["--seed", "-1"], capsys, "--seed")
    refused(ARGS + ["--model-dir", str(TINY_MODEL), "--data", str(tmp_path / "none.json")], capsys, "none.json")
    assert list(tmp_path.iterdir()) == []  # not even runs/
    made = tmp_path / "mine"
    made.mkdir()
    refused(ARGS + ["--data", str(tmp_path / "none.json"), "--run-dir", str(made)], capsys)
    assert made.is_dir() and list(made.iterdir()) == []  # the user's own empty folder stays, empty
    (made / "notes.txt").write_text("mine")
    refused(["run", "--resume", str(made)], capsys, "no checkpoint")
    assert [p.name for p in made.iterdir()] == ["notes.txt"]  # no lock file left in a folder that is no run


def test_a_read_only_working_directory_is_one_line_for_each_command(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through mode bits: a read-only mount is the only way to refuse it
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                          capture_output=True).returncode != 0:
            pytest.skip("root here cannot mount a read-only tmpfs to make a folder it cannot write")
    else:
        ro.chmod(0o555)
    try:
        monkeypatch.chdir(ro)
        import lorabench.runner as runner

        with monkeypatch.context() as m:  # refused before any data is read or tokenised
            m.setattr(runner, "_load_data", lambda plan: pytest.fail("data read before the folder was checked"))
            refused(ARGS, capsys, "cannot make", "give --run-dir")
        refused(["eval", "--limit", "1"], capsys, "cannot make")
        refused(["bench", "--engines", "native", "--presets", "tiny", "--steps", "3", "--untimed-steps", "1",
                 "--device", "cpu"], capsys, "cannot make")
    finally:
        monkeypatch.chdir(tmp_path)
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], capture_output=True)
        else:
            ro.chmod(0o755)


@pytest.mark.slow
def test_a_dead_runs_folder_is_resumable_at_once(tmp_path):
    """A SIGKILLed run leaves its lock file, and no lock: --resume takes the folder straight away."""
    d = tmp_path / "killed"
    env = {**os.environ, "LORABENCH_CACHE": str(tmp_path / "cache")}
    helper = Path(__file__).with_name("interrupt_at.py")
    p = subprocess.run([sys.executable, str(helper), "SIGKILL", "3", *ARGS, "--max-steps", "6",
                        "--checkpoint-every", "2", "--run-dir", str(d)], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL and (d / rundir.LOCK).exists()
    t0 = time.monotonic()
    assert main(["run", "--resume", str(d)]) == 0 and time.monotonic() - t0 < 120


def test_overwrite_never_deletes_runs_inside_the_folder_nor_foreign_files_in_its_subfolders(tmp_path, capsys):
    """A folder of runs (runs/ itself) is no run folder: the runs in it are named, not deleted; a file lorabench
    does not write inside checkpoint/, adapter/ or tensorboard/ is foreign too."""
    outer = a_run_folder(tmp_path / "runs")
    inner = a_run_folder(outer / "20260101-000000-tiny-native")
    before = tree(outer)
    refused(ARGS + ["--run-dir", str(outer), "--overwrite"], capsys, "20260101-000000-tiny-native")
    assert tree(outer) == before and (inner / "result.json").is_file()
    other = tmp_path / "other"
    (other / "checkpoint").mkdir(parents=True)
    (other / "result.json").write_text("{}")
    (other / "checkpoint" / "model_weights.pt").write_bytes(b"weeks of training")
    refused(ARGS + ["--run-dir", str(other), "--overwrite"], capsys, "did not write (checkpoint)")
    assert (other / "checkpoint" / "model_weights.pt").read_bytes() == b"weeks of training"
