"""Cache attention kernels: the Pallas split-KV kernel (interpreted on CPU) against the
reference, and the reference against a float64 NumPy loop that reads like the definition."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvium_jax.inference.kernels import (
    cache_attention,
    pallas_cache_attention,
    reference_cache_attention,
)
from nvium_jax.inference.kernels.pallas_attention import default_num_splits

reference = jax.jit(reference_cache_attention)  # one compile per shape instead of one per op


def random_qkv(seed, B, T, H, G, E, S, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # NumPy: no compile per shape, the tests stay fast
    shapes = [(B, T, H, E), (B, G, S, E), (B, G, S, E)]
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)


def numpy_loop_cache_attention(q_BxTxHxE, k_BxGxSxE, v_BxGxSxE, cache_len_B):
    """Per row, query and head: softmax over the cache positions s < cache_len, in float64;
    a row that sees nothing gets out 0 and lse −inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxHxE, k_BxGxSxE, v_BxGxSxE))
    B, T, H, E = q.shape
    R = H // k.shape[1]
    out = np.zeros_like(q)
    lse = np.full((B, T, H), -np.inf)
    for b in range(B):
        n_visible = int(cache_len_B[b])
        if n_visible == 0:
            continue
        for t in range(T):
            for h in range(H):
                scores = k[b, h // R, :n_visible] @ q[b, t, h] / np.sqrt(E)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ v[b, h // R, :n_visible] / weights.sum()
                lse[b, t, h] = scores.max() + np.log(weights.sum())
    return out, lse


@pytest.mark.parametrize(
    "B,T,H,G,E,S,cache_len", [(2, 3, 4, 2, 16, 24, [0, 17]), (1, 4, 4, 1, 32, 12, [12])]
)
def test_reference_matches_numpy_loop(B, T, H, G, E, S, cache_len):
    q, k, v = random_qkv(7, B, T, H, G, E, S)
    cache_len_B = jnp.asarray(cache_len, jnp.int32)
    expected_out, expected_lse = numpy_loop_cache_attention(q, k, v, cache_len)
    out, lse = reference(q, k, v, cache_len_B)
    assert out.dtype == lse.dtype == jnp.float32
    np.testing.assert_allclose(out, expected_out, atol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, atol=1e-5)  # −inf where nothing is seen


# (B, T, H, G, E, S, block_k, num_splits, cache_len): every B, T, H/G and E of interest
# appears; S = 24, 40 and 100 are no multiple of the tile, so the cache is padded; the
# fourth case spreads a group's 64 query rows over 4 programs; the fifth has more splits
# than tiles (empty splits); the last takes every default and runs a single split.
CASES = [
    (1, 1, 4, 4, 16, 24, None, None, [24]),
    (3, 4, 4, 2, 32, 40, 16, 3, [0, 17, 40]),
    (3, 16, 4, 1, 16, 64, 16, 4, [64, 0, 33]),
    (1, 16, 8, 2, 32, 100, 32, 2, [77]),
    (3, 1, 2, 2, 16, 48, 16, 8, [5, 48, 0]),
    (3, 4, 4, 4, 16, 128, None, None, [100, 0, 128]),
]


@pytest.mark.parametrize("B,T,H,G,E,S,block_k,num_splits,cache_len", CASES)
def test_pallas_matches_reference(B, T, H, G, E, S, block_k, num_splits, cache_len):
    q, k, v = random_qkv(B * T + S, B, T, H, G, E, S)
    cache_len_B = jnp.asarray(cache_len, jnp.int32)
    expected_out, expected_lse = reference(q, k, v, cache_len_B)
    block_rows = 16 if T * H // G > 16 and B == 1 else None
    out, lse = pallas_cache_attention(
        q, k, v, cache_len_B,
        block_k=block_k, block_rows=block_rows, num_splits=num_splits, interpret=True,
    )
    assert out.shape == expected_out.shape and lse.shape == expected_lse.shape
    assert out.dtype == lse.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
    np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, expected_lse, atol=1e-5, rtol=0)


def test_kv_after_the_last_tile_is_never_read():
    # NaN in every KV tile after a row's last visible position would reach the output if
    # read; row 0 sees nothing, so its whole cache is NaN.
    B, T, H, G, E, S, block_k = 3, 4, 4, 2, 16, 64, 16
    q, k, v = random_qkv(2, B, T, H, G, E, S)
    cache_len_B = jnp.array([0, 21, 44], jnp.int32)
    first_unread_B = -(-cache_len_B // block_k) * block_k
    unread_Bx1xSx1 = (jnp.arange(S) >= first_unread_B[:, None])[:, None, :, None]
    k_nan, v_nan = (jnp.where(unread_Bx1xSx1, jnp.nan, x) for x in (k, v))
    out, lse = pallas_cache_attention(
        q, k_nan, v_nan, cache_len_B, block_k=block_k, num_splits=3, interpret=True
    )
    expected_out, expected_lse = reference(q, k, v, cache_len_B)
    np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, expected_lse, atol=1e-5, rtol=0)


def test_bf16_pallas_close_to_reference():
    q, k, v = random_qkv(5, 3, 4, 4, 2, 32, 64, dtype=jnp.bfloat16)
    cache_len_B = jnp.array([64, 9, 0], jnp.int32)
    out, lse = cache_attention(q, k, v, cache_len_B, impl="pallas")
    expected_out, expected_lse = reference(q, k, v, cache_len_B)
    assert out.dtype == lse.dtype == jnp.float32
    np.testing.assert_allclose(out, expected_out, atol=2e-2, rtol=0)
    np.testing.assert_allclose(lse, expected_lse, atol=2e-2, rtol=0)


def test_auto_on_cpu_is_the_reference_bit_for_bit():
    assert jax.default_backend() == "cpu"
    q, k, v = random_qkv(3, 3, 4, 4, 2, 16, 24)
    cache_len_B = jnp.array([24, 0, 7], jnp.int32)
    out, lse = jax.jit(functools.partial(cache_attention, impl="auto"))(q, k, v, cache_len_B)
    expected_out, expected_lse = reference(q, k, v, cache_len_B)
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_array_equal(lse, expected_lse)


def test_default_splits_fill_the_gpu_at_batch_1():
    assert default_num_splits(B=1, G=4, row_tiles=1, kv_tiles=64) == 33  # 132 programs
    assert default_num_splits(B=1, G=12, row_tiles=1, kv_tiles=8) == 8  # capped by tiles
    assert default_num_splits(B=64, G=8, row_tiles=1, kv_tiles=8) == 1


def test_bad_inputs_name_the_fix():
    q, k, v = random_qkv(0, 1, 2, 4, 3, 16, 24)
    cache_len_B = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="not a multiple of the 3 kv heads"):
        cache_attention(q, k, v, cache_len_B, impl="pallas")
    q, k, v = random_qkv(0, 1, 2, 4, 2, 16, 24)
    with pytest.raises(ValueError, match=r"k and v must both be \[B, G, S, E\]"):
        cache_attention(q, k, v[:, :, :12], cache_len_B, impl="pallas")
    with pytest.raises(ValueError, match=r"k and v must both be \[B, G, S, E\]"):
        cache_attention(q, k.transpose(0, 2, 1, 3), v, cache_len_B, impl="pallas")
    with pytest.raises(ValueError, match="decode.attention='triton'"):
        cache_attention(q, k, v, cache_len_B, impl="triton")
