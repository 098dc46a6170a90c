"""Closed-form parameter counts, and the FFN width that matches a baseline to N-vium."""

from __future__ import annotations

import dataclasses

from nvium_jax.config import ModelConfig


def backbone_param_count(cfg: ModelConfig) -> int:
    """Embedding, L blocks, final norm and head (untied)."""
    D, V, E = cfg.d_model, cfg.vocab_size, cfg.head_dim
    attention = D * cfg.n_heads * E * 2 + D * cfg.kv_heads * E * 2  # wq, wo; wk, wv
    block = attention + 3 * D * cfg.d_ff + 2 * D  # SwiGLU, two norms
    return V * D + cfg.n_layers * block + D + D * V


def exit_param_count(cfg: ModelConfig) -> int:
    """One early exit: norm, adapter (no biases), router MLP (with biases, two logits)."""
    D, A, R = cfg.d_model, cfg.adapter_width, cfg.router_width
    return D + 2 * D * A + (D * R + R) + (R * 2 + 2)


def param_count(cfg: ModelConfig) -> int:
    return backbone_param_count(cfg) + len(cfg.early_exits) * exit_param_count(cfg)


def matched_baseline_d_ff(cfg: ModelConfig, multiple: int = 32) -> int:
    """The baseline FFN width (a multiple of `multiple`) whose parameter count is nearest
    to the N-vium model's: same layers and width, no exits."""
    target = param_count(cfg)
    per_unit = 3 * cfg.d_model * cfg.n_layers  # parameters per unit of d_ff
    no_ffn = backbone_param_count(dataclasses.replace(cfg, d_ff=0, exits=()))
    exact = (target - no_ffn) / per_unit
    return max(multiple, multiple * round(exact / multiple))


def matched_baseline_model(cfg: ModelConfig) -> ModelConfig:
    """The parameter-matched baseline of an N-vium model: no exits, FFN widened."""
    return dataclasses.replace(cfg, exits=(), d_ff=matched_baseline_d_ff(cfg))
