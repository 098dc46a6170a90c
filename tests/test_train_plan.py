"""`nvium plan` on the 1.5B config over 8 simulated devices, and `nvium bench train`."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from nvium_jax.config import load_config
from nvium_jax.model.count import param_count

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # plan sets its own
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "nvium_jax.cli", *args], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_plan_1p5b_on_eight_simulated_devices():
    record = run_cli("plan", "--config", "configs/nvium-1.5b.yaml", "--mesh", "data=2,fsdp=4,tensor=1",
                     "--decode-batch", "4", "--json")
    model = load_config(ROOT / "configs/nvium-1.5b.yaml").model
    n = param_count(model)
    assert record["params"] == n and record["param_bytes"] == 4 * n
    # AdamW: two float32 moments per parameter, plus a few scalar counters
    assert 8 * n <= record["optimizer_bytes"] < 8 * n + 1024
    assert record["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and record["devices"] == 8
    assert record["decode_cache_bytes"] == 2 * 48 * 4 * 1024 * 12 * 128 * 2  # K and V, bf16
    # the sharded state alone is (params + Adam) / 4 fsdp shards per device
    assert record["per_device_bytes"] > 12 * n / 4
    assert "estimate" in record["per_device_bytes_source"]


@pytest.mark.slow
def test_bench_train_reports_both_models():
    record = run_cli("bench", "train", "--config", "configs/nvium-tiny.yaml", "--steps", "2",
                     "model.n_layers=4", "model.exits=[1,2,3]", "train.batch_size=2", "model.context=32", "mesh.fsdp=1", "--json")
    assert set(record) >= {"device", "config", "baseline_config", "nvium_step_s", "baseline_step_s",
                           "step_ratio", "nvium_tokens_per_s", "baseline_tokens_per_s",
                           "nvium_mfu", "baseline_mfu"}
    assert record["step_ratio"] == pytest.approx(record["nvium_step_s"] / record["baseline_step_s"])
    assert record["nvium_tokens_per_s"] == pytest.approx(64 / record["nvium_step_s"])
