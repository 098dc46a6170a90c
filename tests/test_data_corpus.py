"""The embedded corpus and `resolve_data_dir`: prepared once into the cache, reused, and a data
dir whose tokenizer disagrees with the config is refused."""

import importlib
import pathlib
import shutil

import pytest

from nvium_jax.config import config_from_dict, load_config
from nvium_jax.data import (
    DataError, TrainBatches, eval_windows, kjv_documents, load_tokenizer, prepare, resolve_data_dir,
)

prep = importlib.import_module("nvium_jax.data.prepare")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kjv_has_66_books_of_plain_prose():
    books = kjv_documents()
    assert len(books) == 66
    assert books[0].startswith("The First Book of Moses, called Genesis\n\nIn the beginning God "
                               "created the heaven and the earth. And the earth was without form")
    assert books[0].rstrip().endswith("and he was put in a coffin in Egypt.")
    assert books[-1].rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert not any("[" in b or "]" in b for b in books)
    assert 4_000_000 < sum(map(len, books)) < 4_300_000


@pytest.fixture(scope="module")
def tiny_embedded(tmp_path_factory):
    """The tiny config's data dir, prepared from the embedded corpus into a fresh $NVIUM_CACHE."""
    cache = tmp_path_factory.mktemp("cache")
    config = load_config(ROOT / "configs" / "nvium-tiny.yaml")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("NVIUM_CACHE", str(cache))
        data_dir = resolve_data_dir(config)
    return config, cache, data_dir


def test_tiny_config_trains_on_the_embedded_corpus(tiny_embedded, monkeypatch):
    config, cache, data_dir = tiny_embedded
    assert data_dir.parent.parent == cache
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    meta = prepare([str(cache / "corpus" / "kjv.jsonl")], data_dir, tokenizer="bpe:4096",
                   val_fraction=config.data.val_fraction)
    assert meta["vocab_size"] == config.model.vocab_size == 4096
    assert meta["documents"] == 66 and 900_000 < meta["train_tokens"] < 1_200_000
    batch = next(TrainBatches(data_dir, context=128, global_batch=16, seed=0))
    assert batch.shape == (16, 129) and batch.max() < 4096
    assert " the " in tokenizer.decode(batch[0].tolist())
    val = eval_windows(data_dir, context=128, batch=16, n_batches=config.train.eval_batches)
    assert val.shape == (config.train.eval_batches, 16, 129)
    monkeypatch.setattr(prep, "_build", lambda *a, **k: pytest.fail("prepared twice"))
    monkeypatch.setenv("NVIUM_CACHE", str(cache))
    assert resolve_data_dir(config) == data_dir


def _config(vocab_size=512, **data):
    model = {"vocab_size": vocab_size, "n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64}
    return config_from_dict({"model": model, "data": data})


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    (root / "text.txt").write_text("\n".join(kjv_documents()[56:58]))  # Titus and Philemon
    prepare([str(root / "text.txt")], root / "data", tokenizer="bpe:300", workers=0)
    other = root / "other"
    prepare([str(root / "text.txt")], other, tokenizer="bpe:290", workers=0)
    return root / "data", other / "tokenizer.json"


def test_a_data_dir_with_another_tokenizer_is_refused(small_dir, tmp_path):
    data_dir, other_tokenizer = small_dir
    assert resolve_data_dir(_config(path=str(data_dir))) == data_dir
    assert resolve_data_dir(_config(path=str(data_dir), tokenizer="bpe:300")) == data_dir
    own = tmp_path / "own.json"
    shutil.copy(data_dir / "tokenizer.json", own)
    assert resolve_data_dir(_config(path=str(data_dir), tokenizer=str(own))) == data_dir
    with pytest.raises(DataError, match=r"prepared with tokenizer 'bpe:300', not data.tokenizer=bpe:999"):
        resolve_data_dir(_config(path=str(data_dir), tokenizer="bpe:999"))
    with pytest.raises(DataError, match=r"prepared with another tokenizer \(bpe:300, hash \w{12}\) than "
                                        r"data.tokenizer=.*other/tokenizer.json \(hash \w{12}\)"):
        resolve_data_dir(_config(path=str(data_dir), tokenizer=str(other_tokenizer)))
    with pytest.raises(DataError, match=r"has a tokenizer of 300 tokens but model.vocab_size=256"):
        resolve_data_dir(_config(vocab_size=256, path=str(data_dir)))
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(_config(path=str(tmp_path / "nowhere")))


def test_a_tampered_tokenizer_file_is_refused(small_dir, tmp_path):
    data_dir = tmp_path / "copy"
    shutil.copytree(small_dir[0], data_dir)
    shutil.copy(small_dir[1], data_dir / "tokenizer.json")
    with pytest.raises(DataError, match="tokenizer.json does not match meta.json"):
        resolve_data_dir(_config(path=str(data_dir)))
    (data_dir / "tokenizer.json").write_text("{")
    with pytest.raises(DataError, match="tokenizer.json' does not parse"):
        resolve_data_dir(_config(path=str(data_dir)))
