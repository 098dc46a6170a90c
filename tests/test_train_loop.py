"""The training loop end to end on a small prepared corpus: exact resume, resume on another
mesh, SIGTERM, non-finite losses, two processes, and the errors raised before any step."""

import dataclasses
import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import nvium_jax
from nvium_jax.config import ConfigError
from nvium_jax.data import eval_windows
from nvium_jax.model.loss import nvium_loss
from nvium_jax.train.loop import NonFiniteLoss, train
from tests.conftest import cli_env, small_config, write_yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def data_dir(word_data):
    return word_data


def train_losses(run_dir) -> dict[int, float]:
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    summary = train(small_config(data_dir, run_dir, "train.profile_steps=1"))
    return run_dir, summary


def test_run_dir_holds_everything(uninterrupted):
    run_dir, summary = uninterrupted
    assert summary["step"] == 8 and summary["start_step"] == 0
    for name in ("config.yaml", "tokenizer.json", "provenance.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    assert list((run_dir / "profile").rglob("*.xplane.pb")), "profiler trace of step 6"
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["devices"]["count"] == 8 and provenance["packages"]["jax"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_record = next(r for r in records if r.get("step") == 5 and "loss" in r)
    for key in ("mixture_ce", "exit_ce", "exit_mass", "expected_depth", "grad_norm", "lr",
                "tokens_per_s", "mfu", "beta"):
        assert key in train_record, key
    assert len(train_record["exit_ce"]) == 2
    assert abs(sum(train_record["exit_mass"]) - 1) < 1e-5
    assert [r["router_warmup"] for r in records if "loss" in r][:3] == [True, True, False]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert {"val_mixture_ce", "val_exit_ce", "val_exit_mass", "val_expected_depth"} <= set(evals[0])


def test_load_run_gives_the_trained_model(uninterrupted, data_dir):
    run_dir, _ = uninterrupted
    run = nvium_jax.load_run(run_dir)
    assert run.step == 8 and run.config.model.d_model == 32
    assert run.eos_id is not None and run.tokenizer.get_vocab_size() <= 320
    windows = eval_windows(data_dir, context=16, batch=8, n_batches=1)[0]
    metrics = nvium_loss(run.model, windows, beta=run.config.train.beta, chunk=16)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in logged if r["step"] == 8 and "val_mixture_ce" in r)
    assert float(metrics.mixture_ce) == pytest.approx(val["val_mixture_ce"], rel=1e-5)
    assert nvium_jax.load_run(run_dir, step=4).step == 4
    with pytest.raises(ConfigError, match=r"no checkpoint at step 5; it has steps \[4, 8\]"):
        nvium_jax.load_run(run_dir, step=5)


def rewind(run_dir, to, step: int):
    """A copy of a run as if it had been stopped right after its checkpoint at `step`."""
    shutil.copytree(run_dir, to)
    for ckpt in (to / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > step:
            shutil.rmtree(ckpt)
    lines = (to / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    (to / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return to


def test_resume_is_bit_exact_and_on_another_mesh_close(uninterrupted, data_dir, tmp_path):
    full_dir, _ = uninterrupted
    expected = train_losses(full_dir)
    same_mesh = rewind(full_dir, tmp_path / "same_mesh", 4)
    summary = train(small_config(data_dir, same_mesh))
    assert summary["start_step"] == 4
    resumed = train_losses(same_mesh)
    assert [resumed[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]
    other_mesh = rewind(full_dir, tmp_path / "other_mesh", 4)
    train(small_config(data_dir, other_mesh, "mesh.data=2", "mesh.fsdp=4"))
    moved = train_losses(other_mesh)
    np.testing.assert_allclose([moved[s] for s in range(5, 9)],
                               [expected[s] for s in range(5, 9)], rtol=1e-5)


def test_errors_come_before_any_step_and_touch_nothing(uninterrupted, data_dir, tmp_path):
    full_dir, _ = uninterrupted
    saved = (full_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds checkpoints of another model.*model\.d_model: 32 → 48"):
        train(small_config(data_dir, full_dir, "model.d_model=48"))
    assert (full_dir / "config.yaml").read_text() == saved
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match=r"mesh data=3 × fsdp=1 × tensor=1 = 3 devices, but 8"):
        train(small_config(data_dir, fresh, "mesh.data=3", "mesh.fsdp=1"))
    with pytest.raises(ConfigError, match=r"12 sequences per micro-batch is not divisible by the data-parallel size 8"):
        train(small_config(data_dir, fresh, "train.batch_size=12"))
    with pytest.raises(ConfigError, match="another tokenizer|prepared with"):
        train(small_config(data_dir, fresh, "data.tokenizer=bpe:999"))
    assert not fresh.exists()


def test_a_diverging_run_stops_before_its_first_checkpoint(data_dir, tmp_path):
    """A real blow-up (lr 1e12), not an injected NaN: `skip` and injected faults are in
    tests/faults/test_numerics.py."""
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step \d+.*no checkpoint was saved yet"):
        train(small_config(data_dir, tmp_path / "stop", "train.lr=1e12", "train.warmup_steps=0",
                           "train.grad_clip=1e30"))


def test_sigterm_saves_a_resumable_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "preempted"
    config = small_config(data_dir, run_dir, "train.steps=400", "train.checkpoint_every=1000",
                          "train.eval_every=1000")
    path = write_yaml(config, tmp_path / "config.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "nvium_jax.cli", "train", "--config", str(path)],
                            env=cli_env(8), stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    for line in proc.stderr:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest
    assert "stopped by signal at step" in rest
    stopped = int(rest.split("stopped by signal at step ")[1].split(";")[0])
    assert 3 <= stopped < 400
    assert (run_dir / "checkpoints" / str(stopped)).is_dir()
    summary = train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=stopped + 2)))
    assert summary["start_step"] == stopped and summary["step"] == stopped + 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(uninterrupted, data_dir, tmp_path):
    full_dir, _ = uninterrupted
    run_dir = tmp_path / "two"
    path = write_yaml(small_config(data_dir, run_dir), tmp_path / "config.yaml")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = cli_env(4)
        env.update(NVIUM_COORDINATOR=f"localhost:{port}", NVIUM_NUM_PROCESSES="2",
                   NVIUM_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "nvium_jax.cli", "train", "--config", str(path)],
            env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    deadline = time.time() + 300
    outputs = [p.communicate(timeout=max(deadline - time.time(), 1))[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    expected, got = train_losses(full_dir), train_losses(run_dir)
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)],
                               rtol=1e-5)


def test_generate_cli_decodes_the_run(uninterrupted, capsys):
    """`nvium generate --json` gives the tokens `generate` gives for the same prompt and seed."""
    from nvium_jax.cli import main
    from nvium_jax.inference import generate

    run_dir, _ = uninterrupted
    assert main(["generate", "--run", str(run_dir), "--prompt", "the king", "--max-new-tokens",
                 "6", "--seed", "3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {"samples", "tokens_per_s", "flushes"}
    sample = record["samples"][0]
    run = nvium_jax.load_run(run_dir)
    prompt = ([] if run.bos_id is None else [run.bos_id]) + run.tokenizer.encode("the king").ids
    out = generate(run.model, [prompt], 6, seed=3, eos_id=run.eos_id)
    n = int(out.lengths_B[0])
    assert sample["tokens"] == out.tokens_BxN[0, :n].tolist()
    assert sample["exits"] == out.exits_BxN[0, :n].tolist()
    assert sample["text"] == run.tokenizer.decode(sample["tokens"]) and sample["prompt"] == "the king"
    # a non-exact sampler with --decode deferred is one clear error
    assert main(["generate", "--run", str(run_dir), "--prompt", "the", "--top-k", "3",
                 "--decode", "deferred"]) == 2
    assert 'needs decode="dense"' in capsys.readouterr().err
