"""Tokenizers: BPE training, round trips, special ids, hashing, and the errors a user meets."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from nvium_jax.data import DataError, load_tokenizer, special_ids, tokenizer_hash
from nvium_jax.data.tokenizer import EOS_TOKEN, Piece, encode_pieces, parse_spec, train_bpe, vocab_size

TEXT = [
    "In the beginning was the Word, and the Word was with God.\n",
    "Ünïcödé, emoji 🙂, tabs\tand  double  spaces,\r\nand CRLF line ends.\n\n",
    "numbers 12345 and punctuation: (a), [b], {c}; 'quoted' \"text\" — dash.",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXT * 20, 300)


def test_text_tokens_text_round_trip(bpe):
    for text in [*TEXT, "words never seen: zyxwvut qqq ∑∫ 漢字"]:
        ids = bpe.encode(text, add_special_tokens=False).ids
        assert bpe.decode(ids) == text


def test_bpe_is_byte_level_with_eos_first_and_deterministic(bpe):
    assert bpe.token_to_id(EOS_TOKEN) == 0
    assert special_ids(bpe) == (None, 0)
    assert 257 < vocab_size(bpe) <= 300
    assert tokenizer_hash(train_bpe(TEXT * 20, 300)) == tokenizer_hash(bpe)


def test_hash_survives_save_and_load(bpe, tmp_path):
    bpe.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer_hash(loaded) == tokenizer_hash(bpe)
    assert tokenizer_hash(train_bpe(TEXT * 20, 280)) != tokenizer_hash(bpe)


def test_encode_pieces_puts_bos_before_and_eos_after_documents(bpe):
    a, b = "first document", " continues here"
    pieces = [Piece(a, True, False), Piece(b, False, True), Piece("second", True, True)]
    ids = encode_pieces(bpe, pieces, bos_id=7, eos_id=0, dtype=np.dtype(np.uint16))
    enc = lambda s: bpe.encode(s, add_special_tokens=False).ids  # noqa: E731
    assert ids.tolist() == [7, *enc(a), *enc(b), 0, 7, *enc("second"), 0]
    assert ids.dtype == np.uint16
    no_bos = encode_pieces(bpe, pieces[2:], bos_id=None, eos_id=0, dtype=np.dtype(np.uint32))
    assert no_bos.tolist() == [*enc("second"), 0] and no_bos.dtype == np.uint32


def _word_level(tokens):
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_special_ids_of_llama_style_and_missing_eos():
    assert special_ids(_word_level(["<unk>", "<s>", "</s>", "a"])) == (1, 2)
    with pytest.raises(DataError, match="no end-of-text token"):
        special_ids(_word_level(["<unk>", "a", "b"]))


def test_load_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.json' does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json' does not parse"):
        load_tokenizer(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(DataError, match="wrong.json' does not parse"):
        load_tokenizer(wrong)


def test_parse_spec():
    assert parse_spec("bpe:4096") == ("bpe", 4096)
    assert parse_spec("some/tokenizer.json")[0] == "file"
    for bad in ("bpe:12", "bpe:", "bpe:8k"):
        with pytest.raises(DataError, match="at least 257"):
            parse_spec(bad)
