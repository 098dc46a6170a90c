"""nvium_jax: pretrain N-vium mixture-of-exits transformers and decode them exactly."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported lazily: `import nvium_jax` must not start jax (the CLI sets XLA flags first)
    if name in ("load_run", "Run"):
        from nvium_jax import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'nvium_jax' has no attribute {name!r}")
