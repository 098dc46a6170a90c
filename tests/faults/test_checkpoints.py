"""Damaged checkpoints are never loaded: flipped bytes, a truncated or missing file, missing
metadata are named on stderr and skipped for the previous good checkpoint, from which the
run continues exactly; with none left, one line and nothing changed. One trainer per run dir."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import nvium_jax
from nvium_jax.config import ConfigError
from nvium_jax.runs import MANIFEST, RunDirLock, checkpoint_problem, step_dirs
from nvium_jax.train.loop import train
from tests.faults.conftest import cli_env, listing, nvium, small_config, train_losses, write_yaml


def rewound(straight, to, step):
    """A copy of the straight run stopped right after its checkpoint at `step`."""
    shutil.copytree(straight, to)
    for s, d in step_dirs(to).items():
        if s > step:
            shutil.rmtree(d)
    lines = (to / "metrics.jsonl").read_text().splitlines()
    (to / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
    return to


def flip_bytes(step_dir):
    largest = max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    largest.write_bytes(bytes(data))
    return largest


def truncate(step_dir):
    largest = max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
                  key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 3)
    return largest


def delete_metadata(step_dir):
    meta = next(p for p in step_dir.rglob("*") if p.is_file() and "metadata" in p.name)
    meta.unlink()
    return meta


def test_every_checkpoint_is_sealed(straight):
    dirs = step_dirs(straight)
    assert sorted(dirs) == [4, 8, 12]
    for d in dirs.values():
        assert checkpoint_problem(d) is None
        assert json.loads((d / MANIFEST).read_text())["files"]


@pytest.mark.parametrize("damage", [flip_bytes, truncate, delete_metadata], ids=["flipped", "truncated", "metadata"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_continues_exactly(
        straight, tmp_path, fault_data, damage, capfd):
    run_dir = rewound(straight, tmp_path / "run", 8)
    damaged = damage(run_dir / "checkpoints" / "8").relative_to(run_dir / "checkpoints" / "8")
    assert str(damaged) in checkpoint_problem(run_dir / "checkpoints" / "8")
    # load_run verifies what it reads (the parameters and the checkpoint's own files): it
    # falls back when those are damaged, and loads step 8 when only optimizer state is
    if len(damaged.parts) == 1 or damaged.parts[0] == "params":
        assert nvium_jax.load_run(run_dir).step == 4
        with pytest.raises(ConfigError, match="checkpoint 8 of .* fails verification; good checkpoints: \\[4\\]"):
            nvium_jax.load_run(run_dir, step=8)
    else:
        assert nvium_jax.load_run(run_dir).step == 8
    capfd.readouterr()
    summary = train(small_config(fault_data, run_dir, "train.steps=12"))
    err = capfd.readouterr().err
    assert "checkpoint 8 of" in err and "fails verification" in err and "skipping it" in err
    assert summary["start_step"] == 4 and summary["step"] == 12
    assert train_losses(run_dir) == train_losses(straight)  # steps 5–12 redone exactly
    kept = list((run_dir / "damaged").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("checkpoint-8-")  # set aside, not deleted
    assert sorted(step_dirs(run_dir)) == [4, 8, 12]


def flip_largest(directory):
    largest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))


def test_load_run_verifies_what_it_reads(straight, tmp_path, capfd):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    flip_largest(run_dir / "checkpoints" / "12" / "params")  # one bit of the parameters
    flip_largest(run_dir / "checkpoints" / "8" / "opt_state")  # optimizer state: not read by load_run
    capfd.readouterr()
    assert nvium_jax.load_run(run_dir).step == 8
    assert "checkpoint 12 of" in capfd.readouterr().err
    with pytest.raises(ConfigError, match=r"checkpoint 12 of .* fails verification; good checkpoints: \[4, 8\]"):
        nvium_jax.load_run(run_dir, step=12)
    assert checkpoint_problem(run_dir / "checkpoints" / "8") is not None  # training would skip it


def test_no_good_checkpoint_is_one_line_and_changes_nothing(straight, tmp_path, fault_data):
    run_dir = rewound(straight, tmp_path / "run", 8)
    flip_bytes(run_dir / "checkpoints" / "4")
    truncate(run_dir / "checkpoints" / "8")
    before = listing(run_dir)
    config = write_yaml(small_config(fault_data, run_dir, "train.steps=12"), tmp_path / "c.yaml")
    out = nvium(["train", "--config", str(config)], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint of") and "passes verification" in last
    assert "Traceback" not in out.stderr
    assert listing(run_dir) == before


def test_one_trainer_per_run_dir(straight, tmp_path, fault_data, capfd):
    run_dir = rewound(straight, tmp_path / "run", 8)
    config = small_config(fault_data, run_dir, "train.steps=12")
    before = listing(run_dir)
    with RunDirLock(run_dir):  # this process owns it
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()} on host"):
            train(config)
    assert listing(run_dir) == before
    # a lock left by a dead process on this host is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                     "started": "earlier"}))
    capfd.readouterr()
    assert train(config)["step"] == 12
    assert f"taking over the lock of dead pid {dead.pid}" in capfd.readouterr().err
    assert not (run_dir / "train.lock").exists()  # released at the end


def test_two_nvium_train_on_one_run_dir(fault_data, tmp_path):
    """Two real processes: the second refuses in one line while the first trains on."""
    run_dir = tmp_path / "run"
    config = write_yaml(small_config(fault_data, run_dir, "train.steps=300", "train.checkpoint_every=1000",
                                     "train.eval_every=1000"), tmp_path / "c.yaml")
    first = subprocess.Popen([sys.executable, "-m", "nvium_jax.cli", "train", "--config", str(config)],
                             env=cli_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    for line in first.stderr:
        if line.startswith("step 2/"):
            break
    second = nvium(["train", "--config", str(config)], cwd=tmp_path, timeout=120)
    first.terminate()
    rest = first.stderr.read()
    assert first.wait(timeout=120) == 0, rest
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: run dir {run_dir} is in use by pid {first.pid}")
    assert np.isfinite(list(train_losses(run_dir).values())).all()
