"""Reference attention for a ragged block of queries over a position-indexed KV cache.

The one definition the Pallas kernel is tested against is the model's own cache attention
(`layers.cache_attend`: key `s` of the cache sits at position `s`, a query at position p
sees the keys at positions ≤ p, GQA); the decode loop's default on CPU.
"""

from nvium_jax.model.layers import cache_attend as reference_attention

__all__ = ["reference_attention"]
