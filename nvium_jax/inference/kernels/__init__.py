"""Cache attention for the decode loop: the queries of a block against each row's KV cache
below its fill pointer (DESIGN §1, "Exact deferred decoding"), as (out, lse) so that the
loop can merge it with the attention over the block's own keys."""

from __future__ import annotations

import jax

from nvium_jax.config import InputError
from nvium_jax.inference.kernels.pallas_attention import pallas_cache_attention
from nvium_jax.inference.kernels.reference import reference_cache_attention

IMPLS = ("auto", "pallas", "reference")


def cache_attention(q_BxTxHxE, k_BxGxSxE, v_BxGxSxE, cache_len_B, *, impl: str = "auto"):
    """Cache attention by `impl`: "pallas" (interpreted on CPU), "reference", or "auto" —
    the reference everywhere until the kernel has been compiled and timed on a GPU (the GPU
    issue measures it; `decode.attention=pallas` selects it meanwhile)."""
    if impl not in IMPLS:
        raise InputError(f"decode.attention={impl!r}: choose one of {', '.join(IMPLS)}")
    if impl in ("auto", "reference"):
        return reference_cache_attention(q_BxTxHxE, k_BxGxSxE, v_BxGxSxE, cache_len_B)
    interpret = jax.default_backend() == "cpu"
    return pallas_cache_attention(q_BxTxHxE, k_BxGxSxE, v_BxGxSxE, cache_len_B, interpret=interpret)


__all__ = ["IMPLS", "cache_attention", "pallas_cache_attention", "reference_cache_attention"]
