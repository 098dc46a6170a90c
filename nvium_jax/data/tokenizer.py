"""Tokenizers: load a `tokenizer.json`, train a byte-level BPE, encode documents to ids.

A document is encoded as `[BOS] ids [EOS]` (BOS only when the tokenizer has one), so the
packed stream has EOS between documents. Long documents arrive in pieces (`Piece`); only a
document's first piece gets BOS and only its last gets EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterable, NamedTuple

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nvium_jax.data.store import DataError
from nvium_jax.paths import data_location

EOS_TOKEN = "<|endoftext|>"  # the special token of the BPE we train
_EOS_NAMES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[BOS]")
_MIN_BPE_VOCAB = 257  # 256 byte tokens + EOS


class Piece(NamedTuple):
    """Text of (part of) a document; `nbytes` = input bytes it stands for (progress)."""

    text: str
    starts_doc: bool
    ends_doc: bool
    nbytes: int = 0


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A Hugging Face `tokenizer.json`; a clear error when it is missing or does not parse."""
    path = data_location(path, "tokenizer")  # a data dir's own may sit in a bucket
    if not path.is_file():
        raise DataError(
            f"tokenizer file {str(path)!r} does not exist; pass a tokenizer.json "
            f"(Hugging Face tokenizers format) or bpe:VOCAB to train one"
        )
    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(
            f"tokenizer file {str(path)!r} does not parse as a Hugging Face tokenizer.json "
            f"({str(err).splitlines()[0][:200]}); pass a valid tokenizer.json or bpe:VOCAB"
        ) from None


def special_ids(tokenizer: Tokenizer) -> tuple[int | None, int]:
    """(bos_id or None, eos_id) found by the usual token names; EOS must exist."""
    eos = _first_id(tokenizer, _EOS_NAMES)
    if eos is None:
        raise DataError(
            f"the tokenizer has no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
            f"add one of them as a special token"
        )
    bos = _first_id(tokenizer, _BOS_NAMES)
    return (None if bos == eos else bos), eos


def _first_id(tokenizer: Tokenizer, names: Iterable[str]) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (key order normalised)."""
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def vocab_size(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can emit, special tokens included."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def parse_spec(spec: str) -> tuple[str, int | pathlib.Path]:
    """`bpe:VOCAB` → ("bpe", VOCAB); anything else is a tokenizer.json path → ("file", path)."""
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or int(size) < _MIN_BPE_VOCAB:
            raise DataError(
                f"tokenizer {spec!r}: the BPE vocabulary must be an integer of at least "
                f"{_MIN_BPE_VOCAB} (256 bytes + EOS), e.g. bpe:8192"
            )
        return "bpe", int(size)
    return "file", data_location(spec, "tokenizer")


def train_bpe(texts: Iterable[str], size: int) -> Tokenizer:
    """A byte-level BPE of at most `size` tokens with `<|endoftext|>` as id 0 (EOS)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_pieces(
    tokenizer: Tokenizer, pieces: list[Piece], bos_id: int | None, eos_id: int, dtype: np.dtype
) -> np.ndarray:
    """The packed token stream of `pieces`: BOS before a document, EOS after it."""
    encodings = tokenizer.encode_batch([p.text for p in pieces], add_special_tokens=False)
    parts = [np.zeros(0, dtype)]
    for piece, encoding in zip(pieces, encodings):
        head = [bos_id] if piece.starts_doc and bos_id is not None else []
        tail = [eos_id] if piece.ends_doc else []
        parts.append(np.asarray(head + encoding.ids + tail, dtype))
    return np.concatenate(parts)


_WORKER: dict = {}  # the tokenizer of a worker process, set once by `init_worker`


def init_worker(tokenizer_json: str, bos_id: int | None, eos_id: int, dtype: str) -> None:
    """Initialiser of a tokenization worker process."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER.update(
        tokenizer=Tokenizer.from_str(tokenizer_json), bos_id=bos_id, eos_id=eos_id,
        dtype=np.dtype(dtype),
    )


def encode_in_worker(pieces: list[Piece]) -> np.ndarray:
    """`encode_pieces` with the tokenizer `init_worker` installed."""
    return encode_pieces(
        _WORKER["tokenizer"], pieces, _WORKER["bos_id"], _WORKER["eos_id"], _WORKER["dtype"]
    )
