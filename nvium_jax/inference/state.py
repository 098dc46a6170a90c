"""The decode state, the static options of one decode, the prefill, and the bookkeeping that
every iteration shares (recording tokens, the stop rules, the optional run counters of the
byte model).

Per row the state keeps fill pointers m_0 ≥ m_1 ≥ … ≥ m_{K-1} (segment s has written K/V
for exactly the positions < m_s), the position t of the last sampled token, and — in a ring
of W + 1 slots indexed by position — the residual stream of every pending position after
its deepest computed segment. The KV cache is one buffer per layer, [B·G, S, E] (kv heads
before positions, the layout the attention's matmuls read without a transpose; batch and kv
heads merged, since on XLA CPU a loop-carried buffer with a leading axis of 1 is copied
whole at every in-place update); `k_cache` and `v_cache` give the DESIGN §3 view,
[L, B, S, G, E].
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from nvium_jax.inference.sampling import (
    IDENTITY,
    HeadTransform,
    draw_from_head,
    draw_from_mixture,
    gate_fires,
    token_keys,
)

SCHEDULES = ("advance", "lockstep", "wait", "wait+advance")  # the first is the default
NOT_SAMPLED = -1  # output slots after a row stopped
MIXTURE_SAMPLED = -2  # exit of a token drawn from the transformed mixture (dense only)


class PendingKV(NamedTuple):
    """The K/V that segment s computed in the last iteration, for its layers: N tokens,
    each bound for (row, position); a position ≥ S is dropped. The loop writes them at the
    start of the next iteration, before anything reads the cache: a buffer written after it
    was read in the same loop iteration is copied whole by XLA to keep the old values."""

    k_LsxNxGxE: jax.Array
    v_LsxNxGxE: jax.Array
    row_N: jax.Array
    target_N: jax.Array


class DecodeState(NamedTuple):
    k_layers: tuple  # one [B·G, S, E] per layer: keys after RoPE, position-indexed
    v_layers: tuple
    pending: tuple  # one PendingKV per segment, not yet in the cache
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
    iteration: jax.Array  # scalar int32, loop iterations so far (whose turn it is to run)
    stats: Optional["DecodeStats"]  # what the loop ran, when asked (`LoopOptions.stats`)

    @property
    def cache_len(self) -> int:
        """S, the positions each layer's buffer holds."""
        return self.k_layers[0].shape[1]

    @property
    def k_cache(self) -> jax.Array:
        """Every layer's keys, [L, B, S, G, E] (DESIGN §3); complete whenever the state
        leaves a compiled function (the loop writes its pending K/V before it returns)."""
        return cache_view(self.k_layers, self.pos_B.shape[0])

    @property
    def v_cache(self) -> jax.Array:
        return cache_view(self.v_layers, self.pos_B.shape[0])


class DecodeStats(NamedTuple):
    """What the loop ran, for the byte model of `nvium bench decode` (prefill not counted)."""

    segment_runs_K: jax.Array  # batch-wide runs of each segment's layers (flushes included)
    kv_reads: jax.Array  # Σ over runs and running rows of layers × positions of KV read
    exit_runs_K: jax.Array  # runs of exit k's norm, router and adapter (final: its norm)
    head_runs: jax.Array  # runs of the shared head (one per iteration)


def cache_view(layers: tuple, batch: int) -> jax.Array:
    """Per-layer [B·G, S, E] buffers as one [L, B, S, G, E] array."""
    L = len(layers)
    _, S, E = layers[0].shape
    return jnp.stack(layers).reshape(L, batch, -1, S, E).swapaxes(2, 3)


def row_view(cache_BGxSxE: jax.Array, batch: int) -> jax.Array:
    """One layer's buffer as [B, G, S, E] (a free reshape)."""
    _, S, E = cache_BGxSxE.shape
    return cache_BGxSxE.reshape(batch, -1, S, E)


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """Everything static about one decode: hashable, so it keys the compiled loop."""

    mode: str  # deferred | dense
    window: int
    max_new_tokens: int
    context: int
    batch: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    sampling: str = "mixture"  # mixture | exit (DESIGN §1 "Sampling modes")
    router_temperature: float = 1.0  # per-exit sampling only
    schedule: str = "advance"
    wait_rows: int = 1
    wait_age: int = 8
    attention: str = "auto"
    max_run_tokens: Optional[int] = None  # None: the rule of `run_cap`
    stats: bool = False  # carry `DecodeStats` (the loop without them counts nothing)

    @property
    def exact(self) -> bool:
        return self.temperature == 1.0 and self.top_k is None and self.top_p is None

    @property
    def mixture_transform(self) -> bool:
        """Whether tokens come from the transformed full mixture (every head; dense only)."""
        return self.sampling == "mixture" and not self.exact

    @property
    def head(self) -> HeadTransform:
        """The transform of the chosen exit's distribution (the identity for the mixture)."""
        if self.sampling == "exit":
            return HeadTransform(self.temperature, self.top_k, self.top_p)
        return IDENTITY

    @property
    def gate_temperature(self) -> float:
        return self.router_temperature if self.sampling == "exit" else 1.0

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
    def run_cap(self) -> int:
        """Tokens one run of a deep segment holds at most (batch > 1): B × W would hold
        every row's longest block, but every run pads its K/V, residuals and cache writes
        to this size, so it is capped at max(2B, 2W) (≥ W: one row's block always fits).
        Rows whose blocks do not fit wait an iteration (exact: draws are indexed by token),
        taking turns; a flush that does not fit waits before its row feeds a token."""
        B, W = self.batch, self.window
        if B == 1:
            return W
        cap = min(B * W, max(2 * B, 2 * W)) if self.max_run_tokens is None else self.max_run_tokens
        return min(B * W, max(cap, B, W))

    @property
    def run_shapes(self) -> tuple[tuple[int, int], ...]:
        """(tokens, width) of each compiled run of a deep segment: the rows' pending blocks
        packed into one list of `tokens`, no row's block longer than `width` (the
        attention lays each row's block out in `width` slots). At batch 1: the powers of
        two up to W (and W), as blocks of one row. At batch B > 1: one token per row
        (B, 1) — the steady state of `advance` — and two per row (2B, 2), then ragged
        blocks (N, min(N, W)) for N = 2B, 4B, … up to `run_cap`; the run takes the first
        that holds its blocks (measured at batch 4 and 8 on CPU: one token per row takes
        80–95% of the runs)."""
        W, B, cap = self.window, self.batch, self.run_cap
        if B == 1:
            widths = {1 << i for i in range(int(math.log2(W)) + 1)} | {W}
            return tuple((w, w) for w in sorted(widths))
        shapes = {(B, 1), (min(2 * B, cap), min(2, W))}
        n = 2 * B
        while n < cap:
            shapes.add((n, min(n, W)))
            n *= 2
        shapes.add((cap, min(cap, W)))
        return tuple(sorted(shapes))


def pending_kv(k_list, v_list, row_N, pos_N, valid_N, cache_len: int) -> PendingKV:
    """Segment output bound for the cache: invalid tokens point past it."""
    return PendingKV(jnp.stack(k_list), jnp.stack(v_list), row_N,
                     jnp.where(valid_N, pos_N, cache_len))


def no_pending(model, n_tokens: int, cache_len: int, segment) -> PendingKV:
    """Nothing to write for a segment whose runs hold `n_tokens` tokens."""
    start, stop = segment
    cfg = model.config
    kv = jnp.zeros((stop - start, n_tokens, cfg.kv_heads, cfg.head_dim), model.dtype)
    return PendingKV(kv, kv, jnp.zeros((n_tokens,), jnp.int32),
                     jnp.full((n_tokens,), cache_len, jnp.int32))


def write_pending(state: "DecodeState", model) -> "DecodeState":
    """Scatters every segment's pending K/V into the cache, in place."""
    k_layers, v_layers = list(state.k_layers), list(state.v_layers)
    G = model.config.kv_heads
    for (start, _), p in zip(model.config.segments, state.pending):
        index = (p.row_N[:, None] * G + jnp.arange(G), p.target_N[:, None])  # [N, G] each
        for i in range(p.k_LsxNxGxE.shape[0]):
            layer = start + i
            k_layers[layer] = k_layers[layer].at[index].set(p.k_LsxNxGxE[i], mode="drop")
            v_layers[layer] = v_layers[layer].at[index].set(p.v_LsxNxGxE[i], mode="drop")
    return state._replace(k_layers=tuple(k_layers), v_layers=tuple(v_layers))


def drop_pending(state: "DecodeState") -> "DecodeState":
    """Marks every pending K/V as written (after `write_pending`)."""
    return state._replace(pending=tuple(
        p._replace(target_N=jnp.full_like(p.target_N, state.cache_len)) for p in state.pending))


def pending_sizes(opts, model) -> tuple[int, ...]:
    """Tokens per run of each segment: B for the first (one per row) and in dense mode,
    the largest packed count for a deep segment of the deferred loop."""
    K = model.config.n_exits
    deep = opts.batch if opts.mode == "dense" else opts.run_shapes[-1][0]
    return (opts.batch,) + (deep,) * (K - 1)


def to_cache(kv_BxTxGxE: jax.Array, cache_len: int, dtype) -> jax.Array:
    """A block of keys or values at positions 0..T−1 as a [B·G, S, E] cache buffer."""
    B, T, G, E = kv_BxTxGxE.shape
    kv_BGxTxE = kv_BxTxGxE.astype(dtype).transpose(0, 2, 1, 3).reshape(B * G, T, E)
    return jnp.pad(kv_BGxTxE, ((0, 0), (0, cache_len - T), (0, 0)))


def gate_exits(model, s: int, z_BxD: jax.Array, keys_BxKx2, opts: LoopOptions) -> jax.Array:
    """Whether each row's token exits at s (u_s < q'_s) — one function for dense and
    deferred."""
    return gate_fires(model.gate_logp(s, z_BxD[:, None])[:, 0], keys_BxKx2, s,
                      opts.gate_temperature)


def choose_exit(model, h_KxBxD, keys_BxKx2, opts: LoopOptions):
    """Sequential halting over fully computed exits (prefill and dense): the first s whose
    gate fires, else the final exit, and the token from that exit's head; returns (token,
    exit). The mixture's non-exact samplers draw from the whole mixture instead."""
    K = model.config.n_exits
    B = h_KxBxD.shape[1]
    z_KxBxD = [model.exit_norm(k, h_KxBxD[k]) for k in range(K)]
    if opts.mixture_transform:
        gates = [model.gate_logp(k, z[:, None])[:, 0] for k, z in enumerate(z_KxBxD[:-1])]
        gate_BxK1x2 = jnp.stack(gates, axis=1) if gates else jnp.zeros((B, 0, 2), jnp.float32)
        states_KxBxD = jnp.stack([model.exit_state(k, z) for k, z in enumerate(z_KxBxD)])
        token_B = draw_from_mixture(model, states_KxBxD, gate_BxK1x2, keys_BxKx2,
                                    HeadTransform(opts.temperature, opts.top_k, opts.top_p))
        return token_B, jnp.full((B,), MIXTURE_SAMPLED, jnp.int32)
    exit_B = jnp.full((B,), K - 1, jnp.int32)
    for k in reversed(range(K - 1)):  # the shallowest exit that fires wins
        exit_B = jnp.where(gate_exits(model, k, z_KxBxD[k], keys_BxKx2, opts), k, exit_B)
    chosen_BxD = model.exit_state(K - 1, z_KxBxD[K - 1])
    for k in range(K - 1):
        chosen_BxD = jnp.where((exit_B == k)[:, None], model.exit_state(k, z_KxBxD[k]), chosen_BxD)
    return draw_from_head(model, chosen_BxD, keys_BxKx2, opts.head), exit_B


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


def count_run(state: DecodeState, s: int, ran, rows_B, stop_B, model, exits: bool) -> DecodeState:
    """Segment s ran (`ran`, a traced bool) for `rows_B`, each reading its layers' KV below
    `stop_B`; with `exits`, exit s's norm, router and adapter ran too (counted when the
    state carries stats)."""
    if state.stats is None:
        return state
    start, stop = model.config.segments[s]
    kv = jnp.sum(jnp.where(rows_B, stop_B, 0).astype(jnp.float32)) * (stop - start)
    stats = state.stats
    return state._replace(stats=stats._replace(
        segment_runs_K=stats.segment_runs_K.at[s].add(ran.astype(jnp.int32)),
        kv_reads=stats.kv_reads + jnp.where(ran, kv, 0.0),
        exit_runs_K=stats.exit_runs_K.at[s].add((ran & exits).astype(jnp.int32)),
    ))


def count_head(state: DecodeState) -> DecodeState:
    """The shared head ran (once per iteration; counted when the state carries stats)."""
    if state.stats is None:
        return state
    return state._replace(stats=state.stats._replace(head_runs=state.stats.head_runs + 1))


def zero_stats(n_exits: int) -> DecodeStats:
    return DecodeStats(segment_runs_K=jnp.zeros((n_exits,), jnp.int32), kv_reads=jnp.float32(0),
                       exit_runs_K=jnp.zeros((n_exits,), jnp.int32), head_runs=jnp.int32(0))


def prefill(model, layers, prompts_BxP, prompt_len_B, row_key_Bx2, eos_id, cache_len: int,
            opts) -> DecodeState:
    """All layers over the right-padded prompts in one pass (causal self-attention: a
    padding slot sits after every real position of its row, so none sees it), then the
    first draw at position P_b − 1 (gates from every exit there; one head)."""
    cfg = model.config
    B, P = prompts_BxP.shape
    K, D, N = cfg.n_exits, cfg.d_model, opts.max_new_tokens
    pos_BxP = jnp.broadcast_to(jnp.arange(P), (B, P))
    last_Bx1x1 = (prompt_len_B - 1)[:, None, None]
    h_BxPxD = model.embed(prompts_BxP)
    exit_h, k_layers, v_layers = [], [], []
    for start, stop in cfg.segments:
        h_BxPxD, (k_list, v_list) = model.run_layers(
            h_BxPxD, pos_BxP, start, stop, layer_states=layers, return_kv=True
        )
        exit_h.append(jnp.take_along_axis(h_BxPxD, last_Bx1x1, axis=1)[:, 0])
        k_layers += [to_cache(k, cache_len, model.dtype) for k in k_list]
        v_layers += [to_cache(v, cache_len, model.dtype) for v in v_list]
    state = DecodeState(
        k_layers=tuple(k_layers),
        v_layers=tuple(v_layers),
        pending=tuple(no_pending(model, n, cache_len, segment)
                      for n, segment in zip(pending_sizes(opts, model), cfg.segments)),
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
        iteration=jnp.int32(0),
        stats=zero_stats(K) if opts.stats else None,
    )
    keys_BxKx2 = token_keys(row_key_Bx2, state.n_B, K)
    token_B, exit_B = choose_exit(model, jnp.stack(exit_h), keys_BxKx2, opts)
    return record_tokens(state, jnp.ones((B,), bool), token_B, exit_B, opts)
