"""The batch schedule (`inference/policy.py`) against a plain-Python simulator of the deferred
staircase: per-row fill pointers, needs and ages, flushes at the window, the four schedules,
the run cap and the turns, driven by random exit draws per token. At every iteration the
jitted policy gets the simulator's state and must return the simulator's plans; the
simulator checks the staircase's invariants as it executes them (a gated token's lower
segments ran, fill pointers never cross, no pending block outgrows the ring, every row
finishes, the final flush completes every segment)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvium_jax.inference import policy
from nvium_jax.inference.state import LoopOptions


# ---- the simulator: lists and loops, no jax ------------------------------------------------
def turns(want, room, offset):
    """Rows taken in turn from `offset` while their wants fit in `room`; the first that does
    not fit closes the queue."""
    B, taken = len(want), [False] * len(want)
    for i in range(B):
        b = (offset + i) % B
        if want[b] > room:
            break
        room -= want[b]
        taken[b] = True
    return taken


def run_lengths(start, stop, rows, optional, first, shapes, B, offset):
    """Tokens each row runs, the run's branch, and the rows of `rows` that run their block."""
    block = [max(e - s, 0) for s, e in zip(start, stop)]
    queued = [rows[b] and not first[b] for b in range(B)]
    room = shapes[-1][0] - sum(block[b] for b in range(B) if first[b])
    taken = turns([block[b] if queued[b] else 0 for b in range(B)], room, offset)
    full = [first[b] or (queued[b] and taken[b]) for b in range(B)]
    must = [block[b] if full[b] else 0 for b in range(B)]
    if sum(must) == 0:
        return [0] * B, 0, full
    spare = [0] * B
    if optional is not None:  # rows short of their gated token, and the others wholly
        spare = [block[b] if optional[b] and not rows[b]
                 else max(block[b] - 1, 0) if rows[b] and not full[b] else 0 for b in range(B)]
    target = min(max(sum(must), min(sum(must) + sum(spare), 2 * B)), shapes[-1][0])
    choice = next(i for i, (n, w) in enumerate(shapes) if n >= target and w >= max(must))
    tokens, width = shapes[choice]
    room, length = tokens - sum(must), list(must)
    for b in range(B):
        take = min(spare[b], width - must[b], room)
        length[b] += take
        room -= take
    assert sum(length) <= tokens and max(length) <= width
    return length, 1 + choice, full


class Staircase:
    """B rows of the deferred loop: fill pointers m_0 ≥ … ≥ m_{K−1}, the position t of the
    last sampled token, the segment its token needs next (0: fresh, −1: sampled) and how
    long it has waited; token n of row b exits at `exit_draws[b][n]`."""

    def __init__(self, prompt_lens, stops, exit_draws, K, opts):
        self.B, self.K, self.opts = len(prompt_lens), K, opts
        self.fill = [[p] * K for p in prompt_lens]
        self.t = [p - 1 for p in prompt_lens]
        self.need, self.age = [0] * self.B, [0] * self.B
        self.n = [1] * self.B  # the prefill drew token 0
        self.stops, self.exit_draws = stops, exit_draws
        self.iteration = 0

    def active(self):
        return [self.n[b] < self.stops[b] for b in range(self.B)]

    def flushes(self):
        B, W, cap = self.B, self.opts.window, self.opts.run_shapes[-1][0]
        active = self.active()
        fed = [active[b] and self.need[b] == 0 for b in range(B)]
        deferred = [self.t[b] - self.fill[b][-1] for b in range(B)]
        wants = [fed[b] and deferred[b] + 1 > W for b in range(B)]
        flush = [w and ok for w, ok in zip(wants, turns(
            [deferred[b] if wants[b] else 0 for b in range(B)], cap, self.iteration % B))]
        return flush, [fed[b] and not (wants[b] and not flush[b]) for b in range(B)]

    def segment(self, s, flush, fed, sampled):
        """Segment s ≥ 1's plan: (start, lengths, branch, gated rows that ran)."""
        B, opts, active = self.B, self.opts, self.active()
        gate = [active[b] and self.need[b] == s and not flush[b] for b in range(B)]
        waiting = [b for b in range(B) if gate[b]]
        runs = bool(waiting)
        if opts.waits:
            runs &= (len(waiting) >= opts.wait_rows or not any(fed)
                     or any(self.age[b] >= opts.wait_age for b in waiting))
        gate = [g and runs for g in gate]
        start = [self.fill[b][s] for b in range(B)]
        stop = [self.t[b] + 1 if gate[b]
                else min(self.fill[b][s - 1], self.t[b] + (sampled[b] and not flush[b]))
                for b in range(B)]
        optional = [opts.advance and active[b] and not gate[b] for b in range(B)]
        length, index, full = run_lengths(start, stop, [g or f for g, f in zip(gate, flush)],
                                          optional, flush, opts.run_shapes, B, self.iteration % B)
        return start, length, index, [g and f for g, f in zip(gate, full)]

    def run(self, s, start, length, gate):
        for b in range(self.B):
            if gate[b]:  # the token's lower segments ran: its block ends at t
                assert self.fill[b][s - 1] == start[b] + length[b] == self.t[b] + 1
            self.fill[b][s] = start[b] + length[b]

    def gate(self, s, gate_rows, sampled, moved):
        for b in range(self.B):
            if gate_rows[b]:
                exits = s == self.K - 1 or self.exit_draws[b][self.n[b]] == s
                sampled[b] |= exits
                moved[b] = True
                self.need[b] = -1 if exits else s + 1

    def finish_iteration(self, sampled, moved):
        active = self.active()
        for b in range(self.B):
            self.age[b] = 0 if moved[b] else self.age[b] + (active[b] and self.need[b] > 0)
            if sampled[b]:
                self.t[b] += 1
                self.n[b] += 1
                self.need[b] = self.age[b] = 0
            fill = self.fill[b]
            assert all(fill[s] >= fill[s + 1] for s in range(self.K - 1))
            assert fill[0] <= self.t[b] + 1
            assert self.t[b] - fill[-1] <= self.opts.window  # the ring holds every pending position
        self.iteration += 1

    def arrays(self):
        return (jnp.asarray(self.fill, jnp.int32), jnp.asarray(self.t, jnp.int32),
                jnp.asarray(self.need, jnp.int32), jnp.asarray(self.age, jnp.int32),
                jnp.asarray(self.active()))


# ---- the policy, jitted once per static configuration ------------------------------------
@functools.partial(jax.jit, static_argnames="opts")
def _plan_flushes(fill_BxK, t_B, need_B, active_B, iteration, opts):
    return policy.plan_flushes(fill_BxK, t_B, need_B, active_B, iteration, opts)


@functools.partial(jax.jit, static_argnames="opts")
def _plan_segment(s, fill_BxK, t_B, need_B, age_B, active_B, flush, sampled_B, iteration, opts):
    return policy.plan_segment(s, fill_BxK, t_B, need_B, age_B, active_B, flush, sampled_B,
                               iteration, opts)


@functools.partial(jax.jit, static_argnames="opts")
def _plan_final_flush(s, fill_BxK, t_B, opts):
    return policy.plan_final_flush(s, fill_BxK, t_B, opts)


@functools.partial(jax.jit, static_argnames="opts")
def _next_age(age_B, moved_B, need_B, active_B, opts):
    return policy.next_age(age_B, moved_B, need_B, active_B)


def as_lists(plan):
    return [np.asarray(x).tolist() for x in plan]


def decode_and_compare(sim: Staircase, K: int):
    """Runs the staircase to the end and its final flush, comparing every plan."""
    opts, B = sim.opts, sim.B
    bound = 4 * K * B * max(sim.stops) + 16
    while any(sim.active()):
        assert sim.iteration < bound, "a row starves"
        fill, t, need, age, active = sim.arrays()
        flush, fed = sim.flushes()
        flush_plan = _plan_flushes(fill, t, need, active, jnp.int32(sim.iteration), opts=opts)
        assert as_lists(flush_plan) == [flush, fed]
        for b in range(B):
            if fed[b]:
                sim.fill[b][0] = sim.t[b] + 1
        sampled, moved = [False] * B, [False] * B
        sim.gate(0, fed, sampled, moved)
        for s in range(1, K):
            fill, t, need, age, active = sim.arrays()
            start, length, index, gate = sim.segment(s, flush, fed, sampled)
            plan = _plan_segment(jnp.int32(s), fill, t, need, age, active, flush_plan,
                                 jnp.asarray(sampled), jnp.int32(sim.iteration), opts=opts)
            assert as_lists(plan) == [start, length, index, gate], (sim.iteration, s)
            sim.run(s, start, length, gate)
            sim.gate(s, gate, sampled, moved)
        age = _next_age(jnp.asarray(sim.age, jnp.int32), jnp.asarray(moved),
                        jnp.asarray(sim.need, jnp.int32), jnp.asarray(sim.active()), opts=opts)
        sim.finish_iteration(sampled, moved)
        expected_age = [0 if sampled[b] else a for b, a in enumerate(np.asarray(age).tolist())]
        assert sim.age == expected_age
    flush_opts = dataclasses.replace(opts, max_run_tokens=B * opts.window)  # as `flush` has it
    for s in range(1, K):  # `flush`: every row's pending positions, one run per segment
        start = [sim.fill[b][s] for b in range(B)]
        stop = [min(sim.fill[b][s - 1], sim.t[b]) for b in range(B)]
        length, index, _ = run_lengths(start, stop, [True] * B, None, [True] * B,
                                       flush_opts.run_shapes, B, 0)
        plan = _plan_final_flush(jnp.int32(s), *sim.arrays()[:2], opts=flush_opts)
        assert as_lists(plan) == [start, length, index, [False] * B]
        sim.run(s, start, length, [False] * B)
    assert all(fill == [t] * K for fill, t in zip(sim.fill, sim.t))


CONFIGS = [  # batch, window, schedule, max_run_tokens, wait_rows, wait_age, exits
    (1, 1, "advance", None, 1, 8, 4),
    (1, 5, "advance", None, 1, 8, 4),
    (1, 3, "wait", None, 1, 2, 3),
    (3, 2, "lockstep", None, 1, 8, 4),
    (4, 3, "advance", 4, 1, 8, 4),
    (4, 4, "wait+advance", None, 2, 3, 4),
    (5, 3, "lockstep", 5, 1, 8, 4),
    (6, 2, "wait", 6, 3, 2, 4),
    (8, 4, "wait+advance", 8, 3, 4, 3),
    (2, 6, "advance", None, 1, 8, 2),
    (2, 6, "wait+advance", None, 2, 3, 4),
]


@pytest.mark.parametrize("batch, window, schedule, max_run_tokens, wait_rows, wait_age, K", CONFIGS)
def test_policy_plans_equal_the_staircase_simulator(batch, window, schedule, max_run_tokens,
                                                    wait_rows, wait_age, K):
    opts = LoopOptions(mode="deferred", window=window, max_new_tokens=24, context=128,
                       batch=batch, schedule=schedule, wait_rows=wait_rows, wait_age=wait_age,
                       max_run_tokens=max_run_tokens)
    rng = np.random.default_rng([batch, window, K, len(schedule)])
    for _ in range(4):
        rates = rng.dirichlet(np.ones(K) * 0.7)  # from mostly shallow to mostly deep
        stops = rng.integers(2, 20, batch).tolist()
        draws = rng.choice(K, size=(batch, 24), p=rates).tolist()
        sim = Staircase(rng.integers(1, 7, batch).tolist(), stops, draws, K, opts)
        decode_and_compare(sim, K)


def test_plan_run_takes_rows_in_turn_within_the_cap():
    """Against a Python loop and the simulator's `run_lengths`, on inputs the staircase
    rarely reaches: flush rows first, then gate rows in turn from `offset` while their whole
    blocks fit the largest run; the rest wait, and advancing rows (a waiting gate row short
    of its gated token) fill the room of the chosen run."""
    shapes = ((4, 1), (8, 2), (8, 4))  # batch 4, W = 4, capped at 8 tokens
    rng = np.random.default_rng(0)
    for _ in range(200):
        start_B = rng.integers(0, 20, 4)
        stop_B = start_B + rng.integers(0, 5, 4)
        rows_B = rng.random(4) < 0.7
        first_B = rows_B & (rng.random(4) < 0.2)
        optional_B = ~rows_B & (rng.random(4) < 0.7)
        offset = int(rng.integers(0, 4))
        block = np.maximum(stop_B - start_B, 0)
        if block[first_B].sum() > 8:
            continue  # the loop admits only flushes that fit
        room, full, queue_open = 8 - block[first_B].sum(), first_B.copy(), True
        for b in [(offset + i) % 4 for i in range(4)]:
            if rows_B[b] and not first_B[b]:
                queue_open &= block[b] <= room
                if queue_open:
                    full[b], room = True, room - block[b]
        len_B, index, full_B = (np.asarray(x) for x in policy.plan_run(
            jnp.asarray(start_B), jnp.asarray(stop_B), jnp.asarray(rows_B),
            jnp.asarray(optional_B), shapes, 4, jnp.asarray(first_B), offset))
        np.testing.assert_array_equal(full_B, full)
        expected = run_lengths(start_B.tolist(), stop_B.tolist(), rows_B.tolist(),
                               optional_B.tolist(), first_B.tolist(), shapes, 4, offset)
        assert (len_B.tolist(), int(index)) == expected[:2]
        must = np.where(full, block, 0)
        assert (len_B[full] == block[full]).all()
        assert (len_B[rows_B & ~full] < np.maximum(block[rows_B & ~full], 1)).all()
        assert (len_B[~rows_B & ~optional_B] == 0).all() and (len_B <= block).all()
        if must.sum() == 0:
            assert index == 0 and len_B.sum() == 0
        else:
            tokens, width = shapes[index - 1]
            assert len_B.sum() <= tokens and len_B.max() <= width
            assert must.sum() <= tokens and must.max() <= width
