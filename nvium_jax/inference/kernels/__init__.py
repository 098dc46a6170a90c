"""Attention kernels for the deferred decode loop: a ragged block of queries per row
attending to a position-indexed KV cache (DESIGN §1, "Exact deferred decoding")."""

from __future__ import annotations

import jax

from nvium_jax.inference.kernels.pallas_attention import pallas_attention
from nvium_jax.inference.kernels.reference import reference_attention

IMPLS = ("auto", "pallas", "reference")


def block_attention(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, q_pos_BxT, *, impl: str = "auto"):
    """Block attention by `impl`: "pallas" (interpreted on CPU), "reference", or "auto" —
    the Pallas kernel on GPU, the reference elsewhere (the kernel lowers to Triton only)."""
    if impl not in IMPLS:
        raise ValueError(f"error: impl={impl!r} — choose one of {', '.join(IMPLS)}")
    backend = jax.default_backend()
    if impl == "reference" or (impl == "auto" and backend != "gpu"):
        return reference_attention(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, q_pos_BxT)
    return pallas_attention(
        q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, q_pos_BxT, interpret=backend == "cpu"
    )


__all__ = ["IMPLS", "block_attention", "pallas_attention", "reference_attention"]
