"""The batch schedule of the deferred loop as pure functions: which rows flush, which feed a
new token, and which positions each deep segment runs (no model, no weights; `loop.py`
executes the plans).

One iteration's plans, made from the fill pointers, the rows' positions, needs and ages and
the iteration count:
  0. `plan_flushes`: a row about to feed a token whose block would exceed W flushes (every
     segment s ≥ 1 runs on [m_s, t) without gates; the token continues next iteration) — as
     many rows as one run holds (`LoopOptions.run_cap`), the others wait their turn and feed
     no token; the other active rows whose token is fresh feed it to segment 0;
  1. `plan_segment`, for s = 1 … K−1 after segment s − 1 ran and gated: the rows whose token
     waits at s run it on their block [m_s, t], and the flushing rows their [m_s, t).
Whether segment s ≥ 1 runs is the schedule: `lockstep` runs it whenever a row needs it
(the other rows masked); `advance` (the default) runs it likewise and lets the rows that do
not need it push their own pending positions through it — a token that exited above s in
this iteration included — so rows stay at most a token behind; `wait` lets a row wait until
`wait_rows` rows need that segment (or it has waited `wait_age` iterations, or no row is
feeding a new token); `wait+advance` does both. Under every schedule a run holds at most
`run_cap` tokens: rows whose blocks do not fit wait, taking turns from the row after the
iteration count (so none starves). No plan changes a token: every draw is indexed by
(row, token), never by iteration.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class FlushPlan(NamedTuple):
    flush_B: jax.Array  # rows that flush every deep segment this iteration
    fed_B: jax.Array  # rows that feed their new token x_t to segment 0


class RunPlan(NamedTuple):
    """One run of a deep segment: row b computes positions [start_b, start_b + len_b)."""

    start_B: jax.Array  # m_s of each row
    len_B: jax.Array  # positions the run takes (0: the row does not run)
    index: jax.Array  # the run's branch: 0 skips, else 1 + its (tokens, width) shape
    gate_B: jax.Array  # rows whose token at t ran its whole block and meets the gate of s


def plan_flushes(fill_BxK, t_B, need_B, active_B, iteration, opts) -> FlushPlan:
    """The flushes that fit one run, taken in turn; a row whose flush waits feeds no token
    (a flush finishes in its iteration: the row's next block must fit the ring)."""
    B = t_B.shape[0]
    fed_B = active_B & (need_B == 0)
    deferred_B = t_B - fill_BxK[:, -1]  # the deepest segment's block: the longest
    wants_B = fed_B & (deferred_B + 1 > opts.window)
    flush_B = wants_B & _in_turn(jnp.where(wants_B, deferred_B, 0), opts.run_shapes[-1][0],
                                 iteration % B)
    return FlushPlan(flush_B, fed_B & ~(wants_B & ~flush_B))


def plan_segment(s: int, fill_BxK, t_B, need_B, age_B, active_B, flush: FlushPlan, sampled_B,
                 iteration, opts) -> RunPlan:
    """Segment s ≥ 1's run, after the gates of segments < s drew `sampled_B` this iteration:
    the flushing rows, the rows whose token waits at s (when the schedule runs it), and under
    `advance` a prefix of every other row's pending block."""
    B = t_B.shape[0]
    gate_B = active_B & (need_B == s) & ~flush.flush_B
    gate_B &= _segment_runs(gate_B, age_B, jnp.any(flush.fed_B), opts)
    start_B = fill_BxK[:, s]
    # a row's pending block ends below t — or at t once its token has exited above s
    # (a flushing row's block already spans W positions without it)
    pending_end_B = jnp.minimum(fill_BxK[:, s - 1], t_B + (sampled_B & ~flush.flush_B))
    stop_B = jnp.where(gate_B, t_B + 1, pending_end_B)
    len_B, index, full_B = plan_run(start_B, stop_B, gate_B | flush.flush_B,
                                    opts.advance & active_B & ~gate_B, opts.run_shapes, B,
                                    flush.flush_B, iteration % B)
    return RunPlan(start_B, len_B, index, gate_B & full_B)


def plan_final_flush(s: int, fill_BxK, t_B, opts) -> RunPlan:
    """Segment s ≥ 1 on every row's pending positions [m_s, t), in one run (`flush`)."""
    start_B = fill_BxK[:, s]
    stop_B = jnp.minimum(fill_BxK[:, s - 1], t_B)
    rows_B = jnp.ones(t_B.shape, bool)
    len_B, index, _ = plan_run(start_B, stop_B, rows_B, None, opts.run_shapes, t_B.shape[0],
                               rows_B)
    return RunPlan(start_B, len_B, index, jnp.zeros_like(rows_B))


def next_age(age_B, moved_B, need_B, active_B):
    """Iterations each row's token has waited at its segment: 0 once it moved this iteration,
    one more while it still needs a deep segment."""
    return jnp.where(moved_B, 0, age_B + (active_B & (need_B > 0)))


def _segment_runs(waiting_B, age_B, fed_new_token, opts):
    """Whether a deep segment runs this iteration for the rows waiting at it."""
    anyone = jnp.any(waiting_B)
    if not opts.waits:
        return anyone
    enough = jnp.sum(waiting_B) >= opts.wait_rows
    starving = jnp.any(waiting_B & (age_B >= opts.wait_age))
    return anyone & (enough | starving | ~fed_new_token)


def _in_turn(want_B, room, offset):
    """Which rows' `want_B` tokens fit in `room`, taken in turn from row `offset` (a row
    whose block does not fit stops the ones after it: none jumps the queue)."""
    B = want_B.shape[0]
    order_B = (jnp.arange(B) + offset) % B  # the rows in turn
    taken_B = jnp.cumsum(want_B[order_B]) <= room
    return jnp.zeros((B,), bool).at[order_B].set(taken_B)


def plan_run(start_B, stop_B, rows_B, optional_B, shapes: tuple, batch: int, first_B=None,
             offset=0):
    """How many tokens of each row a deep segment's run takes, its branch, and which rows
    of `rows_B` run their whole block. Branch 0 skips (no row runs), else 1 + the first of
    `shapes` (tokens, width) that holds every running block and the run's target. Rows of
    `first_B` always run (their sum was checked to fit); the other rows of `rows_B` run
    in turn from row `offset` while their blocks fit in the largest run, the rest wait.
    Rows of `optional_B` (and, under it, the waiting rows, short of their gated token)
    advance a prefix of their pending block into the room the run leaves (up to twice the
    batch in all, when that much is pending, and never past the width), so compiled slots
    hold real tokens."""
    tokens_A = jnp.asarray([n for n, _ in shapes])
    width_A = jnp.asarray([w for _, w in shapes])
    block_B = jnp.maximum(stop_B - start_B, 0)
    first_B = jnp.zeros_like(rows_B) if first_B is None else first_B & rows_B
    n_first = jnp.sum(jnp.where(first_B, block_B, 0))
    queued_B = rows_B & ~first_B
    full_B = first_B | (queued_B & _in_turn(jnp.where(queued_B, block_B, 0),
                                             tokens_A[-1] - n_first, offset))
    must_B = jnp.where(full_B, block_B, 0)
    n_must = jnp.sum(must_B)
    spare_B = jnp.zeros_like(must_B)
    if optional_B is not None:  # a waiting row may advance too, but not its gated token
        spare_B = jnp.where(optional_B & ~rows_B, block_B,
                            jnp.where(rows_B & ~full_B, jnp.maximum(block_B - 1, 0), 0))
    target = jnp.maximum(n_must, jnp.minimum(n_must + jnp.sum(spare_B), 2 * batch))
    target = jnp.minimum(target, tokens_A[-1])
    fits_A = (tokens_A >= target) & (width_A >= jnp.max(must_B))
    choice = jnp.argmax(fits_A)  # the first that fits (the last always does)
    room = tokens_A[choice] - n_must
    spare_B = jnp.minimum(spare_B, width_A[choice] - must_B)
    taken_B = jnp.clip(room - (jnp.cumsum(spare_B) - spare_B), 0, spare_B)
    index = jnp.where(n_must > 0, 1 + choice, 0)
    return must_B + jnp.where(n_must > 0, taken_B, 0), index, full_B
