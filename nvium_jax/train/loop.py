"""`nvium train`: validate everything, build the sharded step, restore or initialise,
then loop — logging, held-out evaluation, async checkpoints, clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import pathlib
import signal
import sys
import time
from typing import Optional

import jax
import numpy as np

from nvium_jax.config import Config, ConfigError, TrainConfig
from nvium_jax.data import TrainBatches, eval_windows, resolve_data_dir
from nvium_jax.paths import local_path
from nvium_jax.run_store import open_run
from nvium_jax.runs import (
    RunDirLock, checkpoint_manager, command_line, config_changes, has_checkpoints,
    holds_train_state, read_run_config, restore_checkpoint, restore_params, save_checkpoint,
    seal_finished, set_aside, step_dirs, verified_step, write_run_files,
)
from nvium_jax.train import beta as beta_controller
from nvium_jax.train.mesh import batch_sharding, data_parallel_size, make_mesh
from nvium_jax.train.metrics import MetricsSink, mfu
from nvium_jax.train.optimizer import lr_schedule
from nvium_jax.train.step import (
    TrainState, abstract_state, make_trainer, micro_batches, router_warmup_steps, step_batch_shape,
)

SYNC_EVERY = 10  # fetch a scalar at least this often: queued CPU collectives can deadlock


class NonFiniteLoss(RuntimeError):
    pass


def check_resume(config: Config, run_dir: pathlib.Path, name: Optional[str] = None) -> bool:
    """True when the run dir holds checkpoints this config may resume; else a ConfigError
    listing the differences, before anything in the dir is touched."""
    if not has_checkpoints(run_dir):
        return False
    saved = read_run_config(run_dir)
    errors, warnings = config_changes(saved, config)
    if errors:
        raise ConfigError(
            f"run dir {name or run_dir} holds checkpoints of another model; these keys differ: "
            f"{'; '.join(errors)} — use another run.dir or the run's own config.yaml"
        )
    for change in warnings:
        print(f"warning: resuming {name or run_dir} with a changed {change}", file=sys.stderr)
    note = schedule_change(saved.train, config.train, max(step_dirs(run_dir)))
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return True


def schedule_change(old: TrainConfig, new: TrainConfig, step: int) -> Optional[str]:
    """What a resume at `step` with another schedule does: the learning rate there under
    both, and where the router warm-up ends (both are functions of `train.steps`)."""
    keys = ("steps", "lr", "schedule", "warmup_steps", "min_lr_ratio", "decay_frac", "router_warmup_frac")
    changed = [k for k in keys if getattr(old, k) != getattr(new, k)]
    if not changed:
        return None
    lr_old, lr_new = float(lr_schedule(old)(step)), float(lr_schedule(new)(step))
    warm_old = int(old.router_warmup_frac * old.steps)
    warm_new = int(new.router_warmup_frac * new.steps)
    note = (f"{', '.join(f'train.{k} {getattr(old, k)} → {getattr(new, k)}' for k in changed)} at step "
            f"{step}: the learning rate there goes {lr_old:.3g} → {lr_new:.3g} (the schedule now spans "
            f"{new.steps} steps), the router warm-up ends at step {warm_new} (was {warm_old})")
    if warm_old <= step < warm_new:
        note += " — this run goes back into router warm-up"
    return note


EMBEDDED_TOKENS = 1.0e6  # the embedded corpus, about (KJV; the count depends on the tokenizer)
EMBEDDED_MAX_PARAMS = 20_000_000  # the tiny configs are ≈ 2 M parameters


def check_data(config: Config) -> None:
    """A model larger than the tiny ones refuses the embedded corpus unless asked."""
    from nvium_jax.model.count import param_count

    if config.data.path is not None or config.data.allow_embedded:
        return
    params = param_count(config.model)
    if params <= EMBEDDED_MAX_PARAMS:
        return
    t = config.train
    tokens = t.steps * t.batch_size * config.model.context
    raise ConfigError(
        f"data.path is null, so this {params / 1e6:,.0f}M-parameter model would train on the "
        f"embedded corpus (≈ {EMBEDDED_TOKENS / 1e6:.0f} M tokens): {tokens / 1e9:,.2f} B tokens "
        f"= ≈ {tokens / EMBEDDED_TOKENS:,.0f} epochs of it; prepare a corpus with `nvium prepare "
        f"--input FILES --out DIR` and set data.path=DIR (or data.allow_embedded=true)")


def check_batch(config: Config, n_data_parallel: int) -> None:
    train = config.train
    micro = train.batch_size // train.grad_accum
    if micro % n_data_parallel:
        raise ConfigError(
            f"train.batch_size={train.batch_size} / train.grad_accum={train.grad_accum} = {micro} "
            f"sequences per micro-batch is not divisible by the data-parallel size "
            f"{n_data_parallel} (mesh.data × mesh.fsdp); change the batch or the mesh"
        )
    if train.batch_size % (jax.process_count() * train.grad_accum):
        raise ConfigError(
            f"train.batch_size={train.batch_size} must split evenly over {jax.process_count()} "
            f"processes × train.grad_accum={train.grad_accum}"
        )


def to_global(local: np.ndarray, sharding, global_shape) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag


def evaluate(trainer, params, beta, windows_NxBxT1: np.ndarray, sharding) -> dict:
    """Mean held-out metrics over fixed validation batches, the depth cost at `beta`."""
    results = []
    n_proc, proc = jax.process_count(), jax.process_index()
    for batch in windows_NxBxT1:
        rows = batch.shape[0] // n_proc
        local = batch[proc * rows:(proc + 1) * rows]
        results.append(jax.device_get(trainer.eval_fn(params, beta, to_global(local, sharding, batch.shape))))
    mean = {k: np.mean([r._asdict()[k] for r in results], axis=0) for k in results[0]._fields}
    return {f"val_{_metric_name(k)}": _plain(v) for k, v in mean.items()}


def _metric_name(key: str) -> str:
    """The logged name of a metric: `exit_ce_K` → `exit_ce` (a list, shallow → final)."""
    return key[:-2] if key.endswith("_K") else key


def _plain(value):
    value = np.asarray(value)
    return value.tolist() if value.ndim else float(value)


def train(config: Config, command: Optional[list[str]] = None) -> dict:
    """Runs (or resumes) training to `train.steps`; returns the last logged records. A run
    dir in a bucket (`s3://…`, `gs://…`) trains in a local mirror that is pulled first and pushed as
    it goes (`nvium_jax.run_store`), under a lock object in the bucket."""
    store = open_run(config.run.dir, "run.dir")
    if store is None:
        run_dir = local_path(config.run.dir, "run.dir")
        return _train(config, command, run_dir, LocalRun(run_dir))
    with store.training_lock():
        store.pull_for_training()  # by every process, into its own mirror
        try:
            summary = _train(config, command, store.mirror, store)
        except BaseException:  # whatever was sealed is pushed; the error that stopped training
            # is the one raised, a failed push only named beside it
            try:
                store.push_all()
            except Exception as err:
                print(f"warning: pushing to {store.url} after the error below failed too: {err}",
                      file=sys.stderr)
            raise
        store.push_all()
        return summary


def _train(config, command, run_dir, store) -> dict:
    check_data(config)
    resuming = check_resume(config, run_dir, store.name)
    mesh = make_mesh(config.mesh)
    check_batch(config, data_parallel_size(mesh))
    data_dir = resolve_data_dir(config)
    beta_controller.check_beta_match(config, data_dir)
    trainer = make_trainer(config, mesh)
    with RunDirLock(run_dir):  # before anything in the run dir is written
        return _train_locked(config, command, run_dir, resuming, mesh, data_dir, trainer, store)


class LocalRun:
    """A local run dir: nothing to push (the `RunStore` interface the loop calls)."""

    def __init__(self, run_dir):
        self.name = str(run_dir)  # how messages name the run dir

    def set_aside(self, steps):
        pass

    def push_files(self, names=()):
        pass

    def push_metrics(self, force=False):
        pass

    def push_checkpoints_async(self):
        pass

    def checkpoint_manager(self, run_dir, keep):
        return checkpoint_manager(run_dir, keep)


def _train_locked(config, command, run_dir, resuming, mesh, data_dir, trainer, store) -> dict:
    train_cfg, context = config.train, config.model.context
    step = None
    if resuming:  # the newest checkpoint that passes its checksums; newer damaged ones set aside
        step, damaged = verified_step(run_dir, name=store.name)
        same_step_everywhere(step, store.name)
        store.set_aside(damaged)  # in the bucket, before its local copy moves
        set_aside(run_dir, damaged)
    batches = TrainBatches(
        data_dir, context=context, global_batch=train_cfg.batch_size, seed=train_cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        workers=config.data.workers, prefetch=config.data.prefetch,
    )
    manager = store.checkpoint_manager(run_dir, train_cfg.keep)
    try:
        if resuming and not holds_train_state(run_dir, step):
            # parameters only (an import): a fresh optimizer and data order
            state = trainer.init_fn()
            state = state._replace(params=restore_params(manager, step, abstract_state(trainer).params))
            print(f"starting {store.name} from the parameters of its checkpoint {step}", file=sys.stderr)
        elif resuming:
            restored, data_state = restore_checkpoint(manager, step, abstract_state(trainer))
            counters = restored["counters"]
            state = TrainState(counters["step"], restored["params"], restored["opt_state"],
                               counters["beta"], counters["skipped"])
            batches.set_state(data_state)
            print(f"resuming {store.name} from step {step}", file=sys.stderr)
        else:
            state = trainer.init_fn()
        write_run_files(run_dir, config, data_dir / "tokenizer.json", command or command_line())
        store.push_files()
        micro = train_cfg.batch_size // train_cfg.grad_accum
        val = eval_windows(data_dir, context=context, batch=micro, n_batches=train_cfg.eval_batches)
        sink = MetricsSink(run_dir, config, int(jax.device_get(state.step)))
        try:
            with _StopRequest() as stop:
                return _loop(config, trainer, state, batches, manager, sink, stop, val,
                             batch_sharding(mesh), run_dir, store)
        finally:
            sink.close()
    finally:
        manager.wait_until_finished()
        seal_finished(run_dir, manager)
        manager.close()
        batches.close()


def same_step_everywhere(step: int, name: str) -> None:
    """Every process resumes from the same checkpoint (a bucket run's processes each verify
    their own pulled copy): else one line, on every process, before any collective waits."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    steps = sorted(set(int(s) for s in multihost_utils.process_allgather(np.int64(step))))
    if len(steps) > 1:
        raise ConfigError(f"the processes of {name} would resume from different checkpoints "
                          f"({steps}): one's copy fails verification; run again")


def _loop(config, trainer, state, batches, manager, sink, stop, val, val_sharding, run_dir,
          store) -> dict:
    train_cfg = config.train
    tokens_per_step = train_cfg.batch_size * config.model.context
    global_shape = step_batch_shape(config)
    step = int(jax.device_get(state.step))
    summary: dict = {"start_step": step}
    if step == 0:  # a resumed run logged its evaluations already
        state, summary["eval"] = _log_eval(sink, trainer, state, val, val_sharding, step, config)
    pending, last_sync, last_good = [], time.time(), (step or None)
    spike_watch = SpikeWatch()
    profile_at = step + 5 if train_cfg.profile_steps else None
    while step < train_cfg.steps:
        if profile_at is not None and step == profile_at:
            jax.profiler.start_trace(str(run_dir / "profile"))
        local = micro_batches(next(batches), train_cfg.grad_accum)
        state, metrics = trainer.step_fn(state, to_global(local, trainer.batch_sharding, global_shape))
        step += 1
        pending.append(metrics)
        if profile_at is not None and step == profile_at + train_cfg.profile_steps:
            jax.block_until_ready(state.step)
            jax.profiler.stop_trace()
        boundary = (step % train_cfg.log_every == 0 or step % train_cfg.checkpoint_every == 0
                    or step % train_cfg.eval_every == 0 or step == train_cfg.steps)
        if not (boundary or len(pending) >= SYNC_EVERY):
            continue
        stopping = stop.requested()  # at the same steps on every process
        records = jax.device_get(pending)
        now = time.time()
        _check_finite(records, step - len(records) + 1, train_cfg.on_nonfinite, last_good)
        record = _train_record(records[-1], step, len(records) * tokens_per_step / (now - last_sync), config)
        spikes = [step - len(records) + 1 + i for i, r in enumerate(records) if spike_watch(float(r["loss"]))]
        if spikes:
            record["loss_spike_steps"] = spikes
            sink.note(f"[yellow]loss spike at step {', '.join(map(str, spikes))}[/yellow] "
                      f"(over {spike_watch.factor}× the running mean {spike_watch.mean:.4f})")
        pending, last_sync = [], now
        if step % train_cfg.log_every == 0 or step == train_cfg.steps or spikes:
            sink.log(record)
            sink.progress(record)
            summary["train"] = record
            store.push_metrics()
        if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
            state, summary["eval"] = _log_eval(sink, trainer, state, val, val_sharding, step, config)
            last_sync = time.time()  # evaluation time is not training throughput
        seal_finished(run_dir, manager)  # the last async save, once orbax has committed it
        store.push_checkpoints_async()  # a sealed checkpoint uploads while training goes on
        if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps or stopping:
            save_checkpoint(manager, state, batches.get_state(), config)
            last_good = step
        if stopping:
            print(f"stopped by signal at step {step}; checkpoint saved in {store.name} — "
                  f"run the same command to resume", file=sys.stderr)
            summary["stopped_at"] = step
            break
    summary["step"] = step
    return summary


class SpikeWatch:
    """Flags a loss more than `factor` × the running mean of the losses before it (an
    exponential mean over synced steps, after `warmup` of them)."""

    def __init__(self, factor: float = 1.5, warmup: int = 20, decay: float = 0.9):
        self.factor, self.warmup, self.decay = factor, warmup, decay
        self.mean, self.seen = None, 0

    def __call__(self, loss: float) -> bool:
        if not np.isfinite(loss):
            return False
        spike = self.seen >= self.warmup and loss > self.factor * self.mean
        if not spike:  # a spike does not pull the reference up
            self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
            self.seen += 1
        return spike


def _check_finite(records, first_step: int, policy: str, last_good: Optional[int]) -> None:
    for offset, record in enumerate(records):
        if not bool(record["finite"]) and policy == "stop":
            kept = ("no checkpoint was saved yet" if last_good is None
                    else f"the last good checkpoint is step {last_good}")
            raise NonFiniteLoss(
                f"non-finite loss at step {first_step + offset}; stopped without saving it — "
                f"{kept}; set train.on_nonfinite=skip to skip such steps"
            )


def _train_record(metrics: dict, step: int, tokens_per_s: float, config: Config) -> dict:
    record = {"step": step}
    for key, value in metrics.items():
        if key != "finite":
            record[_metric_name(key)] = _plain(value)
    record["router_warmup"] = bool(metrics["router_warmup"])
    record["tokens_per_s"] = tokens_per_s
    record["mfu"] = mfu(tokens_per_s, config.model, config.model.context)
    return record


def _log_eval(sink, trainer, state, val, sharding, step: int, config: Config):
    """Held-out metrics at the β in force, then the β controller's step (the new β goes into
    the state, and so into the checkpoint saved at this step); returns (state, record)."""
    record = {"step": step, **evaluate(trainer, state.params, state.beta, val, sharding)}
    old_beta = np.float32(jax.device_get(state.beta))
    update = beta_controller.update(float(old_beta), record["val_mixture_ce"],
                                    step, config.train, router_warmup_steps(config))
    new_beta = np.float32(update.beta)  # as the state holds it
    record.update(beta_target_ce=update.target_ce, beta_gap=update.gap, beta=float(new_beta))
    if new_beta != old_beta:
        state = state._replace(beta=jax.make_array_from_callback(
            (), trainer.state_shardings.beta, lambda _: new_beta))
        sink.note(f"[magenta]β → {update.beta:.4f}[/magenta] (target CE {update.target_ce:.4f}, "
                  f"gap {update.gap:+.4f})")
    sink.log(record)
    sink.note(f"[cyan]eval step {step}[/cyan] · val loss {record['val_loss']:.4f} · "
              f"val ce {record['val_mixture_ce']:.4f} · exit ce "
              f"{', '.join(f'{c:.3f}' for c in record['val_exit_ce'])} · exit mass "
              f"{', '.join(f'{m:.2f}' for m in record['val_exit_mass'])}")
    return state, record
