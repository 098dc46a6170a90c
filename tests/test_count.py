"""Parameter counts of every shipped config: abstract init (nothing allocated) == formula."""

import dataclasses
import pathlib

import jax
import pytest
from flax import nnx

from nvium_jax.config import load_config
from nvium_jax.model import build_model, matched_baseline_d_ff, param_count
from scripts.param_table import SIZES, table

ROOT = pathlib.Path(__file__).resolve().parent.parent


def abstract_param_count(model_cfg) -> int:
    abstract = nnx.eval_shape(lambda: build_model(model_cfg))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("size", SIZES)
def test_param_counts_match_formula_and_baseline_within_half_percent(size):
    nvium = load_config(ROOT / f"configs/nvium-{size}.yaml").model
    baseline = load_config(ROOT / f"configs/baseline-{size}.yaml").model
    assert baseline.early_exits == () and nvium.n_exits == 4
    assert dataclasses.replace(baseline, d_ff=nvium.d_ff, exits=nvium.exits) == nvium
    for cfg in (nvium, baseline):
        assert abstract_param_count(cfg) == param_count(cfg)
    assert abs(param_count(baseline) / param_count(nvium) - 1) < 0.005
    assert baseline.d_ff == matched_baseline_d_ff(nvium)


def test_paper_1p5b_shape():
    m = load_config(ROOT / "configs/nvium-1.5b.yaml").model
    assert (m.d_model, m.n_layers, m.n_heads, m.head_dim, m.d_ff) == (1536, 48, 12, 128, 4096)
    assert (m.vocab_size, m.context, m.early_exits) == (32000, 1024, (12, 24, 36))
    assert 1.4e9 < param_count(m) < 1.6e9


def test_readme_lists_the_formula_table():
    assert table() in (ROOT / "README.md").read_text()
