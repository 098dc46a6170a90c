"""Data dirs on S3, against a real S3 server (moto's server mode) that this module starts on
127.0.0.1 and stops: `nvium prepare --out s3://…`, the loader and `nvium eval --data s3://…`
read what a local prepare writes, and a missing bucket or an unreachable endpoint ends in one
line naming the URL and what to check."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="s3:// data dirs need s3fs (pip install 'nvium_jax[test]')")
pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (pip install 'nvium_jax[test]')")

from nvium_jax import cli  # noqa: E402
from nvium_jax.config import ConfigError  # noqa: E402
from nvium_jax.data import TrainBatches, eval_windows, prepare, read_meta  # noqa: E402
from tests.conftest import write_word_corpus  # noqa: E402

BUCKET = "nvium-test"
_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forget_clients() -> None:
    """s3fs (and epath over it) cache their clients with the endpoint they were made for."""
    import s3fs
    from etils.epath import backend

    s3fs.S3FileSystem.clear_instance_cache()
    type(backend.fsspec_backend)._get_filesystem.cache_clear()


@contextlib.contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    _forget_clients()
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_clients()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (never another address), the AWS environment pointing at
    it and one bucket; stopped at the end of the module."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with _environ(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint):
            import boto3

            client = boto3.client("s3")
            deadline = time.time() + 30
            while True:
                try:
                    client.create_bucket(Bucket=BUCKET)
                    break
                except Exception:  # not listening yet
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"moto's S3 server did not start on {endpoint}")
                    time.sleep(0.2)
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("s3_corpus") / "corpus.txt", documents=120)


@pytest.fixture(scope="module")
def local_and_s3(s3_server, corpus, tmp_path_factory):
    """The same corpus prepared into a local dir and into s3://BUCKET/words."""
    local = tmp_path_factory.mktemp("s3_local") / "words"
    meta_local = prepare([str(corpus)], local, tokenizer="bpe:300", val_fraction=0.05)
    url = f"s3://{BUCKET}/words"
    meta_s3 = prepare([str(corpus)], url, tokenizer="bpe:300", val_fraction=0.05)
    return local, url, meta_local, meta_s3


def _keys(client, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_prepare_into_s3_writes_what_a_local_prepare_writes(local_and_s3, s3_server):
    local, url, meta_local, meta_s3 = local_and_s3
    drop = ("created",)  # the time it was written
    assert {k: v for k, v in meta_s3.items() if k not in drop} == \
        {k: v for k, v in meta_local.items() if k not in drop}
    assert read_meta(url) == meta_s3  # meta.json is the object that was put
    keys = _keys(s3_server, "words/")
    local_files = sorted("words/" + p.relative_to(local).as_posix()
                         for p in local.rglob("*") if p.is_file())
    assert keys == local_files  # the same objects as the local dir's files, nothing staged left
    # the token arrays read through tensorstore's s3 kvstore equal the local ones
    for split in ("train", "val"):
        n = meta_s3[f"{split}_tokens"]
        body = s3_server.get_object(Bucket=BUCKET, Key=f"words/{split}/zarr.json")["Body"].read()
        assert json.loads(body)["shape"] == [n]
    windows_local = eval_windows(local, context=16, batch=4, n_batches=2)
    windows_s3 = eval_windows(url, context=16, batch=4, n_batches=2)
    np.testing.assert_array_equal(windows_s3, windows_local)


def test_rerun_of_prepare_into_s3_is_a_noop(local_and_s3, s3_server, corpus):
    _, url, _, meta_s3 = local_and_s3
    before = s3_server.head_object(Bucket=BUCKET, Key="words/meta.json")["ETag"]
    again = prepare([str(corpus)], url, tokenizer="bpe:300", val_fraction=0.05)
    assert again == meta_s3
    assert s3_server.head_object(Bucket=BUCKET, Key="words/meta.json")["ETag"] == before


def test_loader_batches_from_s3_equal_the_local_ones(local_and_s3):
    local, url, _, _ = local_and_s3
    kwargs = dict(context=16, global_batch=4, seed=3)
    batches = [TrainBatches(d, **kwargs) for d in (local, url)]
    for _ in range(3):
        np.testing.assert_array_equal(next(iter(batches[1])), next(iter(batches[0])))


def test_a_dir_without_meta_is_never_trusted(local_and_s3, s3_server):
    """A prepare stopped after its arrays but before meta.json (the object put last)."""
    local, _, _, _ = local_and_s3
    for path in local.rglob("*"):
        if path.is_file() and path.name != "meta.json":
            s3_server.put_object(Bucket=BUCKET, Key="half/" + path.relative_to(local).as_posix(),
                                 Body=path.read_bytes())
    with pytest.raises(ConfigError, match=r"'s3://nvium-test/half' has no meta.json"):
        read_meta(f"s3://{BUCKET}/half")


def test_missing_bucket_is_one_line_naming_the_url(s3_server, corpus, tmp_path, capsys):
    url = "s3://nvium-no-such-bucket/words"
    code = cli.main(["prepare", "--input", str(corpus), "--out", url, "--tokenizer", "bpe:300"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: out_dir='s3://nvium-no-such-bucket/words': bucket "
                             "'nvium-no-such-bucket' does not exist") and "AWS_ENDPOINT_URL" in err[0]
    with pytest.raises(ConfigError, match="does not exist .*AWS_ENDPOINT_URL"):
        read_meta(url)


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line_naming_the_url(s3_server):
    # nothing listens; one attempt (botocore's standard environment), not its retries' 5–10 s
    with _environ(AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}", AWS_MAX_ATTEMPTS="1"):
        start = time.time()
        with pytest.raises(ConfigError, match=r"reading data dir 's3://nvium-test/words' failed "
                                              r"\(Could not connect.*AWS_ENDPOINT_URL") as err:
            read_meta(f"s3://{BUCKET}/words")
        assert "\n" not in str(err.value)
        assert time.time() - start < 60


@pytest.mark.slow
def test_train_and_eval_from_s3_data_equal_local(local_and_s3, tmp_path, capsys):
    """A run trained from the bucket's data logs the losses of one trained from the local
    copy, and `nvium eval --data s3://…` reports what `--data LOCAL` reports."""
    from tests.conftest import small_config
    from nvium_jax.train.loop import train
    from nvium_jax.train.metrics import read_metrics

    local, url, _, _ = local_and_s3
    losses = {}
    for name, data in (("local", local), ("s3", url)):
        run_dir = tmp_path / name
        train(small_config(data, run_dir, "train.steps=4", "train.checkpoint_every=4",
                           "train.eval_every=4", "model.vocab_size=300"))
        losses[name] = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses["s3"]) == 4 and losses["s3"] == losses["local"]
    records = []
    for data in (str(local), url):
        assert cli.main(["eval", "--run", str(tmp_path / "local"), "--data", data, "--json",
                         "--no-plots", "--batches", "1"]) == 0
        records.append(json.loads(capsys.readouterr().out))
    assert records[1]["data"] == url
    assert {k: v for k, v in records[1].items() if k != "data"} == \
        {k: v for k, v in records[0].items() if k != "data"}
