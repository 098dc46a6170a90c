"""The adaptive depth cost: the paper's feedback controller on β.

At every held-out evaluation after the router warm-up,
`gap = target CE − this evaluation's mixture CE`, where the target is a constant
(`train.beta_target`) or a baseline run's held-out mixture CE at its logged step nearest to
this one (`train.beta_match`, re-read at every evaluation so both may train at once).
Inside the dead band β holds; otherwise it moves by `min(k_up·gap, max_step)` when N-vium
is ahead (gap > 0: afford more depth cost) or by `max(k_down·gap, −max_step)` when it is
behind, and is clipped to `[beta_min, beta_max]`. The new β is used until the next
evaluation; it lives in the train state, so a resume continues exactly.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import NamedTuple, Optional

from nvium_jax.config import Config, ConfigError, TrainConfig
from nvium_jax.runs import read_run_config
from nvium_jax.train.metrics import read_metrics


class BetaUpdate(NamedTuple):
    target_ce: Optional[float]  # None: no target known yet (β holds)
    gap: Optional[float]  # target − mixture CE
    beta: float  # the value this evaluation sets


def controller_on(train: TrainConfig) -> bool:
    return train.beta_target is not None or train.beta_match is not None


def next_beta(beta: float, gap: float, train: TrainConfig) -> float:
    """The paper's asymmetric proportional step with a dead band and a step cap."""
    if abs(gap) < train.beta_dead_band:
        return beta
    if gap > 0:
        step = min(train.beta_k_up * gap, train.beta_max_step)
    else:
        step = max(train.beta_k_down * gap, -train.beta_max_step)
    return min(max(beta + step, train.beta_min), train.beta_max)


def held_out_curve(run_dir: pathlib.Path) -> dict[int, float]:
    """step → held-out mixture CE of a run's `metrics.jsonl`."""
    rows = read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")
    return {int(r["step"]): float(r["val_mixture_ce"]) for r in rows if "val_mixture_ce" in r}


def nearest_ce(curve: dict[int, float], step: int) -> Optional[float]:
    """The CE at the logged step nearest to `step` (the earlier one on a tie)."""
    if not curve:
        return None
    return curve[min(curve, key=lambda s: (abs(s - step), s))]


def target_ce(train: TrainConfig, step: int) -> Optional[float]:
    if train.beta_match is not None:
        return nearest_ce(held_out_curve(pathlib.Path(train.beta_match)), step)
    return train.beta_target


def update(beta: float, mixture_ce: float, step: int, train: TrainConfig,
           warmup_steps: int) -> BetaUpdate:
    """What one held-out evaluation at `step` does to β (nothing before the warm-up ends,
    when the depth cost is off, or without a target)."""
    if not controller_on(train):
        return BetaUpdate(None, None, beta)
    target = target_ce(train, step)
    gap = None if target is None else target - mixture_ce
    if gap is None or step == 0 or step < warmup_steps:
        return BetaUpdate(target, gap, beta)
    return BetaUpdate(target, gap, next_beta(beta, gap, train))


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_beta_match(config: Config, data_dir: pathlib.Path) -> None:
    """A `train.beta_match` run must have been trained on the same tokens and held-out
    set: the same tokenizer, data, context and held-out batches — else one ConfigError."""
    match = config.train.beta_match
    if match is None:
        return
    run_dir = pathlib.Path(match)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"train.beta_match={match!r} is not a run directory (no config.yaml); pass the "
            f"run dir of the matched baseline (train it first, or start it before this run)")
    other = read_run_config(run_dir)
    mine, theirs = config, other
    differ = []
    if mine.data.path != theirs.data.path:
        differ.append(f"data.path {theirs.data.path!r} ≠ {mine.data.path!r}")
    if mine.model.context != theirs.model.context:
        differ.append(f"model.context {theirs.model.context} ≠ {mine.model.context}")
    held_out = lambda c: (c.train.batch_size // c.train.grad_accum, c.train.eval_batches)
    if held_out(mine) != held_out(theirs):
        differ.append(
            f"held-out set (micro-batch, train.eval_batches) {held_out(theirs)} ≠ {held_out(mine)}")
    tokenizer = run_dir / "tokenizer.json"
    if tokenizer.is_file() and _sha256(tokenizer) != _sha256(data_dir / "tokenizer.json"):
        differ.append("tokenizer.json differs")
    if differ:
        raise ConfigError(
            f"train.beta_match={match!r} was not trained on the same tokens: "
            f"{'; '.join(differ)} — match these keys to that run or train a matched baseline")
