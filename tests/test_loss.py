"""The chunked custom-VJP loss against an unchunked naive loss built from model(tokens)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nvium_jax.model import build_model, mixture_logprobs
from nvium_jax.model.loss import nvium_loss, router_warmup_loss
from tests.reference import randomize_exit_weights


@pytest.fixture
def model(small_cfg):
    model = build_model(small_cfg, seed=5)
    randomize_exit_weights(model, seed=6)
    return model


@pytest.fixture
def windows_BxT1(small_cfg):
    return jax.random.randint(jax.random.key(8), (3, 11), 0, small_cfg.vocab_size)


def naive_loss(model, windows, beta, warmup):
    """Every exit's full logits at once, mixture by direct formula, autodiff through all."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    out = model(inputs)
    mixture = mixture_logprobs(*out)
    ce = -jnp.mean(jnp.take_along_axis(mixture, targets[..., None], -1))
    weights_BxTxK = jnp.exp(out.route_logp_BxTxK)
    depths = jnp.asarray(model.config.exit_depths, jnp.float32)
    depth_cost = beta * jnp.mean(weights_BxTxK @ depths) / model.config.n_layers
    # q_k from π: q_k = π_k / (1 − Σ_{j<k} π_j)
    reach = 1.0 - jnp.cumsum(weights_BxTxK, -1) + weights_BxTxK
    q_BxTxK1 = (weights_BxTxK / reach)[..., :-1]
    K = model.config.n_exits
    warm = jnp.mean(sum((q_BxTxK1[..., k] - 1.0 / (K - k)) ** 2 for k in range(K - 1)))
    return ce + (warm if warmup else depth_cost)


@pytest.mark.parametrize(("chunk", "warmup"), [pytest.param(1, False, marks=pytest.mark.slow), (4, True),
                                              pytest.param(64, False, marks=pytest.mark.slow)])
def test_chunked_loss_and_gradient_equal_naive(model, windows_BxT1, chunk, warmup):
    """chunk 4 does not divide the 10 targets (padding); 64 is one chunk."""
    def chunked(m):
        return nvium_loss(m, windows_BxT1, beta=0.3, router_warmup=warmup, chunk=chunk).loss

    naive = nnx.jit(nnx.value_and_grad(naive_loss), static_argnums=(2, 3))
    expected, expected_grads = naive(model, windows_BxT1, 0.3, warmup)
    got, grads = nnx.jit(nnx.value_and_grad(chunked))(model)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    for (path, g), (_, e) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(expected_grads)):
        scale = float(jnp.abs(e.get_value()).max()) + 1e-6
        np.testing.assert_allclose(g.get_value(), e.get_value(), atol=2e-5 * scale, err_msg=str(path))


@pytest.mark.slow
def test_gradient_under_jit_with_bfloat16_compute(small_cfg, windows_BxT1):
    model = build_model(dataclasses.replace(small_cfg, dtype="bfloat16"), seed=5)

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: nvium_loss(m, windows_BxT1, chunk=4).loss)(m)

    g = grads(model)
    assert g["head"].get_value().dtype == jnp.float32
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))


def test_metrics_equal_per_exit_references(model, windows_BxT1):
    metrics = nvium_loss(model, windows_BxT1, beta=0.0, chunk=4)
    inputs, targets = windows_BxT1[:, :-1], windows_BxT1[:, 1:]
    out = model(inputs)
    exit_ce = [-np.mean(np.take_along_axis(np.asarray(lp), np.asarray(targets)[..., None], -1))
               for lp in out.exit_logp_KxBxTxV]
    np.testing.assert_allclose(metrics.exit_ce_K, exit_ce, rtol=1e-6)
    weights = np.exp(np.asarray(out.route_logp_BxTxK))
    np.testing.assert_allclose(metrics.exit_mass_K, weights.mean((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(float(np.sum(metrics.exit_mass_K)), 1.0, atol=1e-6)
    expected_depth = (weights * np.array(model.config.exit_depths)).sum(-1).mean()
    np.testing.assert_allclose(metrics.expected_depth, expected_depth, rtol=1e-6)
    np.testing.assert_allclose(metrics.loss, metrics.mixture_ce, rtol=1e-7)  # beta = 0


def test_depth_cost_and_warmup_switch(model, windows_BxT1):
    on = nvium_loss(model, windows_BxT1, beta=0.5, router_warmup=True, chunk=4)
    off = nvium_loss(model, windows_BxT1, beta=0.5, router_warmup=False, chunk=4)
    np.testing.assert_allclose(on.loss, on.mixture_ce + on.router_loss, rtol=1e-6)
    np.testing.assert_allclose(off.depth_cost, 0.5 * off.expected_depth / 4, rtol=1e-6)
    np.testing.assert_allclose(off.loss, off.mixture_ce + off.depth_cost, rtol=1e-6)


def test_warmup_targets_make_routing_uniform():
    K = 4
    q_K1 = jnp.array([1 / 4, 1 / 3, 1 / 2])  # the targets 1/(K−k+1), k = 1..3
    assert float(router_warmup_loss(q_K1[None, None])) == 0.0
    reach, weights = 1.0, []
    for q in q_K1:
        weights.append(reach * q)
        reach *= 1 - q
    np.testing.assert_allclose(weights + [reach], [1 / K] * K, rtol=1e-6)
    np.testing.assert_allclose(router_warmup_loss(jnp.zeros((1, 1, 3))), 1/16 + 1/9 + 1/4, rtol=1e-6)


def test_baseline_loss_is_cross_entropy(small_cfg, windows_BxT1):
    baseline = build_model(dataclasses.replace(small_cfg, exits=()), seed=1)
    metrics = nvium_loss(baseline, windows_BxT1, beta=0.15, chunk=3)
    logp = baseline(windows_BxT1[:, :-1]).exit_logp_KxBxTxV[0]
    ce = -jnp.mean(jnp.take_along_axis(logp, windows_BxT1[:, 1:, None], -1))
    np.testing.assert_allclose(metrics.loss, ce, rtol=1e-6)
    np.testing.assert_allclose(metrics.exit_mass_K, [1.0])
    np.testing.assert_allclose(metrics.expected_depth, 4.0)
