"""Config loading, overrides and the one-line errors a user sees."""

import pathlib
import subprocess
import sys

import pytest

from nvium_jax.cli import main
from nvium_jax.config import ConfigError, config_from_dict, config_to_dict, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/nvium-tiny.yaml"


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.run.dir == f"runs/{path.stem}"
        assert config_from_dict(config_to_dict(config)) == config


def test_overrides_are_parsed_as_yaml():
    config = load_config(TINY, ["model.n_layers=4", "train.lr=3e-4", "model.exits=[1,3]", "run.wandb=disabled",
                                "model.n_kv_heads=2", "data.path=null", "train.grad_accum=2"])
    assert config.train.lr == pytest.approx(3e-4) and isinstance(config.train.lr, float)
    assert config.model.exits == (1, 3) and config.model.exit_depths == (1, 3, 4)
    assert config.model.kv_heads == 2 and config.train.grad_accum == 2
    assert config.model.segments == ((0, 1), (1, 3), (3, 4))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", r"unknown config key train\.lrr; keys of train are: .*\blr\b"),
        ("trian.lr=1", r"unknown section 'trian'"),
        ("train.lr", r"not of the form section\.key=value"),
        ("train.steps=1.5", r"train\.steps=1\.5 is not valid; expected an integer"),
        ("train.steps=true", r"expected an integer"),
        ("train.lr=fast", r"train\.lr='fast' is not valid; expected a number"),
        ("model.exits=[3,1]", r"model\.exits=\[3, 1\] — exits must be increasing layer indices in \[1, 3\]"),
        ("model.exits=[1,4]", r"exits must be increasing layer indices in \[1, 3\] \(model\.n_layers=4\)"),
        ("model.exits=[0,2]", r"\[1, 3\]"),
        ("model.exits=3", r"model\.exits=3 is not valid; expected a list of integers"),
        ("model.n_heads=5", r"model\.d_model=128 is not divisible by model\.n_heads=5"),
        ("model.n_kv_heads=3", r"model\.n_kv_heads=3 must divide model\.n_heads=4"),
        ("model.dtype=float16", r"model\.dtype='float16' is not allowed; choose one of auto, bfloat16, float32"),
        ("train.schedule=linear", r"choose one of cosine, wsd"),
        ("train.grad_accum=3", r"train\.batch_size=16 is not divisible by train\.grad_accum=3"),
        ("mesh.data=0", r"mesh\.data=0 must be a positive size or -1"),
        ("mesh.data=-1", r"at most one of mesh\.data, mesh\.fsdp, mesh\.tensor may be -1"),
        ("decode.window=0", r"decode\.window=0 must be at least 1"),
        ("model.router_head=deep", r"model\.router_head='deep' is not allowed; choose one of ours, reference"),
        ("model.adapter_activation=relu", r"choose one of gelu, silu"),
        ("model.adapter_init=xavier", r"model\.adapter_init='xavier' is not allowed; choose one of ours, reference"),
        ("model.final_adapter=1", r"model\.final_adapter=1 is not valid; expected true or false"),
        ("train.exit_lr_mult=-0.5", r"train\.exit_lr_mult=-0\.5 must be at least 0"),
        ("train.exit_lr_mult=fast", r"train\.exit_lr_mult='fast' is not valid; expected a number"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, ["model.n_layers=4", "model.exits=[1,2,3]", override])


def test_exit_options_default_to_ours_and_parse():
    default = load_config(TINY)
    m = default.model
    assert (m.router_head, m.adapter_activation, m.adapter_init, m.final_adapter) == ("ours", "gelu", "ours", False)
    assert default.train.exit_lr_mult == 1.0 and m.router_width == m.d_model == 128
    config = load_config(TINY, ["model.router_head=reference", "model.adapter_activation=silu",
                                "model.adapter_init=reference", "model.final_adapter=true",
                                "train.exit_lr_mult=3"])
    m = config.model
    assert (m.router_head, m.adapter_activation, m.adapter_init, m.final_adapter) == (
        "reference", "silu", "reference", True)
    assert config.train.exit_lr_mult == 3.0 and isinstance(config.train.exit_lr_mult, float)
    assert config_from_dict(config_to_dict(config)) == config
    # the reference router's width: 0.66·D rounded up to 8, as the paper's configs have it
    for d_model, width in ((128, 88), (256, 176), (1536, 1016)):
        assert load_config(TINY, ["model.router_head=reference", f"model.d_model={d_model}"]).model.router_width == width
    assert load_config(TINY, ["model.router_head=reference", "model.router_hidden=40"]).model.router_width == 40


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("modle:\n  d_model: 3\n")
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        load_config(bad)


def test_cli_prints_config_and_errors_without_traceback(capsys):
    assert main(["train", "--config", str(TINY), "--print-config", "train.lr=1e-3"]) == 0
    out, err = capsys.readouterr()
    assert "lr: 0.001" in out and "2,903,686 parameters" in err
    assert main(["train", "--config", str(TINY), "--print-config", "model.exits=[1,9]"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: model.exits=[1, 9] — exits must be increasing")
    assert "Traceback" not in err and err.count("\n") == 1


def test_console_script_error_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "nvium_jax.cli", "train", "--config", str(TINY), "--print-config",
         "train.nope=1"], capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip()] and "unknown config key train.nope" in result.stderr
