"""A run dir in an object store (`s3://` or `gs://bucket/prefix`), worked on through a local
mirror.

orbax-checkpoint 0.12 writes arrays to local paths and to `gs://` only, so a run whose dir is
a bucket URL trains and loads in a local mirror (for `gs://` too: one code path for both
stores) (`<cache>/runs/…`, the cache dir of `nvium_jax.data.corpus.default_cache_dir`) while
the bucket stays the truth:

- **pull** makes the mirror what the bucket holds before training: the run files and every
  checkpoint whose manifest is in the bucket (a checkpoint without one is a write that never
  finished, and is not pulled). `load_run` pulls only the checkpoint it loads, only the files
  of the items it reads, and skips to an older one when a file fails its checksum.
- **push** puts each run file whole (one PUT: an object appears whole or not at all; there is
  no rename) — `metrics.jsonl` is rewritten whole at each push, at most every 10 s and
  before each checkpoint — and a checkpoint's files first, its manifest last: a checkpoint counts only once its manifest exists (the local seal
  rule), and a step written again loses its old manifest before any of its files change.
  Checkpoints that orbax rotates out locally (`train.keep`) are deleted in the bucket; damaged
  ones are copied to `damaged/` before their step is written again, never just deleted.
  While training, a checkpoint uploads in a background thread from a hard-linked snapshot
  (one upload at a time); the end of training (also after SIGTERM) waits for it.
- **the lock** is the object `train.lock`, created only if absent (`If-None-Match: *` on S3,
  `ifGenerationMatch=0` on GCS): of two trainers one PUT succeeds and the other is refused,
  whichever host they run on.

A multi-process run trains in one mirror per process (`…/process-<i>`: hosts share only the
bucket). orbax 0.12's multi-process save needs one directory every host sees, so its
checkpoints go through `GatheredCheckpoints`: each save gathers the whole state to every
process and process 0 alone writes it, a single-process checkpoint of whole arrays, into its
mirror, whence it is pushed; every process restores from its own pulled mirror and keeps its
shards. Only process 0 takes the lock and writes to the bucket. Credentials, region and
endpoint come from each store's standard environment, as for data dirs (`nvium_jax.paths`).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import platform
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from nvium_jax.config import ConfigError
from nvium_jax.paths import check_bucket, object_store, store_error, store_errors, url_scheme
from nvium_jax.runs import (
    CHECKPOINT_ITEMS, MANIFEST, checkpoint_manager, checkpoint_problem, now_utc, step_dirs, take_over_or_refuse,
)

RUN_FILES = ("config.yaml", "tokenizer.json", "provenance.json", "metrics.jsonl",
             "metrics.redone.jsonl")
LOCK = "train.lock"
METRICS_PUSH_S = 10.0  # metrics.jsonl is put at most this often while training (and at the end)


def mirror_root() -> pathlib.Path:
    from nvium_jax.data.corpus import default_cache_dir

    return default_cache_dir() / "runs"


def _writer_only(method):
    """A RunStore method that writes to the bucket: a no-op on every process but process 0."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.writer:
            return method(self, *args, **kwargs)
    return call


class RunStore:
    """The bucket side of a run dir `url` and its local `mirror` (`kind`: "train" for the
    trainer's working copy, "read" for what `load_run` and `nvium eval` read)."""

    def __init__(self, url: str, kind: str = "train", mirror: Optional[pathlib.Path] = None):
        self.url = str(url).rstrip("/")
        self.name = self.url  # how messages name the run dir
        self.root = self.url.split("://", 1)[1]  # bucket/prefix, fsspec's form
        self.mirror = mirror or mirror_root() / kind / url_scheme(url) / self.root
        if mirror is None and kind == "train" and jax.process_count() > 1:  # hosts share no disk
            self.mirror = self.mirror / f"process-{jax.process_index()}"
        self.writer = jax.process_index() == 0  # the one process that writes to the bucket
        self.fs = object_store(url_scheme(url))  # s3fs or gcsfs, from the standard environment
        self.in_bucket: dict[int, str] = {}  # step → the manifest the bucket holds, verified
        self.sent: dict[str, bytes] = {}  # run file → the bytes last put
        self.metrics_pushed_at = 0.0
        self.files_lock = threading.Lock()
        self.pusher: Optional[threading.Thread] = None
        self.push_error: Optional[BaseException] = None

    # ---- requests, each failure one line naming the URL -----------------------------
    def _call(self, doing: str, rel: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError:
            raise
        except store_errors() as err:
            raise store_error(f"{self.url}/{rel}".rstrip("/"), err, doing) from None

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _get(self, rel: str) -> Optional[bytes]:
        """The object's bytes, or None when there is none."""
        try:
            return self.fs.cat_file(self._key(rel))
        except FileNotFoundError:
            return None
        except store_errors() as err:
            raise store_error(f"{self.url}/{rel}", err, "reading") from None

    def _exists(self, rel: str) -> bool:
        return bool(self._call("reading", rel, self.fs.exists, self._key(rel)))

    def _put(self, rel: str, data: bytes) -> None:
        self._call("writing", rel, self.fs.pipe_file, self._key(rel), data)

    def _delete_tree(self, rel: str) -> None:
        if self._call("listing", rel, self.fs.exists, self._key(rel)):
            self._call("deleting", rel, self.fs.rm, self._key(rel), recursive=True)

    def _bucket_steps(self) -> list[int]:
        try:
            names = self.fs.ls(self._key("checkpoints"), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except store_errors() as err:
            raise store_error(f"{self.url}/checkpoints", err, "listing") from None
        return sorted(int(n.rsplit("/", 1)[-1]) for n in names if n.rsplit("/", 1)[-1].isdigit())

    # ---- pulling ---------------------------------------------------------------------
    def _pull_run_files(self, names: Iterable[str]) -> None:
        self.mirror.mkdir(parents=True, exist_ok=True)
        for name in names:
            data = self._get(name)
            if data is None:
                (self.mirror / name).unlink(missing_ok=True)
                continue
            (self.mirror / name).write_bytes(data)
            self.sent[name] = data

    def _pull_step(self, step: int, items: Optional[tuple[str, ...]]) -> Optional[str]:
        """Checkpoint `step` into the mirror (only files that differ from its manifest; with
        `items`, only those items' files); its manifest text, or None when it has none."""
        rel = f"checkpoints/{step}"
        manifest = self._get(f"{rel}/{MANIFEST}")
        if manifest is None:
            return None
        local = self.mirror / "checkpoints" / str(step)
        local.mkdir(parents=True, exist_ok=True)
        (local / MANIFEST).write_bytes(manifest)
        if checkpoint_problem(local, items) is None:
            return manifest.decode()  # already here, whole
        try:
            files = json.loads(manifest)["files"]
        except (ValueError, KeyError, TypeError):
            return manifest.decode()  # unreadable: verification names it
        for name in files:
            parts = pathlib.PurePath(name).parts
            if items is not None and len(parts) > 1 and parts[0] not in items:
                continue
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            try:  # streamed to the file (a checkpoint's objects can be gigabytes)
                self.fs.get_file(self._key(f"{rel}/{name}"), str(local / name))
            except FileNotFoundError:
                continue  # missing: verification names it
            except store_errors() as err:
                raise store_error(f"{self.url}/{rel}/{name}", err, "reading") from None
        return manifest.decode()

    def pull_for_training(self) -> pathlib.Path:
        """The mirror emptied and filled from the bucket: run files and every checkpoint with a
        manifest (the trainer verifies them and sets the damaged ones aside)."""
        if self.mirror.exists():
            shutil.rmtree(self.mirror)
        self._pull_run_files(RUN_FILES)
        for step in self._bucket_steps():
            manifest = self._pull_step(step, None)
            if manifest is not None:  # the trainer verifies it; `set_aside` drops a damaged one
                self.in_bucket[step] = manifest
        return self.mirror

    def pull_run_files(self) -> pathlib.Path:
        """The run files (config.yaml, tokenizer.json, …) in the mirror, which must be a run's."""
        self._pull_run_files(RUN_FILES)
        if not (self.mirror / "config.yaml").is_file():
            raise ConfigError(f"{self.url} is not a run directory: it has no config.yaml")
        return self.mirror

    def pull_for_load(self, step: Optional[int], items: tuple[str, ...]) -> pathlib.Path:
        """The run files and one checkpoint (`step`, else the newest whose `items` pass their
        checksums; a damaged one is named and skipped) in the read mirror, which keeps what
        it already holds and verifies."""
        self.pull_run_files()
        steps = self._bucket_steps()
        local = self.mirror / "checkpoints"
        for stale in (p for p in local.iterdir() if p.name.isdigit() and int(p.name) not in steps) \
                if local.is_dir() else ():
            shutil.rmtree(stale)  # rotated out of the bucket since the last pull
        for candidate in ([step] if step is not None else sorted(steps, reverse=True)):
            if candidate not in steps:
                break  # named by verified_step, which lists the steps
            if self._pull_step(candidate, items) is None:
                continue  # a write that never finished
            problem = checkpoint_problem(local / str(candidate), items)
            if problem is None or step is not None:
                break  # the chosen one (a given step that fails is named by verified_step)
            print(f"warning: checkpoint {candidate} of {self.url} fails verification: {problem}; "
                  f"skipping it", file=sys.stderr)
            shutil.rmtree(local / str(candidate))
        return self.mirror

    # ---- pushing ---------------------------------------------------------------------
    @_writer_only
    def push_files(self, names: Iterable[str] = RUN_FILES) -> None:
        """Each named run file in the mirror that changed since it was last put, put whole."""
        with self.files_lock:  # the background push puts metrics.jsonl too
            for name in names:
                path = self.mirror / name
                if not path.is_file():
                    continue
                data = path.read_bytes()
                if self.sent.get(name) != data:
                    self._put(name, data)
                    self.sent[name] = data

    @_writer_only
    def push_metrics(self, force: bool = False) -> None:
        if force or time.monotonic() - self.metrics_pushed_at >= METRICS_PUSH_S:
            self.push_files(("metrics.jsonl",))
            self.metrics_pushed_at = time.monotonic()

    def _plan(self) -> tuple[list[tuple[int, str, pathlib.Path]], list[int]]:
        """What the bucket lacks: (step, manifest, a hard-linked snapshot of the step dir —
        orbax may rotate the original out while it uploads) for each sealed checkpoint whose
        manifest the bucket does not hold, and the steps that left the mirror."""
        local = {s: d for s, d in step_dirs(self.mirror).items() if (d / MANIFEST).is_file()}
        new = []
        for step, step_dir in sorted(local.items()):
            manifest = (step_dir / MANIFEST).read_text()
            if self.in_bucket.get(step) != manifest:
                new.append((step, manifest, _snapshot(step_dir, self.mirror / ".push" / str(step))))
        return new, [s for s in self.in_bucket if s not in local]

    def _push(self, plan) -> None:
        """Each new checkpoint: the old manifest deleted, the step's objects replaced, the
        manifest put last; then the rotated steps deleted."""
        new, rotated = plan
        for step, manifest, staged in new:
            rel = f"checkpoints/{step}"
            self.push_metrics(force=True)  # the bucket's metrics reach every checkpoint it holds
            if self._exists(f"{rel}/{MANIFEST}"):
                self._call("deleting", f"{rel}/{MANIFEST}", self.fs.rm_file, self._key(f"{rel}/{MANIFEST}"))
            self._delete_tree(rel)  # a damaged copy was set aside first (set_aside)
            for path in sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST):
                name = f"{rel}/{path.relative_to(staged).as_posix()}"  # streamed; multipart when large
                self._call("writing", name, self.fs.put_file, str(path), self._key(name))
            self._put(f"{rel}/{MANIFEST}", manifest.encode())
            self.in_bucket[step] = manifest
            shutil.rmtree(staged, ignore_errors=True)
        for step in rotated:
            self._delete_tree(f"checkpoints/{step}")
            del self.in_bucket[step]

    def _push_in_background(self, plan) -> None:
        try:
            self._push(plan)
        except BaseException as err:  # re-raised in the training thread by wait()
            self.push_error = err

    def wait(self) -> None:
        """Until the background push is done; its error, if it failed, raised here."""
        if self.pusher is not None:
            self.pusher.join()
            self.pusher = None
        if self.push_error is not None:
            err, self.push_error = self.push_error, None
            raise err

    @_writer_only
    def push_checkpoints(self) -> None:
        """Every sealed checkpoint the bucket lacks, pushed now (after any background push)."""
        self.wait()
        self._push(self._plan())

    @_writer_only
    def push_checkpoints_async(self) -> None:
        """The same in a background thread, so that training goes on while a checkpoint
        uploads; one push at a time (a call while one runs returns, and a later call takes
        what is new). A failed push is raised at the next call."""
        if self.pusher is not None and self.pusher.is_alive():
            return
        self.wait()
        plan = self._plan()
        if plan[0] or plan[1]:
            self.pusher = threading.Thread(target=self._push_in_background, args=(plan,),
                                           name="nvium-push", daemon=True)
            self.pusher.start()

    @_writer_only
    def set_aside(self, steps: list[int]) -> None:
        """Damaged checkpoints copied to `damaged/checkpoint-STEP-STAMP/` in the bucket (kept,
        never deleted) and removed from `checkpoints/`, as `runs.set_aside` moves them locally."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        for step in steps:
            rel, target = f"checkpoints/{step}", f"damaged/checkpoint-{step}-{stamp}"
            if not self._exists(rel):
                continue
            source = self._key(rel)
            for key in self._call("listing", rel, self.fs.find, source):  # object by object:
                # a recursive copy also tries the prefix itself as an object (gcsfs), in vain
                self._call("copying", rel, self.fs.cp_file, key, self._key(target) + key[len(source):])
            self._delete_tree(rel)
            self.in_bucket.pop(step, None)
            print(f"moved damaged checkpoint {step} to {self.url}/{target}", file=sys.stderr)

    @_writer_only
    def push_tree(self, rel: str) -> None:
        """Every file under `rel` of the mirror (e.g. an evaluation's outputs), put whole."""
        for path in sorted(p for p in (self.mirror / rel).rglob("*") if p.is_file()):
            self._put(path.relative_to(self.mirror).as_posix(), path.read_bytes())

    def push_all(self) -> None:
        self.push_checkpoints()  # waits for a background push first
        self.push_files()

    def checkpoint_manager(self, run_dir: pathlib.Path, keep: int):
        """orbax's manager of the mirror; `GatheredCheckpoints` for a multi-process run."""
        if jax.process_count() > 1:
            return GatheredCheckpoints(run_dir, keep)
        return checkpoint_manager(run_dir, keep)

    # ---- one trainer per run dir -------------------------------------------------------
    def lock(self) -> "BucketLock":
        return BucketLock(self)

    @contextmanager
    def training_lock(self):
        """The bucket's lock, held by process 0 for the whole run; in a multi-process run
        every process learns whether it was taken (else each ends with process 0's error)."""
        if jax.process_count() == 1:
            with self.lock():
                yield
            return
        from jax.experimental import multihost_utils

        held, error = None, None
        if self.writer:
            try:
                held = self.lock().__enter__()
            except ConfigError as err:
                error = err
        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not taken:
            raise error or ConfigError(f"{self.url}: process 0 could not take the run's lock "
                                       f"(see its error)")
        try:
            yield
        finally:
            if held is not None:
                held.__exit__(None, None, None)


class BucketLock:
    """`train.lock` in the bucket, created only if absent (`If-None-Match: *`): it names the
    owner (pid, host, start time). A second trainer refuses in one line; a lock left by a
    dead process on this host is taken over, as the local `RunDirLock` does."""

    def __init__(self, store: RunStore):
        self.store, self.held = store, False

    def __enter__(self):
        me = json.dumps({"pid": os.getpid(), "host": platform.node(), "started": now_utc()}).encode()
        key = self.store._key(LOCK)
        for _ in range(3):
            try:  # created only if absent: the precondition is the lock (an existing lock is
                # also looked for first, for servers that ignore the precondition, e.g. emulators)
                if self.store._get(LOCK) is not None:
                    raise FileExistsError(key)
                self.store.fs.pipe_file(key, me, mode="create")
            except FileExistsError:
                raw = self.store._get(LOCK)
                try:
                    owner = {} if raw is None else json.loads(raw)
                except ValueError:
                    owner = None
                take_over_or_refuse(owner, self.store.url)
                self.store._call("deleting", LOCK, self.store.fs.rm_file, key)
                continue
            except store_errors() as err:
                raise store_error(f"{self.store.url}/{LOCK}", err, "writing") from None
            self.held = True
            return self
        raise ConfigError(f"could not take {self.store.url}/{LOCK}: another process keeps creating it")

    def __exit__(self, *exc):
        if self.held:
            try:
                self.store.fs.rm_file(self.store._key(LOCK))
            except store_errors():
                print(f"warning: could not remove {self.store.url}/{LOCK}; remove it before the "
                      f"next run", file=sys.stderr)
            self.held = False
        return False


class GatheredCheckpoints:
    """The checkpoints of a multi-process run into a bucket, with the calls of orbax's
    `CheckpointManager` that training makes. orbax 0.12's multi-process save needs one
    directory every host sees (its primary host creates the directories the others write
    into), and here each process has only its own mirror. So a save gathers the whole state
    to every process (`process_allgather`) and process 0 alone writes it, as one process
    would, into its mirror (whence it is sealed and pushed); a restore reads whole arrays
    from this process's own mirror (pulled from the bucket) and keeps this process's shards.
    The checkpoint is the one a single process writes; the cost is the whole state in each
    host's memory at a save, and the gather's traffic."""

    def __init__(self, run_dir: pathlib.Path, keep: int):
        self.directory = (pathlib.Path(run_dir) / "checkpoints").absolute()
        self.keep, self.process = keep, jax.process_index()
        self.manager = self._own_manager()

    def _own_manager(self):
        """orbax's manager over this process alone (its barriers wait for no other host)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, enable_async_checkpointing=True, create=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=self.process, active_processes={self.process},
                barrier_sync_key_prefix=f"nvium-process-{self.process}"))
        return ocp.CheckpointManager(self.directory, options=options, item_names=CHECKPOINT_ITEMS)

    def save(self, step: int, args) -> None:
        from jax.experimental import multihost_utils

        items = {name: ocp.args.StandardSave(multihost_utils.process_allgather(arg.item, tiled=True))
                 if isinstance(arg, ocp.args.StandardSave) else arg for name, arg in args.items()}
        if self.process == 0:
            self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, args) -> dict:
        whole = lambda target: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        items = {name: ocp.args.PyTreeRestore(item=arg.item, restore_args=whole(arg.item))
                 if isinstance(arg, ocp.args.StandardRestore) else arg for name, arg in args.items()}
        reader = self._own_manager()  # its handlers are the restore's (PyTree, not Standard)
        try:
            restored = reader.restore(step, args=ocp.args.Composite(**items))
        finally:
            reader.close()
        shard = lambda target, array: jax.make_array_from_callback(
            target.shape, target.sharding, lambda index: array[index])
        return {name: jax.tree.map(shard, arg.item, restored[name])
                if isinstance(arg, ocp.args.StandardRestore) else restored[name] for name, arg in args.items()}

    def is_saving_in_progress(self) -> bool:
        return self.manager.is_saving_in_progress()

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _snapshot(step_dir: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """`step_dir`'s files hard-linked under `target` (copied where links fail): instant, and
    unaffected when orbax deletes the original."""
    if target.exists():
        shutil.rmtree(target)
    for path in step_dir.rglob("*"):
        if path.is_file():
            copy = target / path.relative_to(step_dir)
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, copy)
            except OSError:
                shutil.copy2(path, copy)
    return target


def open_run(value, what: str, kind: str = "train") -> Optional[RunStore]:
    """The store of a run dir URL (its bucket checked), or None for a local path. A URL of
    another scheme is refused in one line (`paths.run_location`)."""
    from nvium_jax.paths import run_location

    run_location(value, what)
    if url_scheme(value) is None:
        return None
    check_bucket(str(value), what)
    return RunStore(str(value), kind)
