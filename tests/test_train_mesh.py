"""Mesh sizing, the logical-axis rules, and sharded loss/gradients equal to one device."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nvium_jax.config import ConfigError, MeshConfig, load_config
from nvium_jax.train import step as step_lib
from nvium_jax.train.step import micro_batches
from nvium_jax.train.mesh import batch_sharding, logical_spec, make_mesh, mesh_shape
from tests.reference import randomize_exit_weights


def test_mesh_shape_resolves_the_rest_and_rejects_mismatch():
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=1), 8) == (2, 4, 1)
    assert mesh_shape(MeshConfig(data=1, fsdp=2, tensor=4), 8) == (1, 2, 4)
    with pytest.raises(ConfigError, match=r"= 4 devices, but 8 are available"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="not divisible by 3"):
        mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)


def test_logical_rules_shard_and_fall_back_to_replication():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    assert logical_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert logical_spec(("layers", "embed", "kv_heads", "head_dim"), (4, 64, 2, 8), mesh) == P(
        None, "fsdp", None, None)  # 2 kv heads do not split over 4
    assert logical_spec(("vocab", "embed"), (37, 64), mesh) == P(None, "fsdp")
    assert logical_spec(("router", None), (16, 2), mesh) == P(None, None)


def test_micro_batches_keep_each_process_rows_contiguous():
    batch = np.arange(8)[:, None] * np.ones((1, 3), int)
    micro = micro_batches(batch, 2)
    assert micro[:, :, 0].tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # process 0 of 2 holds rows 0..3: in every micro-batch, its rows come first
    np.testing.assert_array_equal(micro_batches(batch[:4], 2), micro[:, :2])


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(
        "configs/nvium-tiny.yaml",
        ["model.n_layers=4", "model.exits=[1,2,3]", "model.dtype=float32", "model.vocab_size=61",
         "model.context=16", "model.d_model=32",
         "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "train.batch_size=8",
         "train.loss_chunk=8", "model.router_bias_init=-1.0"],
    )


def _loss_and_grads(config, mesh_cfg, tokens_BxT1):
    mesh = make_mesh(mesh_cfg) if mesh_cfg else make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    trainer = step_lib.make_trainer(config, mesh)
    state = trainer.init_fn()
    model = nnx.merge(trainer.graphdef, state.params)
    randomize_exit_weights(model, seed=1)
    params = nnx.to_pure_dict(nnx.state(model))
    params = jax.device_put(params, trainer.state_shardings.params)
    loss_fn = functools.partial(step_lib._loss, graphdef=trainer.graphdef, config=config,
                                beta=0.15, router_warmup=False, remat="full")
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                      in_shardings=(trainer.state_shardings.params, batch_sharding(mesh)))
    (loss, _), grads = grad_fn(params, jax.device_put(tokens_BxT1, batch_sharding(mesh)))
    return float(loss), jax.device_get(grads), grads


TOKENS = np.random.default_rng(0).integers(0, 61, (8, 17)).astype(np.int32)


@pytest.fixture(scope="module")
def one_device(tiny_config):
    return _loss_and_grads(tiny_config, None, TOKENS)[:2]


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(1, 8, 1), pytest.param(MeshConfig(2, 4, 1), marks=pytest.mark.slow),
                                      pytest.param(MeshConfig(1, 2, 4), marks=pytest.mark.slow)])
def test_sharded_loss_and_gradients_equal_one_device(tiny_config, one_device, mesh_cfg):
    loss_1, grads_1 = one_device
    loss_n, grads_n, sharded = _loss_and_grads(tiny_config, mesh_cfg, TOKENS)
    assert abs(loss_n - loss_1) <= 1e-5 * abs(loss_1)
    for a, b in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_1)):
        np.testing.assert_allclose(a, b, atol=1e-5 * (np.abs(b).max() + 1e-8), rtol=0)
    wq = sharded["blocks"]["attn"]["wq"]
    assert len(wq.sharding.device_set) == 8
    assert wq.addressable_shards[0].data.shape[1] == 32 // mesh_cfg.fsdp  # embed over fsdp
