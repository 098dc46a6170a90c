"""Training batches with grain, as a pure function of (seed, step); held-out eval windows.

Windows: window j of a split is tokens[j·T : j·T + T + 1] (T = context) — stride T, so
consecutive windows share one token and every token but the first is a target exactly
once per epoch; documents are packed across window boundaries. Order: the windows of all
epochs form one stream, epoch e a seeded permutation of [0, N) from (seed, e); global
batch i is stream items [i·B, (i+1)·B) (it may straddle two epochs) and process h of H
takes rows [h·B/H, (h+1)·B/H) — so any number of processes trains on the same batches.
"""

from __future__ import annotations

import os

import numpy as np

from nvium_jax.data.store import DataError, open_tokens, read_meta, read_windows
from nvium_jax.paths import data_location

_ROUNDS = 4  # Feistel rounds of the window permutation
_MAX_STEPS = 1 << 62  # the batch stream is endless; grain needs a length


def window_count(n_tokens: int, context: int) -> int:
    """Windows of context+1 tokens at stride context in a split of `n_tokens`."""
    return max(0, (n_tokens - 1) // context)


def _mix64(x_N: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a cheap, well-mixed hash of 64-bit words (wraps mod 2**64)
    x_N = (x_N ^ (x_N >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x_N = (x_N ^ (x_N >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x_N ^ (x_N >> np.uint64(31))


def permute(index_N: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded bijection of [0, n) applied to `index_N`: Feistel network + cycle walking."""
    index_N = np.asarray(index_N, np.int64)
    if n <= 1:
        return np.zeros_like(index_N)
    half = ((n - 1).bit_length() + 1) // 2  # the Feistel domain 4**half >= n
    mask = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence([seed % (1 << 64), epoch]).generate_state(_ROUNDS, np.uint64)
    x_N = index_N.astype(np.uint64)
    todo_N = np.ones(x_N.shape, bool)
    while todo_N.any():  # cycle walking: re-encrypt until the value falls inside [0, n)
        left, right = x_N[todo_N] >> np.uint64(half), x_N[todo_N] & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        x_N[todo_N] = (left << np.uint64(half)) | right
        todo_N = x_N >= np.uint64(n)
    return x_N.astype(np.int64)


def stream_windows(flat_N: np.ndarray, n_windows: int, seed: int) -> np.ndarray:
    """Window ids at positions `flat_N` of the endless stream of per-epoch permutations."""
    epoch_N, position_N = np.divmod(np.asarray(flat_N, np.int64), n_windows)
    windows_N = np.empty_like(position_N)
    for epoch in np.unique(epoch_N):
        chosen = epoch_N == epoch
        windows_N[chosen] = permute(position_N[chosen], n_windows, seed, int(epoch))
    return windows_N


def batch_windows(step: int, *, n_windows: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1, offset: int = 0) -> np.ndarray:
    """Window ids of this process's rows of global batch `step` (stream starts at `offset`)."""
    rows = global_batch // process_count
    first = offset + step * global_batch + process_index * rows
    return stream_windows(first + np.arange(rows, dtype=np.int64), n_windows, seed)


class _ReadBatch:
    """grain map: step → int32 [rows, context+1]; reopens the store in each worker process."""

    def __init__(self, data_dir, split, meta, context, order: dict):
        self._where = (str(data_dir), split, meta)
        self._context = context
        self._order = order
        self._store = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    def __call__(self, step: int) -> np.ndarray:
        if self._store is None:
            self._store = open_tokens(*self._where)
        windows = batch_windows(int(step), **self._order)
        return read_windows(self._store, windows * self._context, self._context + 1)


class TrainBatches:
    """Endless, checkpointable batches int32 [global_batch // process_count, context + 1]."""

    def __init__(self, data_dir, *, context: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, workers: int = 0,
                 prefetch: int = 2, split: str = "train"):
        _check_layout(context, global_batch, process_index, process_count, workers, prefetch, split)
        self.data_dir = data_location(data_dir, "data dir")
        self._meta = read_meta(self.data_dir)
        self.n_windows = window_count(self._meta[f"{split}_tokens"], context)
        if self.n_windows < 1:
            raise DataError(
                f"data dir {str(data_dir)!r}: its {split} split holds {self._meta[f'{split}_tokens']} "
                f"tokens, fewer than one window of context+1={context + 1}; prepare more text"
            )
        self._args = dict(context=context, global_batch=global_batch, seed=seed, split=split,
                          process_index=process_index, process_count=process_count,
                          workers=workers, prefetch=prefetch)
        open_tokens(self.data_dir, split, self._meta)  # fail here, not in a worker
        self._offset, self._step, self._iterator = 0, 0, None

    def _start(self):
        import grain
        import grain.multiprocessing

        a = self._args
        order = dict(n_windows=self.n_windows, global_batch=a["global_batch"], seed=a["seed"],
                     process_index=a["process_index"], process_count=a["process_count"],
                     offset=self._offset)
        read = _ReadBatch(self.data_dir, a["split"], self._meta, a["context"], order)
        threads = 1 if a["prefetch"] > 0 else 0  # tensorstore reads release the GIL
        dataset = grain.MapDataset.range(0, _MAX_STEPS).map(read).to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=a["prefetch"])
        )
        if a["workers"] > 0:
            _mark_absl_flags_parsed()
            dataset = dataset.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
                num_workers=a["workers"], per_worker_buffer_size=max(a["prefetch"], 1)))
        return iter(dataset)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> np.ndarray:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self._step += 1
        return batch

    @property
    def windows_done(self) -> int:
        """Windows of the global stream consumed so far (all processes together)."""
        return self._offset + self._step * self._args["global_batch"]

    def get_state(self) -> dict:
        """JSON-serialisable position: the stream offset plus what it is only valid for."""
        return {"windows_done": self.windows_done, "seed": self._args["seed"],
                "context": self._args["context"], "split": self._args["split"],
                "n_tokens": self._meta[f"{self._args['split']}_tokens"],
                "tokenizer_hash": self._meta["tokenizer"]["hash"]}

    def set_state(self, state: dict) -> None:
        """Continues after the batches that produced `state` (any worker or process count)."""
        mine = self.get_state()
        for key in ("context", "split", "n_tokens", "tokenizer_hash"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"the loader state was saved for {key}={state.get(key)!r} but data dir "
                    f"{str(self.data_dir)!r} with these settings has {key}={mine[key]!r}; resume "
                    f"with the same data dir and context, or start a new run"
                )
        self.close()
        self._offset, self._step = int(state["windows_done"]), 0

    def close(self) -> None:
        """Stops worker processes; the next batch starts a fresh pipeline at the same place."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
        self._offset, self._step = self.windows_done, 0

    def __del__(self):
        if getattr(self, "_iterator", None) is not None:
            self.close()


def _check_layout(context, global_batch, process_index, process_count, workers, prefetch, split):
    problems = [
        (context >= 1, f"context={context} must be at least 1"),
        (global_batch >= 1, f"global_batch={global_batch} must be at least 1"),
        (process_count >= 1 and 0 <= process_index < process_count,
         f"process_index={process_index} must lie in [0, process_count={process_count})"),
        (global_batch % max(process_count, 1) == 0,
         f"global_batch={global_batch} is not divisible by process_count={process_count}; "
         f"choose a batch size that is a multiple of the number of processes"),
        (workers >= 0 and prefetch >= 0, f"workers={workers} and prefetch={prefetch} must be >= 0"),
        (split in ("train", "val"), f"split={split!r} must be 'train' or 'val'"),
    ]
    for ok, message in problems:
        if not ok:
            raise DataError(message)


def _mark_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_windows(data_dir: str | os.PathLike, *, context: int, batch: int, n_batches: int) -> np.ndarray:
    """int32 [n_batches, batch, context+1] from the validation split, always the same.

    The batch·n_batches windows start at evenly spaced offsets over the whole split; they
    overlap only when the split holds fewer windows than that.
    """
    meta = read_meta(data_dir)
    n_val, count = meta["val_tokens"], batch * n_batches
    if context < 1 or count < 1:
        raise DataError(f"context={context}, batch={batch} and n_batches={n_batches} must be >= 1")
    if n_val < context + 1:
        raise DataError(
            f"data dir {str(data_dir)!r}: its validation split holds {n_val} tokens, fewer than "
            f"one window of context+1={context + 1}; prepare it with a larger --val-fraction"
        )
    starts = np.arange(count, dtype=np.int64) * (n_val - context - 1) // max(count - 1, 1)
    tokens = read_windows(open_tokens(data_dir, "val", meta), starts, context + 1)
    return tokens.reshape(n_batches, batch, context + 1)
