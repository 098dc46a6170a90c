"""Layers against per-query NumPy loops: RoPE, GQA attention, and a block attending to a
KV cache (the decode path) against the full sequence."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvium_jax.inference.segments import attend_block_and_cache
from nvium_jax.model.layers import Attention, RMSNorm, apply_rope, rope_angles
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
    out, (k, v) = attn(jnp.asarray(x, jnp.float32), positions)
    assert k.shape == v.shape == (2, 7, small_cfg.kv_heads, small_cfg.head_dim)
    expected = naive_attention(x, *_weights(attn), small_cfg.rope_theta)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_cached_block_equals_full_sequence(small_cfg):
    """A ragged prefix in the cache ([B, G, S, E], garbage past each row's prefix), then a
    block of later positions attending to it and to itself equals the full sequence."""
    attn = Attention(small_cfg, nnx.Rngs(1), jnp.float32)
    B, T, S, G, E = 2, 9, 12, small_cfg.kv_heads, small_cfg.head_dim
    x = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, small_cfg.d_model)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    full, (k_full, v_full) = attn(x, positions)
    prefix_len = np.array([5, 3])  # row 0 holds 5 cached positions, row 1 holds 3
    garbage = np.random.default_rng(4).normal(size=(B, G, S, E)) * 1e3
    cache_k, cache_v = (np.array(garbage, np.float32) for _ in range(2))
    for b, n in enumerate(prefix_len):
        cache_k[b, :, :n] = np.asarray(k_full[b, :n]).transpose(1, 0, 2)
        cache_v[b, :, :n] = np.asarray(v_full[b, :n]).transpose(1, 0, 2)
    # the block: row 0 positions 5..8, row 1 positions 3..6, the last slot of row 1 padding
    block_pos = jnp.asarray(prefix_len[:, None] + np.arange(4)[None])
    valid = jnp.asarray([[True] * 4, [True, True, True, False]])
    block_x = jnp.take_along_axis(x, block_pos[..., None], axis=1)

    def attend(q, k, v):
        return attend_block_and_cache(q, k, v, block_pos, valid, jnp.asarray(cache_k),
                                      jnp.asarray(cache_v), jnp.asarray(prefix_len), "reference")

    out, (k_block, _) = attn(block_x, block_pos, attend)
    expected = jnp.take_along_axis(full, block_pos[..., None], axis=1)
    np.testing.assert_allclose(out[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(out[1, :3], expected[1, :3], atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # the padding slot too
    # the block's new keys are those of the full pass at the same positions
    np.testing.assert_allclose(k_block, jnp.take_along_axis(k_full, block_pos[..., None, None], axis=1),
                               atol=1e-5)
