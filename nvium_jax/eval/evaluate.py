"""Held-out evaluation of a model: the mixture's and each exit's perplexity, routing mass
per exit, expected depth, routing by position and by token frequency, and each exit's top-1
agreement with the final exit. `evaluate_run` is what `nvium eval --run` runs.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable, Optional

import numpy as np

from nvium_jax.eval.scoring import TokenScores, score_tokens
from nvium_jax.paths import data_location

FREQUENCY_RANKS = (1, 11, 101, 1001, 10001)  # bucket starts: the 10 most frequent types, …
COUNT_LIMIT = 1 << 24  # training tokens counted for the frequency ranks


def position_buckets(context: int) -> list[tuple[int, int]]:
    """[lo, hi) position ranges 0, 1, 2–3, 4–7, … covering [0, context)."""
    edges = [0, 1]
    while edges[-1] < context:
        edges.append(min(2 * edges[-1], context))
    return list(zip(edges[:-1], edges[1:]))


def frequency_ranks(counts_V: np.ndarray) -> np.ndarray:
    """Each token id's 1-based rank by count, most frequent first (ties: lower id first)."""
    order = np.argsort(-np.asarray(counts_V), kind="stable")
    ranks_V = np.empty(len(order), np.int64)
    ranks_V[order] = np.arange(1, len(order) + 1)
    return ranks_V


class _Totals:
    """Sums over the evaluated tokens, accumulated batch by batch on the host."""

    def __init__(self, n_exits: int, context: int, n_frequency: int):
        self.K, self.tokens = n_exits, 0
        self.mixture_nll, self.exit_nll_K = 0.0, np.zeros(n_exits)
        self.mass_K, self.agree_K = np.zeros(n_exits), np.zeros(n_exits)
        self.buckets = position_buckets(context)
        self.pos_tokens, self.pos_mass = np.zeros(len(self.buckets)), np.zeros((len(self.buckets), n_exits))
        self.freq_tokens, self.freq_mass = np.zeros(n_frequency), np.zeros((n_frequency, n_exits))
        self.freq_nll = np.zeros(n_frequency)

    def add(self, scores: TokenScores, targets_BxT: np.ndarray, freq_bucket_V: Optional[np.ndarray]):
        B, T = targets_BxT.shape
        self.tokens += B * T
        self.mixture_nll -= float(np.sum(scores.mixture_logp_BxT, dtype=np.float64))
        self.exit_nll_K -= np.sum(scores.exit_logp_KxBxT, axis=(1, 2), dtype=np.float64)
        self.mass_K += np.sum(scores.route_BxTxK, axis=(0, 1), dtype=np.float64)
        final_BxT = scores.exit_argmax_KxBxT[-1]
        self.agree_K += np.sum(scores.exit_argmax_KxBxT == final_BxT, axis=(1, 2))
        mass_TxK = np.sum(scores.route_BxTxK, axis=0, dtype=np.float64)
        for i, (lo, hi) in enumerate(self.buckets):
            self.pos_tokens[i] += B * max(min(hi, T) - lo, 0)
            self.pos_mass[i] += mass_TxK[lo:hi].sum(axis=0)
        if freq_bucket_V is not None:
            bucket_N = freq_bucket_V[targets_BxT].reshape(-1)
            n = len(self.freq_tokens)
            self.freq_tokens += np.bincount(bucket_N, minlength=n)
            self.freq_nll -= np.bincount(bucket_N, scores.mixture_logp_BxT.reshape(-1), minlength=n)
            for k in range(self.K):
                self.freq_mass[:, k] += np.bincount(bucket_N, scores.route_BxTxK[..., k].reshape(-1),
                                                    minlength=n)


def _share(mass_xK: np.ndarray, tokens_x: np.ndarray, depths) -> list[dict]:
    rows = []
    for mass_K, n in zip(mass_xK, tokens_x):
        mass_K = mass_K / max(n, 1)
        rows.append({"tokens": int(n), "mass": [round(float(m), 6) for m in mass_K],
                     "expected_depth": round(float(mass_K @ np.asarray(depths, np.float64)), 4)})
    return rows


def evaluate_windows(model, windows_NxBxT1: np.ndarray, *, token_counts_V=None,
                     on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Aggregates over N batches of B windows of T+1 tokens (inputs then targets). With
    `token_counts_V` (e.g. counted on the training split) it adds routing by the frequency
    rank of the target token."""
    cfg = model.config
    depths = cfg.exit_depths
    ranks_V = None
    if token_counts_V is not None:
        ranks_V = frequency_ranks(token_counts_V)
        starts = [r for r in FREQUENCY_RANKS if r <= len(ranks_V)]
        freq_bucket_V = np.searchsorted(np.asarray(starts), ranks_V, side="right") - 1
    else:
        starts, freq_bucket_V = [], None
    totals = _Totals(cfg.n_exits, windows_NxBxT1.shape[-1] - 1, len(starts))
    for i, window_BxT1 in enumerate(windows_NxBxT1):
        window_BxT1 = np.asarray(window_BxT1)
        scores = score_tokens(model, window_BxT1[:, :-1], window_BxT1[:, 1:])
        totals.add(scores, window_BxT1[:, 1:], freq_bucket_V)
        if on_batch is not None:
            on_batch(i + 1)
    n = max(totals.tokens, 1)
    mass_K = totals.mass_K / n
    record = {
        "tokens": int(totals.tokens),
        "n_layers": cfg.n_layers,
        "mixture_ppl": round(float(np.exp(totals.mixture_nll / n)), 4),
        "expected_depth": round(float(mass_K @ np.asarray(depths, np.float64)), 4),
        "exits": [
            {"index": k, "depth": depths[k], "ppl": round(float(np.exp(totals.exit_nll_K[k] / n)), 4),
             "mass": round(float(mass_K[k]), 6),
             "agreement_with_final": round(float(totals.agree_K[k] / n), 6)}
            for k in range(cfg.n_exits)
        ],
        "mixture_ce": round(totals.mixture_nll / n, 6),
        "by_position": [
            {"positions": [lo, hi - 1], **row}
            for (lo, hi), row in zip(totals.buckets, _share(totals.pos_mass, totals.pos_tokens, depths))
            if row["tokens"]
        ],
    }
    if ranks_V is not None:
        ends = [*starts[1:], len(ranks_V) + 1]
        record["by_frequency"] = [
            {"ranks": [lo, hi - 1], **row,
             "mixture_ppl": round(float(np.exp(nll / max(row["tokens"], 1))), 4)}
            for lo, hi, row, nll in zip(starts, ends, _share(totals.freq_mass, totals.freq_tokens, depths),
                                        totals.freq_nll)
            if row["tokens"]
        ]
    return record


def token_counts(data_dir, vocab_size: int, split: str = "train", limit: int = COUNT_LIMIT) -> np.ndarray:
    """How often each id occurs in the first `limit` tokens of a prepared split."""
    from nvium_jax.data.store import open_tokens, read_meta

    meta = read_meta(data_dir)
    store = open_tokens(data_dir, split, meta)
    n = min(int(store.shape[0]), limit)
    tokens_N = np.asarray(store[:n].read().result())
    return np.bincount(tokens_N.astype(np.int64), minlength=vocab_size)[:vocab_size]


def eval_dir(run_dir, step: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / "eval" / f"step_{step}"


def evaluate_run(run, run_dir, *, data_dir=None, batches: Optional[int] = None,
                 batch_size: Optional[int] = None, plots: bool = True, progress: bool = True) -> dict:
    """`nvium eval --run`: held-out windows of the run's validation split (or of `data_dir`,
    prepared with the run's tokenizer) — by default the very windows the trainer evaluates,
    so `mixture_ppl` is exp of the logged `val_mixture_ce` of the same step. Writes
    eval.json and the PNG plots into RUN_DIR/eval/step_<N>/."""
    from nvium_jax.data import eval_windows

    config = run.config
    data_dir = check_eval_data(run, run_dir, data_dir)
    train_cfg = config.train
    batch_size = batch_size or train_cfg.batch_size // train_cfg.grad_accum
    batches = batches or train_cfg.eval_batches
    windows = eval_windows(data_dir, context=config.model.context, batch=batch_size, n_batches=batches)
    counts = token_counts(data_dir, config.model.vocab_size)
    with _progress_bar(batches, progress) as advance:
        record = evaluate_windows(run.model, windows, token_counts_V=counts, on_batch=advance)
    record = {"step": run.step, **record, "data": str(data_dir)}
    out = eval_dir(run_dir, run.step)
    out.mkdir(parents=True, exist_ok=True)
    from nvium_jax.paths import atomic_write_text

    atomic_write_text(out / "eval.json", json.dumps(record, indent=2))
    if plots:
        from nvium_jax.eval import plots as plotting

        record["plots"] = [str(p) for p in plotting.write_plots(record, pathlib.Path(run_dir), out)]
    return record


def check_eval_data(run, run_dir, data_dir) -> pathlib.Path:
    """The data dir to evaluate on: `data_dir` (its tokenizer must be the run's) or the run's
    own (`data.path`, or the embedded corpus prepared with the run's tokenizer)."""
    from nvium_jax.config import ConfigError
    from nvium_jax.data import read_meta, resolve_data_dir, tokenizer_hash

    if data_dir is None:
        try:
            return resolve_data_dir(run.config)
        except (OSError, ValueError) as err:
            raise ConfigError(f"the data of run {run_dir} cannot be read here ({err}); "
                              f"pass --data DIR, a dir prepared with the run's tokenizer") from None
    data_dir = data_location(data_dir, "--data")
    meta = read_meta(data_dir)
    if run.tokenizer is not None and meta["tokenizer"]["hash"] != tokenizer_hash(run.tokenizer):
        raise ConfigError(
            f"--data {data_dir} was prepared with another tokenizer ({meta['tokenizer'].get('spec')}) "
            f"than run {run_dir}; prepare it with `nvium prepare --tokenizer {run_dir}/tokenizer.json`")
    return data_dir


class _progress_bar:
    """A batch counter on stderr (rich), or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda done: None
        import rich.console
        import rich.progress

        self.bar = rich.progress.Progress(
            "eval", rich.progress.BarColumn(), rich.progress.MofNCompleteColumn(),
            rich.progress.TimeRemainingColumn(),
            console=rich.console.Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("eval", total=self.total)
        return lambda done: self.bar.update(task, completed=done)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False


__all__ = ["evaluate_windows", "evaluate_run", "token_counts", "frequency_ranks",
           "position_buckets", "eval_dir", "check_eval_data"]
