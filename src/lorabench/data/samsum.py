"""Training records (samsum's {"dialogue", "summary"}, or another format: formats.py) from every form users have
them in.

``--data`` may be: samsum's ``corpus.7z`` (needs py7zr); a folder with train/val/test files (``.json`` list,
``.jsonl``, ``.csv`` or ``.parquet``) or an HF dataset snapshot (``data/<split>-*.parquet`` shards); one such file (used as the training split); or an HF dataset name when the
``datasets`` package is installed and online. Every row is checked: a missing column or a non-string value fails
with the file, the row and what is wrong.
"""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from ..errors import DataError
from . import looks_like_hub_name

SPLITS = {"train": ("train",), "validation": ("val", "validation", "valid", "dev"), "test": ("test",)}
_EXTS = (".json", ".jsonl", ".csv", ".parquet")




def load_split(source: str | Path, split: str, fmt: str | None = None, template: str | None = None,
               chat=None) -> tuple[list[dict], str]:
    """Records of ``split`` (train / validation / test) and a label naming where they came from, each with its
    training "text" (``fmt``, or ``template``, or the format its columns show: formats.py).
    Returns ([], label) when the source has no such split (e.g. a single file has no validation split). ``chat``:
    the model's chat template (chat.ChatTemplate) for chat records, None where it has none."""
    spec = {"fmt": fmt, "template": template, "chat": chat}
    if split not in SPLITS:
        raise ValueError(split)
    p = Path(source)
    if p.is_dir():
        for stem in SPLITS[split]:
            for ext in _EXTS:
                f = p / f"{stem}{ext}"
                if f.is_file():
                    return read_file(f, **spec), str(f)
        for stem in SPLITS[split]:  # the HF snapshot layout: data/<split>-00000-of-0000N.parquet
            shards = sorted((p / "data").glob(f"{stem}-*.parquet")) if (p / "data").is_dir() else []
            if shards:
                return [r for f in shards for r in read_file(f, **spec)], f"{p / 'data' / stem}-*.parquet"
        if split == "train":
            raise DataError(f"--data {p}: no train.json/.jsonl/.csv/.parquet in this folder, nor "
                            "data/train-*.parquet (the HF snapshot layout)")
        return [], str(p)
    if p.is_file():
        if p.suffix == ".7z":
            return _read_7z(p, split, spec)
        if split != "train":
            return [], str(p)
        return read_file(p, **spec), str(p)
    if looks_like_hub_name(source):
        return _read_hub(str(source), split, spec)
    raise DataError(f"--data {source}: no such file or folder")


def read_file(path: Path, fmt: str | None = None, template: str | None = None, chat=None) -> list[dict]:
    ext = path.suffix.lower()
    if ext not in _EXTS:
        raise DataError(f"{path}: unsupported data file type {ext!r}; use {', '.join(_EXTS)} or corpus.7z")
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001  (pyarrow raises ArrowInvalid, OSError and others on a bad file)
            raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:120]})") from None
        return validate(table.to_pylist(), str(path), fmt=fmt, template=template, chat=chat)
    return parse_bytes(path.read_bytes(), ext, str(path), fmt, template, chat)


def decode_utf8(raw: bytes, label: str) -> str:
    """``raw`` as UTF-8 text (a leading byte-order mark dropped); a DataError naming the file, line and byte
    otherwise."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{label}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); save the file as "
                        "UTF-8") from None


def parse_bytes(raw: bytes, ext: str, label: str, fmt: str | None = None, template: str | None = None,
                chat=None) -> list[dict]:
    text = decode_utf8(raw, label)
    if ext == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}: not valid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(rows, dict) and "data" in rows:
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DataError(f"{label}: expected a JSON list of records (objects of columns)")
        return validate(rows, label, fmt=fmt, template=template, chat=chat)
    if ext == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{label}: line {i} is not valid JSON ({e.msg})") from None
        return validate(rows, label, row_word="line", fmt=fmt, template=template, chat=chat)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    return validate(rows, label, first_row=2, fmt=fmt, template=template, chat=chat)


def validate(rows: list, label: str, row_word: str = "row", first_row: int = 1, fmt: str | None = None,
             template: str | None = None, chat=None) -> list[dict]:
    """Check every row against its format (formats.py; detected from the first row's columns when ``fmt`` and
    ``template`` are None) and return the records: their columns, plus "text", what the record trains on, and
    "response_start", the character where its response begins (formats.render_parts; absent for plain text)."""
    from . import formats

    out = []
    required, optional = None, None
    for i, r in enumerate(rows):
        where = f"{label}: {row_word} {i + first_row}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected an object of columns, got {type(r).__name__}")
        if required is None:
            try:
                fmt = fmt if fmt is not None or template is not None else formats.detect(r, where)
                required, optional = formats.needed(fmt, template)
            except ValueError as e:
                raise DataError(str(e)) from None
        turns = formats.CHAT_COLUMNS.get(fmt) if template is None else None  # a chat record's column
        for col in required + [c for c in optional if c in r and r[c] is not None]:
            if col not in r:
                raise DataError(f"{where}: missing column {col!r} (columns present: {', '.join(map(str, r))})")
            if turns is not None:
                continue  # turns: checked by chat_messages
            if not isinstance(r[col], str):
                raise DataError(f"{where}: {col!r} must be a string, got {type(r[col]).__name__}")
        rec = {c: r[c] for c in required + optional if c in r and r[c] is not None}
        if turns is not None:
            out.append(chat_record(r, turns, chat, where))
            continue
        prompt, response = formats.render_parts(rec, fmt, template)
        if not any(str(rec.get(c, "")).strip() for c in required):
            rec["empty"] = True  # the prompt's words alone: left out and counted (drop_empty)
        rec["text"] = prompt + (response or "")
        if response is not None:
            rec["response_start"] = len(prompt)  # where the response begins in "text" (--loss-on response)
        out.append(rec)
    if not out:
        raise DataError(f"{label}: no rows")
    return out


def drop_empty(records: list[dict], label: str) -> tuple[list[dict], int]:
    """The records with content (some column of the format not blank), and how many had none; a DataError
    naming ``label`` where none has any (training would learn the prompt template alone)."""
    kept = [r for r in records if not r.get("empty")]
    if records and not kept:
        raise DataError(f"{label}: every one of its {len(records)} records is empty (no text in any column it "
                        "trains on); give records with content")
    return kept, len(records) - len(kept)


def chat_record(row: dict, column: str, chat, where: str) -> dict:
    """A chat record: its turns, the text the model's chat template makes of them (special tokens included:
    "templated"), and the character spans of its assistant turns (None where the template does not render turn by
    turn)."""
    from .chat import chat_messages

    chat = chat() if callable(chat) else chat
    if chat is None:
        raise DataError(f"{where}: chat records ({column!r}) are rendered with the model's chat template, and this "
                        "model's tokenizer has none (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                        "give --prompt-template, or a model folder with a template")
    try:
        messages = chat_messages(row, column, where)
        text, spans = chat.render_with_spans(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None
    rec = {"messages": messages, "text": text, "templated": True}
    if spans is not None:
        rec["response_spans"] = spans
    return rec


def _read_7z(path: Path, split: str, spec: dict) -> tuple[list[dict], str]:
    try:
        import py7zr
    except ImportError:
        raise DataError(f"{path}: reading samsum's corpus.7z needs py7zr (pip install py7zr), "
                        "or unpack it and pass the folder") from None
    try:
        with py7zr.SevenZipFile(path, "r") as z:
            names = z.getnames()
            want = [n for n in names if Path(n).stem in SPLITS[split] and Path(n).suffix == ".json"]
            if not want:
                if split == "train":
                    raise DataError(f"{path}: no train.json inside (found {', '.join(names)})")
                return [], str(path)
            with tempfile.TemporaryDirectory() as tmp:  # extract() works across py7zr versions (no read())
                z.extract(path=tmp, targets=[want[0]])
                raw = (Path(tmp) / want[0]).read_bytes()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (py7zr raises Bad7zFile, CrcError, lzma errors, EOFError...)
        raise DataError(f"{path}: not a readable 7z archive ({type(e).__name__}: {str(e)[:120]}); "
                        "re-download it or unpack it and pass the folder") from None
    return parse_bytes(raw, ".json", f"{path}:{want[0]}", **spec), f"{path}:{want[0]}"


def _read_hub(name: str, split: str, spec: dict) -> tuple[list[dict], str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {name}: no such file or folder; read as a hub dataset name it needs the 'datasets' package "
                        "(and internet); download the data and pass its folder instead") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError:
        return [], name
    except Exception as e:  # offline, unknown name, ...
        raise DataError(f"--data {name}: could not load from the hub ({e})") from None
    return validate(list(ds), f"{name}[{split}]", **spec), f"{name}[{split}]"
