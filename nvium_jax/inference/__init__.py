"""Exact deferred-batch decoding: `generate`, `flush`, its options and the decode state."""

from nvium_jax.inference.decode import DecodeOptions, DecodeState, GenerateOutput, flush, generate

__all__ = ["DecodeOptions", "DecodeState", "GenerateOutput", "flush", "generate"]
