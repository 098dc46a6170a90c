"""Backbone layers: RMSNorm, RoPE, grouped-query attention, SwiGLU, decoder block.

Modules built with `n_stack=L` hold every weight with a leading `layers` axis; the stack
is applied by scanning (or looping) over slices of it, each slice merged back into the
same module class, so training and decoding run one piece of layer code.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nvium_jax.config import ModelConfig


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[Optional[str], ...],
    std: float,
    dtype,
    n_stack: Optional[int] = None,
) -> nnx.Param:
    """A normal(0, std) weight (std=0: zeros) tagged with its logical axis names."""
    if n_stack is not None:
        shape, axes = (n_stack, *shape), ("layers", *axes)
    if std == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def constant_param(value, axes, dtype, n_stack: Optional[int] = None) -> nnx.Param:
    value = jnp.asarray(value, dtype)
    if n_stack is not None:
        value, axes = jnp.broadcast_to(value, (n_stack, *value.shape)), ("layers", *axes)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, n_stack: Optional[int] = None):
        self.scale = constant_param(jnp.ones(cfg.d_model), ("embed",), cfg.param_dtype, n_stack)
        self.eps = cfg.norm_eps
        self.dtype = dtype

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_angles(positions_BxT: jax.Array, head_dim: int, theta: float):
    """cos and sin of the rotary angles, [B, T, E], half-split (HF Llama) layout."""
    inv_freq_E2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_E2
    angles_BxTxE = jnp.concatenate([angles_BxTxE2, angles_BxTxE2], axis=-1)
    return jnp.cos(angles_BxTxE), jnp.sin(angles_BxTxE)


def apply_rope(x_BxTxHxE: jax.Array, cos_BxTxE: jax.Array, sin_BxTxE: jax.Array) -> jax.Array:
    x = x_BxTxHxE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # rotate_half
    out = x * cos_BxTxE[:, :, None, :] + rotated * sin_BxTxE[:, :, None, :]
    return out.astype(x_BxTxHxE.dtype)


def attend(
    q_BxTxHxE: jax.Array,
    k_BxSxGxE: jax.Array,
    v_BxSxGxE: jax.Array,
    q_pos_BxT: jax.Array,
    k_pos_BxS: jax.Array,
) -> jax.Array:
    """Softmax attention where a query sees every key at a position ≤ its own (GQA)."""
    B, T, H, E = q_BxTxHxE.shape
    G = k_BxSxGxE.shape[2]
    q_BxTxGxRxE = q_BxTxHxE.reshape(B, T, G, H // G, E)
    scores_BxGxRxTxS = jnp.einsum(
        "btgre,bsge->bgrts", q_BxTxGxRxE, k_BxSxGxE, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(E))
    visible_Bx1x1xTxS = (k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None])[:, None, None]
    scores_BxGxRxTxS = jnp.where(visible_Bx1x1xTxS, scores_BxGxRxTxS, -jnp.inf)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(v_BxSxGxE.dtype)
    out_BxTxGxRxE = jnp.einsum("bgrts,bsge->btgre", probs_BxGxRxTxS, v_BxSxGxE)
    return out_BxTxGxRxE.reshape(B, T, H, E)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, n_stack: Optional[int] = None):
        D, H, G, E = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        pd = cfg.param_dtype
        self.wq = param(rngs, (D, H, E), ("embed", "heads", "head_dim"), cfg.init_std, pd, n_stack)
        self.wk = param(rngs, (D, G, E), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd, n_stack)
        self.wv = param(rngs, (D, G, E), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd, n_stack)
        self.wo = param(rngs, (H, E, D), ("heads", "head_dim", "embed"), out_std, pd, n_stack)
        self.rope_theta = cfg.rope_theta
        self.dtype = dtype

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, attend_fn=None):
        """Self-attention of a block of positions. `attend_fn(q, k, v)` replaces the block's
        causal self-attention (decoding attends to a KV cache as well). Returns (out,
        (k, v)): the block's keys (after RoPE) and values, for a cache.

        The projections are plain 2-D matmuls on [D, H·E] / [H·E, D] views of the weights
        (free reshapes), so no compiler ever transposes a weight to match an activation."""
        dt = self.dtype
        B, T, D = x_BxTxD.shape
        H, E = self.wq[...].shape[-2:]
        G = self.wk[...].shape[-2]
        x_BxTxD = x_BxTxD.astype(dt)
        q_BxTxHxE = (x_BxTxD @ self.wq[...].astype(dt).reshape(D, H * E)).reshape(B, T, H, E)
        k_BxTxGxE = (x_BxTxD @ self.wk[...].astype(dt).reshape(D, G * E)).reshape(B, T, G, E)
        v_BxTxGxE = (x_BxTxD @ self.wv[...].astype(dt).reshape(D, G * E)).reshape(B, T, G, E)
        cos, sin = rope_angles(positions_BxT, E, self.rope_theta)
        q_BxTxHxE = apply_rope(q_BxTxHxE, cos, sin)
        k_BxTxGxE = apply_rope(k_BxTxGxE, cos, sin)
        if attend_fn is None:
            out_BxTxHxE = attend(q_BxTxHxE, k_BxTxGxE, v_BxTxGxE, positions_BxT, positions_BxT)
        else:
            out_BxTxHxE = attend_fn(q_BxTxHxE, k_BxTxGxE, v_BxTxGxE)
        out_BxTxD = out_BxTxHxE.astype(dt).reshape(B, T, H * E) @ self.wo[...].astype(dt).reshape(H * E, D)
        return out_BxTxD, (k_BxTxGxE, v_BxTxGxE)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, n_stack: Optional[int] = None):
        D, F = cfg.d_model, cfg.d_ff
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        pd = cfg.param_dtype
        self.w_gate = param(rngs, (D, F), ("embed", "mlp"), cfg.init_std, pd, n_stack)
        self.w_up = param(rngs, (D, F), ("embed", "mlp"), cfg.init_std, pd, n_stack)
        self.w_down = param(rngs, (F, D), ("mlp", "embed"), out_std, pd, n_stack)
        self.dtype = dtype

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x_BxTxD.astype(dt)
        gate_BxTxF = jax.nn.silu(x @ self.w_gate[...].astype(dt))
        up_BxTxF = x @ self.w_up[...].astype(dt)
        return (gate_BxTxF * up_BxTxF) @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, n_stack: Optional[int] = None):
        self.attn_norm = RMSNorm(cfg, dtype, n_stack)
        self.attn = Attention(cfg, rngs, dtype, n_stack)
        self.mlp_norm = RMSNorm(cfg, dtype, n_stack)
        self.mlp = SwiGLU(cfg, rngs, dtype, n_stack)

    def __call__(self, h_BxTxD, positions_BxT, attend_fn=None):
        """Returns (h, (k, v)) — the block's keys and values, which decoding caches."""
        attn_out, kv = self.attn(self.attn_norm(h_BxTxD), positions_BxT, attend_fn)
        h_BxTxD = h_BxTxD + attn_out.astype(h_BxTxD.dtype)
        h_BxTxD = h_BxTxD + self.mlp(self.mlp_norm(h_BxTxD)).astype(h_BxTxD.dtype)
        return h_BxTxD, kv
