"""samsum loading, FlagPerf's prompt, packing (hand-worked), the packed-data cache, and data errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lorabench.data.packing import format_sample, pack, packed_dataset, tokenize_records
from lorabench.data.samsum import DataError, load_split
from lorabench.data.tokenizer import Tokenizer
from lorabench.assets import TINY_DATA, TINY_MODEL


def test_prompt_is_flagperfs_template():
    rec = {"dialogue": "Anna: hi\r\nTom: hello", "summary": "They greet."}
    assert format_sample(rec) == "Summarize this dialog:\nAnna: hi\r\nTom: hello\n---\nSummary:\nThey greet."


def test_pack_hand_worked():
    # samples [1 5 6 2] [1 7 2] [1 8 9 9 2] -> stream 1 5 6 2 1 7 2 1 8 9 9 2 -> chunks of 5, tail of 2 dropped
    out = pack([[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 9, 2]], 5)
    assert out.tolist() == [[1, 5, 6, 2, 1], [7, 2, 1, 8, 9]]
    assert out.dtype == np.int32


def test_tokenize_adds_bos_and_eos():
    tok = Tokenizer(TINY_MODEL)
    rec = {"dialogue": "Anna: hi", "summary": "Anna says hi."}
    (ids,) = tokenize_records([rec], tok)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert ids[1:-1] == tok.encode(format_sample(rec))
    assert tok.decode(ids[1:-1]) == format_sample(rec)


def test_cache_hit_and_key(tmp_path):
    tok = Tokenizer(TINY_MODEL)
    recs, _ = load_split(TINY_DATA, "train")
    a, cached_a = packed_dataset(recs[:50], tok, 64, tmp_path)
    b, cached_b = packed_dataset(recs[:50], tok, 64, tmp_path)
    c, cached_c = packed_dataset(recs[:51], tok, 64, tmp_path)
    assert (cached_a, cached_b, cached_c) == (False, True, False)
    assert np.array_equal(a, b) and len(c) >= len(a)
    assert len(list((tmp_path / "packed").glob("*.npy"))) == 2


def write_rows(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif kind == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


ROWS = [{"id": str(i), "dialogue": f"A: line {i}\r\nB: ok, \"quoted\", {i}", "summary": f"sum {i}"} for i in range(5)]


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_every_file_format_gives_the_same_records(tmp_path, kind):
    f = tmp_path / f"train.{kind}"
    write_rows(f, ROWS, kind)
    recs, label = load_split(f, "train")
    assert recs == [{"dialogue": r["dialogue"], "summary": r["summary"], "text": format_sample(r),
                    "response_start": len(format_sample(r)) - len(r["summary"])} for r in ROWS]
    assert load_split(f, "validation")[0] == []
    # a folder with train/val files
    d = tmp_path / "folder"
    d.mkdir()
    write_rows(d / f"train.{kind}", ROWS, kind)
    write_rows(d / f"val.{kind}", ROWS[:2], kind)
    assert load_split(d, "train")[0] == recs and len(load_split(d, "validation")[0]) == 2


def test_malformed_rows_name_file_and_row(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"dialogue": "a", "summary": "b"}\n{"dialogue": "a"}\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: missing column 'summary'"):
        load_split(f, "train")
    f.write_text('{"dialogue": "a", "summary": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2 is not valid JSON"):
        load_split(f, "train")
    g = tmp_path / "train.json"
    g.write_text(json.dumps([{"dialogue": "a", "summary": None}]))
    with pytest.raises(DataError, match=r"train.json: row 1: 'summary' must be a string, got NoneType"):
        load_split(g, "train")
    h = tmp_path / "train.csv"
    h.write_text("dialogue,notes\nhello,world\n")
    with pytest.raises(DataError, match=r"train.csv: row 2: missing column 'summary'"):
        load_split(h, "train", fmt="samsum")
    with pytest.raises(DataError, match=r"train.csv: row 2: columns dialogue, notes match no format"):
        load_split(h, "train")
    with pytest.raises(DataError, match="no such file or folder"):
        load_split(tmp_path / "absent", "train")
    with pytest.raises(DataError, match="no train.json"):
        load_split(tmp_path / "empty_dir_that_exists" if (tmp_path / "empty_dir_that_exists").mkdir() is None
                   else None, "train")


def test_7z_without_py7zr_says_what_to_do(tmp_path, monkeypatch):
    import sys

    f = tmp_path / "corpus.7z"
    f.write_bytes(b"7z")
    monkeypatch.setitem(sys.modules, "py7zr", None)
    with pytest.raises(DataError, match="needs py7zr"):
        load_split(f, "train")


def test_samsum_corpus_7z(tmp_path):
    """samsum's own archive layout: corpus.7z holding train.json / val.json / test.json."""
    py7zr = pytest.importorskip("py7zr")
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "train.json").write_text(json.dumps(ROWS))
    (src / "val.json").write_text(json.dumps(ROWS[:2]))
    (src / "test.json").write_text(json.dumps(ROWS[2:]))
    archive = tmp_path / "corpus.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        for name in ("train.json", "val.json", "test.json"):
            z.write(src / name, name)
    train, label = load_split(archive, "train")
    assert train == [{"dialogue": r["dialogue"], "summary": r["summary"], "text": format_sample(r),
                    "response_start": len(format_sample(r)) - len(r["summary"])} for r in ROWS]
    assert label.endswith("corpus.7z:train.json")
    assert len(load_split(archive, "validation")[0]) == 2 and len(load_split(archive, "test")[0]) == 3


def test_hub_dataset_name_goes_through_datasets(monkeypatch):
    """'owner/name' (not a local path) is read with datasets.load_dataset, one split at a time."""
    import sys
    import types

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if split == "test":
            raise ValueError("no such split")
        return ROWS[:3] if split == "train" else ROWS[:1]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    recs, label = load_split("Samsung/samsum", "train")
    assert len(recs) == 3 and label == "Samsung/samsum[train]"
    assert len(load_split("Samsung/samsum", "validation")[0]) == 1
    assert load_split("Samsung/samsum", "test")[0] == []
    assert calls == [("Samsung/samsum", "train"), ("Samsung/samsum", "validation"), ("Samsung/samsum", "test")]
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        load_split("Samsung/samsum", "train")


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv"])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, ext):
    body = {".json": b'[{"dialogue": "a",\n "summary": "caf\xe9"}]',
            ".jsonl": b'{"dialogue": "a", "summary": "b"}\n{"dialogue": "caf\xe9", "summary": "b"}\n',
            ".csv": b"dialogue,summary\nhello,world\ncaf\xe9,b\n"}[ext]
    line = {".json": 2, ".jsonl": 2, ".csv": 3}[ext]
    f = tmp_path / f"train{ext}"
    f.write_bytes(body)
    with pytest.raises(DataError, match=rf"train\{ext}: not UTF-8 text \(byte 0xe9 at line {line}\)"):
        load_split(f, "train")
    f.write_bytes(b"\xef\xbb\xbf" + body.replace(b"\xe9", "\u00e9".encode()))  # UTF-8 with a BOM reads
    assert load_split(f, "train")[0]


def test_corrupt_parquet_and_7z_are_one_line_errors(tmp_path):
    p = tmp_path / "train.parquet"
    p.write_bytes(b"PAR1 this is not a parquet file")
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match=r"train.parquet: not a readable parquet file"):
        load_split(p, "train")
    pytest.importorskip("py7zr")
    z = tmp_path / "corpus.7z"
    z.write_bytes(b"7z\xbc\xaf\x27\x1c" + b"\x00" * 40)
    with pytest.raises(DataError, match=r"corpus.7z: not a readable 7z archive"):
        load_split(z, "train")


def test_a_garbage_tokenizer_is_a_one_line_error(tmp_path):
    import shutil

    from lorabench.config import ConfigError

    d = tmp_path / "model"
    shutil.copytree(TINY_MODEL, d)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    with pytest.raises(ConfigError, match=r"tokenizer.json: not a readable tokenizer"):
        Tokenizer(d)
    shutil.copy(TINY_MODEL / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text("{truncated")
    with pytest.raises(ConfigError, match=r"tokenizer_config.json: not valid JSON"):
        Tokenizer(d)


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "other tokens", "no checksum"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_note(tmp_path, capsys, damage):
    tok = Tokenizer(TINY_MODEL)
    recs, _ = load_split(TINY_DATA, "train")
    good, _ = packed_dataset(recs[:50], tok, 64, tmp_path)
    (entry,) = (tmp_path / "packed").glob("*.npy")
    if damage == "zero bytes":
        entry.write_bytes(b"")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "other tokens":  # a valid array of the right shape, other values
        np.save(entry, good[::-1].copy())
    else:
        entry.with_suffix(".sha256").unlink()
    again, cached = packed_dataset(recs[:50], tok, 64, tmp_path)
    assert not cached and np.array_equal(again, good)
    assert f"data cache entry {entry}" in capsys.readouterr().err
    assert packed_dataset(recs[:50], tok, 64, tmp_path)[1]  # and the rebuilt entry is used from then on


def test_a_cache_path_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "cachefile"
    f.write_text("x")
    with pytest.raises(DataError, match=r"the data cache .*cachefile is a file"):
        packed_dataset([{"dialogue": "a", "summary": "b"}], Tokenizer(TINY_MODEL), 8, f)


def test_formats_are_detected_and_rendered(tmp_path):
    """alpaca (with and without input), plain text and a --prompt-template, each to the text worked out here; chat
    records without a chat template in the model are refused with what to do; a template column a row lacks is
    named."""
    from lorabench.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    f = tmp_path / "train.jsonl"
    rows = [{"instruction": "Add.", "input": "2 + 2", "output": "4"}, {"instruction": "Greet.", "output": "Hi"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    recs, _ = load_split(f, "train")
    assert recs[0]["text"] == ("Below is an instruction that describes a task, paired with an input that provides "
                               "further context. Write a response that appropriately completes the request.\n\n"
                               "### Instruction:\nAdd.\n\n### Input:\n2 + 2\n\n### Response:\n4")
    assert recs[0]["text"] == ALPACA_WITH_INPUT.format(instruction="Add.", input="2 + 2") + "4"
    assert recs[1]["text"] == ALPACA_NO_INPUT.format(instruction="Greet.") + "Hi"
    f.write_text(json.dumps({"text": "plain words"}) + "\n")
    assert load_split(f, "train")[0][0]["text"] == "plain words"
    f.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n")
    recs, _ = load_split(f, "train", template="Q: {q}\nA: {a}")
    assert recs[0]["text"] == "Q: Why?\nA: Because."
    with pytest.raises(DataError, match=r"train.jsonl: line 1: missing column 'b'"):
        load_split(f, "train", template="{q} {b}")
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: chat records .* this model's tokenizer has none"):
        load_split(f, "train")


def test_each_format_packs_its_own_text(tmp_path):
    """The packed tokens are the tokenizer's encoding of each record's text, BOS and EOS around it."""
    tok = Tokenizer(TINY_MODEL)
    recs = [{"text": "one two three"}, {"text": "four"}]
    ids = tokenize_records(recs, tok)
    assert ids[0] == tok.with_bos(tok.encode("one two three")) + [tok.eos_id]
    assert ids[1] == tok.with_bos(tok.encode("four")) + [tok.eos_id]


def test_hf_snapshot_layout_reads_every_shard(tmp_path):
    """A dataset as the hub stores it: data/train-0000K-of-00002.parquet shards (in order) and a validation shard."""
    pytest.importorskip("pyarrow")
    d = tmp_path / "snapshot" / "data"
    d.mkdir(parents=True)
    write_rows(d / "train-00000-of-00002.parquet", ROWS[:3], "parquet")
    write_rows(d / "train-00001-of-00002.parquet", ROWS[3:], "parquet")
    write_rows(d / "validation-00000-of-00001.parquet", ROWS[:2], "parquet")
    train, label = load_split(tmp_path / "snapshot", "train")
    assert [r["summary"] for r in train] == [r["summary"] for r in ROWS] and label.endswith("train-*.parquet")
    assert len(load_split(tmp_path / "snapshot", "validation")[0]) == 2
    assert load_split(tmp_path / "snapshot", "test")[0] == []


def test_response_masks_are_the_answer_tokens_hand_built():
    """--loss-on response: ids equal to training on everything; the mask is 0 on BOS and the prompt, 1 on the
    answer and EOS: the tokens before the first 1 decode to the prompt exactly, those from it to the answer
    (samsum's summary, alpaca's output, a template's last column and what follows it)."""
    from lorabench.data.packing import tokenize_with_mask
    from lorabench.data.samsum import validate

    tok = Tokenizer(TINY_MODEL)
    cases = [
        ({"dialogue": "Anna: hi\nTom: hello", "summary": "They greet."}, None,
         "Summarize this dialog:\nAnna: hi\nTom: hello\n---\nSummary:\n", "They greet."),
        ({"instruction": "Add 2 and 2.", "output": "4"}, None,
         "Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\nAdd 2 and 2.\n\n### Response:\n", "4"),
        ({"q": "Sky?", "a": "Blue.", "note": "x"}, "Question: {q}\n{note}\nAnswer:\n{a}\n",
         "Question: Sky?\nx\nAnswer:\n", "Blue.\n"),
    ]
    for row, template, prompt, response in cases:
        (rec,) = validate([row], "t", template=template)
        assert rec["text"] == prompt + response and rec["response_start"] == len(prompt)
        (ids,), (mask,) = tokenize_with_mask([rec], tok)
        assert ids == tokenize_records([rec], tok)[0]  # the same tokens as --loss-on all
        first = mask.index(1)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(mask) == len(ids)
        assert mask == [0] * first + [1] * (len(ids) - first)
        # (as the tokenizer round-trips text: the tiny one maps '#' to <unk>, which decodes to nothing)
        assert tok.decode(ids[1:first]) == tok.decode(tok.encode(prompt))
        assert tok.decode(ids[first:-1]) == response


def test_a_token_straddling_the_boundary_is_trained_and_plain_text_has_no_response(tmp_path):
    """A prompt ending in a space: the answer's first token carries that space, and it is a response token (the
    model must produce it); plain text records have no response and are refused by name."""
    from lorabench.data.packing import packed_dataset, tokenize_with_mask
    from lorabench.data.samsum import validate

    tok = Tokenizer(TINY_MODEL)
    (rec,) = validate([{"q": "2+2", "a": "four"}], "t", template="q: {q} a: {a}")
    (ids,), (mask,) = tokenize_with_mask([rec], tok)
    first = mask.index(1)
    assert tok.decode(ids[1:first]) == "q: 2+2 a:"  # the space before "four" is no prompt token's
    assert tok.decode(ids[first:first + 1]).startswith(" ") or tok.decode(ids[first:-1]) == "four"
    (plain,) = validate([{"text": "just text"}], "t")
    with pytest.raises(DataError, match="record 1 has no response"):
        packed_dataset([plain], tok, 8, tmp_path, loss_on="response")


def test_pack_documents_hand_worked():
    """Samples [1 5 6 2] [1 7 2] [1 8 9 9 2] in chunks of 5: ids as pack cuts them; positions restart at each
    document and at each chunk (the second document's tail "7 2" is a part of its own); a position-0 token is no
    target; a response mask (given) is kept under that rule."""
    from lorabench.data.packing import pack_documents

    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 9, 2]]
    out = pack_documents(docs, None, 5)
    assert out.dtype == np.int32 and out.shape == (2, 3, 5)
    assert out[:, 0].tolist() == [[1, 5, 6, 2, 1], [7, 2, 1, 8, 9]]
    assert out[:, 2].tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert out[:, 1].tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 1, 1]]
    masked = pack_documents(docs, [[0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1]], 5)
    assert masked[:, 1].tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]


def test_pack_rows_hand_worked():
    """--packing none: one record a row, padded (id 9 here, mask 0, position -1); a record longer than a row goes on
    in a row of its own from position 0; a row's first token is no target; a given mask is kept."""
    from lorabench.data.packing import pack_rows

    out = pack_rows([[1, 5, 6, 2], [1, 7, 2, 3, 4, 8, 2]], [[0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1]], 5, pad_id=9)
    assert out.dtype == np.int32 and out.shape == (3, 3, 5)
    assert out[:, 0].tolist() == [[1, 5, 6, 2, 9], [1, 7, 2, 3, 4], [8, 2, 9, 9, 9]]
    assert out[:, 1].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert out[:, 2].tolist() == [[0, 1, 2, 3, -1], [0, 1, 2, 3, 4], [0, 1, -1, -1, -1]]
