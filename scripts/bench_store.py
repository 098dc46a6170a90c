"""Checkpoints and token reads through object stores on loopback against the local disk.

For nvium-tiny and nvium-125m (float32): the seconds to save a whole train state (params,
Adam's two moments filled with noise, counters) and seal it locally, and to do the same in a
run dir `s3://…` or `gs://…` (the local mirror's save plus the push of its objects, manifest
last); the seconds to restore it locally, and from the bucket (the pull into an empty mirror
plus the restore); and the training loader's tokens/s from the local data dir and from a copy
in the bucket (tensorstore's s3 or gcs kvstore), against the tiny step's own tokens/s. The
servers are moto (s3) and gcp-storage-emulator (gs) on 127.0.0.1, started here
(`scripts.store_servers`): the figures measure our overhead and the server's, not a
network's. The s3 figures keep their keys (`tiny_bucket_save_s`); the gs ones are prefixed
with the store (`gs_tiny_bucket_save_s`).

    python -m scripts.bench_store [--configs tiny,125m] [--stores s3,gs] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from nvium_jax.config import load_config
from nvium_jax.data import resolve_data_dir
from nvium_jax.paths import location, upload_tree
from nvium_jax.run_store import RunStore
from nvium_jax.runs import checkpoint_manager, restore_checkpoint, save_checkpoint, seal_finished, step_dirs
from nvium_jax.train.mesh import make_mesh
from nvium_jax.train.step import abstract_state, make_trainer
from scripts.bench_data import loader_tokens_per_s, model_tokens_per_s, print_record
from scripts.store_servers import serve

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
BUCKET = "nvium-bench"
SERVER_NAMES = {"s3": "moto on 127.0.0.1",
                "gs": "gcp-storage-emulator (scripts/gcs_emulator.py) on 127.0.0.1"}


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _restore(manager, step: int, target) -> None:
    restored, _ = restore_checkpoint(manager, step, target)
    jax.block_until_ready((restored["params"], restored["opt_state"]))


def _noisy_state(config):
    """The trainer and a train state the size of a trained one: Adam's moments start at zero,
    which orbax's compression shrinks to nothing, so they are filled with noise."""
    trainer = make_trainer(config, make_mesh(config.mesh))
    state = trainer.init_fn()
    leaves, treedef = jax.tree.flatten(state.opt_state)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    return trainer, state._replace(opt_state=jax.tree.unflatten(treedef, [
        x + 1e-3 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim
        else x for x, k in zip(leaves, keys)]))


def _save(run_dir: pathlib.Path, state, config):
    """The state saved synchronously and sealed in `run_dir`; its open checkpoint manager."""
    manager = checkpoint_manager(run_dir, async_save=False)
    save_checkpoint(manager, state, {}, config)
    manager.wait_until_finished()
    seal_finished(run_dir, manager)
    return manager


def _bucket_times(url: str, root: pathlib.Path, state, target, config) -> dict:
    """Seconds to save into the run dir `url` (the mirror's save plus the push) and to
    restore from it (the pull into an empty mirror plus the restore); then the run's objects
    and mirrors are deleted (the GCS emulator holds its objects in memory)."""
    store = RunStore(url, mirror=root / "mirror")
    save_s, manager = _timed(lambda: _save(store.mirror, state, config))
    manager.close()
    push_s, _ = _timed(store.push_checkpoints)
    reader = RunStore(url, mirror=root / "pulled")
    pull_s, _ = _timed(reader.pull_for_training)
    manager = checkpoint_manager(reader.mirror, async_save=False)
    restore_s, _ = _timed(lambda: _restore(manager, max(step_dirs(reader.mirror)), target))
    manager.close()
    store.fs.rm(store.root, recursive=True)
    shutil.rmtree(root)
    return {"bucket_save_s": save_s + push_s, "bucket_push_s": push_s,
            "bucket_restore_s": pull_s + restore_s, "bucket_pull_s": pull_s}


def store_key(store: str, key: str) -> str:
    """A figure's key: as it always was for s3, prefixed with the store for the others."""
    return key if store == "s3" else f"{store}_{key}"


def checkpoint_times(name: str, config, root: pathlib.Path, runs: int, stores: list[str]) -> dict:
    """Median seconds of save and restore of config `name`, locally and through each store's
    bucket, and the bytes."""
    trainer, state = _noisy_state(config)
    target = abstract_state(trainer)
    rows = collections.defaultdict(list)
    for run in range(runs):
        local = root / f"local{run}"
        seconds, manager = _timed(lambda: _save(local, state, config))
        rows[f"{name}_local_save_s"].append(seconds)
        step = max(step_dirs(local))
        size = sum(p.stat().st_size for p in step_dirs(local)[step].rglob("*") if p.is_file())
        rows[f"{name}_local_restore_s"].append(_timed(lambda: _restore(manager, step, target))[0])
        manager.close()
        for store in stores:
            url = f"{store}://{BUCKET}/{config.model.n_layers}L-{run}"
            for key, value in _bucket_times(url, root / f"{store}{run}", state, target, config).items():
                rows[store_key(store, f"{name}_{key}")].append(value)
    record = {k: statistics.median(v) for k, v in rows.items()}
    record[f"{name}_checkpoint_bytes"] = size
    for store in stores:
        for way in ("push", "pull"):
            record[store_key(store, f"{name}_bucket_{way}_mb_per_s")] = \
                size / record[store_key(store, f"{name}_bucket_{way}_s")] / 1e6
    return record


def loader_times(tiny, runs: int, stores: list[str]) -> dict:
    """The tiny loader's tokens/s from the local data dir and from a copy in each store's
    bucket, and the tiny step's tokens/s."""
    data_dir = resolve_data_dir(tiny)
    context, batch = tiny.model.context, tiny.train.batch_size
    sources = {"tiny_loader_local_tokens_per_s": data_dir}
    for store in stores:
        url = f"{store}://{BUCKET}/data"
        upload_tree(data_dir, location(url, "data", (store,)))
        sources[store_key(store, "tiny_loader_bucket_tokens_per_s")] = url
    record = {key: loader_tokens_per_s(source, context, batch, workers=0, batches=100, runs=runs)
              for key, source in sources.items()}
    record["tiny_step_tokens_per_s"] = model_tokens_per_s(tiny, batch, context, steps=10)
    for key in sources:
        record[key.replace("_tokens_per_s", "_margin")] = record[key] / record["tiny_step_tokens_per_s"]
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,125m")
    parser.add_argument("--stores", default="s3,gs", help="object stores to measure: s3 (moto), gs (the GCS emulator)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    stores = args.stores.split(",")
    record = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__} "
                         f"on {jax.devices()[0].device_kind}"}
    for store in stores:
        record[store_key(store, "server")] = SERVER_NAMES[store]
    with contextlib.ExitStack() as stack:
        for store in stores:
            os.environ.update(stack.enter_context(serve(store, BUCKET)))
        root = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for name in args.configs.split(","):
            config = load_config(CONFIGS / f"nvium-{name}.yaml", ["model.dtype=float32"])
            print(f"{name}: checkpoints...", file=sys.stderr)
            record.update(checkpoint_times(name, config, root / name, args.runs, stores))
        print("tiny: loader and step...", file=sys.stderr)
        record.update(loader_times(load_config(CONFIGS / "nvium-tiny.yaml"), args.runs, stores))
    print_record(record, args.json, digits=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
