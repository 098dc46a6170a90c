"""The grain loader: windows, a pure (seed, step) order shared by any number of processes,
exact restore (also across worker and process counts), and held-out eval windows.

The data dirs here hold token i at position i, so every row names its own window."""

import json

import numpy as np
import pytest

from nvium_jax.data import DataError, TrainBatches, eval_windows
from nvium_jax.data.loader import batch_windows, permute, stream_windows, window_count
from nvium_jax.data.store import FORMAT, write_meta, write_tokens

T = 8  # context


def _data_dir(path, n_train, n_val=50, vocab=65536):
    path.mkdir()
    write_tokens(path / "train", np.arange(n_train, dtype=np.uint16))
    write_tokens(path / "val", np.arange(30000, 30000 + n_val, dtype=np.uint16))
    write_meta(path, {
        "format": FORMAT, "dtype": "uint16", "vocab_size": vocab, "bos_id": None, "eos_id": 0,
        "train_tokens": n_train, "val_tokens": n_val, "documents": 1, "inputs": [],
        "tokenizer": {"spec": "bpe:65536", "hash": f"{n_train:064d}"},
    })
    return path


@pytest.fixture
def data48(tmp_path):
    """48 windows of T+1 tokens: 12 global batches of 4 per epoch."""
    return _data_dir(tmp_path / "d48", 48 * T + 1)


def _window_ids(batch_BxW):
    """The window each row is, checked to be the contiguous slice a window must be."""
    starts = batch_BxW[:, 0]
    np.testing.assert_array_equal(batch_BxW, starts[:, None] + np.arange(T + 1))
    assert np.all(starts % T == 0)
    return starts // T


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_permute_is_a_seeded_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4099):
        order = permute(np.arange(n), n, seed=3, epoch=0)
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
        np.testing.assert_array_equal(order, permute(np.arange(n), n, seed=3, epoch=0))
    order = permute(np.arange(1000), 1000, seed=3, epoch=0)
    assert (order == np.arange(1000)).mean() < 0.01
    assert (order != permute(np.arange(1000), 1000, seed=3, epoch=1)).mean() > 0.9
    assert (order != permute(np.arange(1000), 1000, seed=4, epoch=0)).mean() > 0.9
    huge = permute(np.arange(1000), 10**12, seed=0, epoch=0)  # no table: O(1) memory per index
    assert len(set(huge.tolist())) == 1000 and huge.max() < 10**12


def test_every_window_once_per_epoch_even_when_batches_straddle_epochs():
    for n in (48, 50, 7):
        for epoch in range(3):
            ids = stream_windows(epoch * n + np.arange(n), n, seed=1)
            np.testing.assert_array_equal(np.sort(ids), np.arange(n))
    flat = np.concatenate([batch_windows(s, n_windows=50, global_batch=4, seed=1) for s in range(25)])
    assert sorted(flat[:50]) == list(range(50)) == sorted(flat[50:])
    assert flat[:50].tolist() != flat[50:].tolist()  # reshuffled per epoch


def test_rows_are_windows_and_same_seed_gives_same_batches(data48):
    loader = TrainBatches(data48, context=T, global_batch=4, seed=0)
    batches = _take(loader, 24)
    assert batches[0].shape == (4, T + 1) and batches[0].dtype == np.int32
    for epoch in (batches[:12], batches[12:]):
        ids = np.concatenate([_window_ids(b) for b in epoch])
        np.testing.assert_array_equal(np.sort(ids), np.arange(48))
    again = _take(TrainBatches(data48, context=T, global_batch=4, seed=0), 24)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = _take(TrainBatches(data48, context=T, global_batch=4, seed=1), 24)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_two_processes_split_the_one_process_batches(data48):
    one = _take(TrainBatches(data48, context=T, global_batch=4, seed=5), 24)
    hosts = [_take(TrainBatches(data48, context=T, global_batch=4, seed=5, process_index=h,
                                process_count=2), 24) for h in (0, 1)]
    for step, batch in enumerate(one):
        assert hosts[0][step].shape == (2, T + 1)
        np.testing.assert_array_equal(np.concatenate([hosts[0][step], hosts[1][step]]), batch)
    for epoch in (slice(0, 12), slice(12, 24)):
        seen = [set(np.concatenate([_window_ids(b) for b in hosts[h][epoch]]).tolist()) for h in (0, 1)]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(48))
        assert len(seen[0]) == len(seen[1]) == 24  # each once: 12 steps × 2 rows


def test_restored_state_continues_exactly(data48):
    loader = TrainBatches(data48, context=T, global_batch=4, seed=2)
    _take(loader, 7)
    state = json.loads(json.dumps(loader.get_state()))
    expected = _take(loader, 15)
    restored = TrainBatches(data48, context=T, global_batch=4, seed=2)
    _take(restored, 3)  # a restored loader may have read before: set_state wins
    restored.set_state(state)
    assert all(np.array_equal(a, b) for a, b in zip(_take(restored, 15), expected))
    halves = []
    for h in (0, 1):  # resume on two processes: the same global batches
        host = TrainBatches(data48, context=T, global_batch=4, seed=2, process_index=h, process_count=2)
        host.set_state(state)
        halves.append(_take(host, 15))
    assert all(np.array_equal(np.concatenate([a, b]), e) for a, b, e in zip(*halves, expected))


def test_worker_processes_give_the_same_batches_and_restore(data48):
    plain = TrainBatches(data48, context=T, global_batch=4, seed=9)
    expected = _take(plain, 20)
    pooled = TrainBatches(data48, context=T, global_batch=4, seed=9, workers=2, prefetch=2)
    try:
        got = _take(pooled, 12)
        state = pooled.get_state()
        got += _take(pooled, 8)
    finally:
        pooled.close()
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    restored = TrainBatches(data48, context=T, global_batch=4, seed=9, workers=0)
    restored.set_state(state)
    assert all(np.array_equal(a, b) for a, b in zip(_take(restored, 8), expected[12:]))


def test_state_from_other_data_or_context_is_refused(data48, tmp_path):
    state = TrainBatches(data48, context=T, global_batch=4, seed=0).get_state()
    with pytest.raises(DataError, match="loader state was saved for context=8"):
        TrainBatches(data48, context=4, global_batch=4, seed=0).set_state(state)
    other = _data_dir(tmp_path / "other", 40 * T + 1)
    with pytest.raises(DataError, match="loader state was saved for n_tokens=385"):
        TrainBatches(other, context=T, global_batch=4, seed=0).set_state(state)


def test_loader_errors(data48, tmp_path):
    with pytest.raises(DataError, match="global_batch=6 is not divisible by process_count=4"):
        TrainBatches(data48, context=T, global_batch=6, seed=0, process_count=4)
    with pytest.raises(DataError, match=r"process_index=2 must lie in \[0, process_count=2\)"):
        TrainBatches(data48, context=T, global_batch=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(DataError, match="fewer than one window of context\\+1=1025"):
        TrainBatches(data48, context=1024, global_batch=4, seed=0)
    with pytest.raises(DataError, match="has no meta.json"):
        TrainBatches(tmp_path, context=T, global_batch=4, seed=0)
    assert window_count(48 * T + 1, T) == 48 and window_count(48 * T, T) == 47


def test_eval_windows_are_fixed_evenly_spaced_val_slices(tmp_path):
    data = _data_dir(tmp_path / "d", 100, n_val=200)
    windows = eval_windows(data, context=T, batch=3, n_batches=2)
    assert windows.shape == (2, 3, T + 1) and windows.dtype == np.int32
    starts = windows.reshape(6, T + 1)[:, 0] - 30000
    np.testing.assert_array_equal(starts, np.arange(6) * (200 - T - 1) // 5)  # first to last
    np.testing.assert_array_equal(windows.reshape(6, T + 1), 30000 + starts[:, None] + np.arange(T + 1))
    np.testing.assert_array_equal(windows, eval_windows(data, context=T, batch=3, n_batches=2))
    crowded = eval_windows(data, context=T, batch=8, n_batches=8)  # 64 windows > 22: overlap
    assert crowded.shape == (8, 8, T + 1) and crowded[-1, -1, -1] == 30000 + 199
    with pytest.raises(DataError, match="validation split holds 200 tokens, fewer than one window"):
        eval_windows(data, context=200, batch=1, n_batches=1)
