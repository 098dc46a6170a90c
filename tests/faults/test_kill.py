"""kill -9 at any moment — during a step (with a torn metrics line, as a kill in the middle
of an append leaves), during the async checkpoint write and the data-iterator save, before a
checkpoint is sealed: every restart resumes from the newest complete, verified checkpoint and
reaches the very losses of an uninterrupted run, and metrics.jsonl stays valid JSON lines
with one row per step."""

import json
import signal
import subprocess
import sys
import time

import pytest

from nvium_jax.runs import checkpoint_problem, step_dirs
from tests.faults.conftest import cli_env, metrics_rows, nvium, small_config, train_losses, write_yaml


def run_until_killed(config_path, cwd, after: str, delay: float = 0.0) -> str:
    """Starts `nvium train`, SIGKILLs it `delay` s after a stderr line starting with `after`."""
    proc = subprocess.Popen([sys.executable, "-m", "nvium_jax.cli", "train", "--config", str(config_path)],
                            env=cli_env(), cwd=cwd, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(after):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    return "".join(seen)


@pytest.mark.parametrize("after, delay", [
    ("eval step 4", 0.0),    # right as checkpoint 4 (arrays, then the data-iterator state) is written
    ("step 9/", 0.0),        # in the middle of steps, checkpoint 8 behind it possibly not sealed yet
], ids=["checkpoint-write", "mid-steps-after-checkpoint"])
def test_kill_9_then_resume_reaches_the_same_losses(straight, fault_data, tmp_path, after, delay):
    run_dir = tmp_path / "run"
    config = write_yaml(small_config(fault_data, run_dir, "train.steps=12"), tmp_path / "c.yaml")
    log = run_until_killed(config, tmp_path, after, delay)
    assert after in log
    if after == "step 9/":  # and a kill in the middle of an append: a torn last line
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write('{"step": 10, "loss": 4.1')
    for d in step_dirs(run_dir).values():  # what the kill left: complete or unsealed, never half
        problem = checkpoint_problem(d)
        assert problem is None or "no checksum manifest" in problem, problem
    out = nvium(["train", "--config", str(config)], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert train_losses(run_dir) == train_losses(straight)  # every line parses, one row per step
    assert [r["step"] for r in metrics_rows(run_dir) if "val_loss" in r] == [0, 4, 8, 12]
    resumed = int(out.stderr.split("from step ")[1].split()[0]) if "resuming" in out.stderr else 0
    redone = (run_dir / "metrics.redone.jsonl")
    if redone.is_file():  # rows of redone steps are moved there, not lost
        assert all(json.loads(line)["step"] > resumed or resumed == 0 for line in redone.read_text().splitlines())
    assert sorted(step_dirs(run_dir)) == [4, 8, 12]
    assert all(checkpoint_problem(d) is None for d in step_dirs(run_dir).values())
