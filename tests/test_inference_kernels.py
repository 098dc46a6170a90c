"""Block attention kernels: the Pallas kernel (interpreted on CPU) against the reference,
and the reference against a float64 NumPy loop that reads like the definition."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvium_jax.inference.kernels import block_attention, pallas_attention, reference_attention

reference = jax.jit(reference_attention)  # one compile per shape instead of one per op


def random_qkv(seed, B, T, H, G, E, S, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # NumPy: no compile per shape, the tests stay fast
    shapes = [(B, T, H, E), (B, S, G, E), (B, S, G, E)]
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)


def ragged_positions(seed, B, T, S):
    """Row b holds positions start_b .. start_b + T − 1; the first row starts at 0 and the
    last (when B > 1) ends at S − 1, the others start at random."""
    starts_B = np.random.default_rng(seed).integers(0, S - T + 1, size=B)
    starts_B[0] = 0
    if B > 1:
        starts_B[-1] = S - T
    return jnp.asarray(starts_B[:, None] + np.arange(T), jnp.int32)


def numpy_loop_attention(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, q_pos_BxT):
    """Per query and head: softmax over the keys at positions ≤ the query's, in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxHxE, k_BxSxGxE, v_BxSxGxE))
    B, T, H, E = q.shape
    R = H // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            n_visible = int(q_pos_BxT[b, t]) + 1
            for h in range(H):
                scores = k[b, :n_visible, h // R] @ q[b, t, h] / np.sqrt(E)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ v[b, :n_visible, h // R] / weights.sum()
    return out


# (B, T, H, G, E, S, block_k, block_rows): every B, T, H/G, E and S of interest appears;
# S = 24 and 200 are no multiple of 32, so the cache is padded to 16-position tiles; the
# last case splits a group's 64 query rows over 4 programs, each with its own KV extent.
CASES = [
    (1, 1, 4, 4, 16, 24, None, None),
    (3, 4, 4, 2, 32, 24, None, None),
    (3, 16, 4, 1, 16, 64, None, None),
    (3, 4, 4, 4, 32, 64, 16, None),
    (1, 16, 4, 2, 32, 200, None, None),
    (3, 1, 4, 1, 16, 200, None, None),
    (3, 16, 4, 1, 16, 200, 32, 16),
]


@pytest.mark.parametrize("B,T,H,G,E,S,block_k,block_rows", CASES)
def test_pallas_matches_reference(B, T, H, G, E, S, block_k, block_rows):
    q, k, v = random_qkv(B * T + S, B, T, H, G, E, S)
    q_pos_BxT = ragged_positions(S + T, B, T, S)
    expected = reference(q, k, v, q_pos_BxT)
    got = pallas_attention(
        q, k, v, q_pos_BxT, block_k=block_k, block_rows=block_rows, interpret=True
    )
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("B,T,H,G,E,S", [(2, 3, 4, 2, 16, 24), (1, 4, 4, 1, 32, 12)])
def test_reference_matches_numpy_loop(B, T, H, G, E, S):
    q, k, v = random_qkv(7, B, T, H, G, E, S)
    q_pos_BxT = ragged_positions(3, B, T, S)
    expected = numpy_loop_attention(q, k, v, np.asarray(q_pos_BxT))
    np.testing.assert_allclose(reference(q, k, v, q_pos_BxT), expected, atol=1e-5)


def test_queries_beyond_the_cache_stay_finite():
    # Row 0 runs past the cache's end; row 1 holds padding garbage (negative and huge).
    q, k, v = random_qkv(1, 2, 4, 4, 2, 16, 24)
    q_pos_BxT = jnp.array([[22, 23, 24, 25], [5, -3, 10**6, 6]], jnp.int32)
    got = pallas_attention(q, k, v, q_pos_BxT, interpret=True)
    assert np.isfinite(np.asarray(got)).all()
    expected = reference(q, k, v, q_pos_BxT)
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5, rtol=0)  # sees the whole cache


def test_kv_after_the_last_tile_is_never_read():
    # NaN in every KV tile after a row's last query position would reach the output if read.
    B, T, H, G, E, S, block_k = 3, 4, 4, 2, 16, 64, 16
    q, k, v = random_qkv(2, B, T, H, G, E, S)
    q_pos_BxT = jnp.array([[0, 1, 2, 3], [17, 18, 19, 20], [40, 41, 42, 43]], jnp.int32)
    first_unread_B = (q_pos_BxT[:, -1] // block_k + 1) * block_k
    unread_BxSx1x1 = (jnp.arange(S) >= first_unread_B[:, None])[:, :, None, None]
    k_nan, v_nan = (jnp.where(unread_BxSx1x1, jnp.nan, x) for x in (k, v))
    got = pallas_attention(q, k_nan, v_nan, q_pos_BxT, block_k=block_k, interpret=True)
    expected = reference(q, k, v, q_pos_BxT)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_auto_on_cpu_is_the_reference_bit_for_bit():
    assert jax.default_backend() == "cpu"
    q, k, v = random_qkv(3, 3, 4, 4, 2, 16, 24)
    q_pos_BxT = ragged_positions(4, 3, 4, 24)
    got = jax.jit(functools.partial(block_attention, impl="auto"))(q, k, v, q_pos_BxT)
    np.testing.assert_array_equal(got, reference(q, k, v, q_pos_BxT))


def test_bf16_pallas_close_to_reference():
    q, k, v = random_qkv(5, 3, 4, 4, 2, 32, 64, dtype=jnp.bfloat16)
    q_pos_BxT = ragged_positions(6, 3, 4, 64)
    got = block_attention(q, k, v, q_pos_BxT, impl="pallas")
    expected = reference(q, k, v, q_pos_BxT)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(expected, np.float32), atol=2e-2, rtol=0
    )


def test_bad_inputs_name_the_fix():
    q, k, v = random_qkv(0, 1, 2, 4, 3, 16, 24)
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        pallas_attention(q, k, v, jnp.zeros((1, 2), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="impl='triton'"):
        block_attention(q, k, v, jnp.zeros((1, 2), jnp.int32), impl="triton")
