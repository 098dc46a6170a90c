"""Checkpoints and token reads through an S3 server on loopback against the local disk.

For nvium-tiny and nvium-125m (float32): the seconds to save a whole train state (params,
Adam's two moments filled with noise, counters) and seal it locally, and to do the same in a run dir `s3://…` (the
local mirror's save plus the push of its objects, manifest last); the seconds to restore it
locally, and from the bucket (the pull into an empty mirror plus the restore); and the
training loader's tokens/s from the local data dir and from a copy in the bucket (tensorstore's
s3 kvstore), against the tiny step's own tokens/s. The server is moto on 127.0.0.1, started
here (`scripts.store_servers`): the figures measure our overhead and moto's, not a network's.

    python -m scripts.bench_store [--configs tiny,125m] [--runs 3] [--json]
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
import jax.numpy as jnp

from nvium_jax.config import load_config
from nvium_jax.data import resolve_data_dir
from nvium_jax.paths import location, upload_tree
from nvium_jax.run_store import RunStore
from nvium_jax.runs import checkpoint_manager, restore_checkpoint, save_checkpoint, seal_finished, step_dirs
from nvium_jax.train.mesh import make_mesh
from nvium_jax.train.step import abstract_state, make_trainer
from scripts.bench_data import loader_tokens_per_s, model_tokens_per_s
from scripts.store_servers import serve

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
BUCKET = "nvium-bench"


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _restore(manager, step: int, target) -> None:
    restored, _ = restore_checkpoint(manager, step, target)
    jax.block_until_ready((restored["params"], restored["opt_state"]))


def checkpoint_times(config, root: pathlib.Path, runs: int) -> dict:
    """Median seconds of save and restore, locally and through the bucket, and the bytes."""
    trainer = make_trainer(config, make_mesh(config.mesh))
    state = trainer.init_fn()
    # Adam's moments start at zero, which orbax's compression shrinks to nothing: fill them
    # with noise so that the checkpoint has the size of a trained one (params + 2 moments)
    leaves, treedef = jax.tree.flatten(state.opt_state)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    state = state._replace(opt_state=jax.tree.unflatten(treedef, [
        x + 1e-3 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim
        else x for x, k in zip(leaves, keys)]))
    target = abstract_state(trainer)
    rows = {k: [] for k in ("local_save_s", "bucket_save_s", "bucket_push_s", "local_restore_s",
                            "bucket_restore_s", "bucket_pull_s")}
    size = 0
    for run in range(runs):
        local = root / f"local{run}"
        url = f"s3://{BUCKET}/{config.model.n_layers}L-{run}"
        store = RunStore(url, mirror=root / f"mirror{run}")
        for run_dir, key in ((local, "local_save_s"), (store.mirror, "bucket_save_s")):
            manager = checkpoint_manager(run_dir, async_save=False)

            def save():
                save_checkpoint(manager, state, {}, config)
                manager.wait_until_finished()
                seal_finished(run_dir, manager)

            seconds, _ = _timed(save)
            if run_dir == store.mirror:
                push_s, _ = _timed(store.push_checkpoints)
                rows["bucket_push_s"].append(push_s)
                seconds += push_s
            rows[key].append(seconds)
            step = max(step_dirs(run_dir))
            if run_dir == local:
                size = sum(p.stat().st_size for p in step_dirs(local)[step].rglob("*") if p.is_file())
                rows["local_restore_s"].append(_timed(lambda: _restore(manager, step, target))[0])
            manager.close()
        reader = RunStore(url, mirror=root / f"pulled{run}")
        pull_s, _ = _timed(reader.pull_for_training)
        manager = checkpoint_manager(reader.mirror, async_save=False)
        restore_s, _ = _timed(lambda: _restore(manager, step, target))
        manager.close()
        rows["bucket_pull_s"].append(pull_s)
        rows["bucket_restore_s"].append(pull_s + restore_s)
    record = {k: statistics.median(v) for k, v in rows.items()}
    record["checkpoint_bytes"] = size
    record["bucket_push_mb_per_s"] = size / record["bucket_push_s"] / 1e6
    record["bucket_pull_mb_per_s"] = size / record["bucket_pull_s"] / 1e6
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,125m")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    record = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__} "
                         f"on {jax.devices()[0].device_kind}", "server": "moto on 127.0.0.1"}
    with serve("s3", BUCKET) as env, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(env)
        root = pathlib.Path(tmp)
        for name in args.configs.split(","):
            config = load_config(CONFIGS / f"nvium-{name}.yaml", ["model.dtype=float32"])
            print(f"{name}: checkpoints...", file=sys.stderr)
            for key, value in checkpoint_times(config, root / name, args.runs).items():
                record[f"{name}_{key}"] = value
        tiny = load_config(CONFIGS / "nvium-tiny.yaml")
        data_dir = resolve_data_dir(tiny)
        url = f"s3://{BUCKET}/data"
        upload_tree(data_dir, location(url, "data", ("s3",)))
        context, batch = tiny.model.context, tiny.train.batch_size
        print("tiny: loader and step...", file=sys.stderr)
        for where, source in (("local", data_dir), ("bucket", url)):
            record[f"tiny_loader_{where}_tokens_per_s"] = loader_tokens_per_s(
                source, context, batch, workers=0, batches=100, runs=args.runs)
        record["tiny_step_tokens_per_s"] = model_tokens_per_s(tiny, batch, context, steps=10)
        for where in ("local", "bucket"):
            record[f"tiny_loader_{where}_margin"] = (record[f"tiny_loader_{where}_tokens_per_s"]
                                                     / record["tiny_step_tokens_per_s"])
    if args.json:
        print(json.dumps(record))
    else:
        for key, value in record.items():
            print(f"{key:>36}: {value:,.3f}" if isinstance(value, float) else f"{key:>36}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
