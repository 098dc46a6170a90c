"""The MFU FLOP formula against XLA's own count of the compiled train computation."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from nvium_jax.config import ModelConfig
from nvium_jax.model import build_model
from nvium_jax.model.loss import nvium_loss
from nvium_jax.train.metrics import mfu, train_flops_per_token

BASE = ModelConfig(vocab_size=4096, n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_ff=512,
                   context=128, exits=(1, 2, 3), dtype="float32")


def xla_flops_per_token(cfg: ModelConfig, batch: int = 2) -> float:
    graphdef, state = nnx.split(build_model(cfg))
    tokens = jnp.zeros((batch, cfg.context + 1), jnp.int32)

    def loss(state, tokens):
        return nvium_loss(nnx.merge(graphdef, state), tokens, chunk=cfg.context).loss

    analysis = jax.jit(jax.value_and_grad(loss)).lower(state, tokens).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return analysis["flops"] / (batch * cfg.context)


# XLA counts a scan body once, so every segment here is one layer long (a scan of length 1)
@pytest.mark.parametrize("cfg", [BASE, dataclasses.replace(BASE, n_layers=1, exits=()),
                                 dataclasses.replace(BASE, final_adapter=True)],
                         ids=["nvium", "baseline", "final_adapter"])
def test_train_flops_formula_matches_xla_count(cfg):
    assert xla_flops_per_token(cfg) == pytest.approx(train_flops_per_token(cfg, cfg.context), rel=0.03)


def test_mfu_is_unknown_on_cpu():
    assert mfu(1000.0, BASE, 128) is None
