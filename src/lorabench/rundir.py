"""Output folders: claimed before any work, locked for the life of the process that writes them, and replaced by
``--overwrite`` only where they are recognisably lorabench's own.

Every folder lorabench writes into (``run``, ``eval``, ``bench`` and each bench row) holds a marker file
(``MARKER``) and a lock file (``LOCK``). The lock is an exclusive ``fcntl.flock`` held for as long as the writer
runs: the kernel drops it when the process ends, however it ends, so a killed run never leaves a stale lock, and a
second process on the same folder is refused with the holder's pid before it writes anything.

``--overwrite`` replaces a folder only when nothing in it is foreign (every entry is one lorabench writes, and the
folder carries the marker, a ``result.json`` or a ``metrics.jsonl``), and never a folder that is ``/``, the home
folder, the working directory or one of its ancestors, or one that holds, is inside or contains an input of the
job (model, data, MMLU, adapter, config file).
"""
from __future__ import annotations

import fnmatch
import os
import tempfile
from pathlib import Path

from .errors import ConfigError

MARKER = ".lorabench"
"""Written into every folder lorabench claims (what made it), so --overwrite can tell its folders from others."""
LOCK = ".lorabench.lock"
"""The lock file: the holder's pid while a process writes the folder."""

_VISIBLE = ("result.json", "report.md", "metrics.jsonl", "config.toml", "eval.json", "bench.json", "bench.md",
            "mmlu.json", "mmlu.md", "mmlu_predictions.jsonl", "mmlu_flagperf.json", "mmlu_flagperf_predictions.jsonl",
            "rouge_predictions.jsonl", "adapter", "best_adapter", "checkpoint", "tensorboard")
OUTPUT_NAMES = (MARKER, LOCK, *_VISIBLE, "*.png", ".*.png.*", ".write-check.*",
                *(f".{n}{sep}*" for n in _VISIBLE for sep in ".-"))
"""Names (glob patterns) of what lorabench writes in an output folder, its temporary files included."""

RECOGNISED_BY = (MARKER, "result.json", "metrics.jsonl", "bench.json")


CONTENTS = {"adapter": ("adapter_config.json", "adapter_model.safetensors"),
            "best_adapter": ("adapter_config.json", "adapter_model.safetensors"),
            "checkpoint": ("state-*.pt", "rng-*-*.pt", ".state-*", ".rng-*"),
            "tensorboard": ("events.out.tfevents.*",)}
"""What lorabench writes inside its own subfolders: anything else in them is foreign."""


def is_output_name(name: str) -> bool:
    """Whether a file called ``name`` is one lorabench writes in an output folder (OUTPUT_NAMES)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in OUTPUT_NAMES)


def _lorabench_entry(entry: Path, bench: bool = False) -> bool:
    """Whether ``entry`` is something lorabench writes: a file of OUTPUT_NAMES, one of its subfolders holding only
    its own files, or (in a bench folder, ``bench``) a row's run folder that no process holds."""
    if entry.is_symlink():
        return False
    if entry.is_dir():
        if entry.name in CONTENTS:
            return all(not e.is_dir() and any(fnmatch.fnmatch(e.name, p) for p in CONTENTS[entry.name])
                       for e in entry.iterdir())
        if any(fnmatch.fnmatch(entry.name, p) for p in OUTPUT_NAMES if p.startswith(".")):
            return True  # a temporary folder of lorabench's (.adapter-*)
        return bench and holder(entry) is None and is_recognised(entry) and foreign_entries(entry) == []
    return is_output_name(entry.name)


def is_recognised(folder: Path) -> bool:
    return any((folder / name).exists() for name in RECOGNISED_BY)


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that lorabench does not write."""
    bench = (Path(folder) / "bench.json").is_file()  # only a bench folder holds run folders (its rows)
    return sorted(e.name for e in Path(folder).iterdir() if not _lorabench_entry(e, bench))


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_replaceable(folder: Path, inputs: dict[str, Path | str | None]):
    """Refuse (ConfigError) to replace ``folder`` unless it is a lorabench output folder and no input of the job
    is in it or around it. ``inputs``: {flag: path} of the job's inputs (None and non-paths skipped)."""
    folder = Path(folder)
    real = folder.resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if real == Path(real.anchor) or real == home or _inside(cwd, real):
        what = ("the file system's root" if real == Path(real.anchor) else "your home folder" if real == home
                else "the working directory" if real == cwd else "an ancestor of the working directory")
        raise ConfigError(f"--overwrite {folder}: refused, it is {what}; give --run-dir a folder of its own")
    for flag, path in inputs.items():
        if path is None:
            continue
        p = Path(path)
        if not p.exists():
            continue
        p = p.resolve()
        if _inside(p, real) or _inside(real, p):
            where = "holds" if _inside(p, real) and p != real else "is" if p == real else "lies inside"
            raise ConfigError(f"--overwrite {folder}: refused, it {where} this job's {flag} {path}; give --run-dir "
                              "a folder of its own")
    foreign = foreign_entries(real)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"--overwrite {folder}: refused, it holds files lorabench did not write ({shown}); "
                          "remove them or give another --run-dir")
    if not is_recognised(real):
        raise ConfigError(f"--overwrite {folder}: refused, it is not a lorabench output folder (no {MARKER}, "
                          "result.json or metrics.jsonl); give another --run-dir")


class FolderLock:
    """An exclusive lock on an output folder, held until ``release`` or the process's end."""

    def __init__(self, folder: Path, fd: int, created: bool = False):
        self.folder, self.fd, self.created = Path(folder), fd, created
        """``created``: whether the claim made the folder (unclaim removes only such a folder)."""

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder(folder: Path) -> str | None:
    """The pid that holds ``folder``'s lock, as a phrase, or None where no process holds it. Reads only."""
    import fcntl

    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _who(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _who(fd: int) -> str:
    """The holder named in a lock file: the pid its holder wrote there."""
    pid = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return f"process {pid}" if pid.isdigit() else "another process"


def in_use(folder: Path, who: str) -> ConfigError:
    return ConfigError(f"{folder}: in use by {who} (a lorabench run writing there); wait for it to end or give "
                       "another folder")


def lock(folder: Path) -> FolderLock:
    """Take ``folder``'s lock (the folder exists) and write this pid into it; a ConfigError naming the holder if
    another process has it."""
    import fcntl

    folder = Path(folder)
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ConfigError(f"{folder}: cannot write there ({e.strerror}); give a folder you can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _who(fd)
        os.close(fd)
        raise in_use(folder, who) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return FolderLock(folder, fd)


def _mark(folder: Path, kind: str):
    (folder / MARKER).write_text(f"lorabench {kind} folder\n")


def _empty_but_ours(folder: Path) -> bool:
    return all(e.name in (MARKER, LOCK) for e in folder.iterdir())


def check_claimable(run_dir: Path | None, overwrite: bool = False, inputs: dict | None = None,
                    default: Path | None = None):
    """The checks ``claim`` makes before it takes a folder, reading only: a job runs them before any work, so a
    refusal costs nothing (``claim`` makes them again under the lock). ``default``: the folder made where
    ``run_dir`` is None; the nearest existing folder above a folder to be made must be writable."""
    made = Path(run_dir) if run_dir is not None else Path(default) if default is not None else None
    if made is not None and (run_dir is None or not made.exists()):
        base = made.absolute().parent
        while not base.exists():
            base = base.parent
        if not os.access(base, os.W_OK | os.X_OK):
            raise ConfigError(f"{base}: cannot make {made} here (no write access); give --run-dir a folder you can "
                              "write")
    if run_dir is None:
        return
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: is a file, not a folder")
    if run_dir.is_dir():
        check_free(run_dir)
        _check_contents(run_dir, overwrite, inputs)


def check_free(folder: Path):
    """Refuse a folder another process holds, naming it (reads only)."""
    who = holder(folder)
    if who is not None:
        raise in_use(folder, who)


def _check_contents(run_dir: Path, overwrite: bool, inputs: dict | None) -> bool:
    """Whether ``run_dir`` holds anything but the claim's own files; a ConfigError where it does and may not be
    replaced (without ``overwrite``, or not a lorabench folder: check_replaceable)."""
    if _empty_but_ours(run_dir):
        return False
    if not overwrite:
        raise ConfigError(f"--run-dir {run_dir}: not empty (another run's results?); give an empty or new "
                          "folder, or --overwrite to replace a lorabench run folder whole")
    check_replaceable(run_dir, inputs or {})
    return True


def claim(run_dir: Path | None, overwrite: bool = False, default: Path | None = None, kind: str = "run",
          inputs: dict | None = None) -> tuple[Path, FolderLock]:
    """The output folder of a job, made now, locked and checked writable before any work: ``run_dir`` as given,
    which must be absent or empty (``overwrite`` replaces a lorabench folder whole, ``check_replaceable``); or,
    where none is given, ``default`` made unique with -2, -3, ... (one mkdir each, so two jobs started in the same
    second never share one). Refusals are ConfigErrors and leave the file system as it was."""
    if run_dir is None:
        base = Path(default)
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{base.parent}: cannot make the folder for run folders ({e.strerror}); give --run-dir "
                              "a folder you can write") from None
        for k in range(1, 10_000):
            candidate = base if k == 1 else base.with_name(f"{base.name}-{k}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise ConfigError(f"{candidate}: cannot make the run folder ({e.strerror}); give --run-dir a folder "
                                  "you can write") from None
            held = lock(candidate)
            held.created = True
            _mark(candidate, kind)
            return candidate, held
        raise ConfigError(f"{base}: 9,999 run folders of that name exist; give --run-dir")
    run_dir = Path(run_dir)
    check_claimable(run_dir, overwrite, inputs)
    existed = run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--run-dir {run_dir}: cannot make it ({e.strerror}); give a folder you can write") from None
    held = lock(run_dir)
    held.created = not existed
    try:
        if existed and _check_contents(run_dir, overwrite, inputs):  # (checked above; again now, under the lock)
            _clear(run_dir)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
        _mark(run_dir, kind)
    except OSError as e:
        held.release()
        raise ConfigError(f"--run-dir {run_dir}: not writable ({e.strerror}); give a folder you can write") from None
    except ConfigError:
        held.release()
        raise
    return run_dir, held


def _clear(folder: Path):
    """Remove everything in ``folder`` but its lock file."""
    import shutil

    for e in folder.iterdir():
        if e.name == LOCK:
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()


def unclaim(folder: Path, held: FolderLock | None):
    """Give back a folder claimed by a job that then stopped before its work began: the files the claim wrote
    (marker, lock, config.toml) removed, and the folder itself where the claim made it; the lock released."""
    try:
        ours = (MARKER, LOCK, "config.toml")
        if folder.is_dir() and all(e.name in ours for e in folder.iterdir()):
            for name in ours:
                (folder / name).unlink(missing_ok=True)
            if held is not None and held.created:
                folder.rmdir()
    except OSError:
        pass
    finally:
        if held is not None:
            held.release()
