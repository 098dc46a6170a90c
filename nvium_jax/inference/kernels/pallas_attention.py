"""Pallas flash attention for a ragged block of queries over a position-indexed KV cache.

Same contract as `reference_attention`: key `s` sits at position `s`; a query at position
p sees the keys at positions ≤ p; GQA with R = H // G query heads per kv head.

The grid runs over (batch row b, kv head g, row tile i). One program holds the queries of
one kv group as a [rows, E] tile — row j is (block position t, head r) = (j // R, j % R),
padded to a power of two ≥ 16 so Triton's `dot` lowers — and walks the cache in tiles of
`block_k` positions with an online (flash) softmax in float32. The loop's trip count is
dynamic: it stops at the tile holding the largest query position of that tile of rows, so
keys beyond the block's last position are never read, and a row whose block sits early
in its sequence reads little KV. Keys after a query are masked by position.

Query positions are clipped to [0, S − 1] first: a query beyond the cache sees all of it
(as in the reference) and a garbage negative one sees key 0, so padding rows of a block
stay finite. Padding rows should carry a position no later than the block's last one, or
they lengthen the loop of their program.

Lowering: Pallas Triton on GPU (every block shape a power of two, KV tiles read by ref
slicing with `pl.ds`), `interpret=True` anywhere (the CPU tests). TPU (Mosaic) is not
supported: the [S, E] KV block of one kv head would be copied whole into VMEM, and the
squeezed kv-head axis sits in a tiled dimension. The KV cache is padded (copied) only when
S is not a multiple of `block_k` or E is not a power of two ≥ 16; size the cache to avoid it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked tile gives no NaN
_MIN_TILE = 16  # smallest dimension Triton's dot accepts
_MAX_ROWS = 128  # default query rows per program; more rows become more programs


def default_block_k(S: int) -> int:
    """The largest of 128, 64, 32, 16 that divides S, else 16 (the cache is then padded)."""
    return next((b for b in (128, 64, 32, 16) if S % b == 0), _MIN_TILE)


def _check_shapes(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, q_pos_BxT, block_k: int) -> None:
    B, T, H, E = q_BxTxHxE.shape
    if k_BxSxGxE.shape != v_BxSxGxE.shape or k_BxSxGxE.shape[::3] != (B, E):
        raise ValueError(
            f"error: k.shape={k_BxSxGxE.shape}, v.shape={v_BxSxGxE.shape} — k and v must be "
            f"[B, S, G, E] with B={B} and E={E} as in q.shape={q_BxTxHxE.shape}"
        )
    G = k_BxSxGxE.shape[2]
    if H % G:
        raise ValueError(f"error: {H} query heads are not a multiple of {G} kv heads")
    if q_pos_BxT.shape != (B, T):
        raise ValueError(f"error: q_pos.shape={q_pos_BxT.shape} — it must be [B, T] = {(B, T)}")
    _check_tile("block_k", block_k)


def _check_tile(name: str, size: int) -> None:
    if size < _MIN_TILE or size & (size - 1):
        raise ValueError(f"error: {name}={size} — it must be a power of two ≥ {_MIN_TILE}")


def _pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _group_rows(q_BxTxHxE: jax.Array, G: int, M: int, E_pad: int) -> jax.Array:
    """[B, T, H, E] → [B, G, M, E_pad]: row t·R + r of group g is query head g·R + r at t."""
    B, T, H, E = q_BxTxHxE.shape
    q_BxGxTxRxE = q_BxTxHxE.reshape(B, T, G, H // G, E).transpose(0, 2, 1, 3, 4)
    q_BxGxNxE = q_BxGxTxRxE.reshape(B, G, T * (H // G), E)
    return _pad_axis(_pad_axis(q_BxGxNxE, 2, M), 3, E_pad)


def _ungroup_rows(o_BxGxMxE: jax.Array, T: int, H: int, E: int) -> jax.Array:
    B, G = o_BxGxMxE.shape[:2]
    o_BxGxTxRxE = o_BxGxMxE[:, :, : T * (H // G), :E].reshape(B, G, T, H // G, E)
    return o_BxGxTxRxE.transpose(0, 2, 1, 3, 4).reshape(B, T, H, E)


def _row_positions(q_pos_BxT: jax.Array, R: int, M: int, S: int) -> jax.Array:
    """Position of each tile row, [B, M]; pad rows repeat the last real one (no extra KV)."""
    pos_BxN = jnp.repeat(jnp.clip(q_pos_BxT.astype(jnp.int32), 0, S - 1), R, axis=1)
    return _pad_axis(pos_BxN, 1, M, mode="edge")


def _flash_kernel(pos_ref, q_ref, k_ref, v_ref, o_ref, *, block_k, sqrt_e, precision):
    """One program: rows [M] of one kv group against KV tiles up to its last position."""
    pos_M = pos_ref[...]
    q_MxE = q_ref[...]
    M, E = q_MxE.shape
    n_tiles = lax.div(jnp.max(pos_M), block_k) + 1  # positions are ≥ 0 (clipped)

    def step(i, carry):
        acc_MxE, max_M, sum_M = carry
        start = pl.multiple_of(i * block_k, block_k)
        k_KxE = k_ref[pl.ds(start, block_k), :]
        v_KxE = v_ref[pl.ds(start, block_k), :]
        s_MxK = lax.dot_general(
            q_MxE, k_KxE, (((1,), (1,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32,
        ) / sqrt_e
        k_pos_MxK = start + lax.broadcasted_iota(jnp.int32, (M, block_k), 1)
        s_MxK = jnp.where(k_pos_MxK <= pos_M[:, None], s_MxK, _MASK_VALUE)
        new_max_M = jnp.maximum(max_M, jnp.max(s_MxK, axis=1))
        rescale_M = jnp.exp(max_M - new_max_M)  # rescales what earlier tiles summed
        p_MxK = jnp.exp(s_MxK - new_max_M[:, None])
        pv_MxE = lax.dot_general(
            p_MxK.astype(v_KxE.dtype), v_KxE, (((1,), (0,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32,
        )
        acc_MxE = acc_MxE * rescale_M[:, None] + pv_MxE
        return acc_MxE, new_max_M, sum_M * rescale_M + jnp.sum(p_MxK, axis=1)

    init = (
        jnp.zeros((M, E), jnp.float32),
        jnp.full((M,), -jnp.inf, jnp.float32),
        jnp.zeros((M,), jnp.float32),
    )
    acc_MxE, _, sum_M = lax.fori_loop(0, n_tiles, step, init)
    o_ref[...] = (acc_MxE / sum_M[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_k", "block_rows", "interpret"))
def pallas_attention(
    q_BxTxHxE: jax.Array,
    k_BxSxGxE: jax.Array,
    v_BxSxGxE: jax.Array,
    q_pos_BxT: jax.Array,
    *,
    block_k: int | None = None,
    block_rows: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`reference_attention` as a Pallas kernel that reads KV only up to each block's end.

    block_k: cache positions per KV tile (default `default_block_k(S)`); block_rows: query
    rows (block position × head of a group) per program, default min(rows, 128)."""
    B, T, H, E = q_BxTxHxE.shape
    S, G = k_BxSxGxE.shape[1:3]
    block_k = default_block_k(S) if block_k is None else block_k
    _check_shapes(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, q_pos_BxT, block_k)
    R = H // G
    block_m = min(max(_MIN_TILE, pl.next_power_of_2(T * R)), block_rows or _MAX_ROWS)
    _check_tile("block_rows", block_m)
    M = pl.cdiv(T * R, block_m) * block_m
    E_pad = max(_MIN_TILE, pl.next_power_of_2(E))
    S_pad = pl.cdiv(S, block_k) * block_k  # pad keys sit after every (clipped) query

    k_pad = _pad_axis(_pad_axis(k_BxSxGxE, 1, S_pad), 3, E_pad)
    v_pad = _pad_axis(_pad_axis(v_BxSxGxE, 1, S_pad), 3, E_pad)
    f32 = q_BxTxHxE.dtype == jnp.float32
    kernel = functools.partial(
        _flash_kernel,
        block_k=block_k,
        sqrt_e=math.sqrt(E),
        precision=lax.Precision.HIGHEST if f32 else None,  # f32: IEEE dots, not TF32
    )
    rows = pl.BlockSpec((None, None, block_m, E_pad), lambda b, g, i: (b, g, i, 0))
    keys = pl.BlockSpec((None, S_pad, None, E_pad), lambda b, g, i: (b, 0, g, 0))
    o_BxGxMxE = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, G, M, E_pad), q_BxTxHxE.dtype),
        grid=(B, G, M // block_m),
        in_specs=[pl.BlockSpec((None, block_m), lambda b, g, i: (b, i)), rows, keys, keys],
        out_specs=rows,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="block_attention",
    )(
        _row_positions(q_pos_BxT, R, M, S),
        _group_rows(q_BxTxHxE, G, M, E_pad),
        k_pad,
        v_pad,
    )
    return _ungroup_rows(o_BxGxMxE, T, H, E)
