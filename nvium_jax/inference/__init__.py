"""Exact deferred-batch decoding: `generate`, `flush` and the decode state."""

from nvium_jax.inference.decode import DecodeState, GenerateOutput, flush, generate

__all__ = ["DecodeState", "GenerateOutput", "flush", "generate"]
