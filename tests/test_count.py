"""Parameter counts of every shipped config: abstract init (nothing allocated) == formula."""

import dataclasses
import pathlib

import jax
import pytest
from flax import nnx

from nvium_jax.config import load_config
from nvium_jax.model import build_model, matched_baseline_d_ff, param_count
from nvium_jax.model.count import matched_baseline_model
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


@pytest.mark.parametrize("router_head", ["ours", "reference"])
@pytest.mark.parametrize("final_adapter", [False, True])
@pytest.mark.parametrize("adapter", [("gelu", "ours"), ("silu", "reference")])
def test_exit_options_are_counted_and_matched(router_head, final_adapter, adapter):
    """Every option combination: the formula equals the built model's leaves, and the matched
    baseline (a plain transformer: no exits, no final adapter) stays within 0.5%."""
    tiny = load_config(ROOT / "configs/nvium-tiny.yaml").model
    cfg = dataclasses.replace(tiny, router_head=router_head, final_adapter=final_adapter,
                              adapter_activation=adapter[0], adapter_init=adapter[1])
    assert abstract_param_count(cfg) == param_count(cfg)
    baseline = matched_baseline_model(cfg)
    assert baseline.early_exits == () and not baseline.final_adapter
    assert abstract_param_count(baseline) == param_count(baseline)
    assert abs(param_count(baseline) / param_count(cfg) - 1) < 0.005


def test_reference_router_and_final_adapter_by_hand():
    """D = 128: the reference router is D→88 (+bias), 88→D (+bias), a norm over D, D→2 (+bias);
    the final adapter is one more D→A→D pair."""
    tiny = load_config(ROOT / "configs/nvium-tiny.yaml").model
    D, A, K1 = tiny.d_model, tiny.adapter_width, len(tiny.early_exits)
    assert D == 128 and tiny.router_width == D
    ref = dataclasses.replace(tiny, router_head="reference")
    assert ref.router_width == 88
    router_ours, router_ref = D * D + D + 2 * D + 2, (D * 88 + 88) + (88 * D + D) + D + (2 * D + 2)
    assert param_count(ref) - param_count(tiny) == K1 * (router_ref - router_ours)
    with_final = dataclasses.replace(tiny, final_adapter=True)
    assert param_count(with_final) - param_count(tiny) == 2 * D * A
    assert matched_baseline_d_ff(with_final) > matched_baseline_d_ff(tiny)
