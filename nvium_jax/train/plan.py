"""`nvium plan`: lower and compile the train step ahead of time for a mesh — nothing is
allocated — and report parameters, optimizer bytes, per-device memory and the KV cache."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from nvium_jax.config import Config
from nvium_jax.model.count import kv_values_per_token, param_count
from nvium_jax.train.mesh import make_mesh
from nvium_jax.train.step import abstract_state, make_trainer, step_batch_shape


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def decode_cache_bytes(config: Config, batch: int) -> int:
    """K and V of every layer for `batch` sequences of full context (bf16 unless float32)."""
    m = config.model
    itemsize = 4 if m.dtype == "float32" else 2
    return m.n_layers * batch * m.context * kv_values_per_token(m) * itemsize


def plan(config: Config, devices, decode_batch: int = 1) -> dict:
    """`model.dtype=auto` is planned as bfloat16: the plan is for accelerator meshes."""
    if config.model.dtype == "auto":
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="bfloat16"))
    mesh = make_mesh(config.mesh, devices)
    trainer = make_trainer(config, mesh)
    abstract = abstract_state(trainer)
    t = config.train
    batch = jax.ShapeDtypeStruct(step_batch_shape(config), jnp.int32, sharding=trainer.batch_sharding)
    started = time.time()
    compiled = trainer.step_fn.lower(abstract, batch).compile()
    compile_s = time.time() - started
    memory = compiled.memory_analysis()
    per_device = None
    if memory is not None:
        per_device = int(
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes
        )
    platform = devices[0].platform
    return {
        "params": param_count(config.model),
        "param_bytes": _nbytes(abstract.params),
        "optimizer_bytes": _nbytes(abstract.opt_state),
        "per_device_bytes": per_device,
        "per_device_bytes_source": (
            "XLA CPU compiler estimate (simulated devices)" if platform == "cpu"
            else f"compiled memory analysis on {devices[0].device_kind}"
        ),
        "decode_cache_bytes": decode_cache_bytes(config, decode_batch),
        "decode_batch": decode_batch,
        "compute_dtype": config.model.dtype,
        "mesh": dict(mesh.shape),
        "devices": len(devices),
        "platform": platform,
        "global_batch": t.batch_size,
        "grad_accum": t.grad_accum,
        "compile_s": round(compile_s, 1),
    }
