"""A full disk (ENOSPC) or a read-only one (EROFS), injected at the write layer — the run
dir's files, the metrics append, orbax's checkpoint save (permission bits do not stop
root): one clear line at start or at the failing write, every earlier checkpoint intact and
verified, and the same command resumes exactly once the disk is fixed."""

import errno
import os

import orbax.checkpoint as ocp
import pytest

import nvium_jax.runs
import nvium_jax.train.metrics
from nvium_jax.cli import main
from nvium_jax.runs import checkpoint_problem, step_dirs
from tests.faults.conftest import listing, small_config, train_losses, write_yaml


def fail_with(code):
    def raiser(*args, **kwargs):
        raise OSError(code, os.strerror(code), "injected")
    return raiser


def test_read_only_run_dir_fails_at_start_and_writes_nothing(fault_data, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    config = write_yaml(small_config(fault_data, run_dir), tmp_path / "c.yaml")
    monkeypatch.setattr(nvium_jax.runs, "atomic_write_text", fail_with(errno.EROFS))
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Read-only file system (EROFS) writing injected; use a writable run.dir")
    assert not step_dirs(run_dir) and not (run_dir / "train.lock").exists()


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_full_disk_mid_run_keeps_every_earlier_checkpoint(straight, fault_data, tmp_path, monkeypatch, capsys, where):
    run_dir = tmp_path / "run"
    config = write_yaml(small_config(fault_data, run_dir, "train.steps=12"), tmp_path / "c.yaml")
    if where == "checkpoint":
        save = ocp.CheckpointManager.save

        def save_until_8(self, step, *args, **kwargs):
            if step == 8:
                raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "checkpoints" / "8"))
            return save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_8)
    else:
        log = nvium_jax.train.metrics.MetricsSink.log

        def log_until_6(self, record):
            if record["step"] == 6:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            return log(self, record)

        monkeypatch.setattr(nvium_jax.train.metrics.MetricsSink, "log", log_until_6)
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: No space left on device (ENOSPC) writing ") and "free some space" in err[-1]
    assert sorted(step_dirs(run_dir)) == [4] and checkpoint_problem(step_dirs(run_dir)[4]) is None
    before = listing(run_dir / "checkpoints")
    monkeypatch.undo()  # the disk is fixed: the same command resumes
    assert main(["train", "--config", str(config)]) == 0
    assert train_losses(run_dir) == train_losses(straight)
    assert {k: v for k, v in listing(run_dir / "checkpoints").items() if k.startswith("4/")} == before
