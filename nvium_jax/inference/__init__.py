"""Exact deferred-batch decoding: `generate`, `flush`, its options and the decode state."""

from nvium_jax.inference.decode import (
    DecodeOptions,
    DecodeState,
    DecodeStats,
    GenerateOutput,
    flush,
    generate,
)

__all__ = ["DecodeOptions", "DecodeState", "DecodeStats", "GenerateOutput", "flush", "generate"]
