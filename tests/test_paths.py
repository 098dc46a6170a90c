"""The path layer: a URL of a scheme not supported (any but s3:// and gs:// for a run dir or a
data dir, any URL elsewhere) is refused in one line naming the value and what is supported — through the CLI
(exit 2, one `error:` line) and the Python API — and is never folded into a local folder
(`s3://b/run` → `./s3:/b/run`)."""

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import cli_env
from nvium_jax import cli
from nvium_jax.config import ConfigError, load_config
from nvium_jax.paths import local_path, url_scheme

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "nvium-tiny.yaml")


def _nothing_folded(root: pathlib.Path) -> None:
    """No `s3:`/`gs:` folder (pathlib's folding of a URL) anywhere under `root`."""
    folded = [p for p in root.rglob("*") if p.name.endswith(":")]
    assert folded == [], f"a URL was folded into local folders: {folded}"


def test_url_scheme_tells_urls_from_local_paths():
    assert url_scheme("s3://my-bucket/run") == "s3"
    assert url_scheme("GS://b/x") == "gs"
    assert url_scheme("file:///tmp/run") == "file"
    for local in ("runs/tiny", "/abs/run", "runs/a:b", "C:/run", "s3:/b/run", "./s3://x",
                  pathlib.Path("runs/x")):
        assert url_scheme(local) is None, local
    assert local_path("runs/tiny", "run.dir") == pathlib.Path("runs/tiny")


@pytest.mark.parametrize("url", ["s3://my-bucket/run", "gs://my-bucket/run", "file:///tmp/run"])
def test_local_path_refuses_a_url_naming_value_and_what_is_supported(url):
    with pytest.raises(ConfigError) as err:
        local_path(url, "run.dir")
    message = str(err.value)
    assert "\n" not in message
    assert f"run.dir={url!r}" in message and "local path" in message


def test_train_cli_refuses_an_unsupported_run_dir_url_in_one_line(tmp_path):
    """The reported bug, as a user meets it (then with s3://, now supported, as gs:// is):
    the real `nvium train` process."""
    proc = subprocess.run(
        [sys.executable, "-m", "nvium_jax.cli", "train", "--config", TINY,
         "run.dir=az://my-bucket/run"],
        env=cli_env(8), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run.dir='az://my-bucket/run'"), proc.stderr
    assert "give a local path or a URL of s3://, gs://" in lines[0]
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, named", [
    (["train", "--config", TINY, "data.path=az://my-bucket/data"], "data.path='az://my-bucket/data'"),
    (["train", "--config", TINY, "train.beta_match=s3://b/baseline"], "train.beta_match='s3://b/baseline'"),
    (["train", "--config", TINY, "data.tokenizer=az://b/tokenizer.json"], "data.tokenizer="),
    (["train", "--config", "az://b/run/config.yaml"], "--config='az://b/run/config.yaml'"),
    (["train", "--config", TINY, "--print-config", "run.dir=az://b/run"], "run.dir='az://b/run'"),
    (["prepare", "--input", "corpus.txt", "--out", "az://my-bucket/data"], "--out='az://my-bucket/data'"),
    (["prepare", "--input", "corpus.txt", "--out", "data", "--tokenizer", "az://b/tok.json"],
     "tokenizer='az://b/tok.json'"),
    (["eval", "--run", "az://my-bucket/run"], "--run='az://my-bucket/run'"),
    (["eval", "--run", "az://my-bucket/run", "--tasks", "lambada"], "--run='az://my-bucket/run'"),
    (["eval", "--run", "runs/local", "--data", "az://my-bucket/data"], "--data='az://my-bucket/data'"),
    (["generate", "--run", "az://my-bucket/run", "--prompt", "the king"], "az://my-bucket/run"),
    (["convert", "hf-import", "hf_model", "--out", "az://my-bucket/run"], "--out='az://my-bucket/run'"),
    (["convert", "hf-import", "gs://hub/llama", "--out", "run"], "SRC_DIR='gs://hub/llama'"),
    (["convert", "hf-export", "runs/local", "--out", "az://my-bucket/hf"], "--out='az://my-bucket/hf'"),
    (["convert", "hf-export", "az://my-bucket/run", "--out", "hf"], "RUN_DIR='az://my-bucket/run'"),
])
def test_cli_refuses_urls_in_one_error_line(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("the king said unto them.\n")
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], out.err
    assert "is not supported" in lines[0] and "local path" in lines[0]
    assert out.out == ""
    _nothing_folded(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_python_api_refuses_urls(tmp_path, monkeypatch):
    from nvium_jax.data import prepare, read_meta, resolve_data_dir
    from nvium_jax.interop.hf import hf_export, hf_import
    from nvium_jax.runs import load_run
    from nvium_jax.train.loop import train

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the king said unto them.\n")
    with pytest.raises(ConfigError, match=r"run\.dir='az://b/run'"):
        load_config(TINY, ["run.dir=az://b/run"])
    config = load_config(TINY, [f"run.dir={tmp_path / 'run'}"])
    # a Config built in Python skips load_config: the trainer's own entry still refuses
    bad = dataclasses.replace(config, run=dataclasses.replace(config.run, dir="az://b/run"))
    with pytest.raises(ConfigError, match=r"run\.dir='az://b/run'"):
        train(bad)
    bad = dataclasses.replace(config, data=dataclasses.replace(config.data, path="az://b/data"))
    with pytest.raises(ConfigError, match=r"data\.path='az://b/data'"):
        resolve_data_dir(bad)
    for call, value in [
        (lambda: load_run("az://b/run"), "az://b/run"),
        (lambda: prepare([str(corpus)], "az://b/data", tokenizer="bpe:300"), "az://b/data"),
        (lambda: read_meta("az://b/data"), "az://b/data"),
        (lambda: hf_import(str(tmp_path), "az://b/run"), "az://b/run"),
        (lambda: hf_export("az://b/run", str(tmp_path / "hf")), "az://b/run"),
    ]:
        with pytest.raises(ConfigError, match=f"{value!r}") as err:
            call()
        assert "not supported" in str(err.value)
    _nothing_folded(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_lm_eval_model_arg_run_refuses_a_url():
    pytest.importorskip("lm_eval")
    from nvium_jax.eval.harness import NviumLM

    with pytest.raises(ConfigError, match=r"'az://my-bucket/run' is a URL \(az://\)"):
        NviumLM(run="az://my-bucket/run")


def test_cli_keeps_gcsfs_retry_tracebacks_off_stderr(tmp_path, monkeypatch, capsys):
    """gcsfs logs a request that ran out of retries (an unreachable endpoint, ≈ 35 s of them)
    at ERROR with its traceback; a command prints only its own error line."""
    import logging

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logging.getLogger("gcsfs"), "level", logging.NOTSET)
    assert logging.getLogger("gcsfs").isEnabledFor(logging.ERROR)
    assert cli.main(["eval", "--run", "az://my-bucket/run"]) == 2
    assert not logging.getLogger("gcsfs").isEnabledFor(logging.ERROR)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
