"""Reference cache attention: each query of a row against that row's cached positions
below its fill pointer, as a normalised output and its log-sum-exp (DESIGN §1, "Exact
deferred decoding"). The decode loop merges it with the attention over the block's own
new keys (`inference.attention`), so a block never has to be written into the cache first.

The Pallas kernel (`pallas_attention.py`) is tested against this function; on CPU it is
also what `decode.attention=auto` runs.
"""

from __future__ import annotations

import jax.numpy as jnp


def reference_cache_attention(q_BxTxHxE, k_BxGxSxE, v_BxGxSxE, cache_len_B):
    """Query t of row b sees cache positions s < cache_len_B[b] (key s sits at position s).

    Returns (out_BxTxHxE, lse_BxTxH), both float32: the softmax-weighted values and
    log Σ_s exp(q·k_s / √E); where a row sees nothing, out is 0 and lse is −inf."""
    B, T, H, E = q_BxTxHxE.shape
    G, S = k_BxGxSxE.shape[1:3]
    q_BxGxRxTxE = q_BxTxHxE.reshape(B, T, G, H // G, E).transpose(0, 2, 3, 1, 4)
    # keys as the left operand, contracted on their minor axis: XLA CPU then reads the
    # cache as it lies (with the keys on the right it transposes the whole cache per call)
    scores_BxGxSxRxT = jnp.einsum(
        "bgse,bgrte->bgsrt", k_BxGxSxE.astype(q_BxTxHxE.dtype), q_BxGxRxTxE,
        preferred_element_type=jnp.float32,
    ) / jnp.sqrt(jnp.float32(E))
    scores_BxGxRxTxS = scores_BxGxSxRxT.transpose(0, 1, 3, 4, 2)
    visible_Bx1x1x1xS = (jnp.arange(S) < cache_len_B[:, None])[:, None, None, None]
    scores_BxGxRxTxS = jnp.where(visible_Bx1x1x1xS, scores_BxGxRxTxS, -jnp.inf)
    max_BxGxRxT = jnp.max(scores_BxGxRxTxS, axis=-1)
    finite_max = jnp.where(jnp.isfinite(max_BxGxRxT), max_BxGxRxT, 0.0)
    probs_BxGxRxTxS = jnp.exp(scores_BxGxRxTxS - finite_max[..., None])
    sum_BxGxRxT = jnp.sum(probs_BxGxRxTxS, axis=-1)
    out_BxGxRxTxE = jnp.einsum(
        "bgrts,bgse->bgrte", probs_BxGxRxTxS.astype(v_BxGxSxE.dtype), v_BxGxSxE,
        preferred_element_type=jnp.float32,
    ) / jnp.maximum(sum_BxGxRxT, jnp.finfo(jnp.float32).tiny)[..., None]
    lse_BxGxRxT = finite_max + jnp.log(sum_BxGxRxT)  # log 0 = −inf where nothing is seen
    out_BxTxHxE = out_BxGxRxTxE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)
    lse_BxTxH = lse_BxGxRxT.transpose(0, 3, 1, 2).reshape(B, T, H)
    return out_BxTxHxE, lse_BxTxH


__all__ = ["reference_cache_attention"]
