"""Learning-rate schedules by formula, and which parameters get weight decay."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from nvium_jax.config import TrainConfig
from nvium_jax.model import build_model
from nvium_jax.train.optimizer import decay_mask, exit_lr_mask, lr_schedule, make_optimizer


def test_cosine_schedule_matches_formula():
    cfg = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    sched = lr_schedule(cfg)
    for step in (0, 4, 9):
        assert float(sched(step)) == pytest.approx(1e-3 * (step + 1) / 10, rel=1e-5)
    for step in (10, 35, 60, 109):
        progress = (step - 10) / 100
        expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert float(sched(step)) == pytest.approx(expected, rel=1e-5)


def test_wsd_schedule_is_flat_then_linear():
    cfg = TrainConfig(steps=100, lr=2e-3, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd",
                      decay_frac=0.2)
    sched = lr_schedule(cfg)
    assert float(sched(10)) == pytest.approx(2e-3) and float(sched(79)) == pytest.approx(2e-3)
    assert float(sched(90)) == pytest.approx(1e-3, rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask(small_cfg, decay_embeddings):
    params = nnx.to_pure_dict(nnx.state(build_model(small_cfg)))
    mask = decay_mask(params, decay_embeddings)
    assert mask["embedding"] is decay_embeddings
    assert mask["head"] and mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["w_down"]
    assert not mask["blocks"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    exit0 = mask["exits"][0]
    assert exit0["router_in"] and exit0["adapter_out"]
    assert not exit0["router_in_bias"] and not exit0["router_out_bias"] and not exit0["norm"]["scale"]


def _paper_exit_params(small_cfg) -> dict:
    cfg = dataclasses.replace(small_cfg, router_head="reference", final_adapter=True)
    return nnx.to_pure_dict(nnx.state(build_model(cfg)))


def test_masks_of_the_reference_exits(small_cfg):
    params = _paper_exit_params(small_cfg)
    decay, scaled = decay_mask(params, False), exit_lr_mask(params)
    exit0, scaled0 = decay["exits"][0], scaled["exits"][0]
    assert exit0["router_mid"] and decay["final_adapter"]["adapter_in"]
    assert not exit0["router_mid_bias"] and not exit0["router_norm"]["scale"]
    # the multiplier reaches every router and adapter leaf, and nothing else
    assert all(jax.tree.leaves(scaled["final_adapter"]))
    assert all(v for k, v in jax.tree_util.tree_leaves_with_path(scaled0) if k[0].key != "norm")
    assert not scaled0["norm"]["scale"]
    rest = {k: v for k, v in scaled.items() if k not in ("exits", "final_adapter")}
    assert not any(jax.tree.leaves(rest))


@pytest.mark.parametrize("mult", [1.0, 3.0])
def test_exit_lr_mult_scales_the_exit_updates(small_cfg, mult):
    """First AdamW step by hand: the gradient clipped to global norm 1, then
    −lr·(ĝ/(|ĝ|+ε) + wd·p·decays) (m̂ = ĝ, v̂ = ĝ² at step 1), times `mult` on routers and adapters."""
    params = _paper_exit_params(small_cfg)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    cfg = TrainConfig(steps=10, lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=1.0,
                      exit_lr_mult=mult)
    optimizer = make_optimizer(cfg)
    state = optimizer.init(params)
    updates, _ = jax.jit(optimizer.update)(grads, state, params)
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    decays, scaled = decay_mask(params, False), exit_lr_mask(params)

    def by_hand(g, p, d, s):
        g = np.asarray(g, np.float64) * min(1.0, 1.0 / norm)
        u = -1e-2 * (g / (np.abs(g) + 1e-8) + 0.1 * np.asarray(p, np.float64) * d)
        return u * (mult if s else 1.0)

    expected = jax.tree.map(by_hand, grads, params, decays, scaled)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    # the state does not depend on the multiplier: a resume may change it
    plain = make_optimizer(dataclasses.replace(cfg, exit_lr_mult=1.0))
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(state)
