"""The run directory: config.yaml, tokenizer.json, provenance.json, metrics.jsonl and orbax
checkpoints (params, optimizer state, counters, data-iterator state); `load_run`.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from nvium_jax.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config
from nvium_jax.model import build_model
from nvium_jax.paths import atomic_write_text

# keys that may change when a run resumes, silently; model.* may not change at all
RESUMABLE_CHANGES = ("train.steps", "train.keep", "train.on_nonfinite", "run.wandb", "run.dir")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore",
            "wandb", "tokenizers", "numpy", "nvium_jax")


class Run(NamedTuple):
    config: Config
    model: Any  # nvium_jax.model.Nvium
    tokenizer: Any  # tokenizers.Tokenizer
    step: int
    bos_id: Optional[int]
    eos_id: Optional[int]


def _flat(config_dict: dict) -> dict:
    return {f"{s}.{k}": v for s, keys in config_dict.items() for k, v in keys.items()}


def config_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) for resuming a run saved with `old` under `new`."""
    before, after = _flat(config_to_dict(old)), _flat(config_to_dict(new))
    errors, warnings = [], []
    for key in before:
        if before[key] == after[key]:
            continue
        change = f"{key}: {before[key]!r} → {after[key]!r}"
        if key.startswith("model."):
            errors.append(change)
        elif not (key in RESUMABLE_CHANGES or key.startswith("mesh.") or key.endswith("_every")):
            warnings.append(change)
    return errors, warnings


def read_run_config(run_dir: pathlib.Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.yaml")
    import yaml

    try:
        return config_from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ConfigError) as err:
        raise ConfigError(f"{path} cannot be read as a config: {err}") from None


def checkpoint_manager(run_dir: pathlib.Path, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(), options=options,
        item_names=("params", "opt_state", "counters", "data", "meta"),
    )


def has_checkpoints(run_dir: pathlib.Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def save_checkpoint(manager, state, data_state: dict, config: Config) -> None:
    """Queues an async save of the whole train state at its step."""
    step = int(jax.device_get(state.step))
    counters = {"step": state.step, "beta": state.beta, "skipped": state.skipped}
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            counters=ocp.args.StandardSave(counters),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({"step": step, "config": config_to_dict(config),
                                    "saved": _now()}),
        ),
    )


def save_initial_params(run_dir: pathlib.Path, params, config: Config, source: dict) -> None:
    """Checkpoint 0 holding parameters only (an import, e.g. from Hugging Face): `nvium
    train` starts from them with a fresh optimizer and data order; `load_run` reads them."""
    manager = checkpoint_manager(run_dir, async_save=False)
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"step": 0, "config": config_to_dict(config), "saved": _now(),
                                "initial_params": source}),
    ))
    manager.wait_until_finished()
    manager.close()


def holds_train_state(run_dir: pathlib.Path, step: int) -> bool:
    """Whether checkpoint `step` holds a whole train state (not only initial parameters)."""
    return (run_dir / "checkpoints" / str(step) / "opt_state").is_dir()


def restore_params(manager, step: int, target_params):
    """The parameters of checkpoint `step` in the shardings of `target_params`."""
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target_params)))
    return restored["params"]


def restore_checkpoint(manager, step: int, target):
    """The train state at `step` into `target` — a TrainState of ShapeDtypeStructs whose
    shardings may differ from the saved run's mesh; returns (restored items, data state)."""
    counters = {"step": target.step, "beta": target.beta, "skipped": target.skipped}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            opt_state=ocp.args.StandardRestore(target.opt_state),
            counters=ocp.args.StandardRestore(counters),
            data=ocp.args.JsonRestore(),
        ),
    )
    return restored, restored["data"]


def git_commit() -> Optional[str]:
    here = pathlib.Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(command: list[str]) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {
        "time": _now(),
        "command": command,
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": git_commit(),
        "devices": {
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "count": len(devices),
            "local_count": jax.local_device_count(),
            "process_count": jax.process_count(),
        },
        "host": platform.node(),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_run_files(run_dir: pathlib.Path, config: Config, tokenizer_path: Optional[pathlib.Path],
                    command: list[str]) -> None:
    """config.yaml (the resolved config), tokenizer.json (when there is one), and
    provenance.json, which keeps the first launch and appends every resume."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    if tokenizer_path is not None and tokenizer_path.resolve() != (run_dir / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_path, run_dir / "tokenizer.json")
    record = provenance(command)
    path = run_dir / "provenance.json"
    if path.is_file():
        try:
            first = json.loads(path.read_text())
            first.setdefault("resumes", []).append(record)
            record = first
        except json.JSONDecodeError:
            pass
    atomic_write_text(path, json.dumps(record, indent=2))


def load_run(run_dir, step: Optional[int] = None, *, device=None) -> Run:
    """The model of a run's latest (or given) checkpoint, its config and tokenizer.

    The parameters are restored whole onto one device of this process (`device`, default
    its first), whatever mesh trained the run: a run trained on a pod loads on a laptop.
    """
    run_dir = pathlib.Path(run_dir)
    config = read_run_config(run_dir)
    if not has_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} has no checkpoints yet; train it first (nvium train)")
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(),
                                    item_names=("params", "meta"))
    steps = manager.all_steps()
    step = manager.latest_step() if step is None else step
    if step not in steps:
        raise ConfigError(f"{run_dir} has no checkpoint at step {step}; it has steps {sorted(steps)}")
    abstract = nnx.eval_shape(lambda: build_model(config.model))
    graphdef, abstract_state = nnx.split(abstract)
    # without a sharding orbax restores the saved one, which needs the training topology
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        nnx.to_pure_dict(abstract_state),
    )
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))
    model = nnx.merge(graphdef, restored["params"])
    tokenizer, bos_id, eos_id = None, None, None
    tok_path = run_dir / "tokenizer.json"
    if tok_path.is_file():
        from nvium_jax.data import load_tokenizer, special_ids

        tokenizer = load_tokenizer(tok_path)
        bos_id, eos_id = special_ids(tokenizer)
    return Run(config, model, tokenizer, int(step), bos_id, eos_id)


def command_line() -> list[str]:
    return [pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]
