"""AdamW with warmup + cosine or warmup-stable-decay, global-norm clipping, a decay mask,
and a learning-rate multiplier for the routers and adapters."""

from __future__ import annotations

import jax
import optax

from nvium_jax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine to `lr·min_lr_ratio`, or (wsd) constant until the
    last `decay_frac` of steps and a linear decay to `lr·min_lr_ratio`."""
    warmup = max(cfg.warmup_steps, 0)
    final = cfg.lr * cfg.min_lr_ratio
    rest = max(cfg.steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    else:
        decay = max(int(round(cfg.decay_frac * cfg.steps)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, final, decay)],
            [stable],
        )
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(cfg.lr / warmup, cfg.lr, warmup - 1), after], [warmup]
    )


def decay_mask(params: dict, decay_embeddings: bool) -> dict:
    """Weight decay on matrices only: never on norms and biases; on the input embedding
    only when `train.decay_embeddings`."""

    def decays(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "embedding":
            return decay_embeddings
        is_stacked = str(getattr(path[0], "key", "")) == "blocks"
        return leaf.ndim - int(is_stacked) >= 2 and not name.endswith("bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def _name(key) -> str:
    return str(getattr(key, "key", getattr(key, "idx", key)))


def exit_lr_mask(params: dict) -> dict:
    """The leaves `train.exit_lr_mult` scales: every router and adapter (early exits' and the
    final one's); not the exits' norms."""

    def scaled(path, leaf) -> bool:
        names = [_name(key) for key in path]
        return names[0] == "final_adapter" or (names[0] == "exits" and names[2] != "norm")

    return jax.tree_util.tree_map_with_path(scaled, params)


def _scale_masked(inner: optax.GradientTransformation, mult: float) -> optax.GradientTransformation:
    """`inner` with the updates of the `exit_lr_mask` leaves times `mult` — the same as their
    learning rate times `mult` (AdamW's update, decay included, is linear in it). Stateless,
    so the optimizer state is the same for every `mult` (a resume may change it)."""

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, params)
        mask = exit_lr_mask(updates)
        return jax.tree.map(lambda u, m: u * mult if m else u, updates, mask), state

    return optax.GradientTransformation(inner.init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            lr_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=1e-8,
            weight_decay=cfg.weight_decay,
            mask=lambda params: decay_mask(params, cfg.decay_embeddings),
        ),
    )
    return optimizer if cfg.exit_lr_mult == 1.0 else _scale_masked(optimizer, cfg.exit_lr_mult)
