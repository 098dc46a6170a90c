"""Tests run on CPU with 8 simulated devices, float32; set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_collective_call_terminate_timeout_seconds=60",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402
import pytest  # noqa: E402

from nvium_jax.config import ModelConfig  # noqa: E402


@pytest.fixture
def small_cfg() -> ModelConfig:
    """A model small enough for naive references: GQA (4 heads over 2), three early exits."""
    return ModelConfig(
        vocab_size=37, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
        context=32, exits=(1, 2, 3), adapter_hidden=24, router_hidden=16,
        router_bias_init=-0.3, dtype="float32",
    )


@pytest.fixture
def tokens_BxT(small_cfg):
    return jax.random.randint(jax.random.key(7), (2, 9), 0, small_cfg.vocab_size)
