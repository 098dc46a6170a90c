"""Where a decode loop's time goes, op by op: N-vium dense against the matched baseline (or
any of `nvium bench decode`'s paths), from XLA's own per-thunk trace on CPU.

The loop of each path runs under `jax.profiler` with `--xla_cpu_enable_xprof_traceme` (every
thunk of the compiled program is a trace event) and its optimized HLO is dumped by the same
compile (`--xla_dump_to`), so each event's `dot.N` gets its operand shapes. Printed per
path: seconds per token, then per matrix-vector shape (`f32[768,1] x f32[768,2048]`) the
calls per token, the mean µs per call and the GB/s its weight operand is read at; then the
time per token in dots, fusions, other ops and outside ops (the loop's time per token, by
its own timer, less the ops': dispatch and waits). A loop slower than its bytes say shows here
which op is slow (DESIGN §1, "What the loop costs besides bytes").

    python -m scripts.profile_decode --config configs/nvium-125m.yaml \
        [model.dtype=float32 ...] [--paths dense,baseline] [--max-new-tokens 64] [--prompt-tokens 16] \
        [--exit-rates 0.35,0.25,0.15,0.25] [--repeats 3] [--json]

The XLA flags must be set before jax starts: run it as its own process (`python -m`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import pathlib
import re
import sys
import tempfile
from typing import Iterable

TRACE_FLAGS = "--xla_cpu_enable_xprof_traceme=true"
LOOP_MODULE = "jit__loop_jit"  # the decode loop's jitted entry point (inference/decode.py)
_INSTRUCTION = re.compile(r"\s+(?:ROOT )?%([\w.\-]+) = (\S+?\[[^\]]*\]|\([^)]*\))(?:\{[^}]*\})? ([\w\-]+)\((.*)")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "pred": 1}


def hlo_dots(hlo_text: str) -> dict[str, tuple[str, ...]]:
    """Each dot of an optimized HLO module: name → (lhs shape, rhs shape, result shape)."""
    shapes, dots = {}, {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, op, rest = match.groups()
        shapes[name] = shape
        if op == "dot":
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            dots[name] = (*(shapes.get(o, "?") for o in operands[:2]), shape)
    return dots


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO array shape such as `f32[768,2048]`."""
    dtype, dims = shape.split("[", 1)
    return _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.rstrip("]").split(",") if d)


def is_matvec(dot: tuple[str, ...]) -> bool:
    """A 2-D operand times a weight matrix (the batched attention dots are excluded)."""
    return all(s.count(",") == 1 for s in dot)


def loop_op_durations(events: Iterable[dict], module: str = LOOP_MODULE) -> dict[str, list[float]]:
    """µs of every execution of each op (thunk) of `module`, from a perfetto trace's events."""
    times = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and event.get("args", {}).get("hlo_module") == module \
                and not event["name"].startswith(("end:", "ThunkExecutor", "while")):
            times[event["name"]].append(float(event["dur"]))
    return dict(times)


def profile_table(dots: dict[str, tuple[str, ...]], times: dict[str, list[float]], tokens: int) -> dict:
    """Per matvec shape: calls per token, mean µs, GB/s of its weight operand; totals per
    token (ms) of dots, fusions and the rest."""
    rows = collections.defaultdict(lambda: {"calls": 0, "us": 0.0, "bytes": 0})
    totals = collections.Counter()
    for name, durations in times.items():
        kind = "dot" if name in dots else ("fusion" if "fusion" in name else "other")
        totals[kind] += sum(durations)
        if name in dots and is_matvec(dots[name]):
            lhs, rhs, out = dots[name]
            row = rows[f"{lhs} x {rhs} -> {out}"]
            row["calls"] += len(durations)
            row["us"] += sum(durations)
            row["bytes"] += max(shape_bytes(lhs), shape_bytes(rhs)) * len(durations)
    table = [{"shape": shape, "calls_per_token": round(r["calls"] / tokens, 2),
              "mean_us": round(r["us"] / r["calls"], 2), "ms_per_token": round(r["us"] / tokens / 1e3, 3),
              "gbps": round(r["bytes"] / r["us"] / 1e3, 2)}
             for shape, r in sorted(rows.items(), key=lambda kv: -kv[1]["us"])]
    return {"matvecs": table,
            "matvec_weight_bytes_per_token": round(sum(r["bytes"] for r in rows.values()) / tokens),
            "ms_per_token": {k: round(v / tokens / 1e3, 3) for k, v in sorted(totals.items())}}


def _trace_events(trace_dir: pathlib.Path) -> list[dict]:
    path = glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(config_path: str, overrides: list[str], paths: list[str], max_new_tokens: int,
            prompt_tokens: int, exit_rates, repeats: int, work: pathlib.Path) -> dict:
    import jax

    from nvium_jax.config import load_config
    from nvium_jax.eval.decode_bench import bench_prompts, force_exit_rates
    from nvium_jax.inference import DecodeOptions, generate
    from nvium_jax.model import build_model
    from nvium_jax.model.count import matched_baseline_model

    cfg = load_config(config_path, overrides).model
    model = build_model(cfg, seed=0)
    if exit_rates is not None:
        force_exit_rates(model, exit_rates)
    nets = {"nvium": (model, "deferred"), "dense": (model, "dense"),
            "baseline": (build_model(matched_baseline_model(cfg), seed=0), "dense")}
    prompts = bench_prompts(cfg.vocab_size, 1, prompt_tokens, 0)
    record = {"config": " ".join([config_path, *overrides]), "new_tokens": max_new_tokens, "repeats": repeats}
    for name in paths:
        net, decode = nets[name]
        run = lambda: generate(net, prompts, max_new_tokens, seed=0, decode=decode,
                               options=DecodeOptions(timings={}))
        run()  # compiled (and dumped) here
        timings, trace_dir = [], work / f"trace_{name}"
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(repeats):
                options = DecodeOptions(timings={})
                out = generate(net, prompts, max_new_tokens, seed=0, decode=decode, options=options)
                timings.append(options.timings["decode_s"])
        tokens = repeats * int(out.lengths_B[0] - 1)
        dumps = sorted(glob.glob(str(work / "hlo" / f"*{LOOP_MODULE}.cpu_after_optimizations.txt")))
        dots = hlo_dots(pathlib.Path(dumps[-1]).read_text())  # the newest: this path's loop
        table = profile_table(dots, loop_op_durations(_trace_events(trace_dir)), tokens)
        per_token_ms = 1e3 * sum(timings) / tokens  # the loop's own timer, outside the trace
        table["ms_per_token"]["outside ops"] = round(per_token_ms - sum(table["ms_per_token"].values()), 3)
        record[name] = {"ms_per_token_total": round(per_token_ms, 3), "loop_dots": len(dots), **table}
    return record


def print_report(record: dict, paths: list[str]) -> None:
    print(f"{record['config']}: {record['new_tokens']} new tokens × {record['repeats']}")
    for name in paths:
        r = record[name]
        print(f"\n{name}: {r['ms_per_token_total']:.2f} ms per token ("
              + ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms_per_token"].items()) + ")")
        print(f"  {'calls/token':>11} {'µs/call':>8} {'ms/token':>8} {'GB/s':>6}  shape")
        for row in r["matvecs"]:
            print(f"  {row['calls_per_token']:>11} {row['mean_us']:>8.1f} {row['ms_per_token']:>8.3f} "
                  f"{row['gbps']:>6.1f}  {row['shape']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/nvium-125m.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.dtype=float32")
    parser.add_argument("--paths", default="dense,baseline", help="of nvium (deferred), dense, baseline")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--exit-rates", default="0.35,0.25,0.15,0.25")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if "jax" in sys.modules:
        raise SystemExit("profile_decode sets XLA flags before jax starts: run it as python -m scripts.profile_decode")
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [
            os.environ.get("XLA_FLAGS", ""), TRACE_FLAGS, f"--xla_dump_to={work / 'hlo'}",
            f"--xla_dump_hlo_module_re=.*{LOOP_MODULE}.*", "--xla_dump_hlo_pass_re=NONE"]))
        rates = [float(x) for x in args.exit_rates.split(",")] if args.exit_rates else None
        record = profile(args.config, args.overrides, paths, args.max_new_tokens, args.prompt_tokens, rates,
                         args.repeats, work)
    if args.json:
        print(json.dumps(record))
    else:
        print_report(record, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
