"""Learning-rate schedules by formula, and which parameters get weight decay."""

import math

import pytest
from flax import nnx

from nvium_jax.config import TrainConfig
from nvium_jax.model import build_model
from nvium_jax.train.optimizer import decay_mask, lr_schedule


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
