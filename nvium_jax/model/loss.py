"""The N-vium objective: mixture NLL in log space, expected-depth cost, router warm-up.

    loss = −mean_t log Σ_k π_k p_k(y_t) + β · mean_t Σ_k π_k d_k / L

During the router warm-up phase the depth term is replaced by Σ_k (q_k − 1/(K−k+1))²,
whose targets make π uniform. The K vocabulary projections run in sequence chunks so
K×B×T×V logits never exist at once, and each chunk's backward is computed in its forward
(a custom VJP): the head matmuls run once forward and twice for the gradients, never again.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nvium_jax.model.transformer import ExitStates, Nvium, logsumexp_exact


class LossMetrics(NamedTuple):
    loss: jax.Array  # what is minimised
    mixture_ce: jax.Array  # −mean log p(y), nats
    exit_ce_K: jax.Array  # −mean log p_k(y) of each exit alone, shallow → final
    exit_mass_K: jax.Array  # mean routing weight π_k of each exit (sums to 1)
    expected_depth: jax.Array  # mean Σ_k π_k d_k, in layers
    depth_cost: jax.Array  # β · expected_depth / L as added to the loss (0 in warm-up)
    router_loss: jax.Array  # the warm-up loss (added only during warm-up)


def _chunk_forward(z_KxBxCxD, route_logp_BxCxK, head_DxV, targets_BxC):
    """Logits of every exit for one chunk, and the per-token log-likelihood terms."""
    logits_KxBxCxV = jnp.einsum(
        "kbcd,dv->kbcv", z_KxBxCxD, head_DxV.astype(z_KxBxCxD.dtype),
        preferred_element_type=jnp.float32,
    )
    lse_KxBxC = jax.nn.logsumexp(logits_KxBxCxV, axis=-1)
    target_KxBxCx1 = jnp.broadcast_to(targets_BxC[None, ..., None], (*lse_KxBxC.shape, 1))
    target_logit_KxBxC = jnp.take_along_axis(logits_KxBxCxV, target_KxBxCx1, axis=-1)[..., 0]
    exit_logp_KxBxC = target_logit_KxBxC - lse_KxBxC
    joint_KxBxC = exit_logp_KxBxC + jnp.moveaxis(route_logp_BxCxK, -1, 0)
    return logits_KxBxCxV, lse_KxBxC, exit_logp_KxBxC, joint_KxBxC


def _split_chunks(x, axis: int, chunk: int):
    """[..., T, ...] → [T/chunk, ..., chunk, ...] (T already a multiple of chunk)."""
    shape = x.shape
    x = x.reshape(*shape[:axis], shape[axis] // chunk, chunk, *shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge_chunks(x, axis: int):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


def _pad_to_chunks(z, route, targets, chunk):
    T = targets.shape[1]
    pad = -T % chunk
    valid_BxT = jnp.ones(targets.shape, jnp.float32)
    if pad:
        z = jnp.pad(z, ((0, 0), (0, 0), (0, pad), (0, 0)))
        route = jnp.pad(route, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        valid_BxT = jnp.pad(valid_BxT, ((0, 0), (0, pad)))
    return (
        _split_chunks(z, 2, chunk),
        _split_chunks(route, 1, chunk),
        _split_chunks(targets, 1, chunk),
        _split_chunks(valid_BxT, 1, chunk),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def mixture_nll(exit_z_KxBxTxD, route_logp_BxTxK, head_DxV, targets_BxT, chunk: int):
    """(Σ_t −log Σ_k π_k p_k(y_t), Σ_t −log p_k(y_t) per exit). The second output is a
    metric: its cotangent is ignored."""
    chunks = _pad_to_chunks(exit_z_KxBxTxD, route_logp_BxTxK, targets_BxT, chunk)

    def body(totals, xs):
        z, route, targets, valid = xs
        _, _, exit_logp_KxBxC, joint_KxBxC = _chunk_forward(z, route, head_DxV, targets)
        nll = -jnp.sum(logsumexp_exact(joint_KxBxC, axis=0) * valid)
        exit_nll_K = -jnp.sum(exit_logp_KxBxC * valid, axis=(1, 2))
        return (totals[0] + nll, totals[1] + exit_nll_K), None

    K = exit_z_KxBxTxD.shape[0]
    init = (jnp.zeros((), jnp.float32), jnp.zeros((K,), jnp.float32))
    return jax.lax.scan(body, init, chunks)[0]


def _mixture_nll_fwd(exit_z_KxBxTxD, route_logp_BxTxK, head_DxV, targets_BxT, chunk):
    T = targets_BxT.shape[1]
    chunks = _pad_to_chunks(exit_z_KxBxTxD, route_logp_BxTxK, targets_BxT, chunk)
    V = head_DxV.shape[1]

    def body(carry, xs):
        nll_total, exit_total_K, dhead_DxV = carry
        z, route, targets, valid_BxC = xs
        logits, lse, exit_logp_KxBxC, joint_KxBxC = _chunk_forward(z, route, head_DxV, targets)
        mix_logp_BxC = logsumexp_exact(joint_KxBxC, axis=0)
        # d(−log Σ_k e^{a_k})/d a_k = −r_k, with r the posterior over exits
        resp_KxBxC = jnp.exp(joint_KxBxC - mix_logp_BxC) * valid_BxC
        probs_KxBxCxV = jnp.exp(logits - lse[..., None])
        onehot_BxCxV = jax.nn.one_hot(targets, V, dtype=jnp.float32)
        dlogits_KxBxCxV = (resp_KxBxC[..., None] * (probs_KxBxCxV - onehot_BxCxV)).astype(z.dtype)
        dz_KxBxCxD = jnp.einsum("kbcv,dv->kbcd", dlogits_KxBxCxV, head_DxV.astype(z.dtype))
        dhead_DxV = dhead_DxV + jnp.einsum(
            "kbcd,kbcv->dv", z, dlogits_KxBxCxV, preferred_element_type=jnp.float32
        )
        carry = (
            nll_total - jnp.sum(mix_logp_BxC * valid_BxC),
            exit_total_K - jnp.sum(exit_logp_KxBxC * valid_BxC, axis=(1, 2)),
            dhead_DxV,
        )
        return carry, (dz_KxBxCxD, jnp.moveaxis(-resp_KxBxC, 0, -1))

    K = exit_z_KxBxTxD.shape[0]
    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros((K,), jnp.float32),
        jnp.zeros(head_DxV.shape, jnp.float32),
    )
    (nll, exit_nll_K, dhead_DxV), (dz, droute) = jax.lax.scan(body, init, chunks)
    dz_KxBxTxD = _merge_chunks(dz, 2)[:, :, :T]
    droute_BxTxK = _merge_chunks(droute, 1)[:, :T]
    residuals = (dz_KxBxTxD, droute_BxTxK.astype(route_logp_BxTxK.dtype),
                 dhead_DxV.astype(head_DxV.dtype))
    return (nll, exit_nll_K), residuals


def _mixture_nll_bwd(chunk, residuals, cotangents):
    dz_KxBxTxD, droute_BxTxK, dhead_DxV = residuals
    g_nll = cotangents[0]
    return (
        (g_nll * dz_KxBxTxD).astype(dz_KxBxTxD.dtype),
        g_nll * droute_BxTxK,
        g_nll * dhead_DxV,
        None,
    )


mixture_nll.defvjp(_mixture_nll_fwd, _mixture_nll_bwd)


def router_warmup_loss(exit_q_BxTxK1: jax.Array) -> jax.Array:
    """mean_t Σ_k (q_k − 1/(K−k+1))² over early exits k = 1..K−1 (uniform-π targets)."""
    K = exit_q_BxTxK1.shape[-1] + 1
    targets_K1 = 1.0 / (K - jnp.arange(K - 1, dtype=jnp.float32))
    return jnp.mean(jnp.sum((exit_q_BxTxK1 - targets_K1) ** 2, axis=-1))


def loss_from_states(
    states: ExitStates,
    head_DxV: jax.Array,
    targets_BxT: jax.Array,
    exit_depths: tuple[int, ...],
    *,
    beta,
    router_warmup,
    chunk: int,
) -> LossMetrics:
    n_targets = targets_BxT.size
    nll, exit_nll_K = mixture_nll(
        states.exit_z_KxBxTxD, states.route_logp_BxTxK, head_DxV, targets_BxT, chunk
    )
    mixture_ce = nll / n_targets
    mass_K = jnp.mean(jnp.exp(states.route_logp_BxTxK), axis=(0, 1))
    depth_per_token = jnp.exp(states.route_logp_BxTxK) @ jnp.asarray(exit_depths, jnp.float32)
    expected_depth = jnp.mean(depth_per_token)
    if len(exit_depths) > 1:
        router_loss = router_warmup_loss(states.exit_q_BxTxK1)
        depth_cost = jnp.where(router_warmup, 0.0, beta * expected_depth / exit_depths[-1])
        extra = jnp.where(router_warmup, router_loss, depth_cost)
    else:  # the baseline has no routing to pay for
        router_loss = depth_cost = extra = jnp.zeros((), jnp.float32)
    return LossMetrics(
        loss=mixture_ce + extra,
        mixture_ce=mixture_ce,
        exit_ce_K=exit_nll_K / n_targets,
        exit_mass_K=mass_K,
        expected_depth=expected_depth,
        depth_cost=depth_cost,
        router_loss=router_loss,
    )


def nvium_loss(
    model: Nvium,
    tokens_BxT1: jax.Array,
    *,
    beta=0.15,
    router_warmup=False,
    chunk: int = 256,
    remat: str = "none",
) -> LossMetrics:
    """Next-token objective on windows of T+1 tokens. `beta` and `router_warmup` may be
    traced, so one compiled step serves both phases."""
    inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    states = model.exit_states(inputs_BxT, remat=remat)
    return loss_from_states(
        states, model.head[...], targets_BxT, model.config.exit_depths,
        beta=beta, router_warmup=router_warmup, chunk=chunk,
    )
