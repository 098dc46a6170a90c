"""Exact deferred-batch decoding (DESIGN §1 "Exact deferred decoding").

Segment s (0-based here) is layers [d_{s-1}, d_s). Per row the state keeps fill pointers
m_0 ≥ m_1 ≥ … ≥ m_{K-1} (segment s has written K/V for exactly the positions < m_s), the
position t of the last sampled token, and — in a ring of W + 1 slots indexed by position —
the residual stream of every pending position after its deepest computed segment.

One loop iteration:
  0. rows about to feed a token whose block would exceed W flush: every segment s ≥ 1 runs
     on [m_s, t) without gates (the token itself continues in the next iteration);
  1. for s = 0 … K−1: the rows whose token waits at segment s run it on their block
     [m_s, t] (a query at position p sees the cache below m_s and the block up to p), then
     gate at t with u_s of the row's own random stream; a row that exits picks exit s;
  2. one shared head for every row that exited this iteration, and one draw each.
Whether segment s ≥ 1 runs is the schedule: `lockstep` runs it whenever a row needs it
(the other rows masked); `advance` (the default) runs it likewise and lets the rows that do
not need it push their own pending positions through it; `wait` lets a row wait until
`wait_rows` rows need that segment (or it has waited `wait_age` iterations, or no row is
feeding a new token); `wait+advance` does both. Every draw is indexed by
(row, token) — `fold_in(fold_in(PRNGKey(seed), b), n)` split into K keys — never by
iteration, so every schedule, and `dense`, return the same tokens and exits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvium_jax.inference.sampling import (
    draw_from_head,
    draw_from_mixture,
    gate_uniform,
    row_keys,
    token_keys,
)
from nvium_jax.model.layers import LayerCache
from nvium_jax.model.transformer import check_token_ids

SCHEDULES = ("advance", "lockstep", "wait", "wait+advance")  # the first is the default
NOT_SAMPLED = -1  # output slots after a row stopped
MIXTURE_SAMPLED = -2  # exit of a token drawn from the transformed mixture (dense only)


class DecodeState(NamedTuple):
    k_cache: jax.Array  # [L, B, S, G, E], keys after RoPE, position-indexed
    v_cache: jax.Array
    ring_BxRxD: jax.Array  # residual of pending positions, slot = position mod (W + 1)
    fill_BxK: jax.Array  # m_s: segment s has K/V for positions < m_s
    pos_B: jax.Array  # t: position of the last sampled token (not fed in yet)
    token_B: jax.Array  # x_t
    need_B: jax.Array  # segment the current token runs next (0 = a fresh token)
    age_B: jax.Array  # iterations the current token has waited at its segment
    n_B: jax.Array  # new tokens so far
    done_B: jax.Array
    prompt_len_B: jax.Array
    row_key_Bx2: jax.Array  # fold_in(PRNGKey(seed), b)
    eos_id: jax.Array  # scalar int32, −1 = none (traced: changing it does not recompile)
    tokens_BxN: jax.Array
    exits_BxN: jax.Array
    flushes: jax.Array  # scalar int32
    # what the loop ran, for the byte model of `nvium bench decode` (prefill not counted)
    segment_runs_K: jax.Array  # batch-wide runs of each segment (flushes included)
    kv_reads: jax.Array  # Σ over runs and running rows of layers × positions of KV read
    exit_runs_K: jax.Array  # iterations in which some row drew from exit k (its adapter)
    head_runs: jax.Array  # iterations that ran the shared head


class GenerateOutput(NamedTuple):
    tokens_BxN: np.ndarray
    exits_BxN: np.ndarray
    lengths_B: np.ndarray
    flushes: int
    state: Optional[DecodeState]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Everything static about one decode: hashable, so it keys the compiled loop."""

    mode: str  # deferred | dense
    window: int
    max_new_tokens: int
    context: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    schedule: str = "advance"
    wait_rows: int = 1
    wait_age: int = 8
    attention: str = "auto"
    unroll: bool = True

    @property
    def exact(self) -> bool:
        return self.temperature == 1.0 and self.top_k is None and self.top_p is None

    @property
    def waits(self) -> bool:
        return self.schedule.startswith("wait")

    @property
    def advance(self) -> bool:
        return self.schedule.endswith("advance")

    @property
    def ring(self) -> int:
        return self.window + 1

    @property
    def block_widths(self) -> tuple[int, ...]:
        """Static block widths compiled per segment: powers of two below W, and W."""
        widths = {1 << i for i in range(int(math.log2(self.window)) + 1)} | {self.window}
        return tuple(sorted(w for w in widths if w <= self.window))


# ---- pieces -------------------------------------------------------------------------
def attention_fn(impl: str) -> Optional[Callable]:
    from nvium_jax.inference.kernels import block_attention

    return functools.partial(block_attention, impl=impl)


def run_segment(model, s, h_BxWxD, pos_BxW, valid_BxW, caches, opts):
    """Segment s on a block: masked slots neither write K/V nor (being at position 0)
    make the attention read past the rows' real positions."""
    start, stop = model.config.segments[s]
    pos_BxW = jnp.where(valid_BxW, pos_BxW, 0)
    return model.run_layers(
        h_BxWxD, pos_BxW, start, stop, caches=caches, write_BxT=valid_BxW,
        unroll=opts.unroll, attend_fn=attention_fn(opts.attention),
    )


def gate_q(model, s: int, z_BxD: jax.Array) -> jax.Array:
    """q_s = P(exit at s | reached s), float32 — one function for dense and deferred."""
    return jnp.exp(model.gate_logp(s, z_BxD[:, None])[:, 0, 0])


def choose_exit(model, h_KxBxD, keys_BxKx2, opts):
    """Sequential halting over fully computed exits (prefill and dense): the first s with
    u_s < q_s, else the final exit; returns (token, exit)."""
    K = model.config.n_exits
    B = h_KxBxD.shape[1]
    z_KxBxD = [model.exit_norm(k, h_KxBxD[k]) for k in range(K)]
    if not opts.exact:
        gates = [model.gate_logp(k, z[:, None])[:, 0] for k, z in enumerate(z_KxBxD[:-1])]
        gate_BxK1x2 = jnp.stack(gates, axis=1) if gates else jnp.zeros((B, 0, 2), jnp.float32)
        states = [model.exit_state(k, z) for k, z in enumerate(z_KxBxD)]
        token_B = draw_from_mixture(model, states, gate_BxK1x2, keys_BxKx2, opts.temperature,
                                    opts.top_k, opts.top_p)
        return token_B, jnp.full((B,), MIXTURE_SAMPLED, jnp.int32)
    exit_B = jnp.full((B,), K - 1, jnp.int32)
    for k in reversed(range(K - 1)):  # the shallowest exit that fires wins
        fires_B = gate_uniform(keys_BxKx2, k) < gate_q(model, k, z_KxBxD[k])
        exit_B = jnp.where(fires_B, k, exit_B)
    chosen_BxD = model.exit_state(K - 1, z_KxBxD[K - 1])
    for k in range(K - 1):
        chosen_BxD = jnp.where((exit_B == k)[:, None], model.exit_state(k, z_KxBxD[k]), chosen_BxD)
    return draw_from_head(model, chosen_BxD, keys_BxKx2), exit_B


def record_tokens(state: DecodeState, sampled_B, token_B, exit_B, opts) -> DecodeState:
    """Writes the new tokens of the rows in `sampled_B` and applies the stop rules."""
    rows_B = jnp.arange(sampled_B.shape[0])
    slot_B = jnp.where(sampled_B, state.n_B, opts.max_new_tokens)  # out of range: dropped
    n_B = state.n_B + sampled_B
    stop_B = (n_B >= opts.max_new_tokens) | (state.prompt_len_B + n_B >= opts.context)
    stop_B |= (state.eos_id >= 0) & (token_B == state.eos_id)
    return state._replace(
        tokens_BxN=state.tokens_BxN.at[rows_B, slot_B].set(token_B, mode="drop"),
        exits_BxN=state.exits_BxN.at[rows_B, slot_B].set(exit_B, mode="drop"),
        n_B=n_B,
        pos_B=state.pos_B + sampled_B,
        token_B=jnp.where(sampled_B, token_B, state.token_B),
        need_B=jnp.where(sampled_B, 0, state.need_B),
        age_B=jnp.where(sampled_B, 0, state.age_B),
        done_B=state.done_B | (sampled_B & stop_B),
    )


def count_run(state: DecodeState, s: int, rows_B, stop_B, model) -> DecodeState:
    """Segment s ran for `rows_B`, each reading its layers' KV below `stop_B`."""
    start, stop = model.config.segments[s]
    kv = jnp.sum(jnp.where(rows_B, stop_B, 0).astype(jnp.float32)) * (stop - start)
    return state._replace(
        segment_runs_K=state.segment_runs_K.at[s].add(1), kv_reads=state.kv_reads + kv
    )


def count_exits(state: DecodeState, sampled_B, exit_B, n_exits: int) -> DecodeState:
    drawn_K = jnp.any(sampled_B[:, None] & (exit_B[:, None] == jnp.arange(n_exits)), axis=0)
    return state._replace(
        exit_runs_K=state.exit_runs_K + drawn_K, head_runs=state.head_runs + jnp.any(sampled_B)
    )


# ---- prefill ------------------------------------------------------------------------
def prefill(model, prompts_BxP, prompt_len_B, row_key_Bx2, eos_id, cache_len: int, opts) -> DecodeState:
    """All layers over the right-padded prompts in one pass, then the first draw at
    position P_b − 1 (gates from every exit there; one head)."""
    cfg = model.config
    B, P = prompts_BxP.shape
    L, G, E, D, K = cfg.n_layers, cfg.kv_heads, cfg.head_dim, cfg.d_model, cfg.n_exits
    N = opts.max_new_tokens
    cache_dtype = model.dtype
    caches = LayerCache(
        jnp.zeros((L, B, cache_len, G, E), cache_dtype), jnp.zeros((L, B, cache_len, G, E), cache_dtype)
    )
    pos_BxP = jnp.broadcast_to(jnp.arange(P), (B, P))
    valid_BxP = pos_BxP < prompt_len_B[:, None]
    last_Bx1x1 = (prompt_len_B - 1)[:, None, None]
    h_BxPxD = model.embed(prompts_BxP)
    exit_h = []
    for s in range(K):
        h_BxPxD, caches = run_segment(model, s, h_BxPxD, pos_BxP, valid_BxP, caches, opts)
        exit_h.append(jnp.take_along_axis(h_BxPxD, last_Bx1x1, axis=1)[:, 0])
    state = DecodeState(
        k_cache=caches.k_BxSxGxE,
        v_cache=caches.v_BxSxGxE,
        ring_BxRxD=jnp.zeros((B, opts.ring, D), model.dtype),
        fill_BxK=jnp.broadcast_to(prompt_len_B[:, None], (B, K)).astype(jnp.int32),
        pos_B=(prompt_len_B - 1).astype(jnp.int32),
        token_B=jnp.zeros((B,), jnp.int32),
        need_B=jnp.zeros((B,), jnp.int32),
        age_B=jnp.zeros((B,), jnp.int32),
        n_B=jnp.zeros((B,), jnp.int32),
        done_B=jnp.zeros((B,), bool),
        prompt_len_B=prompt_len_B.astype(jnp.int32),
        row_key_Bx2=row_key_Bx2,
        eos_id=jnp.asarray(eos_id, jnp.int32),
        tokens_BxN=jnp.full((B, N), NOT_SAMPLED, jnp.int32),
        exits_BxN=jnp.full((B, N), NOT_SAMPLED, jnp.int32),
        flushes=jnp.int32(0),
        segment_runs_K=jnp.zeros((K,), jnp.int32),
        kv_reads=jnp.float32(0),
        exit_runs_K=jnp.zeros((K,), jnp.int32),
        head_runs=jnp.int32(0),
    )
    keys_BxKx2 = token_keys(row_key_Bx2, state.n_B, K)
    token_B, exit_B = choose_exit(model, jnp.stack(exit_h), keys_BxKx2, opts)
    return record_tokens(state, jnp.ones((B,), bool), token_B, exit_B, opts)


# ---- one iteration of each mode -----------------------------------------------------
def dense_iteration(model, state: DecodeState, active_B, opts) -> DecodeState:
    """Every layer for every active row's token, then the same draw as prefill."""
    K = model.config.n_exits
    pos_Bx1 = state.pos_B[:, None]
    valid_Bx1 = active_B[:, None]
    caches = LayerCache(state.k_cache, state.v_cache)
    h_Bx1xD = model.embed(state.token_B[:, None])
    exit_h = []
    for s in range(K):
        h_Bx1xD, caches = run_segment(model, s, h_Bx1xD, pos_Bx1, valid_Bx1, caches, opts)
        exit_h.append(h_Bx1xD[:, 0])
    keys_BxKx2 = token_keys(state.row_key_Bx2, state.n_B, K)
    token_B, exit_B = choose_exit(model, jnp.stack(exit_h), keys_BxKx2, opts)
    fill_BxK = jnp.where(valid_Bx1, state.pos_B[:, None] + 1, state.fill_BxK)
    state = state._replace(k_cache=caches.k_BxSxGxE, v_cache=caches.v_BxSxGxE, fill_BxK=fill_BxK)
    for s in range(K):
        state = count_run(state, s, active_B, state.pos_B + 1, model)
    state = count_exits(state, active_B, exit_B, K)
    return record_tokens(state, active_B, token_B, exit_B, opts)


def ring_block(state: DecodeState, s: int, start_B, stop_B, rows_B, width: int, model, opts):
    """Runs segment s ≥ 1 on positions [start_b, stop_b) of each row in `rows_B` (block of
    `width` slots), reading and writing the ring; returns (state, h_BxWxD)."""
    R = opts.ring
    pos_BxW = start_B[:, None] + jnp.arange(width)
    valid_BxW = rows_B[:, None] & (pos_BxW < stop_B[:, None])
    slot_BxW = pos_BxW % R
    h_BxWxD = jnp.take_along_axis(state.ring_BxRxD, slot_BxW[..., None], axis=1)
    caches = LayerCache(state.k_cache, state.v_cache)
    h_BxWxD, caches = run_segment(model, s, h_BxWxD, pos_BxW, valid_BxW, caches, opts)
    rows_Bx1 = jnp.arange(rows_B.shape[0])[:, None]
    ring = state.ring_BxRxD.at[rows_Bx1, jnp.where(valid_BxW, slot_BxW, R)].set(h_BxWxD, mode="drop")
    state = state._replace(k_cache=caches.k_BxSxGxE, v_cache=caches.v_BxSxGxE, ring_BxRxD=ring)
    return state, h_BxWxD


def run_blocks(state, s, start_B, stop_B, rows_B, model, opts):
    """`ring_block` at the smallest compiled width that holds every row's block."""
    widths = opts.block_widths
    need_w = jnp.max(jnp.where(rows_B, stop_B - start_B, 0))
    branch = jnp.minimum(jnp.searchsorted(jnp.asarray(widths), need_w), len(widths) - 1)
    B, D = state.ring_BxRxD.shape[0], state.ring_BxRxD.shape[-1]

    def at_width(width, state):
        state, h_BxWxD = ring_block(state, s, start_B, stop_B, rows_B, width, model, opts)
        index_B = jnp.clip(state.pos_B - start_B, 0, width - 1)
        return state, jnp.take_along_axis(h_BxWxD, index_B[:, None, None], axis=1)[:, 0]

    branches = [functools.partial(at_width, w) for w in widths]
    state, h_t_BxD = jax.lax.switch(branch, branches, state)
    fill_BxK = state.fill_BxK.at[:, s].set(jnp.where(rows_B, jnp.maximum(stop_B, start_B), state.fill_BxK[:, s]))
    return state._replace(fill_BxK=fill_BxK), h_t_BxD.reshape(B, D)


def first_segment(state: DecodeState, rows_B, model, opts):
    """Segment 0 on each running row's new token x_t (a block of one); returns (state, h_t)."""
    B, t_B, R = rows_B.shape[0], state.pos_B, opts.ring
    caches = LayerCache(state.k_cache, state.v_cache)
    h_Bx1xD = model.embed(state.token_B[:, None])
    h_Bx1xD, caches = run_segment(model, 0, h_Bx1xD, t_B[:, None], rows_B[:, None], caches, opts)
    ring = state.ring_BxRxD.at[jnp.arange(B), jnp.where(rows_B, t_B % R, R)].set(h_Bx1xD[:, 0], mode="drop")
    fill_BxK = state.fill_BxK.at[:, 0].set(jnp.where(rows_B, t_B + 1, state.fill_BxK[:, 0]))
    state = state._replace(k_cache=caches.k_BxSxGxE, v_cache=caches.v_BxSxGxE, ring_BxRxD=ring,
                           fill_BxK=fill_BxK)
    return count_run(state, 0, rows_B, t_B + 1, model), h_Bx1xD[:, 0]


def exit_decision(model, s: int, h_t_BxD, gate_rows_B, keys_BxKx2):
    """Rows of `gate_rows_B` whose token exits at s (u_s < q_s; always at the final exit),
    and the head input of exit s for them (the adapter runs only when one exits)."""
    z_BxD = model.exit_norm(s, h_t_BxD)
    if s < model.config.n_exits - 1:
        exits_B = gate_rows_B & (gate_uniform(keys_BxKx2, s) < gate_q(model, s, z_BxD))
    else:
        exits_B = gate_rows_B
    state_BxD = jax.lax.cond(jnp.any(exits_B), lambda: model.exit_state(s, z_BxD), lambda: z_BxD)
    return exits_B, state_BxD


def deferred_iteration(model, state: DecodeState, active_B, opts) -> DecodeState:
    cfg = model.config
    K, B, D = cfg.n_exits, state.pos_B.shape[0], cfg.d_model
    t_B = state.pos_B
    flush_B = active_B & (state.need_B == 0) & (t_B - state.fill_BxK[:, K - 1] + 1 > opts.window)
    keys_BxKx2 = token_keys(state.row_key_Bx2, state.n_B, K)
    chosen_BxD = jnp.zeros((B, D), model.dtype)
    exit_B = jnp.zeros((B,), jnp.int32)
    sampled_B = jnp.zeros((B,), bool)
    moved_B = jnp.zeros((B,), bool)
    fed_new_token = jnp.any(active_B & (state.need_B == 0))
    for s in range(K):
        waiting_B = active_B & (state.need_B == s)
        if s == 0:
            gate_rows_B = rows_B = waiting_B
            start_B, stop_B = t_B, t_B + 1
        else:
            gate_rows_B = waiting_B & ~flush_B
            gate_rows_B &= segment_runs(gate_rows_B, state, fed_new_token, opts)
            advance_B = flush_B | (opts.advance & jnp.any(gate_rows_B) & active_B & ~gate_rows_B)
            start_B = state.fill_BxK[:, s]
            stop_B = jnp.where(gate_rows_B, t_B + 1, jnp.minimum(state.fill_BxK[:, s - 1], t_B))
            rows_B = gate_rows_B | advance_B

        def run(state, s=s, start_B=start_B, stop_B=stop_B, rows_B=rows_B, gate_rows_B=gate_rows_B):
            if s == 0:
                state, h_t_BxD = first_segment(state, rows_B, model, opts)
            else:
                state = count_run(state, s, rows_B, stop_B, model)
                state, h_t_BxD = run_blocks(state, s, start_B, stop_B, rows_B, model, opts)
            return (state, *exit_decision(model, s, h_t_BxD, gate_rows_B, keys_BxKx2))

        def skip(state):
            return state, jnp.zeros((B,), bool), jnp.zeros((B, D), model.dtype)

        state, exits_now_B, exit_state_BxD = jax.lax.cond(jnp.any(rows_B), run, skip, state)
        chosen_BxD = jnp.where(exits_now_B[:, None], exit_state_BxD, chosen_BxD)
        exit_B = jnp.where(exits_now_B, s, exit_B)
        sampled_B |= exits_now_B
        moved_B |= gate_rows_B
        need_B = jnp.where(gate_rows_B, jnp.where(exits_now_B, -1, s + 1), state.need_B)
        state = state._replace(need_B=need_B)
    age_B = jnp.where(moved_B, 0, state.age_B + (active_B & (state.need_B > 0)))
    state = state._replace(age_B=age_B, flushes=state.flushes + jnp.any(flush_B))
    state = count_exits(state, sampled_B, exit_B, K)
    token_B = jax.lax.cond(
        jnp.any(sampled_B),
        lambda: draw_from_head(model, chosen_BxD, keys_BxKx2),
        lambda: jnp.zeros((B,), jnp.int32),
    )
    return record_tokens(state, sampled_B, token_B, exit_B, opts)


def segment_runs(waiting_B, state: DecodeState, fed_new_token, opts):
    """Whether a deep segment runs this iteration for the rows waiting at it."""
    anyone = jnp.any(waiting_B)
    if not opts.waits:
        return anyone
    enough = jnp.sum(waiting_B) >= opts.wait_rows
    starving = jnp.any(waiting_B & (state.age_B >= opts.wait_age))
    return anyone & (enough | starving | ~fed_new_token)


def decode_loop(model, state: DecodeState, n_limit, opts) -> DecodeState:
    """Iterates until every row stopped or holds `n_limit` new tokens (a traced bound, so
    streaming runs chunks of one compiled loop)."""
    iteration = dense_iteration if opts.mode == "dense" else deferred_iteration

    def active(state):
        return ~state.done_B & (state.n_B < n_limit)

    return jax.lax.while_loop(
        lambda state: jnp.any(active(state)),
        lambda state: iteration(model, state, active(state), opts),
        state,
    )


def flush_state(model, state: DecodeState, opts) -> DecodeState:
    """Runs every segment s ≥ 1 on its pending positions [m_s, t) for every row."""
    K = model.config.n_exits
    rows_B = jnp.ones_like(state.done_B)
    for s in range(1, K):
        start_B = state.fill_BxK[:, s]
        stop_B = jnp.minimum(state.fill_BxK[:, s - 1], state.pos_B)
        state, _ = jax.lax.cond(
            jnp.any(stop_B > start_B),
            lambda state, s=s, a=start_B, b=stop_B: run_blocks(state, s, a, b, rows_B, model, opts),
            lambda state: (state, jnp.zeros(state.ring_BxRxD[:, 0].shape, state.ring_BxRxD.dtype)),
            state,
        )
    return state


# ---- jitted entry points --------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "opts"))
def _prefill_jit(graphdef, params, prompts_BxP, prompt_len_B, row_key_Bx2, eos_id, cache_len, opts):
    model = nnx.merge(graphdef, params)
    return prefill(model, prompts_BxP, prompt_len_B, row_key_Bx2, eos_id, cache_len, opts)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"), donate_argnames=("state",))
def _loop_jit(graphdef, params, state, n_limit, opts):
    return decode_loop(nnx.merge(graphdef, params), state, n_limit, opts)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _flush_jit(graphdef, params, state, opts):
    return flush_state(nnx.merge(graphdef, params), state, opts)


# ---- host side ------------------------------------------------------------------------
def prompt_batch(prompts, vocab_size: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates prompts (list of id lists, or a B×T int array) and right-pads them."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise ValueError(f"prompts must be a list of token-id lists or a B×T array, got shape {array.shape}")
        rows = list(array)
    else:
        rows = [np.asarray(row) for row in prompts]
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt")
    for b, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token (e.g. BOS)")
        check_token_ids(row, vocab_size, what=f"prompt {b}")
        if row.size >= context:
            raise ValueError(
                f"prompt {b} has {row.size} tokens, but model.context is {context}: a prompt must be "
                f"shorter than the context (leave room for new tokens)"
            )
    lengths_B = np.array([row.size for row in rows], np.int32)
    padded_BxP = np.zeros((len(rows), int(lengths_B.max())), np.int32)
    for b, row in enumerate(rows):
        padded_BxP[b, : row.size] = row
    return padded_BxP, lengths_B


def non_exact_options(temperature, top_k, top_p) -> list[str]:
    """The sampler options that leave the exact mixture sample (they need decode="dense")."""
    options = (
        (f"temperature={temperature}", temperature is not None and temperature != 1.0),
        (f"top_k={top_k}", top_k is not None),
        (f"top_p={top_p}", top_p is not None),
    )
    return [name for name, is_set in options if is_set]


def check_sampling(decode: str, temperature, top_k, top_p, window, max_new_tokens, schedule) -> None:
    if decode not in ("deferred", "dense"):
        raise ValueError(f'decode={decode!r}: use "deferred" or "dense"')
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: give a positive integer")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window={window!r}: give a positive integer (1 = no deferral)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: give a value ≥ 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: give a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}: give a value in (0, 1] or None")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    non_exact = non_exact_options(temperature, top_k, top_p)
    if non_exact and decode == "deferred":
        raise ValueError(
            f"{', '.join(non_exact)} needs decode=\"dense\": greedy, temperature, top-k and top-p act "
            f"on the full mixture and need every exit's head at every token, which deferred decoding "
            f"does not compute (it samples the mixture exactly at temperature 1 only)"
        )


def default_wait_rows(batch: int) -> int:
    """A deep segment runs when ≈ 3/8 of the batch waits for it (DESIGN §1 "Batch")."""
    return max(1, math.ceil(3 * batch / 8))


def decode_options(model, batch, max_new_tokens, decode, window, temperature, top_k, top_p,
                   schedule, wait_rows, wait_age, attention, unroll) -> DecodeOptions:
    return DecodeOptions(
        mode=decode, window=int(window) if decode == "deferred" else 1,  # dense defers nothing
        max_new_tokens=int(max_new_tokens), context=model.config.context,
        temperature=float(temperature), top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p), schedule=schedule,
        wait_rows=default_wait_rows(batch) if wait_rows is None else int(wait_rows),
        wait_age=int(wait_age), attention=attention, unroll=bool(unroll),
    )


def cache_length(longest_prompt: int, max_new_tokens: int, context: int) -> int:
    """Positions the cache must hold (every token fed in), rounded up to a multiple of 16
    for the attention kernel's tiles, never past the context."""
    need = longest_prompt + max_new_tokens
    return min(context, -(-need // 16) * 16)


def generate(
    model,
    prompts,
    max_new_tokens: int,
    *,
    seed: int = 0,
    decode: str = "deferred",
    window: int = 16,
    eos_id: Optional[int] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    return_state: bool = False,
    schedule: str = SCHEDULES[0],
    wait_rows: Optional[int] = None,
    wait_age: int = 8,
    attention: str = "auto",
    unroll: bool = True,
    on_tokens: Optional[Callable[[np.ndarray, np.ndarray], None]] = None,
    stream_every: int = 8,
) -> GenerateOutput:
    """Samples up to `max_new_tokens` new tokens for each prompt (DESIGN §3).

    `decode="deferred"` samples the exact mixture while deferring the upper layers of
    early-exited tokens; `"dense"` runs every layer for every token with the same random
    stream (the oracle and the speed baseline) and is the only mode for greedy
    (`temperature=0`), temperature, top-k and top-p. `schedule` (advance | lockstep | wait |
    wait+advance), `wait_rows` and `wait_age` choose how a batch shares deep segments; every
    choice returns the same tokens.
    `on_tokens(tokens_BxN, lengths_B)` is called after every `stream_every` tokens per row
    (the loop then runs in chunks of the same compiled code).
    """
    cfg = model.config
    check_sampling(decode, temperature, top_k, top_p, window, max_new_tokens, schedule)
    prompts_BxP, prompt_len_B = prompt_batch(prompts, cfg.vocab_size, cfg.context)
    B = prompts_BxP.shape[0]
    opts = decode_options(model, B, max_new_tokens, decode, window, temperature, top_k,
                          top_p, schedule, wait_rows, wait_age, attention, unroll)
    graphdef, params = nnx.split(model)
    cache_len = cache_length(prompts_BxP.shape[1], opts.max_new_tokens, cfg.context)
    state = _prefill_jit(graphdef, params, jnp.asarray(prompts_BxP), jnp.asarray(prompt_len_B),
                         row_keys(seed, B), -1 if eos_id is None else int(eos_id), cache_len, opts)
    if on_tokens is None:
        state = _loop_jit(graphdef, params, state, jnp.int32(opts.max_new_tokens), opts)
    else:
        n_limit = 1
        while True:
            on_tokens(np.asarray(state.tokens_BxN), np.asarray(state.n_B))
            if bool(np.all(np.asarray(state.done_B))):
                break
            n_limit += stream_every
            state = _loop_jit(graphdef, params, state, jnp.int32(n_limit), opts)
    done_B = np.asarray(state.done_B)
    if not done_B.all():
        raise RuntimeError(f"decode loop ended with rows {np.flatnonzero(~done_B)} unfinished")
    return GenerateOutput(
        tokens_BxN=np.asarray(state.tokens_BxN),
        exits_BxN=np.asarray(state.exits_BxN),
        lengths_B=np.asarray(state.n_B),
        flushes=int(state.flushes),
        state=state if return_state else None,
    )


def flush(model, state: DecodeState, *, attention: str = "auto", unroll: bool = True) -> DecodeState:
    """Completes every pending segment, so the cache holds every layer's K/V for every
    position fed in (0 … P_b + n_b − 2)."""
    ring = state.ring_BxRxD.shape[1]
    opts = DecodeOptions(mode="deferred", window=ring - 1, max_new_tokens=state.tokens_BxN.shape[1],
                         context=model.config.context, attention=attention, unroll=unroll)
    graphdef, params = nnx.split(model)
    return _flush_jit(graphdef, params, state, opts)
