"""`nvium bench train`: N-vium and its matched baseline, step time, tokens/s and MFU, side by
side in one process on the same devices (random tokens: the model, not the data, is timed)."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from nvium_jax.config import Config
from nvium_jax.model.count import matched_baseline_model
from nvium_jax.train.mesh import make_mesh
from nvium_jax.train.metrics import mfu
from nvium_jax.train.step import make_trainer, step_batch_shape


def matched_baseline(config: Config) -> Config:
    return dataclasses.replace(config, model=matched_baseline_model(config.model))


def time_steps(config: Config, steps: int, warmup: int = 2, block: int = 5) -> list[float]:
    """Seconds per train step over blocks of `block` back-to-back steps (dispatch pipelined
    as in training, one host sync per block), after `warmup` compile steps."""
    mesh = make_mesh(config.mesh)
    trainer = make_trainer(config, mesh)
    state = trainer.init_fn()
    tokens = np.random.default_rng(config.train.seed).integers(
        0, config.model.vocab_size, step_batch_shape(config), np.int32)
    batch = jax.device_put(tokens, trainer.batch_sharding)
    for _ in range(warmup):
        state, metrics = trainer.step_fn(state, batch)
        jax.block_until_ready(metrics["loss"])
    times = []
    for start in range(0, steps, block):
        n = min(block, steps - start)
        started = time.perf_counter()
        for _ in range(n):
            state, metrics = trainer.step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - started) / n)
    return times


def bench_train(config: Config, steps: int = 10, name: str = "") -> dict:
    baseline = matched_baseline(config)
    tokens = config.train.batch_size * config.model.context
    out = {"device": f"{jax.device_count()}× {jax.devices()[0].device_kind}",
           "config": name or config.run.dir, "baseline_config": f"model.exits=[] model.d_ff={baseline.model.d_ff}"}
    for name, cfg in (("nvium", config), ("baseline", baseline)):
        step_s = statistics.median(time_steps(cfg, steps))
        out[f"{name}_step_s"] = step_s
        out[f"{name}_tokens_per_s"] = tokens / step_s
        out[f"{name}_mfu"] = mfu(tokens / step_s, cfg.model, cfg.model.context)
    out["step_ratio"] = out["nvium_step_s"] / out["baseline_step_s"]
    return out
