"""The train step: gradient accumulation equals the full batch."""

import jax
import numpy as np
import pytest

from nvium_jax.config import MeshConfig, load_config
from nvium_jax.train.mesh import make_mesh
from nvium_jax.train.step import make_trainer, micro_batches

OVERRIDES = ["model.n_layers=4", "model.exits=[1,2,3]", "model.dtype=float32", "model.vocab_size=61", "model.context=16", "model.d_model=32",
             "model.n_heads=4", "model.d_ff=64", "train.batch_size=8", "train.loss_chunk=8",
             "train.steps=10", "train.router_warmup_frac=0.0", "model.router_bias_init=-1.0"]
TOKENS = np.random.default_rng(3).integers(0, 61, (8, 17)).astype(np.int32)


def one_step(*overrides):
    config = load_config("configs/nvium-tiny.yaml", [*OVERRIDES, *overrides])
    trainer = make_trainer(config, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
    batch = micro_batches(TOKENS, config.train.grad_accum)
    state, metrics = trainer.step_fn(trainer.init_fn(), jax.device_put(batch, trainer.batch_sharding))
    return config, jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def full_batch_step():
    return one_step()


def test_gradient_accumulation_equals_the_full_batch(full_batch_step):
    _, full_state, full = full_batch_step
    _, accum_state, accum = one_step("train.grad_accum=4")
    assert float(accum["loss"]) == pytest.approx(float(full["loss"]), rel=1e-6)
    assert float(accum["grad_norm"]) == pytest.approx(float(full["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(accum_state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
