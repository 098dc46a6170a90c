"""Pallas split-KV (flash-decoding) cache attention for the queries of a decode block.

Same contract as `reference_cache_attention`: query t of row b sees the cache positions
s < cache_len_B[b] of one layer's KV cache [B, G, S, E] (every query of a row sees the same
prefix; causality inside the block is the decode loop's business); GQA with R = H // G query
heads per kv head. It returns (out, lse) in float32 so that the loop can merge it with the
attention over the block's own keys; a row that sees nothing gets out = 0, lse = −inf.

The grid runs over (batch row b, kv head g, split j, row tile i). One program holds the
queries of one kv group as a [rows, E] tile — row m is (block position t, head r) =
(m // R, m % R), padded to a power of two ≥ 16 so Triton's `dot` lowers — and walks its
split of the row's visible KV tiles with an online (flash) softmax in float32. The visible
tiles, ceil(cache_len_b / block_k) of them, are dealt out to the `num_splits` splits in
contiguous runs of equal length, so the work is balanced whatever the fill, and the loop's
trip count is dynamic: tiles at or beyond cache_len are never read, and a split with no
tile left reads nothing. Each program writes a partial (normalised out, lse); a small JAX
step merges the splits by their log-sum-exp weights (an empty split has lse −inf and weight
0). Splits exist so that batch 1 fills a GPU: by default enough of them for about
`_TARGET_PROGRAMS` programs, capped by the number of KV tiles in the cache.

Lowering: Pallas Triton on GPU (every block shape of a load a power of two, KV tiles read by
ref slicing with `pl.ds`), `interpret=True` anywhere (the CPU tests). TPU (Mosaic) is not
supported: the [S, E] KV block of one kv head would be copied whole into VMEM. The KV cache
is padded (copied) only when S is not a multiple of `block_k` or E is not a power of two
≥ 16; size the cache to avoid it.
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

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a masked score gives no NaN
_MIN_TILE = 16  # smallest dimension Triton's dot accepts
_MAX_ROWS = 128  # default query rows per program; more rows become more programs
_TARGET_PROGRAMS = 132  # streaming multiprocessors of an H100/H200: one program each


def default_block_k(S: int) -> int:
    """The largest of 128, 64, 32, 16 that divides S, else 16 (the cache is then padded)."""
    return next((b for b in (128, 64, 32, 16) if S % b == 0), _MIN_TILE)


def default_num_splits(B: int, G: int, row_tiles: int, kv_tiles: int) -> int:
    """Splits per (row, kv head, row tile) for ~`_TARGET_PROGRAMS` programs, ≤ kv_tiles."""
    return max(1, min(kv_tiles, pl.cdiv(_TARGET_PROGRAMS, B * G * row_tiles)))


def _check_shapes(q_BxTxHxE, k_BxGxSxE, v_BxGxSxE, cache_len_B) -> None:
    B, T, H, E = q_BxTxHxE.shape
    if (
        k_BxGxSxE.ndim != 4
        or k_BxGxSxE.shape != v_BxGxSxE.shape
        or k_BxGxSxE.shape[::3] != (B, E)
    ):
        raise ValueError(
            f"k.shape={k_BxGxSxE.shape}, v.shape={v_BxGxSxE.shape} — k and v must "
            f"both be [B, G, S, E] with B={B} and E={E} as in q.shape={q_BxTxHxE.shape}"
        )
    G = k_BxGxSxE.shape[1]
    if H % G:
        raise ValueError(
            f"q has {H} query heads, not a multiple of the {G} kv heads of k and v; "
            f"use a kv-head count that divides {H}"
        )
    if jnp.shape(cache_len_B) != (B,):
        raise ValueError(
            f"cache_len.shape={jnp.shape(cache_len_B)} — it must be [B] = {(B,)}"
        )


def _check_tile(name: str, size: int) -> None:
    if size < _MIN_TILE or size & (size - 1):
        raise ValueError(f"{name}={size} — it must be a power of two ≥ {_MIN_TILE}")


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _group_rows(q_BxTxHxE: jax.Array, G: int, M: int, E_pad: int) -> jax.Array:
    """[B, T, H, E] → [B, G, M, E_pad]: row t·R + r of group g is query head g·R + r at t."""
    B, T, H, E = q_BxTxHxE.shape
    q_BxGxTxRxE = q_BxTxHxE.reshape(B, T, G, H // G, E).transpose(0, 2, 1, 3, 4)
    q_BxGxNxE = q_BxGxTxRxE.reshape(B, G, T * (H // G), E)
    return _pad_axis(_pad_axis(q_BxGxNxE, 2, M), 3, E_pad)


def _ungroup_rows(x_BxGxMx_: jax.Array, T: int, H: int, E: int | None) -> jax.Array:
    """Inverse of `_group_rows` for [B, G, M, E_pad] (E given) or [B, G, M] (E None)."""
    B, G = x_BxGxMx_.shape[:2]
    x_BxGxNx_ = x_BxGxMx_[:, :, : T * (H // G)]
    if E is None:
        return x_BxGxNx_.reshape(B, G, T, H // G).transpose(0, 2, 1, 3).reshape(B, T, H)
    x_BxGxTxRxE = x_BxGxNx_[..., :E].reshape(B, G, T, H // G, E)
    return x_BxGxTxRxE.transpose(0, 2, 1, 3, 4).reshape(B, T, H, E)


def _split_kernel(
    len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, num_splits, sqrt_e, precision
):
    """One program: rows [M] of one kv group against its split of the visible KV tiles."""
    length = jnp.max(len_ref[...])  # every entry holds the row's cache_len, in [0, S]
    q_MxE = q_ref[...]
    M, E = q_MxE.shape
    n_tiles = lax.div(length + block_k - 1, block_k)  # tiles holding a visible position
    per_split = lax.div(n_tiles + num_splits - 1, num_splits)
    first_tile = pl.program_id(2) * per_split
    n_steps = jnp.maximum(jnp.minimum(n_tiles - first_tile, per_split), 0)

    def step(i, carry):
        acc_MxE, max_M, sum_M = carry
        start = pl.multiple_of((first_tile + i) * block_k, block_k)
        k_KxE = k_ref[pl.ds(start, block_k), :]
        v_KxE = v_ref[pl.ds(start, block_k), :]
        s_MxK = lax.dot_general(
            q_MxE, k_KxE, (((1,), (1,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32,
        ) / sqrt_e
        k_pos_MxK = start + lax.broadcasted_iota(jnp.int32, (M, block_k), 1)
        s_MxK = jnp.where(k_pos_MxK < length, s_MxK, _MASK_VALUE)
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
    acc_MxE, max_M, sum_M = lax.fori_loop(0, n_steps, step, init)
    # A split that read nothing: acc 0, sum 0, max −inf → out 0 and lse −inf, no NaN.
    o_ref[...] = acc_MxE / jnp.maximum(sum_M, np.finfo(np.float32).tiny)[:, None]
    lse_ref[...] = max_M + jnp.log(sum_M)


def _merge_splits(o_BxGxPxMxE: jax.Array, lse_BxGxPxM: jax.Array):
    """Merge per-split (normalised out, lse) by log-sum-exp weights; empty splits weigh 0."""
    max_BxGxM = jnp.max(lse_BxGxPxM, axis=2)
    finite_max_BxGxM = jnp.where(jnp.isfinite(max_BxGxM), max_BxGxM, 0.0)
    weight_BxGxPxM = jnp.exp(lse_BxGxPxM - finite_max_BxGxM[:, :, None])
    total_BxGxM = jnp.sum(weight_BxGxPxM, axis=2)
    o_BxGxMxE = jnp.sum(weight_BxGxPxM[..., None] * o_BxGxPxMxE, axis=2)
    o_BxGxMxE = o_BxGxMxE / jnp.maximum(total_BxGxM, np.finfo(np.float32).tiny)[..., None]
    return o_BxGxMxE, finite_max_BxGxM + jnp.log(total_BxGxM)  # log 0 = −inf: sees nothing


@functools.partial(
    jax.jit, static_argnames=("block_k", "block_rows", "num_splits", "interpret")
)
def pallas_cache_attention(
    q_BxTxHxE: jax.Array,
    k_BxGxSxE: jax.Array,
    v_BxGxSxE: jax.Array,
    cache_len_B: jax.Array,
    *,
    block_k: int | None = None,
    block_rows: int | None = None,
    num_splits: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`reference_cache_attention` as a split-KV Pallas kernel that reads only visible tiles.

    block_k: cache positions per KV tile (default `default_block_k(S)`); block_rows: query
    rows (block position × head of a group) per program, default min(rows, 128);
    num_splits: programs sharing one row's KV (default `default_num_splits`)."""
    _check_shapes(q_BxTxHxE, k_BxGxSxE, v_BxGxSxE, cache_len_B)
    B, T, H, E = q_BxTxHxE.shape
    G, S = k_BxGxSxE.shape[1:3]
    R = H // G
    block_k = default_block_k(S) if block_k is None else block_k
    _check_tile("block_k", block_k)
    block_m = min(max(_MIN_TILE, pl.next_power_of_2(T * R)), block_rows or _MAX_ROWS)
    _check_tile("block_rows", block_m)
    M = pl.cdiv(T * R, block_m) * block_m
    E_pad = max(_MIN_TILE, pl.next_power_of_2(E))
    S_pad = pl.cdiv(S, block_k) * block_k  # pad keys lie beyond every cache_len (≤ S)
    if num_splits is None:
        num_splits = default_num_splits(B, G, M // block_m, S_pad // block_k)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} — it must be at least 1")

    k_pad = _pad_axis(_pad_axis(k_BxGxSxE, 2, S_pad), 3, E_pad)
    v_pad = _pad_axis(_pad_axis(v_BxGxSxE, 2, S_pad), 3, E_pad)
    len_BxL = jnp.broadcast_to(
        jnp.clip(cache_len_B.astype(jnp.int32), 0, S)[:, None], (B, _MIN_TILE)
    )  # a vector per row, loaded as the old position tiles were
    f32 = q_BxTxHxE.dtype == jnp.float32
    kernel = functools.partial(
        _split_kernel,
        block_k=block_k,
        num_splits=num_splits,
        sqrt_e=math.sqrt(E),
        precision=lax.Precision.HIGHEST if f32 else None,  # f32: IEEE dots, not TF32
    )
    P = num_splits
    o_BxGxPxMxE, lse_BxGxPxM = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((B, G, P, M, E_pad), jnp.float32),
            jax.ShapeDtypeStruct((B, G, P, M), jnp.float32),
        ),
        grid=(B, G, P, M // block_m),
        in_specs=[
            pl.BlockSpec((None, _MIN_TILE), lambda b, g, j, i: (b, 0)),
            pl.BlockSpec((None, None, block_m, E_pad), lambda b, g, j, i: (b, g, i, 0)),
            pl.BlockSpec((None, None, S_pad, E_pad), lambda b, g, j, i: (b, g, 0, 0)),
            pl.BlockSpec((None, None, S_pad, E_pad), lambda b, g, j, i: (b, g, 0, 0)),
        ],
        out_specs=(
            pl.BlockSpec(
                (None, None, None, block_m, E_pad), lambda b, g, j, i: (b, g, j, i, 0)
            ),
            pl.BlockSpec((None, None, None, block_m), lambda b, g, j, i: (b, g, j, i)),
        ),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="cache_attention",
    )(len_BxL, _group_rows(q_BxTxHxE, G, M, E_pad), k_pad, v_pad)
    if P == 1:
        o_BxGxMxE, lse_BxGxM = o_BxGxPxMxE[:, :, 0], lse_BxGxPxM[:, :, 0]
    else:
        o_BxGxMxE, lse_BxGxM = _merge_splits(o_BxGxPxMxE, lse_BxGxPxM)
    return _ungroup_rows(o_BxGxMxE, T, H, E), _ungroup_rows(lse_BxGxM, T, H, None)


__all__ = ["default_block_k", "default_num_splits", "pallas_cache_attention"]
