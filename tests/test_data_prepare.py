"""`prepare` and `nvium prepare`: the packed stream against a naive encoding, no-op re-runs,
interrupted runs, worker processes, and bad inputs that leave nothing half-written."""

import concurrent.futures
import importlib
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from nvium_jax import cli
from nvium_jax.data import DataError, load_tokenizer, prepare, read_meta, special_ids
from nvium_jax.data.store import open_tokens

prep = importlib.import_module("nvium_jax.data.prepare")  # the module (its function shadows it)

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from "
         "at which but have an they you were her she there one all we their lord said unto").split()


def _prose(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, n_words)
    lines = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def inputs(tmp_path):
    """A text file (one document) and a JSON-lines file (three documents and a bad line)."""
    docs = [_prose(1, 300), _prose(2, 200), _prose(3, 250)]
    (tmp_path / "a.txt").write_text(_prose(0, 400))
    lines = [json.dumps({"text": docs[0]}), "not json", *(json.dumps({"text": d}) for d in docs[1:])]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], [_prose(0, 400), *docs]


def _tokens(data_dir, split):
    meta = read_meta(data_dir)
    return open_tokens(data_dir, split, meta)[:].read().result()


def test_stream_is_documents_joined_by_eos_and_val_is_the_tail(inputs, tmp_path):
    paths, docs = inputs
    meta = prepare(paths, tmp_path / "out", tokenizer="bpe:300", val_fraction=0.1, workers=0)
    tokenizer = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    bos, eos = special_ids(tokenizer)
    expected = [i for d in docs for i in (*tokenizer.encode(d, add_special_tokens=False).ids, eos)]
    stream = np.concatenate([_tokens(tmp_path / "out", "train"), _tokens(tmp_path / "out", "val")])
    assert stream.tolist() == expected and bos is None
    assert meta["val_tokens"] == round(0.1 * len(expected)) == _tokens(tmp_path / "out", "val").size
    assert (meta["documents"], meta["skipped"], meta["dtype"]) == (4, {"not_json": 1, "missing_field": 0}, "uint16")
    assert meta["vocab_size"] <= 300 and meta["eos_id"] == eos
    assert [r["path"] for r in meta["inputs"]] == [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    assert read_meta(tmp_path / "out") == meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokenizer.json", "train", "val"]
    assert tokenizer.decode(stream[: stream.tolist().index(eos)].tolist()) == docs[0]


def test_rerun_is_a_noop_and_any_change_redoes(inputs, tmp_path, monkeypatch):
    paths, _ = inputs
    first = prepare(paths, tmp_path / "out", tokenizer="bpe:300", workers=0)
    with monkeypatch.context() as m:
        m.setattr(prep, "_build", lambda *a, **k: pytest.fail("rebuilt an up-to-date dir"))
        assert prepare(paths, tmp_path / "out", tokenizer="bpe:300", workers=0) == first
    assert prepare(paths, tmp_path / "out", tokenizer="bpe:300", val_fraction=0.2)["val_fraction"] == 0.2
    assert prepare(paths, tmp_path / "out", tokenizer="bpe:280")["tokenizer"]["spec"] == "bpe:280"
    (tmp_path / "a.txt").write_text(_prose(9, 100))
    changed = prepare(paths, tmp_path / "out", tokenizer="bpe:280")
    assert changed["inputs"][0]["sha256"] != first["inputs"][0]["sha256"]
    assert changed["train_tokens"] < first["train_tokens"]


def test_worker_processes_give_the_same_stream(inputs, tmp_path, monkeypatch):
    paths, _ = inputs
    monkeypatch.setattr(prep, "TASK_CHARS", 1500)  # several tasks, spread over 2 workers
    pools = []

    class CountedPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, max_workers, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountedPool)
    one = prepare(paths, tmp_path / "one", tokenizer="bpe:300", workers=0)
    two = prepare(paths, tmp_path / "two", tokenizer="bpe:300", workers=2)
    assert pools == [2]
    assert {**one, "created": 0} == {**two, "created": 0}
    for split in ("train", "val"):
        np.testing.assert_array_equal(_tokens(tmp_path / "one", split), _tokens(tmp_path / "two", split))


def test_failure_midway_leaves_nothing_and_keeps_a_good_old_dir(inputs, tmp_path, monkeypatch):
    paths, _ = inputs
    real_write = prep.write_tokens

    def crash_on_val(path, tokens):
        if path.name == "val":
            raise KeyboardInterrupt  # as if killed while writing
        real_write(path, tokens)

    monkeypatch.setattr(prep, "write_tokens", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare(paths, tmp_path / "new", tokenizer="bpe:300", workers=0)
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(prep, "write_tokens", real_write)
    good = prepare(paths, tmp_path / "old", tokenizer="bpe:300", workers=0)
    monkeypatch.setattr(prep, "write_tokens", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare(paths, tmp_path / "old", tokenizer="bpe:280", workers=0)
    assert read_meta(tmp_path / "old") == good
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["meta.json", "tokenizer.json", "train", "val"]


def test_a_killed_prepare_is_detected_and_redone(inputs, tmp_path):
    paths, _ = inputs
    good = prepare(paths, tmp_path / "out", tokenizer="bpe:300", workers=0)
    # a hard kill mid-way: meta gone (removed first by a redo), arrays half-written, staging left
    (tmp_path / "out" / "meta.json").unlink()
    for chunk in (tmp_path / "out" / "train").rglob("c/*"):
        chunk.write_bytes(b"garbage")
    (tmp_path / "out" / ".staging-12345" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="has no meta.json: it was never prepared or its prepare was interrupted"):
        read_meta(tmp_path / "out")
    again = prepare(paths, tmp_path / "out", tokenizer="bpe:300", workers=0)
    assert {**again, "created": 0} == {**good, "created": 0}
    assert not list((tmp_path / "out").glob(".staging-*"))
    assert _tokens(tmp_path / "out", "train").size == good["train_tokens"]
    (tmp_path / "out" / "meta.json").write_text("{corrupt")  # a corrupt meta is redone too
    assert prepare(paths, tmp_path / "out", tokenizer="bpe:300", workers=0)["train_tokens"] == good["train_tokens"]


def test_a_given_tokenizer_file_is_kept_and_matched_by_hash(inputs, tmp_path):
    paths, _ = inputs
    trained = prepare(paths, tmp_path / "a", tokenizer="bpe:300", workers=0)
    given = prepare(paths, tmp_path / "b", tokenizer=str(tmp_path / "a" / "tokenizer.json"), workers=0)
    assert given["tokenizer"]["hash"] == trained["tokenizer"]["hash"]
    assert given["tokenizer"]["spec"] == str(tmp_path / "a" / "tokenizer.json")
    np.testing.assert_array_equal(_tokens(tmp_path / "a", "train"), _tokens(tmp_path / "b", "train"))


def _word_level(path, n_words, special):
    vocab = {w: i for i, w in enumerate(["<unk>", *special, *(f"w{i}" for i in range(n_words))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return str(path)


def test_large_vocabularies_are_stored_as_uint32_with_bos(tmp_path):
    (tmp_path / "t.txt").write_text("w1 w70000 w5\nw69999 w2")
    spec = _word_level(tmp_path / "big.json", 70_001, ["<s>", "</s>"])
    meta = prepare(str(tmp_path / "t.txt"), tmp_path / "out", tokenizer=spec, val_fraction=0, workers=0)
    assert (meta["dtype"], meta["bos_id"], meta["eos_id"]) == ("uint32", 1, 2)
    assert _tokens(tmp_path / "out", "train").tolist() == [1, 4, 70003, 8, 70002, 5, 2]


@pytest.mark.parametrize("case, message", [
    ("no_eos", r"tokenizer '.*noeos.json': the tokenizer has no end-of-text token"),
    ("bad_tokenizer", r"tokenizer file '.*bad.json' does not parse"),
    ("all_lines_bad", r"input '.*junk.jsonl' holds no document: 2 lines are not JSON objects and 1 records lack"),
    ("strict", r"b.jsonl:2: not a JSON object"),
    ("too_little", r"hold only 2 tokens; give more text or a smaller --val-fraction"),
    ("val_fraction", r"val_fraction=1.0 must lie in \[0, 1\)"),
    ("out_is_file", r"output '.*a.txt' is a file"),
])
def test_bad_inputs_leave_nothing_behind(inputs, tmp_path, case, message):
    paths, _ = inputs
    kwargs = {"tokenizer": "bpe:300", "workers": 0}
    out = tmp_path / "out"
    if case == "no_eos":
        kwargs["tokenizer"] = _word_level(tmp_path / "noeos.json", 10, [])
    elif case == "bad_tokenizer":
        (tmp_path / "bad.json").write_text('{"model": ')
        kwargs["tokenizer"] = str(tmp_path / "bad.json")
    elif case == "all_lines_bad":
        (tmp_path / "junk.jsonl").write_text('oops\n{"body": "x"}\n[1]\n')
        paths = [paths[0], str(tmp_path / "junk.jsonl")]
    elif case == "strict":
        kwargs["strict"] = True
    elif case == "too_little":
        (tmp_path / "tiny.txt").write_text("a")
        paths, kwargs["val_fraction"] = [str(tmp_path / "tiny.txt")], 0.5
    elif case == "val_fraction":
        kwargs["val_fraction"] = 1.0
    elif case == "out_is_file":
        out = tmp_path / "a.txt"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=message):
        prepare(paths, out, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_prepare_prints_meta_json_and_errors_in_one_line(inputs, tmp_path, capsys):
    paths, _ = inputs
    argv = ["prepare", "--input", *paths, "--out", str(tmp_path / "out"), "--tokenizer", "bpe:300",
            "--val-fraction", "0.05", "--workers", "0", "--json"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == read_meta(tmp_path / "out")
    assert cli.main(["prepare", "--input", str(tmp_path / "*.none"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input glob") and err.count("\n") == 1
