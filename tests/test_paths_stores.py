"""Data dirs and run dirs on object stores, against real servers that this module starts on
127.0.0.1 and stops — moto's S3 server, and gcp-storage-emulator for GCS; every test that
touches a bucket runs on both: `nvium prepare --out URL`, the loader and `nvium eval --data
URL` read what a local prepare writes; a run trained into a bucket resumes bit-exact after
SIGTERM and kill -9; `load_run`, `nvium eval` and `nvium generate` read it; a damaged object
is skipped; the lock refuses a second trainer; a missing bucket, an unreachable endpoint or a
write the server itself refuses (HTTP 403) ends in one line naming the URL and what to check."""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from nvium_jax import cli
from nvium_jax.config import ConfigError
from nvium_jax.data import TrainBatches, eval_windows, prepare, read_meta
from scripts.store_servers import CLIENTS, READ_ONLY_SUFFIX, SERVERS, free_port, serve
from tests.conftest import write_word_corpus

BUCKET = "nvium-test"
CHECK = {"s3": "AWS_ENDPOINT_URL", "gs": "STORAGE_EMULATOR_HOST"}  # the word each store's errors name
CREDENTIALS = {"s3": "AWS_ACCESS_KEY_ID", "gs": "GOOGLE_APPLICATION_CREDENTIALS"}  # what a refusal names


def _forget_clients() -> None:
    """s3fs, gcsfs (and epath over them) cache their clients with the endpoint they were made for."""
    from etils.epath import backend

    for name, cls in (("s3fs", "S3FileSystem"), ("gcsfs.core", "GCSFileSystem")):
        if importlib.util.find_spec(name.split(".")[0]):
            getattr(importlib.import_module(name), cls).clear_instance_cache()
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


class Bucket:
    """The test's own view of a bucket on either server (through the same fsspec client
    the project uses, fresh listings each time): keys, bytes, puts and copies."""

    def __init__(self, scheme: str, name: str = BUCKET):
        from nvium_jax.paths import object_store

        self.scheme, self.name, self.fs = scheme, name, object_store(scheme)
        self.check = CHECK[scheme]

    def url(self, key: str = "") -> str:
        return f"{self.scheme}://{self.name}/{key}"

    def keys(self, prefix: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(f"{self.name}/{prefix}")
        except FileNotFoundError:
            return []
        return sorted(k.split("/", 1)[1] for k in found)

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(f"{self.name}/{key}")

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.name}/{key}", data)

    def copy(self, key: str, to: str) -> None:
        self.fs.copy(f"{self.name}/{key}", f"{self.name}/{to}")

    def version(self, key: str):
        self.fs.invalidate_cache()
        info = self.fs.info(f"{self.name}/{key}")
        return info.get("ETag") or info.get("generation") or info.get("etag")


@pytest.fixture(scope="module", params=sorted(SERVERS))
def bucket(request, tmp_path_factory):
    """A store's server on 127.0.0.1 (`scripts.store_servers.serve`), its standard
    environment pointing at it, and one bucket; stopped at the end of the module."""
    scheme = request.param
    for module in (CLIENTS[scheme], SERVERS[scheme]):
        pytest.importorskip(module, reason=f"the {scheme}:// tests need {module} (pip install 'nvium_jax[test]')")
    with open(tmp_path_factory.mktemp(f"{scheme}_server") / "server.log", "w") as log, \
            serve(scheme, BUCKET, log=log) as env, _environ(**env):
        yield Bucket(scheme)


def test_objects_round_trip_byte_for_byte(bucket, tmp_path):
    """The store (and, for GCS, the emulator as scripts/gcs_emulator.py mends it) returns every
    byte it was given — line ends at the end of an object included — by put and by file."""
    for i, tail in enumerate([b"\r", b"\n", b"\r\n", b"\x00", b"--"]):
        data = bytes(range(256)) + tail
        bucket.put(f"bytes/{i}", data)
        (tmp_path / "f").write_bytes(data)
        bucket.fs.put_file(str(tmp_path / "f"), f"{BUCKET}/bytes/file{i}")
        assert bucket.get(f"bytes/{i}") == data and bucket.get(f"bytes/file{i}") == data, tail


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("s3_corpus") / "corpus.txt", documents=120)


@pytest.fixture(scope="module")
def local_and_bucket(bucket, corpus, tmp_path_factory):
    """The same corpus prepared into a local dir and into BUCKET/words."""
    local = tmp_path_factory.mktemp("s3_local") / "words"
    meta_local = prepare([str(corpus)], local, tokenizer="bpe:300", val_fraction=0.05)
    url = bucket.url("words")
    meta_s3 = prepare([str(corpus)], url, tokenizer="bpe:300", val_fraction=0.05)
    return local, url, meta_local, meta_s3


def test_prepare_into_a_bucket_writes_what_a_local_prepare_writes(local_and_bucket, bucket):
    local, url, meta_local, meta_s3 = local_and_bucket
    drop = ("created",)  # the time it was written
    assert {k: v for k, v in meta_s3.items() if k not in drop} == \
        {k: v for k, v in meta_local.items() if k not in drop}
    assert read_meta(url) == meta_s3  # meta.json is the object that was put
    keys = bucket.keys("words/")
    local_files = sorted("words/" + p.relative_to(local).as_posix()
                         for p in local.rglob("*") if p.is_file())
    assert keys == local_files  # the same objects as the local dir's files, nothing staged left
    # the token arrays read through tensorstore's s3 kvstore equal the local ones
    for split in ("train", "val"):
        n = meta_s3[f"{split}_tokens"]
        body = bucket.get(f"words/{split}/zarr.json")
        assert json.loads(body)["shape"] == [n]
    windows_local = eval_windows(local, context=16, batch=4, n_batches=2)
    windows_s3 = eval_windows(url, context=16, batch=4, n_batches=2)
    np.testing.assert_array_equal(windows_s3, windows_local)


def test_rerun_of_prepare_into_a_bucket_is_a_noop(local_and_bucket, bucket, corpus):
    _, url, _, meta_s3 = local_and_bucket
    before = bucket.version("words/meta.json")
    again = prepare([str(corpus)], url, tokenizer="bpe:300", val_fraction=0.05)
    assert again == meta_s3
    assert bucket.version("words/meta.json") == before


def test_loader_batches_from_a_bucket_equal_the_local_ones(local_and_bucket):
    local, url, _, _ = local_and_bucket
    kwargs = dict(context=16, global_batch=4, seed=3)
    batches = [TrainBatches(d, **kwargs) for d in (local, url)]
    for _ in range(3):
        np.testing.assert_array_equal(next(iter(batches[1])), next(iter(batches[0])))


def test_a_dir_without_meta_is_never_trusted(local_and_bucket, bucket):
    """A prepare stopped after its arrays but before meta.json (the object put last)."""
    local, _, _, _ = local_and_bucket
    for path in local.rglob("*"):
        if path.is_file() and path.name != "meta.json":
            bucket.put("half/" + path.relative_to(local).as_posix(), path.read_bytes())
    with pytest.raises(ConfigError, match=rf"'{bucket.scheme}://nvium-test/half' has no meta.json"):
        read_meta(bucket.url("half"))


def test_missing_bucket_is_one_line_naming_the_url(bucket, corpus, tmp_path, capsys):
    url = f"{bucket.scheme}://nvium-no-such-bucket/words"
    code = cli.main(["prepare", "--input", str(corpus), "--out", url, "--tokenizer", "bpe:300"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: out_dir='{url}': bucket "
                             "'nvium-no-such-bucket' does not exist") and bucket.check in err[0]
    with pytest.raises(ConfigError, match=f"does not exist .*{bucket.check}"):
        read_meta(url)


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line_naming_the_url(bucket):
    if bucket.scheme != "s3":
        pytest.skip("gcsfs retries an unreachable endpoint 6 times with back-off (≈ 35 s); one line then too")
    # nothing listens; one attempt (botocore's standard environment), not its retries' 5–10 s
    with _environ(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1"):
        start = time.time()
        with pytest.raises(ConfigError, match=r"reading data dir 's3://nvium-test/words' failed "
                                              r"\(Could not connect.*AWS_ENDPOINT_URL") as err:
            read_meta(f"s3://{BUCKET}/words")
        assert "\n" not in str(err.value)
        assert time.time() - start < 60


@pytest.mark.slow
def test_train_and_eval_from_bucket_data_equal_local(local_and_bucket, tmp_path, capsys):
    """A run trained from the bucket's data logs the losses of one trained from the local
    copy, and `nvium eval --data s3://…` reports what `--data LOCAL` reports."""
    from tests.conftest import small_config
    from nvium_jax.train.loop import train
    from nvium_jax.train.metrics import read_metrics

    local, url, _, _ = local_and_bucket
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


# ---- run dirs in the bucket (nvium_jax.run_store) -----------------------------------------
RUN_ARGS = ("train.steps=12", "train.checkpoint_every=3", "train.eval_every=6", "model.vocab_size=300")


def _losses(lines) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _train_cli_until(config_path, signum, at_step: int) -> str:
    """`nvium train` in its own process, sent `signum` once it reports step `at_step`; its stderr."""
    import signal

    from tests.conftest import cli_env

    proc = subprocess.Popen([sys.executable, "-m", "nvium_jax.cli", "train", "--config", str(config_path)],
                            env=cli_env(8), stderr=subprocess.PIPE, text=True,
                            cwd=config_path.parent)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"step {at_step}/"):
            proc.send_signal(signum)
            break
    seen.append(proc.stderr.read())
    code = proc.wait(timeout=300)
    assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL), "".join(seen)
    return "".join(seen)


@pytest.fixture(scope="module")
def bucket_run(local_and_bucket, bucket, tmp_path_factory):
    """One 12-step run trained locally without a stop, and the same run trained into
    BUCKET/runs/a: stopped by SIGTERM at step 5, resumed and killed -9 at step 9, resumed
    to the end in this process. The mirrors live in a temporary cache dir."""
    from tests.conftest import small_config, write_yaml
    from nvium_jax.train.loop import train

    local_data = local_and_bucket[0]
    tmp = tmp_path_factory.mktemp("bucket_run")
    with _environ(NVIUM_CACHE=str(tmp / "cache")):
        local_cfg = small_config(local_data, tmp / "local", *RUN_ARGS)
        train(local_cfg)
        url = bucket.url("runs/a")
        cfg = small_config(local_data, url, *RUN_ARGS)
        path = write_yaml(cfg, tmp / "config.yaml")
        import signal

        stopped = _train_cli_until(path, signal.SIGTERM, 5)
        killed = _train_cli_until(path, signal.SIGKILL, 9)
        last = io.StringIO()
        with contextlib.redirect_stderr(last):
            train(cfg)
        yield dict(local=tmp / "local", url=url, config=cfg, stopped=stopped, killed=killed,
                   last=last.getvalue(), tmp=tmp)


@pytest.mark.slow
def test_a_run_in_the_bucket_resumes_bit_exact_after_sigterm_and_kill_9(bucket_run, bucket):
    stopped = int(bucket_run["stopped"].split("stopped by signal at step ")[1].split(";")[0])
    assert 5 <= stopped < 12
    assert f"resuming {bucket.url('runs/a')} from step {stopped}" in bucket_run["killed"]
    # the kill -9 left its lock: the third start takes it over (same host, dead pid)
    assert "taking over the lock of dead pid" in bucket_run["last"]
    assert f"resuming {bucket.scheme}://" in bucket_run["last"] and "from step 12" not in bucket_run["last"]
    local = _losses((bucket_run["local"] / "metrics.jsonl").read_text().splitlines())
    body = bucket.get("runs/a/metrics.jsonl").decode()
    assert sorted(local) == list(range(1, 13)) and _losses(body.splitlines()) == local  # relative difference 0
    keys = bucket.keys("runs/a/")
    assert "runs/a/train.lock" not in keys  # released
    for name in ("config.yaml", "tokenizer.json", "provenance.json", "metrics.jsonl"):
        assert f"runs/a/{name}" in keys
    provenance = json.loads(bucket.get("runs/a/provenance.json"))
    assert len(provenance["resumes"]) == 2  # after the SIGTERM and after the kill -9
    steps = sorted({int(k.split("/")[3]) for k in keys if k.startswith("runs/a/checkpoints/")})
    assert steps == [6, 9, 12]  # train.keep = 3: the older ones left the bucket too
    for step in steps:  # every checkpoint sealed, and its objects exactly the manifest's
        manifest = json.loads(bucket.get(f"runs/a/checkpoints/{step}/nvium-manifest.json"))
        listed = {f"runs/a/checkpoints/{step}/{name}" for name in manifest["files"]}
        assert {k for k in keys if k.startswith(f"runs/a/checkpoints/{step}/")} == \
            listed | {f"runs/a/checkpoints/{step}/nvium-manifest.json"}


@pytest.mark.slow
def test_load_run_eval_and_generate_read_the_bucket(bucket_run, bucket, capsys):
    import jax

    from nvium_jax.runs import load_run
    from flax import nnx

    with _environ(NVIUM_CACHE=str(bucket_run["tmp"] / "cache")):
        remote, local = load_run(bucket_run["url"]), load_run(bucket_run["local"])
        assert remote.step == local.step == 12 and remote.tokenizer is not None
        for a, b in zip(jax.tree.leaves(nnx.state(remote.model)), jax.tree.leaves(nnx.state(local.model))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        records = []
        for run in (bucket_run["url"], str(bucket_run["local"])):
            assert cli.main(["eval", "--run", run, "--json", "--no-plots", "--batches", "1"]) == 0
            records.append(json.loads(capsys.readouterr().out))
        assert records[0] == records[1]
        assert "runs/a/eval/step_12/eval.json" in bucket.keys("runs/a/eval/")
        assert cli.main(["generate", "--run", bucket_run["url"], "--prompt", "the king",
                         "--max-new-tokens", "4", "--seed", "0"]) == 0
        remote_text = capsys.readouterr().out
        assert cli.main(["generate", "--run", str(bucket_run["local"]), "--prompt", "the king",
                         "--max-new-tokens", "4", "--seed", "0"]) == 0
        assert capsys.readouterr().out == remote_text


@pytest.mark.slow
def test_a_damaged_object_is_skipped_set_aside_and_the_run_resumes_exact(bucket_run, bucket, capsys):
    """A copy of the run whose newest checkpoint has one object's bytes changed: `load_run`
    names it and loads checkpoint 9; training sets it aside in `damaged/` (kept) and trains
    steps 10–12 again to the same losses."""
    import dataclasses

    from nvium_jax.runs import load_run
    from nvium_jax.train.loop import train

    for key in bucket.keys("runs/a/"):
        if "/eval/" not in key:
            bucket.copy(key, key.replace("runs/a/", "runs/b/", 1))
    manifest = json.loads(bucket.get("runs/b/checkpoints/12/nvium-manifest.json"))
    victim = next(f"runs/b/checkpoints/12/{n}" for n, e in manifest["files"].items()
                  if n.startswith("params/") and e["bytes"] > 64)
    body = bytearray(bucket.get(victim))
    body[len(body) // 2] ^= 0xFF
    bucket.put(victim, bytes(body))
    url = bucket.url("runs/b")
    with _environ(NVIUM_CACHE=str(bucket_run["tmp"] / "cache")):
        assert load_run(url).step == 9
        assert f"checkpoint 12 of {url} fails verification" in capsys.readouterr().err
        cfg = bucket_run["config"]
        summary = train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=url)))
    assert summary["start_step"] == 9 and summary["step"] == 12
    keys = bucket.keys("runs/b/")
    assert any(k.startswith("runs/b/damaged/checkpoint-12-") and k.endswith(victim.rsplit("/", 1)[1])
               for k in keys)
    body = bucket.get("runs/b/metrics.jsonl").decode()
    local = _losses((bucket_run["local"] / "metrics.jsonl").read_text().splitlines())
    assert _losses(body.splitlines()) == local


def test_a_second_trainer_is_refused_by_the_bucket_lock(local_and_bucket, bucket, tmp_path):
    """train.lock held by a process on another host: `nvium train` refuses in one line and
    writes nothing to the bucket; a missing bucket is one line too. (scripts/gcs_emulator.py
    gives the GCS emulator the precondition that real GCS has.)"""
    from tests.conftest import small_config
    from nvium_jax.train.loop import train

    # the precondition itself (If-None-Match: * / ifGenerationMatch=0): a second create fails
    bucket.fs.pipe_file(f"{BUCKET}/runs/race/train.lock", b"first", mode="create")
    with pytest.raises(FileExistsError):
        bucket.fs.pipe_file(f"{BUCKET}/runs/race/train.lock", b"second", mode="create")
    assert bucket.get("runs/race/train.lock") == b"first"
    owner = {"pid": 4242, "host": "another-host", "started": "2026-12-03T00:00:00+00:00"}
    bucket.put("runs/held/train.lock", json.dumps(owner).encode())
    with _environ(NVIUM_CACHE=str(tmp_path / "cache")):
        cfg = small_config(local_and_bucket[0], bucket.url("runs/held"), *RUN_ARGS)
        with pytest.raises(ConfigError, match=rf"run dir {bucket.url('runs/held')} is in use by pid 4242 "
                                              r"on host another-host"):
            train(cfg)
        assert bucket.keys("runs/held/") == ["runs/held/train.lock"]
        cfg = small_config(local_and_bucket[0], f"{bucket.scheme}://nvium-no-such-bucket/run", *RUN_ARGS)
        with pytest.raises(ConfigError, match=rf"run\.dir='{bucket.scheme}://nvium-no-such-bucket/run': bucket "
                                              r"'nvium-no-such-bucket' does not exist"):
            train(cfg)


@pytest.fixture(scope="module")
def read_only(bucket, tmp_path_factory):
    """A second server of the bucket's store whose bucket refuses every write itself, with
    HTTP 403 (moto checking IAM for a user without s3:PutObject; the emulator's `-readonly`
    rule), and its environment; the test's view of it reads with the same credentials."""
    with open(tmp_path_factory.mktemp(f"{bucket.scheme}_read_only") / "server.log", "w") as log, \
            serve(bucket.scheme, BUCKET + READ_ONLY_SUFFIX, read_only=True, log=log) as env:
        with _environ(**env), pytest.raises(OSError, match="Access Denied|Forbidden"):
            Bucket(bucket.scheme, BUCKET + READ_ONLY_SUFFIX).put("probe", b"x")  # the server's own 403
        yield env


def _one_error_line(capsys) -> str:
    """The command's error: its last line of stderr, the only one that says error, no traceback
    (the lines before it are progress)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [x for x in lines if "error" in x.lower()] == lines[-1:], err
    return lines[-1]


def test_prepare_into_a_bucket_that_refuses_writes_is_one_line(read_only, bucket, corpus, capsys):
    """`nvium prepare --out URL` where the server refuses the writes: one line naming the URL
    and the permission to check; no meta.json, nothing a reader would trust."""
    with _environ(**read_only):
        denied = Bucket(bucket.scheme, BUCKET + READ_ONLY_SUFFIX)
        url = denied.url("words")
        code = cli.main(["prepare", "--input", str(corpus), "--out", url, "--tokenizer", "bpe:300"])
        line = _one_error_line(capsys)
        assert code == 2 and line.startswith(f"error: writing '{url}/"), line
        assert "may read, list, write and delete objects" in line and CREDENTIALS[bucket.scheme] in line, line
        assert denied.keys("words/") == []
        with pytest.raises(ConfigError, match=f"data dir '{url}' does not exist"):
            read_meta(url)  # no reader trusts it


def test_training_into_a_bucket_that_refuses_writes_is_one_line(read_only, bucket, local_and_bucket,
                                                                tmp_path, capsys):
    """`nvium train` whose run.dir is in a bucket that refuses writes: one line naming the
    run dir and the permission to check; no lock and no checkpoint manifest in the bucket."""
    from tests.conftest import small_config, write_yaml

    with _environ(**read_only, NVIUM_CACHE=str(tmp_path / "cache")):
        denied = Bucket(bucket.scheme, BUCKET + READ_ONLY_SUFFIX)
        url = denied.url("runs/a")
        path = write_yaml(small_config(local_and_bucket[0], url, *RUN_ARGS), tmp_path / "config.yaml")
        code = cli.main(["train", "--config", str(path)])
        line = _one_error_line(capsys)
        assert code == 2 and line.startswith(f"error: writing '{url}/train.lock' failed"), line
        assert "may read, list, write and delete objects" in line and CREDENTIALS[bucket.scheme] in line, line
        assert denied.keys("runs/") == []


class Recorder:
    """A stand-in for s3fs that records the order of requests."""

    def __init__(self):
        self.calls, self.objects = [], {}

    def pipe_file(self, key, data):
        self.calls.append(("put", key))
        self.objects[key] = data

    def put_file(self, path, key):
        self.pipe_file(key, pathlib.Path(path).read_bytes())

    def exists(self, key):
        return any(k == key or k.startswith(key + "/") for k in self.objects)

    def rm_file(self, key):
        self.calls.append(("rm", key))
        self.objects.pop(key)

    def rm(self, key, recursive):
        self.calls.append(("rm", key))
        for k in [k for k in self.objects if k.startswith(key + "/")]:
            self.objects.pop(k)


def test_a_checkpoint_is_pushed_manifest_last_after_the_metrics(tmp_path):
    """The order of requests (`Recorder`, a stand-in for s3fs): a sealed step's objects, then
    its manifest, after metrics.jsonl; nothing again when unchanged; a step written again
    loses its old manifest before any object changes; a rotated step leaves the bucket."""
    pytest.importorskip("s3fs")
    from nvium_jax.run_store import RunStore
    from nvium_jax.runs import seal

    store = RunStore("s3://b/run", mirror=tmp_path / "mirror")
    store.fs = fake = Recorder()
    step = tmp_path / "mirror" / "checkpoints" / "3"
    (step / "params").mkdir(parents=True)
    (step / "params" / "a").write_bytes(b"weights")
    (step / "meta.json").write_text("{}")
    (tmp_path / "mirror" / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    seal(step)
    store.push_checkpoints()
    assert fake.calls == [("put", "b/run/metrics.jsonl"), ("put", "b/run/checkpoints/3/meta.json"),
                          ("put", "b/run/checkpoints/3/params/a"),
                          ("put", "b/run/checkpoints/3/nvium-manifest.json")]
    fake.calls.clear()
    store.push_checkpoints()
    assert fake.calls == []
    (step / "params" / "a").write_bytes(b"other weights")  # the step written again
    seal(step)
    store.push_checkpoints()
    assert fake.calls[0] == ("rm", "b/run/checkpoints/3/nvium-manifest.json")
    assert fake.calls[-1] == ("put", "b/run/checkpoints/3/nvium-manifest.json")
    assert fake.objects["b/run/checkpoints/3/params/a"] == b"other weights"
    fake.calls.clear()
    import shutil

    shutil.rmtree(step)  # orbax rotated it out
    store.push_checkpoints()
    assert fake.calls == [("rm", "b/run/checkpoints/3")] and fake.objects == {
        "b/run/metrics.jsonl": b'{"step": 3, "loss": 1.0}\n'}


def _sealed_step(mirror, step: int, payload: bytes):
    from nvium_jax.runs import seal

    step_dir = mirror / "checkpoints" / str(step)
    (step_dir / "params").mkdir(parents=True)
    (step_dir / "params" / "a").write_bytes(payload)
    seal(step_dir)
    return step_dir


def test_a_background_push_uploads_a_snapshot_while_training_goes_on(tmp_path):
    """`push_checkpoints_async` returns while the upload runs (one at a time), uploads the
    step even when orbax deletes it meanwhile (a hard-linked snapshot), and a failed upload
    is raised at the next call."""
    pytest.importorskip("s3fs")
    import shutil
    import threading

    from nvium_jax.run_store import RunStore

    release, started = threading.Event(), threading.Event()

    class Slow(Recorder):
        fail = False

        def put_file(self, path, key):
            started.set()
            assert release.wait(30)
            if self.fail:
                raise OSError("Access Denied")
            super().put_file(path, key)

    store = RunStore("s3://b/run", mirror=tmp_path / "mirror")
    store.fs = fake = Slow()
    step_dir = _sealed_step(tmp_path / "mirror", 3, b"weights")
    store.push_checkpoints_async()
    assert started.wait(30) and store.pusher.is_alive()
    pusher = store.pusher
    _sealed_step(tmp_path / "mirror", 6, b"more weights")
    store.push_checkpoints_async()  # one push at a time: this call returns
    assert store.pusher is pusher
    shutil.rmtree(step_dir)  # orbax rotates step 3 out mid-upload
    release.set()
    store.wait()
    assert fake.objects["b/run/checkpoints/3/params/a"] == b"weights"
    assert fake.calls[-1] == ("put", "b/run/checkpoints/3/nvium-manifest.json")
    assert not (tmp_path / "mirror" / ".push" / "3").exists()
    release.clear()
    fake.fail = True
    store.push_checkpoints_async()  # step 6 is new, step 3 has left the mirror
    release.set()
    with pytest.raises(ConfigError, match=r"writing 's3://b/run/checkpoints/6/params/a' failed "
                                          r"\(Access Denied\)"):
        store.wait()
    assert "b/run/checkpoints/6/nvium-manifest.json" not in fake.objects  # never trusted


@pytest.mark.slow
def test_convert_into_and_out_of_a_bucket_equals_local(bucket, tmp_path, capsys):
    """`nvium convert hf-import --out URL` puts what a local import writes (the parameters
    bit for bit; run.dir and data.tokenizer name the bucket), a second import into it is
    refused; `hf-export URL --out URL` puts the files a local export writes; the imported run fine-tunes from its bucket: `--config URL/config.yaml`, data
    prepared with its tokenizer in the bucket, checkpoints pushed beside checkpoint 0."""
    import jax
    from flax import nnx

    from nvium_jax.config import load_config
    from nvium_jax.data.tokenizer import train_bpe
    from nvium_jax.interop.hf import hf_export, hf_import
    from nvium_jax.runs import load_run
    from nvium_jax.train.loop import train
    from tests.test_interop_hf import HF_CONFIG, llama_tensors, write_llama

    corpus = write_word_corpus(tmp_path / "corpus.txt", documents=200)
    src = write_llama(tmp_path / "llama", llama_tensors(HF_CONFIG, seed=2), shards=1)
    train_bpe([corpus.read_text()], HF_CONFIG["vocab_size"]).save(str(src / "tokenizer.json"))
    url, hf_url = bucket.url("convert/run"), bucket.url("convert/hf")
    with _environ(NVIUM_CACHE=str(tmp_path / "cache")):
        hf_import(src, tmp_path / "local", exits=(2,))
        assert cli.main(["convert", "hf-import", str(src), "--out", url, "--exits", "2", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["run_dir"] == url
        keys = bucket.keys("convert/run/")
        for name in ("config.yaml", "tokenizer.json", "provenance.json", "checkpoints/0/nvium-manifest.json"):
            assert f"convert/run/{name}" in keys, name
        assert not (tmp_path / "cache" / "runs" / "train").exists() or \
            not any((tmp_path / "cache" / "runs" / "train").rglob("*.json"))  # the scratch copy is gone
        remote, local = load_run(url), load_run(tmp_path / "local")
        assert remote.step == local.step == 0
        for a, b in zip(jax.tree.leaves(nnx.state(remote.model)), jax.tree.leaves(nnx.state(local.model))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        config = load_config(f"{url}/config.yaml")  # --config from the bucket
        assert config.run.dir == url and config.data.tokenizer == f"{url}/tokenizer.json"
        assert cli.main(["convert", "hf-import", str(src), "--out", url]) == 2  # not empty: refused
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out {url} exists and is not empty") and "\n" not in err
        assert bucket.keys("convert/run/") == keys  # nothing written

        hf_export(tmp_path / "local", tmp_path / "hf")
        assert cli.main(["convert", "hf-export", url, "--out", hf_url]) == 0
        capsys.readouterr()
        names = sorted(p.name for p in (tmp_path / "hf").iterdir())
        assert bucket.keys("convert/hf/") == [f"convert/hf/{n}" for n in names]
        for name in names:
            assert bucket.get(f"convert/hf/{name}") == (tmp_path / "hf" / name).read_bytes(), name

        prepare([str(corpus)], tmp_path / "data", tokenizer=f"{url}/tokenizer.json", val_fraction=0.1)
        tuned = load_config(f"{url}/config.yaml", [
            f"data.path={tmp_path / 'data'}", "run.wandb=disabled", "train.steps=2", "train.batch_size=8",
            "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2",
            "train.warmup_steps=1", "train.log_every=1"])
        summary = train(tuned)
        assert summary["start_step"] == 0 and summary["step"] == 2
        steps = {k.split("/")[3] for k in bucket.keys("convert/run/checkpoints/")}
        assert steps == {"0", "2"} and load_run(url).step == 2


def _two_processes(config_path, tmp_path, stop_at=None) -> list[str]:
    """`nvium train` as two processes of 4 devices, each with a cache of its own (hosts that
    share only the bucket); process 0 is sent SIGTERM once it reports `stop_at` (the stop
    request reaches both). Their stderr; both must exit 0."""
    import signal

    from tests.conftest import cli_env

    port, procs = free_port(), []
    for pid in range(2):
        env = cli_env(4)
        env.update(NVIUM_COORDINATOR=f"localhost:{port}", NVIUM_NUM_PROCESSES="2", NVIUM_PROCESS_ID=str(pid),
                   NVIUM_CACHE=str(tmp_path / f"cache-{pid}"))
        procs.append(subprocess.Popen([sys.executable, "-m", "nvium_jax.cli", "train", "--config", str(config_path)],
                                      env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    first = []
    if stop_at is not None:
        for line in procs[0].stderr:
            first.append(line)
            if line.startswith(f"step {stop_at}/"):
                procs[0].send_signal(signal.SIGTERM)
                break
    deadline = time.time() + 300
    outputs = [p.communicate(timeout=max(deadline - time.time(), 1))[1] for p in procs]
    outputs[0] = "".join(first) + outputs[0]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    return outputs


@pytest.mark.slow
def test_two_processes_train_into_the_bucket_and_resume_as_one(bucket_run, local_and_bucket, bucket, tmp_path):
    """A multi-process run into a bucket: two processes that share no disk (a cache each)
    train into BUCKET/runs/two from the bucket's data dir, are stopped by SIGTERM, and resume
    from the bucket; the losses equal the one-process local run's (to float rounding: the
    mesh spans two processes), and the bucket holds the checkpoints a single process writes:
    `load_run` here reads the last one, equal to the one-process run's parameters to float
    rounding. One store suffices: both stores share this path (the single-process bucket
    tests run on both)."""
    if bucket.scheme != "s3":
        pytest.skip("run on s3 only (≈ 40 s); the single-process bucket runs cover gs://")
    import jax
    from flax import nnx

    from nvium_jax.runs import load_run
    from tests.conftest import small_config, write_yaml

    url = bucket.url("runs/two")
    path = write_yaml(small_config(local_and_bucket[1], url, *RUN_ARGS), tmp_path / "two.yaml")
    stopped = _two_processes(path, tmp_path, stop_at=5)[0]
    assert "stopped by signal at step" in stopped
    resumed = _two_processes(path, tmp_path)
    assert f"resuming {url} from step" in resumed[0] and f"resuming {url} from step" in resumed[1]
    one = _losses((bucket_run["local"] / "metrics.jsonl").read_text().splitlines())
    two = _losses(bucket.get("runs/two/metrics.jsonl").decode().splitlines())
    assert sorted(two) == sorted(one) == list(range(1, 13))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    keys = bucket.keys("runs/two/")
    assert "runs/two/train.lock" not in keys
    assert sorted({int(k.split("/")[3]) for k in keys if k.startswith("runs/two/checkpoints/")}) == [6, 9, 12]
    with _environ(NVIUM_CACHE=str(tmp_path / "reader")):
        remote, local = load_run(url), load_run(bucket_run["local"])
    assert remote.step == local.step == 12
    for a, b in zip(jax.tree.leaves(nnx.state(remote.model)), jax.tree.leaves(nnx.state(local.model))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)  # 12 Adam steps
