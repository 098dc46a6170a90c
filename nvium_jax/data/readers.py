"""Input files → document pieces: plain text, JSON lines and parquet (each optionally .gz).

A plain-text file is one document, read in pieces of about 1 MB cut just before a line
break next to a printable ASCII character — where a byte-level BPE's pre-tokenizer splits
anyway, so the pieces encode exactly like the whole file. A JSON-lines
file (`.jsonl`, `.ndjson`, `.json`) holds one document per line in a string field; a
parquet file one per row in a string column. Invalid UTF-8 is replaced and counted.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import pathlib
from typing import Iterator

from nvium_jax.data.store import DataError
from nvium_jax.data.tokenizer import Piece

PIECE_BYTES = 1 << 20  # target size of a plain-text piece
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PARQUET_ROWS = 1024  # rows per parquet read


@dataclasses.dataclass
class ReadCounts:
    """What reading skipped or repaired, reported in meta.json."""

    documents: int = 0
    not_json: int = 0  # JSON-lines lines that are not a JSON object
    missing_field: int = 0  # lines/rows whose field is absent, null or not a string
    replaced_utf8: int = 0  # invalid UTF-8 sequences replaced by U+FFFD


def expand_inputs(patterns: list[str]) -> list[pathlib.Path]:
    """Files named or matched by glob patterns, in order, each once; errors name the input."""
    if not patterns:
        raise DataError("no input given; pass --input FILE_OR_GLOB (text, .jsonl or .parquet)")
    paths: list[pathlib.Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"input glob {pattern!r} matches no file; check the pattern")
            paths.extend(pathlib.Path(p) for p in matches)
        else:
            path = pathlib.Path(pattern)
            if not path.is_file():
                what = "is a directory" if path.is_dir() else "does not exist"
                raise DataError(f"input {pattern!r} {what}; pass a file or a glob such as 'dir/*.jsonl'")
            paths.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    for path in unique:
        if path.stat().st_size == 0:
            raise DataError(f"input {str(path)!r} is empty; remove it from --input")
    return unique


def input_record(path: pathlib.Path) -> dict:
    """Path, size and sha256 of an input file: what makes a re-run a no-op."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def read_pieces(path: pathlib.Path, field: str, strict: bool, counts: ReadCounts) -> Iterator[Piece]:
    """The document pieces of one input file, by its suffix (a trailing .gz is unpacked)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return _parquet_pieces(path, field, counts)
    if name.endswith(_JSONL_SUFFIXES):
        return _jsonl_pieces(path, field, strict, counts)
    return _text_pieces(path, counts)


def _open(path: pathlib.Path) -> tuple[io.BufferedIOBase, io.BufferedIOBase]:
    """(reader, raw file): the raw file's position measures progress through a .gz."""
    raw = open(path, "rb")
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), raw
    return raw, raw


def _decode(data: bytes, counts: ReadCounts) -> str:
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text:  # count replacements, not U+FFFD that the file really holds
        counts.replaced_utf8 += text.count("\ufffd") - data.count("\ufffd".encode())
    return text


def _safe_cut(data: bytes) -> int:
    """Index of the last line break next to printable ASCII (0 when there is none)."""
    cut = data.rfind(b"\n")
    while cut > 0 and not (_printable(data, cut - 1) or _printable(data, cut + 1)):
        cut = data.rfind(b"\n", 0, cut)
    return max(cut, 0)


def _printable(data: bytes, i: int) -> bool:
    return i < len(data) and 0x21 <= data[i] <= 0x7E


def _text_pieces(path: pathlib.Path, counts: ReadCounts) -> Iterator[Piece]:
    reader, raw = _open(path)
    with reader, raw:
        pending, first, position = b"", True, 0
        while True:
            block = reader.read(PIECE_BYTES)
            data = pending + block
            cut = _safe_cut(data) if block else len(data)
            if cut == 0 and block:  # no safe place yet: keep reading
                pending = data
                continue
            done = raw.tell()
            yield Piece(_decode(data[:cut], counts), first, not block, done - position)
            pending, first, position = data[cut:], False, done
            if not block:
                break
    counts.documents += 1


def _jsonl_pieces(path: pathlib.Path, field: str, strict: bool, counts: ReadCounts) -> Iterator[Piece]:
    reader, raw = _open(path)
    with reader, raw:
        position = 0
        for number, line in enumerate(reader, start=1):
            if not line.strip():
                continue
            text = _decode(line, counts)
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                if strict:
                    raise DataError(
                        f"{path}:{number}: not a JSON object; fix the line or drop --strict to skip it"
                    )
                counts.not_json += 1
                continue
            value = record.get(field)
            if not isinstance(value, str):
                if strict:
                    raise DataError(
                        f"{path}:{number}: no string field {field!r}; pass --field NAME or "
                        f"drop --strict to skip such lines"
                    )
                counts.missing_field += 1
                continue
            done = raw.tell()
            counts.documents += 1
            yield Piece(value, True, True, done - position)
            position = done


def _parquet_pieces(path: pathlib.Path, field: str, counts: ReadCounts) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"input {str(path)!r} is not a readable parquet file ({err})") from None
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise DataError(
            f"input {str(path)!r} has no column {field!r} (columns: {', '.join(columns)}); "
            f"pass --field NAME"
        )
    kind = parquet.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"input {str(path)!r}: column {field!r} holds {kind}, not strings; pass --field NAME")
    rows = max(parquet.metadata.num_rows, 1)
    size = path.stat().st_size
    for batch in parquet.iter_batches(batch_size=_PARQUET_ROWS, columns=[field]):
        values = batch.column(0).to_pylist()
        share = size * len(values) // rows  # progress: bytes this batch stands for
        for value in values:
            if value is None:
                counts.missing_field += 1
                continue
            counts.documents += 1
            yield Piece(value, True, True, share)
            share = 0
