"""Layers against per-query NumPy loops: RoPE, GQA attention, the KV-cache path."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvium_jax.model.layers import Attention, LayerCache, RMSNorm, apply_rope, rope_angles
from tests.reference import naive_attention, rms_norm, rotate_pairs


def _weights(attn):
    return [np.asarray(getattr(attn, n).get_value(), np.float64) for n in ("wq", "wk", "wv", "wo")]


def test_rope_rotates_half_split_pairs():
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 9, 100, 101, 1023]])
    cos, sin = rope_angles(jnp.asarray(positions), 8, 10000.0)
    got = apply_rope(jnp.asarray(x), cos, sin)
    expected = np.stack([np.stack([rotate_pairs(x[b, t], positions[b, t], 10000.0)
                                   for t in range(5)]) for b in range(2)])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_rms_norm(small_cfg):
    norm = RMSNorm(small_cfg, jnp.float32)
    norm.scale[...] = jnp.linspace(0.5, 1.5, small_cfg.d_model)
    x = np.random.default_rng(1).normal(size=(2, 3, small_cfg.d_model))
    expected = rms_norm(x, np.linspace(0.5, 1.5, small_cfg.d_model), small_cfg.norm_eps)
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), expected, atol=1e-5)


def test_gqa_attention_equals_per_query_loop(small_cfg):
    attn = Attention(small_cfg, nnx.Rngs(0), jnp.float32)
    x = np.random.default_rng(2).normal(size=(2, 7, small_cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    out, cache = attn(jnp.asarray(x, jnp.float32), positions)
    assert cache is None
    expected = naive_attention(x, *_weights(attn), small_cfg.rope_theta)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_cached_block_equals_full_sequence(small_cfg):
    """Prefill a ragged prefix into the cache, then attend a block of later positions."""
    attn = Attention(small_cfg, nnx.Rngs(1), jnp.float32)
    B, T, S, G, E = 2, 9, 12, small_cfg.kv_heads, small_cfg.head_dim
    x = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, small_cfg.d_model)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    full, _ = attn(x, positions)
    empty = LayerCache(jnp.full((B, S, G, E), jnp.nan), jnp.full((B, S, G, E), jnp.nan))
    # row 0 prefills 5 positions, row 1 prefills 3 (its other slots are not written)
    prefix_len = np.array([5, 3])
    write = jnp.asarray(np.arange(5)[None] < prefix_len[:, None])
    _, cache = attn(x[:, :5], positions[:, :5], empty, write)
    assert np.isnan(np.asarray(cache.k_BxSxGxE)[1, 3:]).all()
    cache = jax.tree.map(lambda c: jnp.nan_to_num(c), cache)  # stale slots hold garbage
    # then a block: row 0 positions 5..8, row 1 positions 3..6
    block_pos = jnp.asarray(prefix_len[:, None] + np.arange(4)[None])
    block_x = jnp.take_along_axis(x, block_pos[..., None], axis=1)
    out, cache = attn(block_x, block_pos, cache)
    expected = jnp.take_along_axis(full, block_pos[..., None], axis=1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # the cache now holds every position fed in, equal to a direct K computation
    k_direct = jnp.einsum("btd,dge->btge", x, attn.wk[...])
    cos, sin = rope_angles(positions, E, small_cfg.rope_theta)
    k_direct = apply_rope(k_direct, cos, sin)
    np.testing.assert_allclose(cache.k_BxSxGxE[0, :9], k_direct[0], atol=1e-5)
    np.testing.assert_allclose(cache.k_BxSxGxE[1, :7], k_direct[1, :7], atol=1e-5)
