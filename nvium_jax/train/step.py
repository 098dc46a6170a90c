"""The train state, the sharded train step (with gradient accumulation) and the eval step.

State is plain pytrees — params as `nnx.to_pure_dict`, optax state, step, β — so orbax
saves it as is and a different mesh restores it with new shardings.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nvium_jax.config import Config
from nvium_jax.model import build_model
from nvium_jax.model.loss import LossMetrics, nvium_loss
from nvium_jax.train.mesh import batch_sharding, param_shardings, replicated
from nvium_jax.train.optimizer import lr_schedule, make_optimizer

class TrainState(NamedTuple):
    step: jax.Array  # optimizer steps done
    params: dict
    opt_state: optax.OptState
    beta: jax.Array  # weight of the depth cost (set at evaluations by train/beta.py's controller)
    skipped: jax.Array  # steps skipped for a non-finite loss (train.on_nonfinite=skip)


class Trainer(NamedTuple):
    """Everything static about a run's computation: built once from the config and mesh."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    batch_sharding: NamedSharding
    step_fn: callable  # (state, batch_AxBxT1) -> (state, metrics)
    eval_fn: callable  # (params, beta, batch_BxT1) -> LossMetrics
    init_fn: callable  # () -> state, initialised directly in its shardings


def _path_names(path) -> tuple:
    return tuple(
        getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path
    )


def opt_state_shardings(abstract_opt_state, params_shardings: dict, mesh: Mesh):
    """Optimizer leaves that mirror a parameter (Adam's moments) take its sharding."""
    by_path = {
        _path_names(path): s
        for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    }

    def pick(path, leaf):
        names = _path_names(path)
        for start in range(len(names)):
            if names[start:] in by_path:
                return by_path[names[start:]]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def make_trainer(config: Config, mesh: Mesh) -> Trainer:
    abstract_model = nnx.eval_shape(lambda: build_model(config.model, config.train.seed))
    graphdef, abstract_state = nnx.split(abstract_model)
    optimizer = make_optimizer(config.train)
    p_shardings = param_shardings(abstract_state, mesh)
    abstract_params = nnx.to_pure_dict(abstract_state)
    o_shardings = opt_state_shardings(
        jax.eval_shape(optimizer.init, abstract_params), p_shardings, mesh
    )
    scalar = replicated(mesh)
    shardings = TrainState(scalar, p_shardings, o_shardings, scalar, scalar)
    b_sharding = batch_sharding(mesh, leading=1)

    def init():
        params = nnx.to_pure_dict(nnx.state(build_model(config.model, config.train.seed)))
        return TrainState(
            jnp.zeros((), jnp.int32), params, optimizer.init(params),
            jnp.asarray(config.train.beta, jnp.float32), jnp.zeros((), jnp.int32),
        )

    step = functools.partial(_train_step, graphdef=graphdef, optimizer=optimizer, config=config)
    eval_step = functools.partial(_eval_step, graphdef=graphdef, config=config)
    return Trainer(
        graphdef=graphdef,
        optimizer=optimizer,
        state_shardings=shardings,
        batch_sharding=b_sharding,
        step_fn=jax.jit(
            step, in_shardings=(shardings, b_sharding), out_shardings=(shardings, scalar),
            donate_argnums=0,
        ),
        eval_fn=jax.jit(
            eval_step, in_shardings=(p_shardings, scalar, batch_sharding(mesh)), out_shardings=scalar
        ),
        init_fn=jax.jit(init, out_shardings=shardings),
    )


def step_batch_shape(config: Config) -> tuple[int, int, int]:
    """The global token batch one train step takes: [A micro-batches, B/A, T+1]."""
    t = config.train
    return (t.grad_accum, t.batch_size // t.grad_accum, config.model.context + 1)


def micro_batches(local_BxT1: np.ndarray, grad_accum: int) -> np.ndarray:
    """[B_local, T+1] → [A, B_local/A, T+1]: micro-batch a holds rows r ≡ a (mod A), so each
    process's rows stay contiguous inside every micro-batch."""
    b, t = local_BxT1.shape
    return local_BxT1.reshape(b // grad_accum, grad_accum, t).transpose(1, 0, 2)


def abstract_state(trainer: Trainer) -> TrainState:
    """The train state's shapes and dtypes, each leaf carrying its sharding; nothing allocated."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(trainer.init_fn), trainer.state_shardings,
    )


def router_warmup_steps(config: Config) -> int:
    return int(config.train.router_warmup_frac * config.train.steps)


def _loss(params, tokens_BxT1, *, graphdef, config: Config, beta, router_warmup, remat):
    model = nnx.merge(graphdef, params)
    metrics = nvium_loss(
        model, tokens_BxT1, beta=beta, router_warmup=router_warmup,
        chunk=config.train.loss_chunk, remat=remat,
    )
    return metrics.loss, metrics


def _train_step(state: TrainState, batch_AxBxT1, *, graphdef, optimizer, config: Config):
    """One optimizer step over A micro-batches (gradient accumulation)."""
    train = config.train
    in_warmup = state.step < router_warmup_steps(config)
    grad_fn = jax.value_and_grad(
        functools.partial(_loss, graphdef=graphdef, config=config, beta=state.beta,
                          router_warmup=in_warmup, remat=train.remat),
        has_aux=True,
    )

    def micro_step(grads_sum, micro_BxT1):
        (_, metrics), grads = grad_fn(state.params, micro_BxT1)
        return jax.tree.map(jnp.add, grads_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads_sum, micro_metrics = jax.lax.scan(micro_step, zeros, batch_AxBxT1)
    n_micro = batch_AxBxT1.shape[0]
    grads = jax.tree.map(lambda g: g / n_micro, grads_sum)
    metrics: LossMetrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), micro_metrics)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
    finite = jnp.isfinite(metrics.loss) & jnp.isfinite(grad_sq)  # a NaN may hide in the gradients only
    if train.on_nonfinite == "skip":  # a non-finite step changes nothing but the counter
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    new_state = TrainState(
        state.step + 1, params, opt_state, state.beta, state.skipped + (~finite).astype(jnp.int32)
    )
    out = dict(metrics._asdict())
    out.update(
        grad_norm=jnp.sqrt(grad_sq),
        lr=lr_schedule(train)(state.step),
        beta=state.beta,
        finite=finite,
        router_warmup=in_warmup,
        skipped=new_state.skipped,
    )
    return new_state, out


def _eval_step(params, beta, tokens_BxT1, *, graphdef, config: Config) -> LossMetrics:
    """Held-out metrics with the depth cost at the β training uses now (the adapted one
    under the β controller), without the router warm-up loss."""
    model = nnx.merge(graphdef, params)
    return nvium_loss(model, tokens_BxT1, beta=beta, chunk=config.train.loss_chunk)
