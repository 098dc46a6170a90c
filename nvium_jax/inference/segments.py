"""One segment's layers on the tokens a decode iteration computes, without writing the cache.

A run reads the KV cache (each row's positions below its block) and returns the K/V of the
tokens it computed; the loop writes them at the start of its next iteration, outside any
conditional and before any read (`state.write_pending`). A cache updated inside a
`lax.cond` branch is copied into and out of the conditional by XLA, and one written after
it was read in the same loop iteration is copied whole to keep the old values: a copy of
the cache per segment run either way (DESIGN §1 "What the loop costs besides bytes").

Two token layouts:
- rows: one block of T slots per row, `h_BxTxD` (prefill, dense, the first segment, and
  every deep segment at batch 1);
- packed (batch > 1, deep segments): the rows' ragged pending blocks as one list of N
  tokens, each with its row, slot in its block and position, so the weight matmuls run on
  exactly the tokens that exist; only the attention lays them out one block per row to
  read each token's own row of the cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nvium_jax.inference.kernels import cache_attention
from nvium_jax.inference.state import row_view


class Packed(NamedTuple):
    """N tokens: row, slot within the row's block, position; and whether each exists."""

    row_N: jax.Array
    slot_N: jax.Array
    pos_N: jax.Array
    valid_N: jax.Array


def pack_blocks(start_B, len_B, size: int) -> Packed:
    """Row b's block [start_b, start_b + len_b) takes packed slots off_b … off_b + len_b − 1
    (off = exclusive cumsum of len), found arithmetically (no search loop)."""
    off_B = jnp.cumsum(len_B) - len_B
    n_N = jnp.arange(size)
    B = len_B.shape[0]
    row_N = jnp.minimum(jnp.sum((off_B + len_B)[None, :] <= n_N[:, None], axis=1), B - 1)
    slot_N = n_N - off_B[row_N]
    valid_N = n_N < jnp.sum(len_B)
    pos_N = jnp.where(valid_N, start_B[row_N] + slot_N, 0)
    return Packed(row_N, slot_N, pos_N, valid_N)


def block_scores(q_BxTxHxE, k_BxTxGxE, v_BxTxGxE, seen_BxTxJ):
    """Attention of a block's queries over the block's own keys where `seen` (a slot
    always sees itself, so padding slots stay finite): (out, lse), float32."""
    B, T, H, E = q_BxTxHxE.shape
    G = k_BxTxGxE.shape[2]
    R = H // G
    q_BxTxGxRxE = q_BxTxHxE.reshape(B, T, G, R, E)
    scores_BxGxRxTxJ = jnp.einsum(
        "btgre,bjge->bgrtj", q_BxTxGxRxE, k_BxTxGxE, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(E))
    seen_BxTxJ |= jnp.eye(T, dtype=bool)
    scores_BxGxRxTxJ = jnp.where(seen_BxTxJ[:, None, None], scores_BxGxRxTxJ, -jnp.inf)
    max_BxGxRxT = jnp.max(scores_BxGxRxTxJ, axis=-1)
    probs_BxGxRxTxJ = jnp.exp(scores_BxGxRxTxJ - max_BxGxRxT[..., None])
    sum_BxGxRxT = jnp.sum(probs_BxGxRxTxJ, axis=-1)
    out_BxGxRxTxE = jnp.einsum(
        "bgrtj,bjge->bgrte", probs_BxGxRxTxJ.astype(v_BxTxGxE.dtype), v_BxTxGxE,
        preferred_element_type=jnp.float32,
    ) / sum_BxGxRxT[..., None]
    out_BxTxHxE = out_BxGxRxTxE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)
    lse_BxTxH = (max_BxGxRxT + jnp.log(sum_BxGxRxT)).transpose(0, 3, 1, 2).reshape(B, T, H)
    return out_BxTxHxE, lse_BxTxH


def merge_parts(out_a, lse_a, out_b, lse_b, dtype):
    """One softmax over two disjoint key sets, from each part's (out, lse)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    out = out_a * jnp.exp(lse_a - lse)[..., None] + out_b * jnp.exp(lse_b - lse)[..., None]
    return out.astype(dtype)


def attend_block_and_cache(q_BxTxHxE, k_BxTxGxE, v_BxTxGxE, pos_BxT, valid_BxT,
                           cache_k_BxGxSxE, cache_v_BxGxSxE, cache_len_B, impl: str):
    """Queries of a block see the cache below their row's block (`cache_len_B`) and the
    block's own valid keys at positions ≤ theirs; the two softmax parts are merged by their
    log-sum-exp, exactly as one softmax over both."""
    seen_BxTxJ = valid_BxT[:, None, :] & (pos_BxT[:, None, :] <= pos_BxT[:, :, None])
    out_b, lse_b = block_scores(q_BxTxHxE, k_BxTxGxE, v_BxTxGxE, seen_BxTxJ)
    out_c, lse_c = cache_attention(q_BxTxHxE, cache_k_BxGxSxE, cache_v_BxGxSxE, cache_len_B,
                                   impl=impl)
    return merge_parts(out_b, lse_b, out_c, lse_c, q_BxTxHxE.dtype)


def attend_packed_and_cache(q_NxHxE, k_NxGxE, v_NxGxE, packed: "Packed", len_B, width: int,
                            cache_k_BxGxSxE, cache_v_BxGxSxE, start_B, impl: str):
    """The packed tokens' attention: each token sees its own row's cache below the row's
    block and the tokens of its row at positions ≤ its own. The tokens are laid out one
    block of `width` slots per row (no row's block is longer), attended row by row, and
    gathered back: memory and work grow with B × width, never with B × N."""
    N = q_NxHxE.shape[0]
    off_B = jnp.cumsum(len_B) - len_B
    slots_W = jnp.arange(width)
    gather_BxW = jnp.minimum(off_B[:, None] + slots_W, N - 1)
    valid_BxW = slots_W < len_B[:, None]
    pos_BxW = start_B[:, None] + slots_W
    q, k, v = (x[gather_BxW] for x in (q_NxHxE, k_NxGxE, v_NxGxE))
    out_BxWxHxE = attend_block_and_cache(q, k, v, pos_BxW, valid_BxW, cache_k_BxGxSxE,
                                         cache_v_BxGxSxE, start_B, impl)
    return out_BxWxHxE[packed.row_N, jnp.minimum(packed.slot_N, width - 1)]


def run_rows(model, layers, s: int, k_layers, v_layers, h_BxTxD, pos_BxT, valid_BxT,
             cache_len_B, attention: str):
    """Segment s on one block of T slots per row; returns (h, (k_list, v_list)) with each
    layer's new K/V [B, T, G, E] (nothing written)."""
    start, stop = model.config.segments[s]
    pos_BxT = jnp.where(valid_BxT, pos_BxT, 0)

    B = h_BxTxD.shape[0]

    def attend(layer, q, k, v):
        return attend_block_and_cache(q, k, v, pos_BxT, valid_BxT, row_view(k_layers[layer], B),
                                      row_view(v_layers[layer], B), cache_len_B, attention)

    return model.run_layers(h_BxTxD, pos_BxT, start, stop, layer_states=layers,
                            attend_fn=attend, return_kv=True)


def run_packed(model, layers, s: int, k_layers, v_layers, h_NxD, packed: Packed, start_B,
               len_B, width: int, attention: str):
    """Segment s on N packed tokens of several rows (no row's block longer than `width`);
    returns (h_NxD, kv lists [N, G, E])."""
    start, stop = model.config.segments[s]
    B = start_B.shape[0]

    def attend(layer, q_1xNxHxE, k_1xNxGxE, v_1xNxGxE):
        return attend_packed_and_cache(
            q_1xNxHxE[0], k_1xNxGxE[0], v_1xNxGxE[0], packed, len_B, width,
            row_view(k_layers[layer], B), row_view(v_layers[layer], B), start_B, attention)[None]

    h_1xNxD, (k_list, v_list) = model.run_layers(
        h_NxD[None], packed.pos_N[None], start, stop, layer_states=layers, attend_fn=attend,
        return_kv=True,
    )
    return h_1xNxD[0], ([k[0] for k in k_list], [v[0] for v in v_list])
