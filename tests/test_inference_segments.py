"""A segment's tokens: the packed layout against a Python loop, and the attention of packed
tokens (each its own row's cache and block) against a float64 NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np

from nvium_jax.inference.segments import attend_block_and_cache, attend_packed_and_cache, pack_blocks


def test_pack_blocks_equals_a_python_loop():
    start_B = np.array([5, 0, 9, 3, 7])
    len_B = np.array([2, 0, 3, 1, 0])
    size = 8
    packed = jax.tree.map(np.asarray, pack_blocks(jnp.asarray(start_B), jnp.asarray(len_B), size))
    expected = [(b, j, start_B[b] + j) for b in range(5) for j in range(len_B[b])]
    n = len(expected)
    assert packed.valid_N.tolist() == [True] * n + [False] * (size - n)
    got = list(zip(packed.row_N[:n].tolist(), packed.slot_N[:n].tolist(), packed.pos_N[:n].tolist()))
    assert got == expected
    assert (packed.row_N[n:] < 5).all()  # padding points at a real row (its writes are dropped)


def numpy_attention(q_NxHxE, keys_by_token, values_by_token):
    """Softmax over each token's own visible keys, float64."""
    out = np.zeros(q_NxHxE.shape)
    H, E = q_NxHxE.shape[1:]
    for n, (keys_KxGxE, values_KxGxE) in enumerate(zip(keys_by_token, values_by_token)):
        R = H // keys_KxGxE.shape[1]
        for h in range(H):
            scores = keys_KxGxE[:, h // R] @ q_NxHxE[n, h] / np.sqrt(E)
            weights = np.exp(scores - scores.max())
            out[n, h] = weights @ values_KxGxE[:, h // R] / weights.sum()
    return out


def test_packed_tokens_see_their_own_row_only():
    rng = np.random.default_rng(0)
    B, G, H, E, S = 3, 2, 4, 16, 12
    start_B = np.array([4, 0, 7])  # row 1 has an empty cache
    len_B = np.array([2, 3, 1])
    packed = pack_blocks(jnp.asarray(start_B), jnp.asarray(len_B), 8)
    N = 8
    q, k, v = (rng.standard_normal((N, n, E)) for n in (H, G, G))
    cache_k, cache_v = (rng.standard_normal((B, G, S, E)) for _ in range(2))
    packed_attention = jax.jit(attend_packed_and_cache, static_argnums=(5, 9))  # one compile
    got = packed_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), packed,
                           jnp.asarray(len_B), 4, jnp.asarray(cache_k, jnp.float32),
                           jnp.asarray(cache_v, jnp.float32), jnp.asarray(start_B), "reference")
    rows, pos = np.asarray(packed.row_N), np.asarray(packed.pos_N)
    keys, values = [], []
    for n in range(int(len_B.sum())):
        b = rows[n]
        mine = [m for m in range(int(len_B.sum())) if rows[m] == b and pos[m] <= pos[n]]
        keys.append(np.concatenate([cache_k[b, :, :start_B[b]].transpose(1, 0, 2), k[mine]]))
        values.append(np.concatenate([cache_v[b, :, :start_B[b]].transpose(1, 0, 2), v[mine]]))
    n_real = int(len_B.sum())
    np.testing.assert_allclose(got[:n_real], numpy_attention(q[:n_real], keys, values), atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()  # padding tokens too
    # the same tokens laid out one block per row give the same answer
    row_attention = jax.jit(attend_block_and_cache, static_argnums=(8,))
    for b in range(B):
        mine = np.flatnonzero(rows[:n_real] == b)
        if mine.size == 0:
            continue
        row = row_attention(
            *(jnp.asarray(x[mine][None], jnp.float32) for x in (q, k, v)), jnp.asarray(pos[mine][None]),
            jnp.ones((1, mine.size), bool), jnp.asarray(cache_k[b:b + 1], jnp.float32),
            jnp.asarray(cache_v[b:b + 1], jnp.float32), jnp.asarray(start_B[b:b + 1]), "reference")
        np.testing.assert_allclose(row[0], got[mine], atol=1e-5)
