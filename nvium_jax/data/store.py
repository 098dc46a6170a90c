"""A prepared data dir: zarr3 token arrays (tensorstore) and `meta.json`, written last.

Layout: `DIR/train` and `DIR/val` (1-D zarr3 arrays of token ids, uint16 when the
vocabulary fits, else uint32), `DIR/tokenizer.json`, and `DIR/meta.json`. The meta file
is written last and atomically, so a dir without it was never finished and is never used.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorstore as ts

from nvium_jax.config import ConfigError
from nvium_jax.paths import (data_location, kvstore_spec, store_check, store_error, store_errors,
                             url_scheme, write_text)

FORMAT = "nvium-tokens/1"
SPLITS = ("train", "val")
_SHARD_TOKENS = 1 << 22  # tokens per file on disk
_CHUNK_TOKENS = 1 << 13  # tokens per inner chunk: the unit one read fetches
_CACHE_BYTES = 256 << 20  # decoded chunks kept in memory per process
_META_KEYS = {
    "format": str, "dtype": str, "vocab_size": int, "eos_id": int, "train_tokens": int,
    "val_tokens": int, "documents": int, "tokenizer": dict, "inputs": list,
}


class DataError(ConfigError):
    """A data mistake (missing, empty or corrupt input, another tokenizer); names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _array_spec(path) -> dict:
    return {"driver": "zarr3", "kvstore": kvstore_spec(path)}


def write_tokens(path: str | os.PathLike, tokens_N: np.ndarray) -> None:
    """Writes a 1-D token array as zarr3, sharded into files of 4Mi tokens."""
    tokens_N = np.ascontiguousarray(tokens_N)
    raw = {"name": "bytes", "configuration": {"endian": "little"}}
    spec = _array_spec(data_location(path, "token array")) | {
        "metadata": {
            "shape": [int(tokens_N.shape[0])],
            "data_type": tokens_N.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [_SHARD_TOKENS]}},
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [_CHUNK_TOKENS],
                    "codecs": [raw, {"name": "crc32c"}],  # damaged bytes fail the read
                    "index_codecs": [raw, {"name": "crc32c"}],
                },
            }],
        },
    }
    store = ts.open(spec, create=True, delete_existing=True).result()
    for start in range(0, tokens_N.shape[0], _SHARD_TOKENS):  # whole shards: no read-modify-write
        stop = min(start + _SHARD_TOKENS, tokens_N.shape[0])
        store[start:stop].write(tokens_N[start:stop]).result()


def open_tokens(data_dir: str | os.PathLike, split: str, meta: dict) -> ts.TensorStore:
    """Opens a split for reading; checks its length and dtype against meta."""
    path = data_location(data_dir, "data dir") / split
    try:
        context = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})
        store = ts.open(_array_spec(path), open=True, read=True, context=context).result()
    except ValueError as err:
        raise DataError(
            f"data dir {str(data_dir)!r}: its {split} token array cannot be opened ({err}); "
            f"run `nvium prepare` again to rebuild it"
        ) from None
    expected = meta[f"{split}_tokens"]
    if store.shape != (expected,) or store.dtype.numpy_dtype != np.dtype(meta["dtype"]):
        raise DataError(
            f"data dir {str(data_dir)!r}: its {split} array holds {store.shape} {store.dtype.name} but "
            f"meta.json says ({expected},) {meta['dtype']}; run `nvium prepare` again to rebuild it"
        )
    missing = [i for i in range(-(-expected // _SHARD_TOKENS)) if not (path / "c" / str(i)).is_file()]
    if missing:  # zarr would read a missing shard as zeros
        raise DataError(
            f"data dir {str(data_dir)!r}: its {split} array lacks shard file(s) "
            f"{', '.join(f'c/{i}' for i in missing[:5])} of {-(-expected // _SHARD_TOKENS)}; run `nvium "
            f"prepare` again to rebuild it"
        )
    return store


def read_windows(store: ts.TensorStore, starts_B: np.ndarray, length: int) -> np.ndarray:
    """Tokens [start, start + length) for every start, as int32 [B, length]."""
    index_BxW = np.asarray(starts_B, np.int64)[:, None] + np.arange(length, dtype=np.int64)
    try:
        return store.vindex[index_BxW].read().result().astype(np.int32)
    except ValueError as err:  # a checksum or decode failure of a damaged file
        raise DataError(f"token array {store.kvstore.path!r} cannot be read ({err}); run `nvium "
                        f"prepare` again to rebuild it") from None


def read_meta(data_dir: str | os.PathLike) -> dict:
    """The meta of a finished `prepare`; a clear error when the dir is missing or unfinished."""
    data_dir = data_location(data_dir, "data dir")
    redo = f"run `nvium prepare --input ... --out {data_dir}` to (re)build it"
    try:
        found = data_dir.is_dir()
    except store_errors() as err:
        raise store_error(data_dir, err, "reading data dir") from None
    if not found:
        reach = f" (or its bucket cannot be reached: {store_check(data_dir)})" if url_scheme(data_dir) else ""
        raise DataError(f"data dir {str(data_dir)!r} does not exist{reach}; {redo}")
    path = data_dir / "meta.json"
    if not path.is_file():
        raise DataError(
            f"data dir {str(data_dir)!r} has no meta.json: it was never prepared or its "
            f"prepare was interrupted; {redo}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{str(path)!r} is corrupt ({err}); {redo}") from None
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{str(path)!r} is corrupt ({problem}); {redo}")
    return meta


def _meta_problem(meta) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}, expected {FORMAT!r}"
    for key, kind in _META_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"key {key!r} is missing or not {kind.__name__}"
    if meta["dtype"] not in ("uint16", "uint32"):
        return f"dtype {meta['dtype']!r}"
    if not isinstance(meta["tokenizer"].get("hash"), str):
        return "tokenizer hash is missing"
    return None


def write_meta(data_dir: str | os.PathLike, meta: dict) -> None:
    """Writes meta.json whole or not at all (a rename on disk, one PUT on an object store)."""
    write_text(data_location(data_dir, "data dir") / "meta.json", json.dumps(meta, indent=1))
