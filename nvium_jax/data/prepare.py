"""`prepare`: input files → a tokenizer and packed train/val token arrays in a data dir.

Everything is built in `DIR/.staging-<pid>` and moved into place at the end; `meta.json`
comes last (atomically), so an interrupted prepare leaves a dir that is detected and
redone, never used. Re-running with the same inputs (by content hash), tokenizer, field
and validation fraction is a no-op that returns the existing meta.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import multiprocessing
import os
import pathlib
import shutil
import sys
from typing import Callable, Iterator

import numpy as np

import nvium_jax
from nvium_jax.data.readers import ReadCounts, expand_inputs, input_record, read_pieces
from nvium_jax.data.store import (
    FORMAT, SPLITS, DataError, read_meta, token_dtype, write_meta, write_tokens,
)
from nvium_jax.paths import (
    check_bucket, data_location, is_url, store_error, store_errors, upload_tree,
)
from nvium_jax.data.tokenizer import (
    Piece, encode_in_worker, encode_pieces, init_worker, load_tokenizer, parse_spec,
    special_ids, tokenizer_hash, train_bpe, vocab_size,
)

TASK_CHARS = 1 << 20  # characters per tokenization task sent to a worker
BPE_TRAIN_CHARS = 1 << 28  # a BPE is trained on at most the first 256 Mi characters


def prepare(
    inputs: list[str] | str,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "bpe:8192",
    field: str = "text",
    val_fraction: float = 0.005,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = False,
) -> dict:
    """Tokenizes `inputs` (files or globs) into `out_dir` and returns its meta."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must lie in [0, 1), e.g. 0.005")
    if workers is not None and workers < 0:
        raise DataError(f"workers={workers} must be at least 0 (0 or 1 = tokenize in this process)")
    paths = expand_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    kind, arg = parse_spec(tokenizer)
    given = load_tokenizer(arg) if kind == "file" else None
    out = data_location(out_dir, "out_dir")
    if not is_url(out) and out.exists() and not out.is_dir():
        raise DataError(f"output {str(out)!r} is a file; pass a directory to --out")
    request = {
        "inputs": [input_record(p) for p in paths],
        "tokenizer": {"spec": tokenizer if kind == "bpe" else str(arg),
                      "hash": None if given is None else tokenizer_hash(given)},
        "field": field,
        "val_fraction": val_fraction,
    }
    done = _finished_meta(out)
    if done is not None and _same_request(done, request, out):
        return done
    if is_url(out):
        check_bucket(out, "out_dir")
        return _build_remote(paths, out, request, given, workers, strict, progress)
    return _build(paths, out, request, given, workers, strict, progress)


def _finished_meta(out: pathlib.Path) -> dict | None:
    try:
        return read_meta(out)
    except DataError:  # missing, unfinished or corrupt: rebuild
        return None


def _same_request(meta: dict, request: dict, out: pathlib.Path) -> bool:
    def contents(records):
        return [(r.get("sha256"), r.get("bytes")) for r in records]

    theirs, ours = meta["tokenizer"], request["tokenizer"]
    same_tokenizer = theirs["hash"] == ours["hash"] if ours["hash"] else theirs.get("spec") == ours["spec"]
    files = [out / "tokenizer.json", *(out / split / "zarr.json" for split in SPLITS)]
    return (
        same_tokenizer
        and contents(meta["inputs"]) == contents(request["inputs"])
        and meta.get("field") == request["field"]
        and meta.get("val_fraction") == request["val_fraction"]
        and all(f.is_file() for f in files)
    )


def _build(paths, out, request, given, workers, strict, progress) -> dict:
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".staging-*"):  # left by a killed prepare
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f".staging-{os.getpid()}"
    staging.mkdir()
    try:
        meta = _build_in(staging, paths, request, given, workers, strict, progress)
        _install(staging, out)
        write_meta(out, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return meta


def _build_remote(paths, out, request, given, workers, strict, progress) -> dict:
    """An object store has no rename: build on the local disk, drop the old meta.json (so no
    reader trusts a dir being replaced), put every array and tokenizer object, meta.json last."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nvium-prepare-") as tmp:
        local = pathlib.Path(tmp) / "data"
        meta = _build(paths, local, request, given, workers, strict, progress)
        old_meta = out / "meta.json"
        try:
            if old_meta.exists():
                old_meta.unlink()
            for split in SPLITS:
                if (out / split).exists():
                    (out / split).rmtree()
        except store_errors() as err:
            raise store_error(out, err, "replacing the old contents of") from None
        upload_tree(local, out, skip=("meta.json",))
        write_meta(out, meta)
    return meta


def _build_in(staging, paths, request, given, workers, strict, progress) -> dict:
    field = request["field"]
    if given is None:
        size = parse_spec(request["tokenizer"]["spec"])[1]
        given = _train(paths, field, strict, size, progress)
    try:
        bos_id, eos_id = special_ids(given)
    except DataError as err:
        raise DataError(f"tokenizer {request['tokenizer']['spec']!r}: {err}") from None
    dtype = token_dtype(vocab_size(given))
    counts = ReadCounts()
    tasks = _tasks(paths, field, strict, counts)
    encoded = _encode_all(tasks, given, bos_id, eos_id, dtype, workers, paths)
    n_tokens = _write_stream(encoded, staging / "tokens.bin", sum(p.stat().st_size for p in paths), progress)
    n_val = int(round(n_tokens * request["val_fraction"]))
    if n_tokens - n_val < 2:
        raise DataError(
            f"the inputs ({', '.join(map(str, paths))}) hold only {n_tokens} tokens; "
            f"give more text or a smaller --val-fraction"
        )
    stream = np.memmap(staging / "tokens.bin", dtype=dtype, mode="r")
    write_tokens(staging / "train", stream[: n_tokens - n_val])
    write_tokens(staging / "val", stream[n_tokens - n_val:])
    del stream
    (staging / "tokens.bin").unlink()
    given.save(str(staging / "tokenizer.json"))
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size(given),
        "bos_id": bos_id,
        "eos_id": eos_id,
        "tokenizer": {"spec": request["tokenizer"]["spec"], "hash": tokenizer_hash(given)},
        "train_tokens": n_tokens - n_val,
        "val_tokens": n_val,
        "documents": counts.documents,
        "val_fraction": request["val_fraction"],
        "field": field,
        "skipped": {"not_json": counts.not_json, "missing_field": counts.missing_field},
        "replaced_utf8": counts.replaced_utf8,
        "inputs": request["inputs"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nvium_jax": nvium_jax.__version__,
    }


def _train(paths, field, strict, size, progress):
    """A byte-level BPE trained on the first BPE_TRAIN_CHARS characters of the inputs."""
    if progress:
        print(f"training a byte-level BPE of {size} tokens on the inputs", file=sys.stderr)

    def texts():
        seen, counts = 0, ReadCounts()
        for path in paths:
            for piece in read_pieces(path, field, strict, counts):
                yield piece.text
                seen += len(piece.text)
                if seen >= BPE_TRAIN_CHARS:
                    return

    return train_bpe(texts(), size)


def _tasks(paths, field, strict, counts: ReadCounts) -> Iterator[list[Piece]]:
    """Pieces of every input grouped into tasks of about TASK_CHARS characters."""
    task, chars = [], 0
    for path in paths:
        before = dataclasses.replace(counts)
        for piece in read_pieces(path, field, strict, counts):
            task.append(piece)
            chars += len(piece.text)
            if chars >= TASK_CHARS:
                yield task
                task, chars = [], 0
        if counts.documents == before.documents:
            raise DataError(
                f"input {str(path)!r} holds no document: {counts.not_json - before.not_json} "
                f"lines are not JSON objects and {counts.missing_field - before.missing_field} "
                f"records lack a string field {field!r}; pass --field NAME or another file"
            )
    if task:
        yield task


def _encode_all(tasks, tokenizer, bos_id, eos_id, dtype, workers, paths) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, input bytes) per task, in order; worker processes when more than one helps."""
    total = sum(p.stat().st_size for p in paths)
    workers = (os.cpu_count() or 1) if workers is None else workers
    workers = min(workers, -(-total // TASK_CHARS))
    if workers <= 1:
        for task in tasks:
            yield encode_pieces(tokenizer, task, bos_id, eos_id, dtype), sum(p.nbytes for p in task)
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),  # the parent may run jax threads
        initializer=init_worker,
        initargs=(tokenizer.to_str(), bos_id, eos_id, dtype.name),
    )
    pending: collections.deque = collections.deque()
    try:
        for task in tasks:
            pending.append((pool.submit(encode_in_worker, task), sum(p.nbytes for p in task)))
            if len(pending) >= 2 * workers:  # bounded: inputs are never all in memory
                future, nbytes = pending.popleft()
                yield future.result(), nbytes
        while pending:
            future, nbytes = pending.popleft()
            yield future.result(), nbytes
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_stream(encoded, path: pathlib.Path, total_bytes: int, progress: bool) -> int:
    n_tokens = 0
    with open(path, "wb") as f, _progress_bar(total_bytes, progress) as advance:
        for tokens, nbytes in encoded:
            tokens.tofile(f)
            n_tokens += tokens.size
            advance(nbytes)
    return n_tokens


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over input bytes on stderr (or nothing)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich import progress as rp

    columns = (rp.TextColumn("tokenizing"), rp.BarColumn(), rp.DownloadColumn(),
               rp.TransferSpeedColumn(), rp.TimeRemainingColumn())
    with rp.Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("tokenizing", total=total)
        yield lambda n: bar.advance(task, n)


def _install(staging: pathlib.Path, out: pathlib.Path) -> None:
    """Replaces the dir's old contents by the staged ones; meta.json goes first."""
    (out / "meta.json").unlink(missing_ok=True)
    for name in (*SPLITS, "tokenizer.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging / name, target)

