"""Exact deferred-batch decoding, the host side: `generate` and `flush`, their validation,
and the compiled entry points (DESIGN §1 "Exact deferred decoding", §3).

The state and the prefill live in `state.py`, the batch schedules in `policy.py`, the
iteration that executes them in `loop.py`, a segment's run on its tokens in `segments.py`.
Before any loop the weights are made ready for decoding once per call: every layer's
weights sliced out of the stack (so no layer copies its slice per token) and every matrix
cast to the compute dtype (so the loop reads each weight at its compute width: bfloat16
under `auto` on GPU/TPU, float32 on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvium_jax.inference.loop import decode_loop, flush_state
from nvium_jax.inference.sampling import row_keys
from nvium_jax.inference.state import (
    MIXTURE_SAMPLED,
    NOT_SAMPLED,
    SCHEDULES,
    DecodeState,
    DecodeStats,
    LoopOptions,
    prefill,
)
from nvium_jax.config import InputError
from nvium_jax.model.transformer import check_token_ids

__all__ = ["MIXTURE_SAMPLED", "NOT_SAMPLED", "SAMPLINGS", "SCHEDULES", "DecodeOptions",
           "DecodeState", "DecodeStats", "GenerateOutput", "flush", "generate"]

SAMPLINGS = ("mixture", "exit")  # the first is the default


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The research knobs of `generate` (none changes a token): how a batch shares deep
    segments (`schedule`: advance | lockstep | wait | wait+advance; `wait_rows`, default
    ≈ 3/8 of the batch, and `wait_age`), the tokens one deep run holds at most
    (`max_run_tokens`, default `LoopOptions.run_cap`'s rule), the attention implementation
    (auto | pallas | reference), streaming (`on_tokens(tokens_BxN, lengths_B)` after every
    `stream_every` tokens per row; the loop then runs in chunks of the same compiled code),
    `timings`, a dict that receives the seconds of each phase — `prepare_s` (weights made
    ready), `prefill_s` (prompts and the first token), `decode_s` (every later token) — at
    the price of a wait after each, and `stats`: count what the loop ran for the byte model
    (`state.stats`, a `DecodeStats`, with `return_state=True`; a loop compiled apart)."""

    schedule: str = SCHEDULES[0]
    wait_rows: Optional[int] = None
    wait_age: int = 8
    max_run_tokens: Optional[int] = None
    attention: str = "auto"
    on_tokens: Optional[Callable[[np.ndarray, np.ndarray], None]] = None
    stream_every: int = 8
    timings: Optional[dict] = None
    stats: bool = False


class GenerateOutput(NamedTuple):
    tokens_BxN: np.ndarray
    exits_BxN: np.ndarray
    lengths_B: np.ndarray
    flushes: int
    state: Optional[DecodeState]


class DecodeWeights(NamedTuple):
    """The model split for decoding: `rest` (embedding, exits, head; matrices at compute
    width), `layers` (one state per layer, likewise) and the stacked blocks, which the
    compiled code never reads (they only complete the module for `nnx.merge`)."""

    graphdef: object
    blocks: object
    rest: object
    layers: list


def decode_weights(model) -> DecodeWeights:
    dtype = model.dtype
    graphdef, blocks, rest = nnx.split(model, nnx.PathContains("blocks"), ...)
    cast = lambda w: w.astype(dtype) if w.ndim >= 2 else w
    return DecodeWeights(graphdef, blocks, jax.tree.map(cast, rest), model.layer_states(dtype))


# ---- jitted entry points --------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "opts"))
def _prefill_jit(graphdef, blocks, rest, layers, prompts_BxP, prompt_len_B, row_key_Bx2, eos_id,
                 cache_len, opts):
    model = nnx.merge(graphdef, blocks, rest)
    return prefill(model, layers, prompts_BxP, prompt_len_B, row_key_Bx2, eos_id, cache_len, opts)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"), donate_argnames=("state",))
def _loop_jit(graphdef, blocks, rest, layers, state, n_limit, opts):
    return decode_loop(nnx.merge(graphdef, blocks, rest), layers, state, n_limit, opts)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _flush_jit(graphdef, blocks, rest, layers, state, opts):
    return flush_state(nnx.merge(graphdef, blocks, rest), layers, state, opts)


MAX_COMPILED = 16  # compiled programs kept per entry point (`bound_compiled`)


def bound_compiled(limit: Optional[int] = None) -> None:
    """Keeps at most `limit` compiled programs per decode entry point. XLA's CPU backend maps
    each decode loop's code in ≈ 1,500 memory regions, so a process that kept every shape it
    ever decoded (lm-eval over many lengths, a notebook sweeping configs) passed Linux's
    `vm.max_map_count` (65,530) after ≈ 40 loops, and the next compile crashed. An entry
    point at the limit drops its programs before the next call (a shape used again is
    compiled again — a file read with the persistent cache on). `limit`: `MAX_COMPILED`."""
    limit = MAX_COMPILED if limit is None else limit
    for jitted in (_prefill_jit, _loop_jit, _flush_jit):
        size = getattr(jitted, "_cache_size", None)  # jax's count of compiled entries
        if size is not None and size() >= limit:
            jitted.clear_cache()


# ---- host side ------------------------------------------------------------------------
def prompt_batch(prompts, vocab_size: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates prompts (list of id lists, or a B×T int array) and right-pads them."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise InputError(f"prompts must be a list of token-id lists or a B×T array, got shape {array.shape}")
        rows = list(array)
    else:
        rows = [np.asarray(row) for row in prompts]
    if not rows:
        raise InputError("prompts is empty: give at least one prompt")
    for b, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise InputError(f"prompt {b} is empty: every prompt needs at least one token (e.g. BOS)")
        check_token_ids(row, vocab_size, what=f"prompt {b}")
        if row.size >= context:
            raise InputError(
                f"prompt {b} has {row.size} tokens, but model.context is {context}: a prompt must be "
                f"shorter than the context (leave room for new tokens)"
            )
    lengths_B = np.array([row.size for row in rows], np.int32)
    padded_BxP = np.zeros((len(rows), int(lengths_B.max())), np.int32)
    for b, row in enumerate(rows):
        padded_BxP[b, : row.size] = row
    return padded_BxP, lengths_B


def non_exact_options(temperature, top_k, top_p) -> list[str]:
    """The head-transform options that are set (under sampling="mixture" they leave the
    exact mixture sample and need decode="dense")."""
    options = (
        (f"temperature={temperature}", temperature is not None and temperature != 1.0),
        (f"top_k={top_k}", top_k is not None),
        (f"top_p={top_p}", top_p is not None),
    )
    return [name for name, is_set in options if is_set]


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
        and math.isfinite(x)


def check_sampling(decode: str, temperature, top_k, top_p, window, max_new_tokens,
                   sampling: str = "mixture", router_temperature=1.0) -> None:
    """One clear error naming the input for every argument of `generate` a user can get wrong."""
    if decode not in ("deferred", "dense"):
        raise InputError(f'decode={decode!r}: use "deferred" or "dense"')
    if sampling not in SAMPLINGS:
        raise InputError(f'sampling={sampling!r}: use "mixture" (the exact learned distribution) '
                         f'or "exit" (route first, then sample the chosen exit)')
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: give a positive integer")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise InputError(f"window={window!r}: give a positive integer (1 = no deferral)")
    if not _is_number(temperature) or temperature < 0:
        raise InputError(f"temperature={temperature!r}: give a number ≥ 0 (0 = greedy)")
    if not _is_number(router_temperature) or router_temperature < 0:
        raise InputError(f"router_temperature={router_temperature!r}: give a number ≥ 0 "
                         f"(0 = greedy routing: exit where the exit logit wins)")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)
                              or top_k < 1):
        raise InputError(f"top_k={top_k!r}: give a positive integer or None")
    if top_p is not None and not (_is_number(top_p) and 0.0 < top_p <= 1.0):
        raise InputError(f"top_p={top_p!r}: give a value in (0, 1] or None")
    if sampling == "mixture" and router_temperature != 1.0:
        raise InputError(
            f'router_temperature={router_temperature} applies to sampling="exit" only: the mixture '
            f'weighs every exit by its learned routing (use sampling="exit", or leave it at 1)')
    non_exact = non_exact_options(temperature, top_k, top_p)
    if sampling == "mixture" and non_exact and decode == "deferred":
        raise InputError(
            f"{', '.join(non_exact)} needs decode=\"dense\" under sampling=\"mixture\": greedy, "
            f"temperature, top-k and top-p on the full mixture need every exit's head at every "
            f"token, which deferred decoding does not compute (it samples the mixture exactly at "
            f"temperature 1 only) — or use sampling=\"exit\", which routes first and applies them "
            f"to the chosen exit alone, and decodes deferred"
        )


def check_options(options) -> DecodeOptions:
    if options is None:
        return DecodeOptions()
    if not isinstance(options, DecodeOptions):
        raise InputError(f"options={options!r}: give a nvium_jax.inference.DecodeOptions or None")
    if options.schedule not in SCHEDULES:
        raise InputError(f"options.schedule={options.schedule!r}: use one of {', '.join(SCHEDULES)}")
    for name in ("wait_rows", "max_run_tokens"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise InputError(f"options.{name}={value!r}: give a positive integer or None")
    if not isinstance(options.wait_age, (int, np.integer)) or options.wait_age < 0:
        raise InputError(f"options.wait_age={options.wait_age!r}: give an integer ≥ 0")
    if not isinstance(options.stream_every, (int, np.integer)) or options.stream_every < 1:
        raise InputError(f"options.stream_every={options.stream_every!r}: give a positive integer")
    return options


def default_wait_rows(batch: int) -> int:
    """A deep segment runs when ≈ 3/8 of the batch waits for it (DESIGN §1 "Batch")."""
    return max(1, math.ceil(3 * batch / 8))


def loop_options(model, batch, max_new_tokens, decode, window, temperature=1.0, top_k=None,
                 top_p=None, sampling="mixture", router_temperature=1.0,
                 options: Optional[DecodeOptions] = None) -> LoopOptions:
    """The static options of one decode's compiled code."""
    options = options or DecodeOptions()
    return LoopOptions(
        mode=decode, window=int(window) if decode == "deferred" else 1,  # dense defers nothing
        max_new_tokens=int(max_new_tokens), context=model.config.context, batch=int(batch),
        temperature=float(temperature), top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p), sampling=sampling,
        router_temperature=float(router_temperature), schedule=options.schedule,
        wait_rows=default_wait_rows(batch) if options.wait_rows is None else int(options.wait_rows),
        wait_age=int(options.wait_age), attention=options.attention,
        max_run_tokens=options.max_run_tokens, stats=bool(options.stats),
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
    sampling: str = "mixture",
    router_temperature: float = 1.0,
    return_state: bool = False,
    options: Optional[DecodeOptions] = None,
) -> GenerateOutput:
    """Samples up to `max_new_tokens` new tokens for each prompt (DESIGN §3).

    `sampling="mixture"` (default) samples the learned mixture: `decode="deferred"` exactly
    at temperature 1, deferring the upper layers of early-exited tokens; greedy
    (`temperature=0`), temperature, top-k and top-p act on the whole mixture and need
    `decode="dense"` (every layer and head for every token, the same random stream).
    `sampling="exit"` (the paper's decoder) routes first — gate k exits when
    u_k < sigmoid(ℓ_k / router_temperature), 0 = exit iff ℓ_k > 0 — and draws the token
    from the chosen exit alone, with temperature, top-k and top-p applied to it; both
    decodes run it and return the same tokens. `options` holds research knobs that change
    no token (schedules, run shapes, attention, streaming, timings: `DecodeOptions`).
    """
    cfg = model.config
    check_sampling(decode, temperature, top_k, top_p, window, max_new_tokens, sampling,
                   router_temperature)
    options = check_options(options)
    prompts_BxP, prompt_len_B = prompt_batch(prompts, cfg.vocab_size, cfg.context)
    B = prompts_BxP.shape[0]
    opts = loop_options(model, B, max_new_tokens, decode, window, temperature, top_k, top_p,
                        sampling, router_temperature, options)
    bound_compiled()
    clock = _Clock(options.timings)
    weights = clock.phase("prepare_s", decode_weights(model))
    cache_len = cache_length(prompts_BxP.shape[1], opts.max_new_tokens, cfg.context)
    state = _prefill_jit(*weights, jnp.asarray(prompts_BxP), jnp.asarray(prompt_len_B),
                         row_keys(seed, B), -1 if eos_id is None else int(eos_id), cache_len, opts)
    state = clock.phase("prefill_s", state)
    if options.on_tokens is None:
        state = _loop_jit(*weights, state, jnp.int32(opts.max_new_tokens), opts)
    else:
        n_limit = 1
        while True:
            options.on_tokens(np.asarray(state.tokens_BxN), np.asarray(state.n_B))
            if bool(np.all(np.asarray(state.done_B))):
                break
            n_limit += options.stream_every
            state = _loop_jit(*weights, state, jnp.int32(n_limit), opts)
    state = clock.phase("decode_s", state)
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


class _Clock:
    """Seconds between phases, each ended by waiting for its result (when asked for)."""

    def __init__(self, timings: Optional[dict]):
        self.timings = timings
        self.last = time.perf_counter()

    def phase(self, name: str, result):
        if self.timings is not None:
            jax.block_until_ready(result)
            now = time.perf_counter()
            self.timings[name] = now - self.last
            self.last = now
        return result


def flush(model, state: DecodeState, *, attention: str = "auto") -> DecodeState:
    """Completes every pending segment, so the cache holds every layer's K/V for every
    position fed in (0 … P_b + n_b − 2)."""
    B, ring = state.ring_BxRxD.shape[:2]
    opts = LoopOptions(mode="deferred", window=ring - 1, max_new_tokens=state.tokens_BxN.shape[1],
                       context=model.config.context, batch=B, attention=attention,
                       max_run_tokens=B * (ring - 1))  # every row's whole block in one run
    bound_compiled()
    return _flush_jit(*decode_weights(model), state, opts)
