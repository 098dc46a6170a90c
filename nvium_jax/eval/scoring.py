"""Per-token scores of target tokens under every exit and under the exact mixture — what
`nvium eval` aggregates and what the lm-eval adapter sums. One jitted forward per batch;
the head runs over chunks of positions so no [K, B, T, V] tensor is ever materialised.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvium_jax.model import mixture_logprobs
from nvium_jax.model.transformer import check_token_ids

LOGIT_BUDGET = 1 << 25  # float32 values of [K, B, chunk, V] log-probs held at once


class TokenScores(NamedTuple):
    """Scores of each position's target (numpy, on the host)."""

    exit_logp_KxBxT: np.ndarray  # log p_k(target) of each exit, shallow → final
    mixture_logp_BxT: np.ndarray  # log Σ_k π_k p_k(target)
    exit_argmax_KxBxT: np.ndarray  # each exit's most likely token
    mixture_argmax_BxT: np.ndarray  # the mixture's most likely token
    route_BxTxK: np.ndarray  # routing weights π_k (they sum to 1 over K)


def position_chunk(n_exits: int, batch: int, length: int, vocab: int) -> int:
    """Positions whose log-probs fit LOGIT_BUDGET: a power of two, at most `length`."""
    chunk = max(LOGIT_BUDGET // max(n_exits * batch * vocab, 1), 1)
    chunk = 1 << (chunk.bit_length() - 1)
    return min(chunk, 1 << max(length - 1, 0).bit_length())


def _score_chunk(model, exit_z_KxBxCxD, route_logp_BxCxK, targets_BxC):
    exit_logp_KxBxCxV = jnp.stack(
        [jax.nn.log_softmax(model.logits(z_BxCxD), axis=-1) for z_BxCxD in exit_z_KxBxCxD]
    )
    mixture_BxCxV = mixture_logprobs(exit_logp_KxBxCxV, route_logp_BxCxK)
    pick = targets_BxC[None, ..., None]
    return (
        jnp.take_along_axis(exit_logp_KxBxCxV, pick, axis=-1)[..., 0],
        jnp.take_along_axis(mixture_BxCxV, targets_BxC[..., None], axis=-1)[..., 0],
        jnp.argmax(exit_logp_KxBxCxV, axis=-1).astype(jnp.int32),
        jnp.argmax(mixture_BxCxV, axis=-1).astype(jnp.int32),
    )


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score(graphdef, state, inputs_BxT, targets_BxT, chunk: int):
    model = nnx.merge(graphdef, state)
    states = model.exit_states(inputs_BxT)
    B, T = inputs_BxT.shape
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T

    def chunks(x, axis):  # [..., T, ...] → [n_chunks, ..., chunk, ...] along `axis`
        x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
        x = x.reshape(*x.shape[:axis], n_chunks, chunk, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    exit_logp, mixture_logp, exit_argmax, mixture_argmax = jax.lax.map(
        lambda xs: _score_chunk(model, *xs),
        (chunks(states.exit_z_KxBxTxD, 2), chunks(states.route_logp_BxTxK, 1),
         chunks(targets_BxT, 1)),
    )

    def unchunk(x, axis):  # the inverse of `chunks`, padding dropped
        x = jnp.moveaxis(x, 0, axis)
        x = x.reshape(*x.shape[:axis], n_chunks * chunk, *x.shape[axis + 2:])
        return jax.lax.slice_in_dim(x, 0, T, axis=axis)

    return TokenScores(unchunk(exit_logp, 2), unchunk(mixture_logp, 1), unchunk(exit_argmax, 2),
                       unchunk(mixture_argmax, 1), jnp.exp(states.route_logp_BxTxK))


def score_tokens(model, inputs_BxT, targets_BxT) -> TokenScores:
    """Every exit's and the mixture's log-prob and argmax at each position, and the routing.

    `targets_BxT[b, t]` is the token that follows `inputs_BxT[b, :t+1]` (any id, e.g. a
    padding one, where the caller ignores the score).
    """
    inputs_BxT, targets_BxT = np.asarray(inputs_BxT), np.asarray(targets_BxT)
    vocab = model.config.vocab_size
    check_token_ids(inputs_BxT, vocab, "inputs")
    check_token_ids(targets_BxT, vocab, "targets")
    graphdef, state = nnx.split(model)
    B, T = inputs_BxT.shape
    chunk = position_chunk(model.config.n_exits, B, T, vocab)
    scores = _score(graphdef, state, jnp.asarray(inputs_BxT, jnp.int32),
                    jnp.asarray(targets_BxT, jnp.int32), chunk)
    return TokenScores(*(np.asarray(x) for x in jax.device_get(scores)))
