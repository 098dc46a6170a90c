"""nvium_jax: pretrain N-vium mixture-of-exits transformers and decode them exactly."""

__version__ = "0.1.0"
