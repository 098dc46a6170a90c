"""The README's main command: nvium-tiny on the embedded corpus, 1 CPU device, as a user runs
it (shortened to 100 steps), must bring the held-out loss at least 30% below its start."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_config_learns_on_the_embedded_corpus(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), NVIUM_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "nvium_jax.cli", "train", "--config", "configs/nvium-tiny.yaml",
         f"run.dir={run_dir}", "run.wandb=disabled", "train.steps=100", "train.eval_every=50"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_mixture_ce"] for r in records if "val_mixture_ce" in r}
    assert sorted(evals) == [0, 50, 100]
    assert evals[100] <= 0.7 * evals[0], evals
    assert (run_dir / "checkpoints" / "100").is_dir()
