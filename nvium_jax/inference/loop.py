"""The decode iterations (deferred and dense), the loop and the flush: they execute the plans
of `policy.py` — run segments, gate, write the ring and the pending K/V, draw.

One deferred iteration executes its flush plan (rows that flush, rows that feed x_t), then:
  1. segment 0 on each fed row's new token x_t, then its gate;
  2. for s = 1 … K−1: segment s's run plan — the flushing rows' blocks [m_s, t) without
     gates, the gated rows' blocks [m_s, t] (a query at position p sees the cache below m_s
     and the block up to p) with the gate at t, u_s from the row's own random stream (a row
     that exits picks exit s), and the prefixes the schedule advances;
  3. one shared head for every row that exited this iteration, and one draw each.
Every draw is indexed by (row, token) — `fold_in(fold_in(PRNGKey(seed), b), n)` split into
K keys — never by iteration, so every schedule, and `dense`, return the same tokens and
exits; per-exit sampling changes only what a gate compares and the transform of the one
head drawn from.

What a GPU pays besides bytes is kept small: a deep segment is one `lax.switch` per
iteration (skip, or one (tokens, width) run shape), its index computed arithmetically; the
gate, adapter and head run unconditionally where they are needed; nothing is written inside
a branch — the ring after the switch, the cache at the start of the next iteration (before
anything reads it), so XLA copies neither.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nvium_jax.inference.policy import (
    RunPlan,
    next_age,
    plan_final_flush,
    plan_flushes,
    plan_segment,
)
from nvium_jax.inference.sampling import draw_from_head, token_keys
from nvium_jax.inference.segments import pack_blocks, run_packed, run_rows
from nvium_jax.inference.state import (
    DecodeState,
    choose_exit,
    count_head,
    count_run,
    drop_pending,
    gate_exits,
    pending_kv,
    record_tokens,
    write_pending,
)


def exit_decision(model, s: int, h_t_BxD, gate_rows_B, keys_BxKx2, opts):
    """Rows of `gate_rows_B` whose token exits at s (u_s < q'_s; always at the final exit),
    and the head input of exit s for every row (norm and adapter: cheaper than a branch)."""
    z_BxD = model.exit_norm(s, h_t_BxD)
    if s < model.config.n_exits - 1:
        exits_B = gate_rows_B & gate_exits(model, s, z_BxD, keys_BxKx2, opts)
    else:
        exits_B = gate_rows_B
    return exits_B, model.exit_state(s, z_BxD)


def write_ring(ring_BxRxD, h_NxD, row_N, pos_N, valid_N):
    R = ring_BxRxD.shape[1]
    return ring_BxRxD.at[row_N, jnp.where(valid_N, pos_N % R, R)].set(h_NxD, mode="drop")


def first_segment(model, layers, state: DecodeState, rows_B, keys_BxKx2, opts):
    """Segment 0 on each running row's new token x_t (a block of one), and its gate;
    returns (state, exits_B, exit_state_BxD). Under a waiting schedule an iteration may
    feed no new token, so there it sits in a `lax.cond`."""
    B, t_B = rows_B.shape[0], state.pos_B
    start, stop = model.config.segments[0]
    k_seg, v_seg = state.k_layers[start:stop], state.v_layers[start:stop]

    def run(k_seg, v_seg):
        h_Bx1xD, kv = run_rows(model, layers, 0, *by_layer(start, k_seg, v_seg),
                               model.embed(state.token_B[:, None]), t_B[:, None],
                               rows_B[:, None], t_B, opts.attention)
        exits_B, exit_state_BxD = exit_decision(model, 0, h_Bx1xD[:, 0], rows_B, keys_BxKx2,
                                                 opts)
        return h_Bx1xD[:, 0], kv, exits_B, exit_state_BxD

    if opts.waits:
        ran = jnp.any(rows_B)
        h_BxD, (k_list, v_list), exits_B, exit_state_BxD = jax.lax.cond(
            ran, run, skip_branch(run, k_seg, v_seg), k_seg, v_seg)
    else:
        ran = jnp.array(True)
        h_BxD, (k_list, v_list), exits_B, exit_state_BxD = run(k_seg, v_seg)
    state = state._replace(
        pending=set_at(state.pending, 0, one_token_per_row(k_list, v_list, t_B, rows_B, state)),
        ring_BxRxD=write_ring(state.ring_BxRxD, h_BxD, jnp.arange(B), t_B, rows_B),
        fill_BxK=state.fill_BxK.at[:, 0].set(jnp.where(rows_B, t_B + 1, state.fill_BxK[:, 0])),
    )
    return count_run(state, 0, ran, rows_B, t_B + 1, model, exits=True), exits_B, exit_state_BxD


def run_blocks(model, layers, state: DecodeState, s: int, plan: RunPlan, opts,
               keys_BxKx2=None):
    """Executes segment s ≥ 1's run plan — one `lax.switch`. With `keys_BxKx2`, each row of
    `plan.gate_B` has its token (its block's last) meet exit s; returns (state, exits_B,
    exit_state_BxD)."""
    cfg = model.config
    B, D = plan.start_B.shape[0], cfg.d_model
    start, stop = cfg.segments[s]
    start_B, len_B = plan.start_B, plan.len_B
    shapes = opts.run_shapes
    most = shapes[-1][0]
    rows_B = len_B > 0
    packed = pack_blocks(start_B, len_B, most)
    off_B = jnp.cumsum(len_B) - len_B
    pad = lambda x, size: jnp.pad(x, [(0, most - size)] + [(0, 0)] * (x.ndim - 1))

    def finish(h_NxD, k_list, v_list, size, last_B):
        out = (pad(h_NxD, size), [pad(k, size) for k in k_list], [pad(v, size) for v in v_list])
        if keys_BxKx2 is None:
            return out + (jnp.zeros((B,), bool), jnp.zeros((B, D), model.dtype))
        return out + exit_decision(model, s, h_NxD[last_B], plan.gate_B, keys_BxKx2, opts)

    def packed_run(size, width, ring_BxRxD, k_seg, v_seg):
        kv_layers = by_layer(start, k_seg, v_seg)
        p = jax.tree.map(lambda x: x[:size], packed)
        h_NxD = ring_BxRxD[p.row_N, p.pos_N % opts.ring]
        if B == 1:  # one row: the packed list is the row's block
            h_1xNxD, (k_list, v_list) = run_rows(
                model, layers, s, *kv_layers, h_NxD[None], p.pos_N[None], p.valid_N[None],
                start_B, opts.attention)
            h_NxD, k_list, v_list = h_1xNxD[0], [k[0] for k in k_list], [v[0] for v in v_list]
        else:
            h_NxD, (k_list, v_list) = run_packed(
                model, layers, s, *kv_layers, h_NxD, p, start_B, len_B, width, opts.attention)
        last_B = jnp.clip(off_B + len_B - 1, 0, size - 1)  # a gate row's token is its last
        return finish(h_NxD, k_list, v_list, size, last_B)

    def one_per_row(ring_BxRxD, k_seg, v_seg):
        kv_layers = by_layer(start, k_seg, v_seg)
        h_BxD = ring_BxRxD[jnp.arange(B), start_B % opts.ring]
        h_Bx1xD, (k_list, v_list) = run_rows(
            model, layers, s, *kv_layers, h_BxD[:, None], start_B[:, None], rows_B[:, None],
            start_B, opts.attention)
        # into packed order: packed token n is row n's only token
        to_packed = lambda x_BxY: x_BxY[:, 0][packed.row_N[:B]]
        return finish(to_packed(h_Bx1xD), [to_packed(k) for k in k_list],
                      [to_packed(v) for v in v_list], B, jnp.clip(off_B, 0, B - 1))

    branches = [one_per_row if (B > 1 and width == 1) else functools.partial(packed_run, size, width)
                for size, width in shapes]
    operands = (state.ring_BxRxD, state.k_layers[start:stop], state.v_layers[start:stop])
    branches.insert(0, skip_branch(branches[-1], *operands))
    h_NxD, k_list, v_list, exits_B, exit_state_BxD = jax.lax.switch(plan.index, branches, *operands)
    kv = pending_kv(k_list, v_list, packed.row_N, packed.pos_N, packed.valid_N, state.cache_len)
    stop_B = start_B + len_B
    state = state._replace(
        pending=set_at(state.pending, s, kv),
        ring_BxRxD=write_ring(state.ring_BxRxD, h_NxD, packed.row_N, packed.pos_N, packed.valid_N),
        fill_BxK=state.fill_BxK.at[:, s].set(jnp.where(rows_B, stop_B, state.fill_BxK[:, s])),
    )
    state = count_run(state, s, plan.index > 0, rows_B, stop_B, model,
                      exits=keys_BxKx2 is not None)
    return state, exits_B, exit_state_BxD


def deferred_iteration(model, layers, state: DecodeState, active_B, opts) -> DecodeState:
    cfg = model.config
    K, B, D = cfg.n_exits, state.pos_B.shape[0], cfg.d_model
    flush = plan_flushes(state.fill_BxK, state.pos_B, state.need_B, active_B, state.iteration,
                         opts)
    keys_BxKx2 = token_keys(state.row_key_Bx2, state.n_B, K)
    chosen_BxD = jnp.zeros((B, D), model.dtype)
    exit_B = jnp.zeros((B,), jnp.int32)
    sampled_B = jnp.zeros((B,), bool)
    moved_B = jnp.zeros((B,), bool)
    for s in range(K):
        if s == 0:
            gate_B = flush.fed_B
            state, exits_now_B, exit_state_BxD = first_segment(
                model, layers, state, flush.fed_B, keys_BxKx2, opts)
        else:
            plan = plan_segment(s, state.fill_BxK, state.pos_B, state.need_B, state.age_B,
                                active_B, flush, sampled_B, state.iteration, opts)
            gate_B = plan.gate_B  # the other rows waiting at s wait for a later run
            state, exits_now_B, exit_state_BxD = run_blocks(model, layers, state, s, plan, opts,
                                                            keys_BxKx2)
        chosen_BxD = jnp.where(exits_now_B[:, None], exit_state_BxD, chosen_BxD)
        exit_B = jnp.where(exits_now_B, s, exit_B)
        sampled_B |= exits_now_B
        moved_B |= gate_B
        need_B = jnp.where(gate_B, jnp.where(exits_now_B, -1, s + 1), state.need_B)
        state = state._replace(need_B=need_B)
    state = state._replace(age_B=next_age(state.age_B, moved_B, state.need_B, active_B),
                           flushes=state.flushes + jnp.any(flush.flush_B))
    # the chosen exit's head, transformed under per-exit sampling: cheaper than a branch round it
    token_B = draw_from_head(model, chosen_BxD, keys_BxKx2, opts.head)
    return record_tokens(state, sampled_B, token_B, exit_B, opts)


def dense_iteration(model, layers, state: DecodeState, active_B, opts) -> DecodeState:
    """Every layer for every active row's token, then the same draw as prefill."""
    cfg = model.config
    K = cfg.n_exits
    t_B = state.pos_B
    h_Bx1xD = model.embed(state.token_B[:, None])
    exit_h = []
    for s in range(K):
        h_Bx1xD, (k_list, v_list) = run_rows(
            model, layers, s, state.k_layers, state.v_layers, h_Bx1xD, t_B[:, None],
            active_B[:, None], t_B, opts.attention)
        kv = one_token_per_row(k_list, v_list, t_B, active_B, state)
        state = state._replace(pending=set_at(state.pending, s, kv))
        state = count_run(state, s, jnp.array(True), active_B, t_B + 1, model, exits=True)
        exit_h.append(h_Bx1xD[:, 0])
    keys_BxKx2 = token_keys(state.row_key_Bx2, state.n_B, K)
    token_B, exit_B = choose_exit(model, jnp.stack(exit_h), keys_BxKx2, opts)
    state = state._replace(fill_BxK=jnp.where(active_B[:, None], t_B[:, None] + 1, state.fill_BxK))
    return record_tokens(state, active_B, token_B, exit_B, opts)


def decode_loop(model, layers, state: DecodeState, n_limit, opts) -> DecodeState:
    """Iterates until every row stopped or holds `n_limit` new tokens (a traced bound, so
    streaming runs chunks of one compiled loop)."""
    iteration = dense_iteration if opts.mode == "dense" else deferred_iteration

    def active(state):
        return ~state.done_B & (state.n_B < n_limit)

    def body(state):
        state = write_pending(state, model)  # last iteration's K/V, before any read
        state = iteration(model, layers, state, active(state), opts)
        return count_head(state._replace(iteration=state.iteration + 1))

    state = jax.lax.while_loop(lambda state: jnp.any(active(state)), body, state)
    return drop_pending(write_pending(state, model))


def flush_state(model, layers, state: DecodeState, opts) -> DecodeState:
    """Runs every segment s ≥ 1 on its pending positions [m_s, t) for every row."""
    state = write_pending(state, model)
    for s in range(1, model.config.n_exits):
        plan = plan_final_flush(s, state.fill_BxK, state.pos_B, opts)  # flush's options hold B × W
        state, _, _ = run_blocks(model, layers, state, s, plan, opts)
    return drop_pending(write_pending(state, model))


def skip_branch(branch, *operands):
    """A branch that runs nothing and returns zeros shaped like `branch`'s results."""
    shapes = jax.eval_shape(branch, *operands)
    return lambda *_: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def one_token_per_row(k_list, v_list, t_B, valid_B, state: DecodeState):
    """The pending K/V of a run on one token per row ([B, 1] per layer) at positions t_B."""
    B = t_B.shape[0]
    return pending_kv([k[:, 0] for k in k_list], [v[:, 0] for v in v_list], jnp.arange(B), t_B,
                      valid_B, state.cache_len)


def by_layer(start: int, k_seg, v_seg) -> tuple[dict, dict]:
    """A segment's K and V buffers keyed by layer index."""
    return (dict(enumerate(k_seg, start)), dict(enumerate(v_seg, start)))


def set_at(items: tuple, index: int, value) -> tuple:
    return items[:index] + (value,) + items[index + 1:]
