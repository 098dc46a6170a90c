"""A user's mistake ends in one line; a bug of ours keeps its traceback; no doubled
`error:`. Config fuzzing: random keys and values through `load_config` and the CLI give a
valid config or one clear error, never a traceback."""

import dataclasses
import pathlib

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nvium_jax.cli
from nvium_jax.cli import main
from nvium_jax.config import Config, ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
TINY = ROOT / "configs/nvium-tiny.yaml"
SECTIONS = {f.name: [k.name for k in dataclasses.fields(getattr(Config(), f.name))] for f in dataclasses.fields(Config)}
KEYS = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "float32", "bfloat16", "cosine", "wsd", "skip", "-1",
                                           "[1, 2]", "[]", "{a: 1}", "1e-3", "null", "~", ":", "[", "'"]))
values = st.one_of(scalars, st.lists(st.integers(-5, 40), max_size=4), st.lists(scalars, max_size=3))
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20),
                 st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(list(SECTIONS)), st.text(max_size=8)))


def as_override(key, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_random_overrides_give_a_config_or_a_config_error(pairs):
    try:
        config = load_config(TINY, [as_override(k, v) for k, v in pairs])
    except ConfigError as err:
        assert str(err) and "\n" not in str(err).strip()
    else:
        assert isinstance(config, Config)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=6)),
                       st.one_of(values, st.dictionaries(st.text(max_size=10), values, max_size=4)),
                       max_size=4))
def test_random_config_files_give_a_config_or_a_config_error(tmp_path, document):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path)
    except ConfigError as err:
        assert str(err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=3))
def test_the_cli_answers_random_overrides_in_one_line(capsys, pairs):
    code = main(["train", "--config", str(TINY), *[as_override(k, v) for k, v in pairs], "--print-config"])
    captured = capsys.readouterr()
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and not lines[0].startswith("error: error:")
    else:
        assert code == 0 and yaml.safe_load(captured.out)


def test_a_bug_of_ours_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(nvium_jax.cli, "_plan", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["plan", "--config", str(TINY)])


def test_user_mistakes_are_one_line_without_a_doubled_prefix(capsys, tmp_path):
    cases = [
        (["bench", "decode", "--config", str(TINY), "--exit-rates", "0.5,0.6,0,0"], "--exit-rates"),
        (["generate", "--run", str(tmp_path), "--prompt", "x"], "is not a run directory"),
        (["train", "--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["eval", "--run", str(tmp_path)], "is not a run directory"),
        (["train", "--config", str(TINY), "decode.attention=triton", "--print-config"], "decode.attention"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
        assert not err[0].startswith("error: error:")
    source = (ROOT / "nvium_jax/inference/kernels/pallas_attention.py").read_text()
    assert 'f"error: ' not in source
