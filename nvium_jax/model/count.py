"""Closed-form parameter counts, and the FFN width that matches a baseline to N-vium."""

from __future__ import annotations

import dataclasses

from nvium_jax.config import ModelConfig


def block_matmul_param_count(cfg: ModelConfig) -> int:
    """The matrices of one decoder block: wq, wo; wk, wv; the SwiGLU's three."""
    D, E = cfg.d_model, cfg.head_dim
    return D * cfg.n_heads * E * 2 + D * cfg.kv_heads * E * 2 + 3 * D * cfg.d_ff


def block_param_count(cfg: ModelConfig) -> int:
    """One decoder block: its matrices and two norms."""
    return block_matmul_param_count(cfg) + 2 * cfg.d_model


def kv_values_per_token(cfg: ModelConfig) -> int:
    """Cached values one layer keeps per position: K and V of every kv head."""
    return 2 * cfg.kv_heads * cfg.head_dim


def backbone_param_count(cfg: ModelConfig) -> int:
    """Embedding, L blocks, final norm and head (untied)."""
    D, V = cfg.d_model, cfg.vocab_size
    return V * D + cfg.n_layers * block_param_count(cfg) + D + D * V


def adapter_param_count(cfg: ModelConfig) -> int:
    """One residual adapter (no biases): an early exit's, or the final exit's."""
    return 2 * cfg.d_model * cfg.adapter_width


def final_adapter_param_count(cfg: ModelConfig) -> int:
    """The final exit's adapter (`model.final_adapter`), else nothing."""
    return adapter_param_count(cfg) if cfg.final_adapter else 0


def router_param_count(cfg: ModelConfig) -> int:
    """An early exit's router (with biases, two logits): `ours` is D→R→2; `reference` is
    D→R→D, an RMSNorm over D, then D→2."""
    D, R = cfg.d_model, cfg.router_width
    if cfg.router_head == "ours":
        return (D * R + R) + (R * 2 + 2)
    return (D * R + R) + (R * D + D) + D + (D * 2 + 2)


def exit_param_count(cfg: ModelConfig) -> int:
    """One early exit: norm, adapter, router."""
    return cfg.d_model + adapter_param_count(cfg) + router_param_count(cfg)


def param_count(cfg: ModelConfig) -> int:
    return (backbone_param_count(cfg) + len(cfg.early_exits) * exit_param_count(cfg)
            + final_adapter_param_count(cfg))


def matched_baseline_d_ff(cfg: ModelConfig, multiple: int = 32, tolerance: float = 0.0025) -> int:
    """The baseline FFN width whose parameter count is nearest to the N-vium model's (same
    layers and width, no exits): a multiple of `multiple`, halved while that misses the
    count by more than `tolerance` (a small model's step of 32 can be 3% of its size)."""
    target = param_count(cfg)
    per_unit = 3 * cfg.d_model * cfg.n_layers  # parameters per unit of d_ff
    no_ffn = backbone_param_count(dataclasses.replace(cfg, d_ff=0, exits=()))
    exact = (target - no_ffn) / per_unit
    while True:
        d_ff = max(multiple, multiple * round(exact / multiple))
        if multiple == 1 or abs(no_ffn + d_ff * per_unit - target) <= tolerance * target:
            return d_ff
        multiple //= 2


def matched_baseline_model(cfg: ModelConfig) -> ModelConfig:
    """The parameter-matched baseline of an N-vium model: no exits nor final adapter (a plain
    transformer), FFN widened by their parameters."""
    return dataclasses.replace(cfg, exits=(), final_adapter=False, d_ff=matched_baseline_d_ff(cfg))
