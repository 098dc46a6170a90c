"""Loader throughput against what a training step consumes, on this machine.

For nvium-tiny and nvium-125m: tokens/s of `TrainBatches` at the config's context and batch
(embedded corpus; medians of several runs, with 0 and 2 worker processes), and tokens/s of
one jitted `value_and_grad` of `nvium_loss` on `build_model(config.model)` (tiny: its
training batch; 125m: 1×1024 tokens). Prints the ratios; `--json` prints one JSON object.

    python -m scripts.bench_data [--runs 5] [--steps 3] [--tiny-steps 10] [--synthetic N_TOKENS] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from nvium_jax.config import load_config
from nvium_jax.data import TrainBatches, resolve_data_dir
from nvium_jax.data.store import FORMAT, write_meta, write_tokens
from nvium_jax.model import build_model
from nvium_jax.model.loss import nvium_loss

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def loader_tokens_per_s(data_dir, context: int, batch: int, workers: int, batches: int, runs: int) -> float:
    """Median over `runs` of training tokens (batch × context) per second, startup excluded."""
    rates = []
    for run in range(runs):
        loader = TrainBatches(data_dir, context=context, global_batch=batch, seed=run, workers=workers)
        next(loader)  # start-up (worker processes, first read) is not throughput
        started = time.perf_counter()
        for _ in range(batches):
            next(loader)
        rates.append(batches * batch * context / (time.perf_counter() - started))
        loader.close()
    return statistics.median(rates)


def _synthetic_dir(root: pathlib.Path, n_tokens: int) -> pathlib.Path:
    """A data dir of random uint16 tokens: reads miss tensorstore's cache and hit the disk."""
    tokens = np.random.default_rng(0).integers(0, 32000, n_tokens, dtype=np.uint16)
    write_tokens(root / "train", tokens)
    write_tokens(root / "val", tokens[:4096])
    write_meta(root, {"format": FORMAT, "dtype": "uint16", "vocab_size": 32000, "bos_id": None,
                      "eos_id": 0, "train_tokens": n_tokens, "val_tokens": 4096, "documents": 1,
                      "inputs": [], "tokenizer": {"spec": "synthetic", "hash": "0" * 64}})
    return root


def model_tokens_per_s(config, batch: int, context: int, steps: int) -> float:
    """Training tokens per second of one jitted value_and_grad step (compile excluded)."""
    model = build_model(config.model, seed=0)
    t = config.train

    @nnx.jit
    def step(model, tokens_BxT1):
        def loss(m):
            return nvium_loss(m, tokens_BxT1, beta=t.beta, chunk=t.loss_chunk, remat=t.remat).loss

        return nnx.value_and_grad(loss)(model)

    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (batch, context + 1), np.int32)
    times = []
    for i in range(steps + 1):
        started = time.perf_counter()
        loss, grads = step(model, tokens)
        jax.block_until_ready((loss, grads))
        if i:  # the first call compiles
            times.append(time.perf_counter() - started)
    return batch * context / statistics.median(times)


def print_record(record: dict, as_json: bool, digits: int) -> None:
    """A benchmark's figures: one JSON object, or a `key: value` table (floats to `digits`)."""
    if as_json:
        print(json.dumps(record))
        return
    width = max(map(len, record))
    for key, value in record.items():
        print(f"{key:>{width}}: {value:,.{digits}f}" if isinstance(value, float) else f"{key:>{width}}: {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="loader runs per setting (median)")
    parser.add_argument("--steps", type=int, default=3, help="timed 125m steps (median)")
    parser.add_argument("--tiny-steps", type=int, default=10, help="timed tiny steps (median)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N_TOKENS",
                        help="also time the 125m loader on N random tokens (larger than the cache)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tiny = load_config(CONFIGS / "nvium-tiny.yaml")
    data_dir = resolve_data_dir(tiny)
    record = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, jax on "
                         f"{jax.devices()[0].device_kind}",
              "data_dir": str(data_dir)}
    # (name, config, loader batch, loader batches per run, model batch, timed steps)
    settings = (("tiny", tiny, tiny.train.batch_size, 300, tiny.train.batch_size, args.tiny_steps),
                ("125m", load_config(CONFIGS / "nvium-125m.yaml"), 256, 20, 1, args.steps))
    for name, config, loader_batch, batches, model_batch, steps in settings:
        context = config.model.context
        for workers in (0, 2):
            rate = loader_tokens_per_s(data_dir, context, loader_batch, workers, batches, args.runs)
            record[f"{name}_loader_w{workers}_tokens_per_s"] = rate
        print(f"timing a {name} step ({model_batch}×{context} tokens)...", file=sys.stderr)
        record[f"{name}_step_tokens_per_s"] = model_tokens_per_s(config, model_batch, context, steps)
        for workers in (0, 2):
            record[f"{name}_ratio_w{workers}"] = (record[f"{name}_loader_w{workers}_tokens_per_s"]
                                                  / record[f"{name}_step_tokens_per_s"])
    if args.synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            synthetic = _synthetic_dir(pathlib.Path(tmp), args.synthetic)
            record["synthetic_tokens"] = args.synthetic
            for workers in (0, 2):
                record[f"125m_synthetic_loader_w{workers}_tokens_per_s"] = loader_tokens_per_s(
                    synthetic, 1024, 256, workers, 20, args.runs)
    print_record(record, args.json, digits=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
