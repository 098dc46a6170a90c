"""Fault trials, the long version of tests/faults/: `nvium train` killed with SIGKILL at
random moments (sometimes again while it resumes), and runs whose newest checkpoint had
random bytes flipped; every run is then resumed to the end and compared with an
uninterrupted run, loss by loss. Prints a Markdown table for docs/reliability.md.

    python -m scripts.fault_trials [--trials 20] [--seed 0] [--steps 24] [--out runs/fault_trials]

A small model (2 layers, width 32, 16-token windows) on the embedded corpus, 8 simulated
CPU devices, checkpoints every 4 steps, a sync every step: a step takes milliseconds, so a
random kill lands anywhere in steps, evaluations, async checkpoint writes and appends.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
OVERRIDES = [
    "run.wandb=disabled", "model.vocab_size=320", "data.tokenizer=bpe:320", "model.context=16",
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.exits=[1]",
    "model.dtype=float32", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
    "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=4", "train.loss_chunk=16",
    "train.router_warmup_frac=0.25",
]


def env() -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    e["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=60")
    return e


def write_config(run_dir: pathlib.Path, steps: int) -> pathlib.Path:
    from nvium_jax.config import config_to_dict, load_config

    config = load_config(ROOT / "configs/nvium-tiny.yaml", [*OVERRIDES, f"train.steps={steps}",
                                                            f"run.dir={run_dir}"])
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def train(config: pathlib.Path, kill_after: float | None = None) -> tuple[str, float, float]:
    """Runs `nvium train`; with `kill_after`, SIGKILLs it that many seconds after its first
    step. Returns (status, seconds from start, seconds from the first step to the end)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "nvium_jax.cli", "train", "--config", str(config)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_step, lines = None, []
    timer = None
    for line in proc.stderr:
        lines.append(line)
        if first_step is None and line.startswith("step "):
            first_step = time.time()
            if kill_after is not None:
                timer = threading.Timer(kill_after, lambda: proc.send_signal(signal.SIGKILL))
                timer.start()
    code = proc.wait()
    if timer is not None:
        timer.cancel()
    end = time.time()
    stepping = end - (first_step or end)
    if code == -signal.SIGKILL:
        return "killed", end - start, stepping
    return ("ok" if code == 0 else f"exit {code}: {lines[-1:]}"), end - start, stepping


def losses(run_dir: pathlib.Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    if len(steps) != len(set(steps)):
        raise AssertionError(f"steps repeated in metrics.jsonl: {steps}")
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def flip_random_bytes(run_dir: pathlib.Path, rng: random.Random) -> str:
    from nvium_jax.runs import MANIFEST, step_dirs

    newest = step_dirs(run_dir)[max(step_dirs(run_dir))]
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.name != MANIFEST)
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(data))
    return f"{newest.name}/{target.relative_to(newest)}@{at}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default="runs/fault_trials")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out).absolute()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(args.seed)
    reference_dir = out / "reference"
    status, seconds, stepping = train(write_config(reference_dir, args.steps))
    assert status == "ok", status
    reference = losses(reference_dir)
    print(f"reference: {args.steps} steps, {seconds:.1f} s ({stepping:.1f} s from the first step)",
          file=sys.stderr)
    outcomes = {"kill -9": [], "kill -9 twice": [], "flipped bit in the newest checkpoint": []}
    for trial in range(args.trials):
        kind = list(outcomes)[trial % 3]
        run_dir = out / f"trial{trial}"
        config = write_config(run_dir, args.steps)
        if kind == "flipped bit in the newest checkpoint":
            train(config)  # to the end, then damage its newest checkpoint
            detail = f"flipped {flip_random_bytes(run_dir, rng)}"
        else:
            first = rng.uniform(0.0, 1.1) * stepping
            status, _, _ = train(config, kill_after=first)
            detail = f"killed {first:.2f} s after the first step ({status})"
            if kind == "kill -9 twice":
                second = rng.uniform(0.0, 1.1) * stepping
                status, _, _ = train(config, kill_after=second)
                detail += f", again {second:.2f} s into the resume ({status})"
        status, _, _ = train(config)
        try:
            same = status == "ok" and losses(run_dir) == reference
        except (AssertionError, ValueError) as err:
            same, status = False, f"metrics.jsonl: {err}"
        outcomes[kind].append(same)
        print(f"trial {trial:2d} {kind:38s} {detail:75s} → {'exact' if same else status}", file=sys.stderr)
    print("| fault | how it is injected | trials | resumed to the reference's losses exactly |")
    print("|---|---|---:|---:|")
    how = {"kill -9": "SIGKILL at a uniform random time in [0, 1.1] × the steps' duration after the "
                      "first step, then the same command",
           "kill -9 twice": "SIGKILL as above, again during the resume, then the same command",
           "flipped bit in the newest checkpoint": "a finished run; one random bit of a random file of "
                                                  "its newest checkpoint flipped; the same command again"}
    for kind, results in outcomes.items():
        print(f"| {kind} | {how[kind]} | {len(results)} | {sum(results)}/{len(results)} |")
    return 0 if all(all(r) for r in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
