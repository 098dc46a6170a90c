"""Shared pieces of the fault tests: a small prepared corpus, a small config, the CLI's
environment, and run-dir helpers. Every test here is marked `faults` (and `slow`)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import cli_env, small_config, write_yaml

__all__ = ["cli_env", "small_config", "write_yaml"]  # shared with tests/test_train_loop.py

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/faults/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def fault_data(word_data):
    return word_data


@pytest.fixture(scope="session")
def straight(fault_data, tmp_path_factory):
    """An uninterrupted 12-step run (8 devices, as the CLI subprocesses here), checkpoints
    at 4, 8, 12: the reference every interrupted run must reproduce exactly."""
    from nvium_jax.train.loop import train

    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(small_config(fault_data, run_dir, "train.steps=12"))
    return run_dir


def nvium(args, cwd, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "nvium_jax.cli", *args], env=env or cli_env(),
                          cwd=cwd, capture_output=True, text=True, **kwargs)


def metrics_rows(run_dir):
    """metrics.jsonl as rows (every line must parse)."""
    return [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> dict:
    rows = [r for r in metrics_rows(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics.jsonl repeats steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def listing(run_dir, skip=()):
    """Every path under a run dir with its bytes (what 'nothing changed' compares)."""
    run_dir = pathlib.Path(run_dir)
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not any(part in skip for part in p.relative_to(run_dir).parts)}
