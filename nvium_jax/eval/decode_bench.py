"""`nvium bench decode`: deferred vs dense vs the matched baseline, and the byte model.

The same prompts are decoded by (a) N-vium deferred, (b) N-vium dense (same weights, every
layer) and (c) the parameter-matched baseline; repeats are interleaved (a, b, c, a, b, c, …)
so drifting machine speed hits all three alike, compile and warm-up are excluded, and the
medians give `speedup = a / c` (the paper's headline) and `speedup_vs_dense = a / b`.
Tokens/s are those of the decode loop — every new token after the first, over the loop's
seconds — with the prefill (the prompt and the first token, the same work in all three)
timed apart and reported as `prefill_s`: at a 512-token prompt the prefill takes longer
than 32 new tokens, and counting it would hide the decode speed the byte model describes.
Every decode path runs its layers unrolled on weights sliced per layer before the loop
(a scan over the stacked weights copies each layer's slice per token).

Byte model (DESIGN §1 "Cost model"): small-batch decode is memory-bound, so a run costs the
bytes it reads — each segment's weights once per run of that segment (whatever the block
or batch), the norm, router and adapter of an exit per run that evaluates them, the shared
head once per iteration, and per running row the KV of the segment's layers below its
position. The decode loop counts those runs when asked (`DecodeOptions(stats=True)`:
`DecodeStats.segment_runs_K`, `exit_runs_K`, `head_runs`, `kv_reads`), so
`ideal_speedup = dense bytes / deferred bytes` for the very tokens both produced. The timed
loops are the counting ones (a few scalar adds per segment run, as in every figure taken
before the counters became optional): a second compile of each path without them would add
≈ 30 s per benchmark at 125m.

How far each path is from the physical limit: `bytes_per_token` (the byte model's count for
that path's own decode, over its new tokens), `gbps` (those bytes at its measured tokens/s)
and `roofline_fraction`, that over `bandwidth_gbps` — the device's streaming-read bandwidth,
measured once per benchmark process by `stream_read_gbps` (the best of a reduction and a
matrix-vector product over a buffer far larger than the caches: the decode loop's weight
reads are matrix-vector products). Pinned to fewer cores (`taskset -c 0`) the same read
measures what those cores can draw, so the fractions stay comparable across hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvium_jax.config import InputError, ModelConfig
from nvium_jax.inference import DecodeOptions, generate
from nvium_jax.model import build_model
from nvium_jax.model.count import (
    adapter_param_count,
    final_adapter_param_count,
    block_param_count,
    kv_values_per_token,
    matched_baseline_model,
    router_param_count,
)
from nvium_jax.model.transformer import compute_dtype

REFERENCE_EXIT_RATES = (0.35, 0.25, 0.15, 0.25)
PROMPT_TOKENS = 16  # the default prompt length
STREAM_BYTES = 256 << 20  # the read buffer of `stream_read_gbps`: far above any cache
PATHS = ("nvium", "dense", "baseline")  # the decodes one benchmark compares


def gate_probabilities(exit_rates: Sequence[float]) -> list[float]:
    """q_k of each early exit that makes the fractions leaving at each exit `exit_rates`:
    q_1 = r_1, q_k = r_k / (1 − Σ_{j<k} r_j)."""
    rates = [float(r) for r in exit_rates]
    if any(r < 0 for r in rates) or abs(sum(rates) - 1.0) > 1e-6:
        raise InputError(f"--exit-rates {rates}: give K non-negative fractions that sum to 1")
    gates, left = [], 1.0
    for rate in rates[:-1]:
        gates.append(min(1.0, rate / left) if left > 0 else 1.0)
        left -= rate
    return gates


def force_exit_rates(model, exit_rates: Sequence[float]) -> None:
    """Zeroes every router's output weights and sets its exit-minus-continue bias to
    logit(q_k), so every token leaves at exit k with probability exit_rates[k]."""
    K = model.config.n_exits
    if len(exit_rates) != K:
        raise InputError(
            f"--exit-rates has {len(exit_rates)} numbers but the model has {K} exits "
            f"(after layers {list(model.config.exit_depths)}): give one fraction per exit"
        )
    for exit_, q in zip(model.exits, gate_probabilities(exit_rates)):
        q = min(max(q, 1e-7), 1 - 1e-7)
        exit_.router_out[...] = jnp.zeros_like(exit_.router_out[...])
        exit_.router_out_bias[...] = jnp.asarray([np.log(q) - np.log1p(-q), 0.0], exit_.router_out_bias.dtype)


@dataclasses.dataclass(frozen=True)
class ByteCosts:
    """Bytes read per run of each piece, in the compute dtype."""

    segment_K: tuple[float, ...]  # weights of each segment's layers
    router_K: tuple[float, ...]  # router MLP of each early exit (0 for the final)
    adapter_K: tuple[float, ...]  # norm + adapter of each exit (the final's adapter if it has one)
    head: float
    kv_per_layer_position: float


def byte_costs(cfg: ModelConfig) -> ByteCosts:
    size = jnp.dtype(compute_dtype(cfg.dtype)).itemsize
    D, early = cfg.d_model, len(cfg.early_exits)
    return ByteCosts(
        segment_K=tuple(size * block_param_count(cfg) * (stop - start) for start, stop in cfg.segments),
        router_K=tuple([size * router_param_count(cfg)] * early + [0.0]),
        adapter_K=tuple([size * (D + adapter_param_count(cfg))] * early
                        + [size * (D + final_adapter_param_count(cfg))]),
        head=size * D * cfg.vocab_size,
        kv_per_layer_position=size * kv_values_per_token(cfg),
    )


def bytes_read(stats, costs: ByteCosts) -> float:
    """What one decode read, from the loop's run counters (a `DecodeStats`)."""
    runs_K = np.asarray(stats.segment_runs_K, np.float64)
    exits_K = np.asarray(stats.exit_runs_K, np.float64)
    return float(
        runs_K @ np.array(costs.segment_K)
        + exits_K @ (np.array(costs.router_K) + np.array(costs.adapter_K))
        + float(stats.head_runs) * costs.head
        + float(stats.kv_reads) * costs.kv_per_layer_position
    )


def per_call_s(fn, *args, calls: int = 1, repeats: int = 5) -> float:
    """Median seconds per call over `repeats` blocks of `calls` back-to-back calls (one
    host sync per block), after a first call that compiles and warms up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def stream_read_gbps(nbytes: int = STREAM_BYTES, repeats: int = 9) -> float:
    """GB/s (10⁹ bytes) the default device reads from its memory: the faster of a sum over
    `nbytes` of float32 and a matrix-vector product with a [nbytes / 4096, 1024] matrix (the
    decode loop's weight reads), each the median of `repeats` calls. Measured once per
    process (cached); the buffer is freed after."""
    rows = max(1, nbytes // 4096)
    matrix = jnp.ones((rows, 1024), jnp.float32)
    vector = jnp.ones((1024,), jnp.float32)
    read = float(matrix.size * matrix.dtype.itemsize)
    best_s = min(per_call_s(jax.jit(jnp.sum), matrix, repeats=repeats),
                 per_call_s(jax.jit(lambda m: m @ vector), matrix, repeats=repeats))
    del matrix
    return read / best_s / 1e9


def bench_prompts(vocab_size: int, batch: int, prompt_tokens: int = PROMPT_TOKENS,
                  seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, prompt_tokens), np.int32)


def bench_decode(
    model,
    *,
    batch: int = 1,
    prompt_tokens: int = PROMPT_TOKENS,
    max_new_tokens: int = 128,
    exit_rates: Optional[Sequence[float]] = None,
    repeats: int = 5,
    window: int = 16,
    schedule: str = "advance",
    attention: str = "auto",
    seed: int = 0,
    prompts: Optional[np.ndarray] = None,
    sampling: str = "mixture",
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    router_temperature: float = 1.0,
    bandwidth_gbps: Optional[float] = None,
) -> dict:
    """Tokens/s of deferred, dense and the matched baseline on the same prompts (DESIGN §3
    keys), plus the byte model's ideal speedup, the measured exit distribution, and per path
    its bytes per token, GB/s and fraction of `bandwidth_gbps` (measured when not given).
    `prompts` (a [B, P] int array, e.g. cut from held-out text) replaces the random ones,
    setting `batch` and `prompt_tokens`. All three decode with the same sampler: under
    `sampling="exit"` the baseline (one exit) runs the same head transform, which is also
    what the mixture's transforms are for it."""
    cfg = model.config
    if prompts is not None:
        prompts = np.asarray(prompts, np.int32)
        batch, prompt_tokens = prompts.shape
    if exit_rates is not None:
        force_exit_rates(model, exit_rates)
    if prompt_tokens < 1 or prompt_tokens + 1 >= cfg.context:
        raise InputError(f"--prompt-tokens {prompt_tokens}: give at least 1 and leave room for new "
                         f"tokens in model.context={cfg.context}")
    if max_new_tokens < 2:
        raise InputError(f"--max-new-tokens {max_new_tokens}: give at least 2 (the first new token "
                         f"comes from the prefill, the loop decodes the rest)")
    baseline = build_model(matched_baseline_model(cfg), seed=seed)
    if prompts is None:
        prompts = bench_prompts(cfg.vocab_size, batch, prompt_tokens, seed)
    n_new = min(max_new_tokens, cfg.context - prompt_tokens)
    sampler = dict(sampling=sampling, temperature=temperature, top_k=top_k, top_p=top_p,
                   router_temperature=router_temperature)
    decodes = {"nvium": (model, "deferred", schedule), "dense": (model, "dense", "advance"),
               "baseline": (baseline, "dense", "advance")}

    def run(name, timings=None):
        net, decode, batch_schedule = decodes[name]
        options = DecodeOptions(schedule=batch_schedule, attention=attention, timings=timings,
                                stats=True)
        return generate(net, prompts, n_new, seed=seed, decode=decode, window=window,
                        return_state=True, options=options, **sampler)

    outputs = {name: run(name) for name in decodes}  # compile and warm up
    timings = {name: [] for name in decodes}
    for _ in range(repeats):
        for name in decodes:
            timings[name].append({})
            outputs[name] = run(name, timings[name][-1])
    median = lambda name, key: statistics.median(t[key] for t in timings[name])
    rate = {name: int((out.lengths_B - 1).sum()) / median(name, "decode_s")
            for name, out in outputs.items()}
    deferred, dense = outputs["nvium"], outputs["dense"]
    if not np.array_equal(deferred.tokens_BxN, dense.tokens_BxN) and cfg.dtype == "float32":
        raise RuntimeError("deferred and dense decoding disagree in float32: a bug, please report")
    nvium_costs = byte_costs(cfg)
    costs = {"nvium": nvium_costs, "dense": nvium_costs, "baseline": byte_costs(baseline.config)}
    per_token = {name: bytes_read(out.state.stats, costs[name]) / int((out.lengths_B - 1).sum())
                 for name, out in outputs.items()}
    ideal = per_token["dense"] / per_token["nvium"]  # the same tokens: bytes per token's ratio
    if bandwidth_gbps is None:
        bandwidth_gbps = stream_read_gbps()
    gbps = {name: per_token[name] * rate[name] / 1e9 for name in PATHS}
    exits = deferred.exits_BxN[deferred.exits_BxN >= 0]
    distribution = np.bincount(exits, minlength=cfg.n_exits) / max(1, exits.size)
    speedup_vs_dense = rate["nvium"] / rate["dense"]
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{getattr(device, 'device_kind', device.platform)}",
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": n_new,
        "exit_distribution": [round(float(x), 4) for x in distribution],
        "nvium_tokens_per_s": round(rate["nvium"], 2),
        "dense_tokens_per_s": round(rate["dense"], 2),
        "baseline_tokens_per_s": round(rate["baseline"], 2),
        "speedup": round(rate["nvium"] / rate["baseline"], 4),
        "speedup_vs_dense": round(speedup_vs_dense, 4),
        "ideal_speedup": round(ideal, 4),
        "efficiency": round(speedup_vs_dense / ideal, 4),
        "prefill_s": {name: round(median(name, "prefill_s"), 4) for name in decodes},
        "bytes_per_token": {name: round(per_token[name]) for name in PATHS},
        "gbps": {name: round(gbps[name], 3) for name in PATHS},
        "roofline_fraction": {name: round(gbps[name] / bandwidth_gbps, 4) for name in PATHS},
        "bandwidth_gbps": round(bandwidth_gbps, 3),
        "flushes": deferred.flushes,
        "schedule": schedule if batch > 1 else "batch 1",
        **sampler,
        "window": window,
        "repeats": repeats,
    }
