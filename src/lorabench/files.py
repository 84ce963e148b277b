"""Files written whole or not at all: every output goes to a temporary name beside its place, is flushed, given
the mode the user's umask asks for and renamed over it, so a reader always finds the old content or the new one
complete. A write that runs out of space (ENOSPC, quota) removes its temporary file and raises ``DiskFull``, which
names the file and the bytes it needed; the CLI turns it into one line and exit code 6."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path


class DiskFull(Exception):
    """A write ran out of space: the message names the file, the bytes it needed and the bytes free there."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: Path, needed: int | None, e: BaseException) -> DiskFull:
    try:
        room = f", {shutil.disk_usage(Path(path).parent).free:,} bytes free there"
    except OSError:
        room = ""
    size = f" ({needed:,} bytes{room})" if needed is not None else f" ({room[2:]})" if room else ""
    return DiskFull(f"no space left on the device to write {path}{size}; free some space and run again (a "
                    f"checkpointed run: --resume it) [{e.strerror if isinstance(e, OSError) else e}]")


@contextlib.contextmanager
def full_disk_names(path: Path, needed: int | None = None):
    """Inside: a write that runs out of space raises ``DiskFull`` naming ``path`` (and the ``needed`` bytes); any
    other error passes as it is."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, needed, e) from None
        raise


def _write(path: Path, f, data: bytes):
    """One file's bytes (its own function, so a test can make it run out of space for a chosen file)."""
    f.write(data)


def honour_umask(path, is_dir: bool = False):
    """Give a file made by tempfile (always 0600, folders 0700) the mode the user's umask asks for, so others on
    a shared machine can read results as they can read the user's other files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if is_dir else 0o666) & ~mask)


def write_bytes_atomic(path: Path, data: bytes, sync: bool = False) -> None:
    """``data`` into a temporary file beside ``path``, renamed over it once complete (and, with ``sync``, flushed
    to disk first), so ``path`` is always the old content or the new one whole. Out of space: the temporary file
    removed, ``DiskFull`` raised."""
    path = Path(path)
    tmp = None
    try:
        with full_disk_names(path, len(data)):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                _write(Path(tmp), f, data)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            honour_umask(tmp)
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_atomic(path: Path, write, sync: bool = False) -> None:
    """``write(binary file)`` into memory, then to ``path`` as ``write_bytes_atomic`` does."""
    import io

    buf = io.BytesIO()
    write(buf)
    write_bytes_atomic(path, buf.getvalue(), sync=sync)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_folder_atomic(out_dir: Path, files: dict[str, bytes]) -> None:
    """A folder of ``files`` ({name: bytes}) made under a temporary name and renamed into place (an earlier
    folder of that name replaced only once the new one is complete); out of space: the temporary folder removed,
    ``DiskFull`` raised."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    name = None
    try:
        honour_umask(tmp, is_dir=True)
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                _write(tmp / name, f, data)
            honour_umask(tmp / name)
        if out_dir.exists():  # replacing an earlier folder: the new one is complete before the old one goes
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        tmp = None
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(out_dir / (name or ""), sum(map(len, files.values())), e) from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
