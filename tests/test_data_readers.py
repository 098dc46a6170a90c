"""Input files → document pieces: formats, bad lines, bad bytes, and the errors naming the file."""

import gzip
import json

import numpy as np
import pytest

from nvium_jax.data import DataError
from nvium_jax.data import readers
from nvium_jax.data.readers import ReadCounts, expand_inputs, input_record, read_pieces
from nvium_jax.data.tokenizer import encode_pieces, train_bpe


def _read(path, field="text", strict=False):
    counts = ReadCounts()
    return list(read_pieces(path, field, strict, counts)), counts


def test_expand_inputs_keeps_order_dedups_and_expands_globs(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / name).write_text("x")
    paths = expand_inputs([str(tmp_path / "c.jsonl"), str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    assert [p.name for p in paths] == ["c.jsonl", "a.txt", "b.txt"]


@pytest.mark.parametrize("make, arg, message", [
    (lambda d: None, "missing.txt", "missing.txt' does not exist"),
    (lambda d: (d / "empty.txt").write_text(""), "empty.txt", "empty.txt' is empty"),
    (lambda d: None, "*.nothing", r"input glob '.*\*.nothing' matches no file"),
    (lambda d: (d / "sub").mkdir(), "sub", "sub' is a directory"),
])
def test_bad_inputs_name_the_file(tmp_path, make, arg, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        expand_inputs([str(tmp_path / arg)])
    with pytest.raises(DataError, match="no input given"):
        expand_inputs([])


def test_input_record_hashes_content(tmp_path):
    (tmp_path / "a.txt").write_text("same")
    (tmp_path / "b.txt").write_text("same")
    a, b = input_record(tmp_path / "a.txt"), input_record(tmp_path / "b.txt")
    assert a["sha256"] == b["sha256"] and a["bytes"] == 4 and a["path"] != b["path"]


def test_text_file_in_pieces_encodes_like_the_whole_file(tmp_path, monkeypatch):
    lines = ["Verse one, and so on.", "  indented line", "", "tabs\tend \t", "\r", "last words"]
    text = "\n".join(lines * 40) + "\r\nno final newline"
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(readers, "PIECE_BYTES", 64)
    pieces, counts = _read(tmp_path / "doc.txt")
    assert len(pieces) > 10 and counts.documents == 1
    assert "".join(p.text for p in pieces) == text
    assert [p.starts_doc for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [p.ends_doc for p in pieces] == [False] * (len(pieces) - 1) + [True]
    bpe = train_bpe([text], 300)
    whole = bpe.encode(text, add_special_tokens=False).ids + [0]
    assert encode_pieces(bpe, pieces, None, 0, np.dtype(np.uint16)).tolist() == whole


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bytes \xe2\x82 and a real \xef\xbf\xbd")
    pieces, counts = _read(tmp_path / "bad.txt")
    assert pieces[0].text == "ok \ufffd\ufffd bytes \ufffd and a real \ufffd"
    assert counts.replaced_utf8 == 3
    lines = [b'{"text": "caf\xe9"}', b'{"text": "fine"}']
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines))
    pieces, counts = _read(tmp_path / "bad.jsonl")
    assert [p.text for p in pieces] == ["caf\ufffd", "fine"] and counts.replaced_utf8 == 1


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_skips_and_counts_bad_lines(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [
        json.dumps({"text": "one"}), "not json", "", json.dumps({"body": "x"}),
        json.dumps({"text": None}), "[1, 2]", json.dumps({"text": "two", "id": 3}),
    ])
    pieces, counts = _read(path)
    assert [p.text for p in pieces] == ["one", "two"]
    assert all(p.starts_doc and p.ends_doc for p in pieces)
    assert (counts.documents, counts.not_json, counts.missing_field) == (2, 2, 2)
    assert [p.text for p in _read(path, field="body")[0]] == ["x"]


def test_jsonl_strict_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [json.dumps({"text": "one"}), "{oops"])
    with pytest.raises(DataError, match=r"d.jsonl:2: not a JSON object"):
        _read(path, strict=True)
    path = _jsonl(tmp_path / "e.jsonl", [json.dumps({"text": "one"}), "", json.dumps({"t": 1})])
    with pytest.raises(DataError, match=r"e.jsonl:3: no string field 'text'; pass --field NAME"):
        _read(path, strict=True)


def test_gzipped_jsonl(tmp_path):
    with gzip.open(tmp_path / "d.json.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)))
    pieces, counts = _read(tmp_path / "d.json.gz")
    assert [p.text for p in pieces] == [f"doc {i}" for i in range(5)] and counts.documents == 5
    assert sum(p.nbytes for p in pieces) <= (tmp_path / "d.json.gz").stat().st_size


def test_parquet_rows_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["a", None, "b"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet")
    pieces, counts = _read(tmp_path / "d.parquet")
    assert [p.text for p in pieces] == ["a", "b"] and counts.missing_field == 1
    with pytest.raises(DataError, match=r"d.parquet' has no column 'body' \(columns: text, n\)"):
        _read(tmp_path / "d.parquet", field="body")
    with pytest.raises(DataError, match=r"column 'n' holds int64, not strings"):
        _read(tmp_path / "d.parquet", field="n")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="junk.parquet' is not a readable parquet file"):
        _read(tmp_path / "junk.parquet")
