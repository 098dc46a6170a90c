"""The run directory: config.yaml, tokenizer.json, provenance.json, metrics.jsonl and orbax
checkpoints (params, optimizer state, counters, data-iterator state); `load_run`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from nvium_jax.compile_cache import enable_compile_cache
from nvium_jax.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config
from nvium_jax.model import build_model
from nvium_jax.paths import atomic_write_text, is_url

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
        if key.startswith("model.") and key != "model.dtype":  # the compute dtype changes no shape
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


CHECKPOINT_ITEMS = ("params", "opt_state", "counters", "data", "meta")


def checkpoint_manager(run_dir: pathlib.Path, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(), options=options, item_names=CHECKPOINT_ITEMS,
    )


def has_checkpoints(run_dir: pathlib.Path) -> bool:
    return bool(step_dirs(run_dir))


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
                                    "saved": now_utc()}),
        ),
    )


def save_initial_params(run_dir: pathlib.Path, params, config: Config, source: dict) -> None:
    """Checkpoint 0 holding parameters only (an import, e.g. from Hugging Face): `nvium
    train` starts from them with a fresh optimizer and data order; `load_run` reads them."""
    manager = checkpoint_manager(run_dir, async_save=False)
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"step": 0, "config": config_to_dict(config), "saved": now_utc(),
                                "initial_params": source}),
    ))
    manager.wait_until_finished()
    seal_finished(run_dir, manager)
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


# ---- checkpoint integrity: a checksum manifest per committed checkpoint --------------
MANIFEST = "nvium-manifest.json"  # {"files": {relative path: {"bytes", "sha256"}}}


def step_dirs(run_dir: pathlib.Path) -> dict[int, pathlib.Path]:
    """The committed checkpoints, by step (orbax's temporary dirs are not digits)."""
    ckpt = pathlib.Path(run_dir) / "checkpoints"
    if not ckpt.is_dir():
        return {}
    return {int(p.name): p for p in ckpt.iterdir() if p.name.isdigit() and p.is_dir()}


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(step_dir: pathlib.Path) -> None:
    """Writes the manifest of a finished checkpoint: every file's size and SHA-256."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"files": {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                          for p in files}}
    atomic_write_text(step_dir / MANIFEST, json.dumps(manifest, indent=1))


def seal_finished(run_dir: pathlib.Path, manager) -> None:
    """Seals every committed checkpoint without a manifest, once orbax has finished writing."""
    if jax.process_index() != 0 or manager.is_saving_in_progress():
        return
    for step_dir in step_dirs(run_dir).values():
        if not (step_dir / MANIFEST).is_file():
            seal(step_dir)


def checkpoint_problem(step_dir: pathlib.Path, items: Optional[tuple[str, ...]] = None) -> Optional[str]:
    """None when the checkpoint matches its manifest; else what is wrong with it. With
    `items` (e.g. ("params",) for `load_run`) only the files of those items are hashed."""
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "it has no checksum manifest (the writer stopped before sealing it)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, entry in files.items():
        parts = pathlib.PurePath(name).parts
        if items is not None and len(parts) > 1 and parts[0] not in items:
            continue  # another item's file (the checkpoint's own top-level files always count)
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, not the {entry['bytes']} it was written with"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum (damaged bytes)"
    return None


def _legacy(steps: dict) -> bool:
    """A run written before manifests existed: no checkpoint of it has one."""
    return not any((d / MANIFEST).is_file() for d in steps.values())


def verified_step(run_dir: pathlib.Path, step: Optional[int] = None,
                  items: Optional[tuple[str, ...]] = None,
                  name: Optional[str] = None) -> tuple[int, list[int]]:
    """(the newest checkpoint that passes verification — or `step`, which must — and the
    newer damaged ones); `items` limits what is hashed. Each damaged checkpoint is named on
    stderr; none good is an error. `name`: how messages name the run dir (its URL, for a
    local mirror of a bucket)."""
    steps = step_dirs(run_dir)
    label = name or run_dir
    if not steps:
        raise ConfigError(f"{label} has no checkpoints yet; train it first (nvium train)")
    if step is not None and step not in steps:
        raise ConfigError(f"{label} has no checkpoint at step {step}; it has steps {sorted(steps)}")
    if _legacy(steps):
        chosen = max(steps) if step is None else step
        print(f"warning: {label} predates checksum manifests; checkpoint {chosen} is loaded unverified",
              file=sys.stderr)
        return chosen, []
    damaged = []
    for candidate in sorted(steps, reverse=True) if step is None else [step]:
        problem = checkpoint_problem(steps[candidate], items)
        if problem is None:
            return candidate, damaged
        print(f"warning: checkpoint {candidate} of {label} fails verification: {problem}; "
              f"skipping it", file=sys.stderr)
        damaged.append(candidate)
    good = [s for s in sorted(steps) if s not in damaged and checkpoint_problem(steps[s], items) is None]
    raise ConfigError(
        f"checkpoint {step} of {label} fails verification; good checkpoints: {good}" if step is not None
        else f"no checkpoint of {label} passes verification ({len(damaged)} damaged); nothing was "
             f"loaded or changed — restore the checkpoints from a copy or start a new run.dir")


def set_aside(run_dir: pathlib.Path, steps: list[int]) -> None:
    """Moves damaged checkpoints to RUN_DIR/damaged/ (kept, never deleted), so that training
    can write those steps again."""
    if jax.process_index() != 0 or not steps:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    (run_dir / "damaged").mkdir(exist_ok=True)
    for step in steps:
        target = run_dir / "damaged" / f"checkpoint-{step}-{stamp}"
        shutil.move(str(run_dir / "checkpoints" / str(step)), target)
        print(f"moved damaged checkpoint {step} to {target}", file=sys.stderr)


# ---- one training process per run dir -----------------------------------------------
def take_over_or_refuse(owner: Optional[dict], run_dir) -> None:
    """A lock found held: a live owner's (or another host's) refuses in one line naming it;
    a dead process's on this host, or an unreadable one (None), is taken over (said on
    stderr) — the caller then removes it and tries again."""
    if owner is not None and not RunDirLock._stale(owner):
        raise ConfigError(
            f"run dir {run_dir} is in use by pid {owner.get('pid')} on host "
            f"{owner.get('host')} (since {owner.get('started')}); wait for it or stop it, "
            f"or train into another run.dir") from None
    what = "an unreadable lock" if owner is None else f"the lock of dead pid {owner.get('pid')}"
    print(f"taking over {what} in {run_dir}", file=sys.stderr)


class RunDirLock:
    """RUN_DIR/train.lock names the owning process (pid, host, start time). A second
    trainer refuses in one line; a lock left by a dead process on this host is taken over."""

    def __init__(self, run_dir: pathlib.Path):
        self.path = pathlib.Path(run_dir) / "train.lock"
        self.held = False

    def __enter__(self):
        if jax.process_index() != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": platform.node(), "started": now_utc()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                take_over_or_refuse(self._owner(), self.path.parent)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise ConfigError(f"could not take {self.path}: another process keeps creating it")

    def _owner(self) -> Optional[dict]:
        for _ in range(20):  # the owner may be writing it this very moment
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return {}
            except (OSError, ValueError):
                time.sleep(0.05)
        return None

    @staticmethod
    def _stale(owner: dict) -> bool:
        if not owner:
            return True  # removed meanwhile
        if owner.get("host") != platform.node():
            return False  # another host's process: we cannot tell, so it stands
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False


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
        "time": now_utc(),
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


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_run_files(run_dir: pathlib.Path, config: Config, tokenizer_path: Optional[pathlib.Path],
                    command: list[str]) -> None:
    """config.yaml (the resolved config), tokenizer.json (when there is one), and
    provenance.json, which keeps the first launch and appends every resume."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    if tokenizer_path is not None and (is_url(tokenizer_path) or  # a data dir in a bucket
                                       tokenizer_path.resolve() != (run_dir / "tokenizer.json").resolve()):
        atomic_write_text(run_dir / "tokenizer.json", tokenizer_path.read_text(encoding="utf-8"))
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
    `run_dir` may be an `s3://` or `gs://` URL: the run files and the one checkpoint it
    loads are mirrored locally first (`nvium_jax.run_store`).
    It turns on JAX's persistent compilation cache (`nvium_jax.compile_cache`; off with
    NVIUM_COMPILE_CACHE=off), so a new process decodes without compiling again.
    """
    enable_compile_cache()
    from nvium_jax.run_store import open_run

    store = open_run(run_dir, "run dir", kind="read")
    name = str(run_dir)
    if store is not None:  # a bucket: the run files and this one checkpoint's params, mirrored
        run_dir = store.pull_for_load(step, items=("params",))
    run_dir = pathlib.Path(run_dir)
    config = read_run_config(run_dir)
    step, _ = verified_step(run_dir, step, items=("params",), name=name)  # what it reads
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(),
                                    item_names=("params", "meta"))
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
