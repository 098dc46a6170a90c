"""The measurements of the GPU report (`scripts/gpu_report.py`, issue 26), one function per
section, run in a worker process that the driver can kill when a section runs out of time.

    python -m scripts.gpu_report_sections [--smoke]    (started by the driver, not by hand)

Protocol: the worker reads one JSON request per line on stdin, `{"section", "earlier"}`
(`earlier`: the results of the sections already done, e.g. the copy bandwidth), and writes
JSON events on its stdout — `partial` (what a section has so far), then `done` or `error`.
Everything else (jax's logs, stray prints) goes to stderr. It reuses the project's
benchmarks: `bench_decode` (nvium bench decode), `bench_train` (nvium bench train), the byte
model of `eval/decode_bench.py` and the attention kernels, each called in-process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import traceback

# The GPU image has neither: any import of them fails here as it would there.
for _absent in ("grain", "wandb"):
    sys.modules.setdefault(_absent, None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nvium_jax.config import load_config  # noqa: E402
from nvium_jax.eval.decode_bench import REFERENCE_EXIT_RATES, bench_decode, per_call_s  # noqa: E402
from nvium_jax.inference.kernels import cache_attention  # noqa: E402
from nvium_jax.model import build_model, param_count  # noqa: E402
from nvium_jax.model.count import matched_baseline_model  # noqa: E402
from nvium_jax.train.bench import bench_train  # noqa: E402
from nvium_jax.train.metrics import train_flops_per_token  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
COMMAND_BUFFER_FLAG = "--xla_gpu_enable_command_buffer"

# Tiny shapes for `--smoke`: 4 layers with exits after 1, 2, 3 (so the reference rates of
# four exits apply), float32, a short context.
_TINY = ("model.dtype=float32", "model.n_layers=4", "model.exits=[1,2,3]", "model.d_model=64",
         "model.n_heads=2", "model.d_ff=128", "model.vocab_size=512", "model.context=64")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the sections measure: the GPU shapes, or the tiny ones of `--smoke`."""

    model: tuple  # the main decode model (1.5b): config file, overrides
    small_model: tuple  # the launch-bound one (125m)
    train_model: tuple
    train_micro_batches: tuple[int, ...]  # tried in turn until one fits in memory
    train_steps: int
    prompt_tokens: tuple[int, ...]
    new_tokens: int
    big_batch: int
    repeats: int
    copy_bytes: int
    kernel_HxGxExS: tuple[int, int, int, int]
    kernel_batches: tuple[int, ...]
    kernel_queries: tuple[int, ...]
    kernel_dtype: str
    calls: int  # back-to-back calls per timed block of the copy and kernel timings


GPU_PLAN = Plan(
    model=("configs/nvium-1.5b.yaml", ("model.dtype=bfloat16",)),
    small_model=("configs/nvium-125m.yaml", ("model.dtype=bfloat16",)),
    train_model=("configs/nvium-1.5b.yaml", ("model.dtype=bfloat16", "train.grad_accum=1")),
    train_micro_batches=(8, 4, 2), train_steps=10,
    prompt_tokens=(16, 512), new_tokens=64, big_batch=8, repeats=5,
    copy_bytes=1 << 30,
    kernel_HxGxExS=(12, 12, 128, 1024), kernel_batches=(1, 8), kernel_queries=(1, 16),
    kernel_dtype="bfloat16", calls=20,
)
# Smoke prompts of 4 and 8 tokens with 8 new ones share one cache length (16), so their
# decode loops compile once; only the prefill differs.
SMOKE_PLAN = Plan(
    model=("configs/nvium-tiny.yaml", _TINY),
    small_model=("configs/nvium-tiny.yaml", _TINY),
    train_model=("configs/nvium-tiny.yaml", (*_TINY, "train.grad_accum=1")),
    train_micro_batches=(2,), train_steps=2,
    prompt_tokens=(4, 8), new_tokens=8, big_batch=8, repeats=1,
    copy_bytes=16 << 20,
    kernel_HxGxExS=(2, 2, 16, 64), kernel_batches=(1, 8), kernel_queries=(1, 4),
    kernel_dtype="float32", calls=2,
)

_models: dict = {}  # (config, overrides) → (Config, model): decode sections share weights


def _model(spec):
    if spec not in _models:
        path, overrides = spec
        config = load_config(REPO / path, list(overrides))
        _models[spec] = (config, build_model(config.model, seed=0))
    return _models[spec]


def environment(plan: Plan, earlier: dict, emit) -> dict:
    """Versions, the device, and the roofline's denominator: a device-to-device copy (a
    jitted `jnp.copy`, a real copy in XLA), bytes read + written per second."""
    device = jax.devices()[0]
    x = jnp.ones(plan.copy_bytes // 4, jnp.float32)
    copy_s = per_call_s(jax.jit(jnp.copy), x, calls=plan.calls)
    moved = 2 * x.nbytes
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": importlib.metadata.version("jaxlib"),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "memory_bytes": (device.memory_stats() or {}).get("bytes_limit"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "copy_bytes_moved": moved,
        "copy_s": copy_s,
        "copy_bandwidth_bytes_per_s": moved / copy_s,
    }


def _baseline_roofline(row: dict, bandwidth) -> dict:
    """The matched baseline's bytes per token (the byte model's counters of its decode in
    `row`) over its measured time, against the copy bandwidth."""
    per_token = row["bytes_per_token"]["baseline"]
    per_s = per_token * row["baseline_tokens_per_s"]
    return {"baseline_bytes_per_token": per_token, "baseline_bytes_per_s": per_s,
            "baseline_roofline_fraction": per_s / bandwidth if bandwidth else None}


def _decode(plan: Plan, earlier: dict, emit, spec, batch: int, prompts) -> dict:
    config, model = _model(spec)
    bandwidth = earlier.get("environment", {}).get("copy_bandwidth_bytes_per_s")
    result = {"config": spec[0], "overrides": list(spec[1]), "params": param_count(config.model),
              "exit_rates": list(REFERENCE_EXIT_RATES), "rows": []}
    for prompt_tokens in prompts:
        row = bench_decode(model, batch=batch, prompt_tokens=prompt_tokens,
                           max_new_tokens=plan.new_tokens, exit_rates=REFERENCE_EXIT_RATES,
                           repeats=plan.repeats, window=config.decode.window,
                           attention=config.decode.attention,
                           bandwidth_gbps=bandwidth / 1e9 if bandwidth else None)
        row.update(_baseline_roofline(row, bandwidth))
        result["rows"].append(row)
        emit(result)
    return result


def decode(plan, earlier, emit):
    return _decode(plan, earlier, emit, plan.model, 1, plan.prompt_tokens)


def decode_small(plan, earlier, emit):
    return _decode(plan, earlier, emit, plan.small_model, 1, plan.prompt_tokens)


def batch8(plan, earlier, emit):
    return _decode(plan, earlier, emit, plan.model, plan.big_batch, plan.prompt_tokens[:1])


def command_buffers(plan, earlier, emit):
    """The batch-1 decode of the shortest prompt in a worker whose XLA_FLAGS let command
    buffers capture conditionals and while loops, against the `decode` section's figures."""
    flags = os.environ.get("XLA_FLAGS", "")
    if COMMAND_BUFFER_FLAG not in flags:
        raise RuntimeError(f"XLA_FLAGS={flags!r} lacks {COMMAND_BUFFER_FLAG}: run this section "
                           f"through scripts/gpu_report.py, which sets it before jax starts")
    result = _decode(plan, earlier, emit, plan.model, 1, plan.prompt_tokens[:1])
    row = result["rows"][0]
    default = next((r for r in earlier.get("decode", {}).get("rows", [])
                    if r["prompt_tokens"] == row["prompt_tokens"]), None)
    result["xla_flags"] = flags
    for name in ("nvium", "dense", "baseline"):
        key = f"{name}_tokens_per_s"
        result[f"default_{key}"] = default and default[key]
        result[f"{name}_vs_default"] = default and row[key] / default[key]
    return result


def kernel(plan: Plan, earlier: dict, emit) -> dict:
    """The Pallas cache attention (interpreted on CPU) against the reference: max error of
    out and lse, and seconds per call of each, on a random cache filled to ≥ half."""
    H, G, E, S = plan.kernel_HxGxExS
    dtype = jnp.dtype(plan.kernel_dtype)
    impls = {impl: jax.jit(functools.partial(cache_attention, impl=impl)) for impl in ("pallas", "reference")}
    rng = np.random.default_rng(0)
    result = {"heads": H, "kv_heads": G, "head_dim": E, "cache_positions": S,
              "dtype": plan.kernel_dtype, "backend": jax.default_backend(), "rows": []}
    for B in plan.kernel_batches:
        for T in plan.kernel_queries:
            q = jnp.asarray(rng.standard_normal((B, T, H, E)), dtype)
            k, v = (jnp.asarray(rng.standard_normal((B, G, S, E)), dtype) for _ in range(2))
            cache_len_B = jnp.asarray(rng.integers(S // 2, S + 1, (B,)), jnp.int32)
            (out_p, lse_p), (out_r, lse_r) = (impls[i](q, k, v, cache_len_B) for i in ("pallas", "reference"))
            seconds = {i: per_call_s(fn, q, k, v, cache_len_B, calls=plan.calls) for i, fn in impls.items()}
            result["rows"].append({
                "batch": B, "queries": T,
                "max_abs_err_out": float(jnp.max(jnp.abs(out_p - out_r))),
                "max_abs_err_lse": float(jnp.max(jnp.abs(lse_p - lse_r))),
                "pallas_s": seconds["pallas"], "reference_s": seconds["reference"],
                "pallas_speedup": seconds["reference"] / seconds["pallas"],
            })
            emit(result)
    return result


def _out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def train(plan: Plan, earlier: dict, emit) -> dict:
    """`bench_train` at the first micro-batch of `plan.train_micro_batches` that fits, with
    the achieved model TFLOP/s beside the MFU (which needs a known peak, so none on CPU)."""
    _models.clear()  # the decode weights make room for the optimizer state
    path, overrides = plan.train_model
    for micro_batch in plan.train_micro_batches:
        overrides_b = (*overrides, f"train.batch_size={micro_batch}")
        config = load_config(REPO / path, list(overrides_b))
        try:
            record = bench_train(config, steps=plan.train_steps, name=" ".join([path, *overrides_b]))
            break
        except Exception as error:  # noqa: BLE001 — only running out of memory is retried
            if not _out_of_memory(error) or micro_batch == plan.train_micro_batches[-1]:
                raise
            print(f"train: micro-batch {micro_batch} does not fit, trying a smaller one", file=sys.stderr)
    T = config.model.context
    for name, cfg in (("nvium", config.model), ("baseline", matched_baseline_model(config.model))):
        record[f"{name}_model_tflops_per_s"] = record[f"{name}_tokens_per_s"] * train_flops_per_token(cfg, T) / 1e12
    record.update(micro_batch=micro_batch, context=T, remat=config.train.remat,
                  attention="model.layers.attend (XLA einsum softmax)")
    return record


SECTIONS = {"environment": environment, "decode": decode, "command_buffers": command_buffers,
            "batch8": batch8, "kernel": kernel, "train": train, "decode_125m": decode_small}


def serve(plan: Plan) -> None:
    """The worker loop: one request per stdin line, JSON events on the original stdout."""
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not break the protocol
    send = lambda **event: events.write(json.dumps(event) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        emit = lambda result: send(event="partial", result=result)
        try:
            send(event="done", result=SECTIONS[request["section"]](plan, request["earlier"], emit))
        except Exception as error:  # noqa: BLE001 — a failed section is recorded, the next runs
            traceback.print_exc()
            send(event="error", error=f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    serve(SMOKE_PLAN if "--smoke" in sys.argv[1:] else GPU_PLAN)
