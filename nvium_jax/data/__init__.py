"""Data: tokenizers, `prepare` (text → tensorstore token arrays), the grain loader, the embedded corpus."""

from nvium_jax.data.corpus import kjv_documents, resolve_data_dir
from nvium_jax.data.loader import TrainBatches, eval_windows, window_count
from nvium_jax.data.prepare import prepare
from nvium_jax.data.store import DataError, read_meta
from nvium_jax.data.tokenizer import load_tokenizer, special_ids, tokenizer_hash

__all__ = [
    "DataError",
    "TrainBatches",
    "eval_windows",
    "kjv_documents",
    "load_tokenizer",
    "prepare",
    "read_meta",
    "resolve_data_dir",
    "special_ids",
    "tokenizer_hash",
    "window_count",
]
