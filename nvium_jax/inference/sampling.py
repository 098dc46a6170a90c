"""The random stream and the draws of decoding (DESIGN §1 "Random stream", "Sampling modes").

The n-th new token of batch row b uses `key = fold_in(fold_in(PRNGKey(seed), b), n)` split
into K keys: `u_k = uniform(keys[k−1])` decides the gate of early exit k, and the token is
drawn with `keys[K−1]` from the chosen exit — through the head transform (temperature,
top-k, top-p) under per-exit sampling — or, for the mixture's non-exact samplers (dense
only), from the transformed full mixture.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from nvium_jax.model.transformer import mixture_logprobs, route_logp_from_gates


class HeadTransform(NamedTuple):
    """What a draw does to its distribution: temperature (0 = argmax), then top-k, then
    top-p. The identity (1, None, None) is the plain categorical draw."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    @property
    def identity(self) -> bool:
        return self.temperature == 1.0 and self.top_k is None and self.top_p is None


IDENTITY = HeadTransform()


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


def gate_fires(gate_logp_Bx2: jax.Array, keys_BxKx2: jax.Array, k: int,
               router_temperature: float) -> jax.Array:
    """Whether gate k exits, from its [log q, log(1 − q)]: u_k < sigmoid(ℓ/τ_r) with ℓ the
    exit-minus-continue logit. τ_r = 1 compares with q itself (the exact mixture's gate, to
    the bit); τ_r = 0 exits iff ℓ > 0 and draws nothing (u_k's key simply goes unused)."""
    log_q_B, log_continue_B = gate_logp_Bx2[:, 0], gate_logp_Bx2[:, 1]
    if router_temperature == 0.0:
        return log_q_B > log_continue_B
    if router_temperature == 1.0:
        q_B = jnp.exp(log_q_B)
    else:
        q_B = jax.nn.sigmoid((log_q_B - log_continue_B) / router_temperature)
    return gate_uniform(keys_BxKx2, k) < q_B


def kth_largest(x_BxV: jax.Array, k: int) -> jax.Array:
    """Each row's k-th largest value (counting repeats: `lax.top_k(x, k)[0][:, -1]`), [B, 1],
    found by bisection over the float32 order as unsigned integers: 32 counts of `x ≥ mid`,
    each one pass over the row. On a CPU this is many times faster than `lax.top_k` over a
    32000-token vocabulary (a sort), which cost a top-k decode ≈ 7 ms per token at 125m."""
    bits_BxV = jax.lax.bitcast_convert_type(x_BxV.astype(jnp.float32), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    order_BxV = jnp.where(bits_BxV >= sign, ~bits_BxV, bits_BxV | sign)  # ascending as floats
    B = x_BxV.shape[0]

    def halve(_, bounds):  # the answer lies in [low, high]: count(order ≥ low) ≥ k always
        low_B, high_B = bounds
        gap_B = high_B - low_B
        mid_B = low_B + (gap_B >> 1) + (gap_B & 1)  # the upper middle: low < mid ≤ high
        enough_B = jnp.sum(order_BxV >= mid_B[:, None], axis=-1) >= k
        return jnp.where(enough_B, mid_B, low_B), jnp.where(enough_B, high_B, mid_B - 1)

    bounds = (jnp.zeros((B,), jnp.uint32), jnp.full((B,), 0xFFFFFFFF, jnp.uint32))
    kth_B, _ = jax.lax.fori_loop(0, 32, halve, bounds)
    bits_B = jnp.where(kth_B >= sign, kth_B ^ sign, ~kth_B)
    return jax.lax.bitcast_convert_type(bits_B, jnp.float32)[:, None].astype(x_BxV.dtype)


def truncate_logits(logits_BxV, top_k: Optional[int], top_p: Optional[float]):
    """Top-k, then top-p (the smallest set of the likeliest tokens whose mass reaches p):
    every other token gets −inf (ties at the cut are kept)."""
    if top_k is not None:
        kth_Bx1 = kth_largest(logits_BxV, min(top_k, logits_BxV.shape[-1]))
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p is not None:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_Bx1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1,
                             keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def draw_transformed(logp_BxV: jax.Array, key_Bx2: jax.Array, transform: HeadTransform):
    """One token per row from H(p): argmax at temperature 0, else a categorical draw of the
    tempered, truncated log-probs (the identity draws from `logp` itself)."""
    if transform.temperature == 0.0:
        return jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logp_BxV if transform.temperature == 1.0 else logp_BxV / transform.temperature
    logits_BxV = truncate_logits(logits_BxV, transform.top_k, transform.top_p)
    return jax.vmap(jax.random.categorical)(key_Bx2, logits_BxV).astype(jnp.int32)


def draw_from_head(model, z_BxD, keys_BxKx2, transform: HeadTransform = IDENTITY):
    """The token from the chosen exits' head inputs: one head matmul, key K−1."""
    logp_BxV = jax.nn.log_softmax(model.logits(z_BxD[:, None])[:, 0], axis=-1)
    return draw_transformed(logp_BxV, keys_BxKx2[:, -1], transform)


def draw_from_mixture(model, z_KxBxD, gate_BxK1x2, keys_BxKx2, transform: HeadTransform):
    """Greedy / temperature / top-k / top-p on the full mixture (every head), key K−1."""
    logp_KxBxV = jnp.stack(  # one head matmul per exit, as the dense forward does
        [jax.nn.log_softmax(model.logits(z[:, None])[:, 0], axis=-1) for z in z_KxBxD]
    )
    if gate_BxK1x2.shape[1]:
        route_logp_BxK = route_logp_from_gates(gate_BxK1x2)
    else:  # the baseline: one exit, weight 1
        route_logp_BxK = jnp.zeros((z_KxBxD.shape[1], 1), jnp.float32)
    logp_BxV = mixture_logprobs(logp_KxBxV[:, :, None], route_logp_BxK[:, None])[:, 0]
    return draw_transformed(logp_BxV, keys_BxKx2[:, -1], transform)
