"""The random stream and the draws of decoding (DESIGN §1 "Random stream").

The n-th new token of batch row b uses `key = fold_in(fold_in(PRNGKey(seed), b), n)` split
into K keys: `u_k = uniform(keys[k−1])` decides the gate of early exit k, and the token is
`categorical(keys[K−1], logp)` of the chosen exit — or, for the non-exact samplers (dense
only), of the transformed full mixture.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from nvium_jax.model.transformer import mixture_logprobs, route_logp_from_gates


def row_keys(seed: int, batch: int) -> jax.Array:
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch))


def token_keys(row_key_Bx2: jax.Array, n_B: jax.Array, n_exits: int) -> jax.Array:
    """keys[b, k] = split(fold_in(row_key_b, n_b), K)[k], [B, K, 2]."""
    return jax.vmap(lambda key, n: jax.random.split(jax.random.fold_in(key, n), n_exits))(
        row_key_Bx2, n_B
    )


def gate_uniform(keys_BxKx2: jax.Array, k: int) -> jax.Array:
    return jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys_BxKx2[:, k])


def draw_from_head(model, z_BxD, keys_BxKx2):
    """The token from the chosen exits' head inputs: one head matmul, key K−1."""
    logp_BxV = jax.nn.log_softmax(model.logits(z_BxD[:, None])[:, 0], axis=-1)
    return jax.vmap(jax.random.categorical)(keys_BxKx2[:, -1], logp_BxV).astype(jnp.int32)


def truncate_logits(logits_BxV, top_k: Optional[int], top_p: Optional[float]):
    """Top-k, then top-p (the smallest set of the likeliest tokens whose mass reaches p):
    every other token gets −inf."""
    if top_k is not None:
        kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p is not None:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_Bx1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1,
                             keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def draw_from_mixture(model, z_KxBxD, gate_BxK1x2, keys_BxKx2, temperature, top_k, top_p):
    """Greedy / temperature / top-k / top-p on the full mixture (every head)."""
    logp_KxBxV = jnp.stack(
        [jax.nn.log_softmax(model.logits(z[:, None])[:, 0], axis=-1) for z in z_KxBxD]
    )
    if gate_BxK1x2.shape[1]:
        route_logp_BxK = route_logp_from_gates(gate_BxK1x2)
    else:
        route_logp_BxK = jnp.zeros((z_KxBxD.shape[1], 1), jnp.float32)
    logp_BxV = mixture_logprobs(logp_KxBxV[:, :, None], route_logp_BxK[:, None])[:, 0]
    if temperature == 0.0:
        return jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = truncate_logits(logp_BxV / temperature, top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys_BxKx2[:, -1], logits_BxV).astype(jnp.int32)
