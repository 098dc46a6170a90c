"""Token arrays and meta.json: round trips, atomic meta, and every way a data dir can be broken."""

import json

import numpy as np
import pytest

from nvium_jax.data import DataError, read_meta
from nvium_jax.data.store import (
    FORMAT, open_tokens, read_windows, token_dtype, write_meta, write_tokens,
)


def _meta(n_train, n_val, dtype="uint16"):
    return {
        "format": FORMAT, "dtype": dtype, "vocab_size": 50000, "bos_id": None, "eos_id": 0,
        "train_tokens": n_train, "val_tokens": n_val, "documents": 1,
        "tokenizer": {"spec": "bpe:50000", "hash": "0" * 64}, "inputs": [],
    }


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_windows_read_back_what_was_written(tmp_path, dtype, monkeypatch):
    import nvium_jax.data.store as store

    monkeypatch.setattr(store, "_SHARD_TOKENS", 1024)  # several shards and a partial last one
    monkeypatch.setattr(store, "_CHUNK_TOKENS", 256)
    high = min(np.iinfo(dtype).max, 2**31 - 1)  # ids are int32 in batches
    tokens = np.random.default_rng(0).integers(0, high, 5000).astype(dtype)
    write_tokens(tmp_path / "train", tokens)
    write_tokens(tmp_path / "val", tokens[:0])
    write_meta(tmp_path, _meta(5000, 0, np.dtype(dtype).name))
    array = open_tokens(tmp_path, "train", read_meta(tmp_path))
    starts = np.array([0, 1023, 1024, 4990 - 9, 77])
    windows = read_windows(array, starts, 10)
    assert windows.dtype == np.int32
    np.testing.assert_array_equal(windows, np.stack([tokens[s:s + 10] for s in starts]).astype(np.int64))
    assert open_tokens(tmp_path, "val", read_meta(tmp_path)).shape == (0,)


def test_meta_is_written_atomically(tmp_path):
    write_meta(tmp_path, _meta(10, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]
    assert read_meta(tmp_path)["train_tokens"] == 10


def test_missing_dir_and_missing_meta(tmp_path):
    with pytest.raises(DataError, match="nope' does not exist; run `nvium prepare"):
        read_meta(tmp_path / "nope")
    (tmp_path / "train").mkdir()  # a prepare killed before its meta
    with pytest.raises(DataError, match="has no meta.json: it was never prepared or its prepare was interrupted"):
        read_meta(tmp_path)


@pytest.mark.parametrize("text, problem", [
    ('{"format": "nvium-tokens/1", "dtype": "uint1', "Unterminated|Expecting"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({**_meta(1, 1), "format": "other"}), "format 'other'"),
    (json.dumps({**_meta(1, 1), "train_tokens": "10"}), "'train_tokens' is missing or not int"),
    (json.dumps({k: v for k, v in _meta(1, 1).items() if k != "eos_id"}), "'eos_id' is missing"),
    (json.dumps({**_meta(1, 1), "dtype": "float32"}), "dtype 'float32'"),
])
def test_corrupt_meta_is_a_clear_error(tmp_path, text, problem):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(DataError, match=rf"meta.json' is corrupt \(.*({problem})"):
        read_meta(tmp_path)


def test_arrays_that_disagree_with_meta(tmp_path):
    write_tokens(tmp_path / "train", np.arange(100, dtype=np.uint16))
    with pytest.raises(DataError, match=r"holds \(100,\) uint16 but meta.json says \(99,\) uint16"):
        open_tokens(tmp_path, "train", _meta(99, 0))
    with pytest.raises(DataError, match="val token array cannot be opened"):
        open_tokens(tmp_path, "val", _meta(100, 5))
