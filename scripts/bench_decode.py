"""The decode table: `nvium bench decode` over prompt lengths × batch sizes (and, for batch
> 1, batch schedules), on one model, printed as a Markdown table.

    python -m scripts.bench_decode --config configs/nvium-125m.yaml \
        [--prompts 16,128,512] [--batches 1,4,8] [--schedules advance] [--max-new-tokens 64] \
        [--exit-rates 0.35,0.25,0.15,0.25] [--repeats 5] [--attention auto] [--json]

Schedules: `lockstep` (a deep segment runs whenever a row needs it; rows that do not are
masked), `advance` (lockstep, and masked rows advance their own pending blocks through the
running segment), `wait` (a row waits until ≈ 3/8 of the batch needs its segment, or for
at most `wait_age` iterations), `wait+advance` (both). Every schedule returns the same tokens.
Tokens/s are those of the decode loop; the prefill is timed apart (`prefill_s`). The device's
streaming-read bandwidth is measured once (`bandwidth_gbps`, in the table's header) and each
path's byte-model GB/s is given as a fraction of it (`*_roofline`): run under `taskset -c 0`
to see the same on one core.
`--sampling exit --temperature T --top-k K --top-p P --router-temperature R` benchmarks
per-exit sampling (the baseline runs the same head transform).

    python -m scripts.bench_decode --config configs/nvium-125m.yaml --paper-grid

runs the paper's sampling grid instead — head {greedy, temperature 0.6, temperature 1.0 with
top-k 50} × router {greedy, 0.6, 1.0} under `--sampling exit`, at batch 1, 128 new tokens,
prompts of 16 and 512 tokens (other flags as given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from nvium_jax.config import load_config
from nvium_jax.eval.decode_bench import PATHS, REFERENCE_EXIT_RATES, bench_decode, stream_read_gbps
from nvium_jax.model import build_model

COLUMNS = ("prompt_tokens", "batch", "schedule", "nvium_tokens_per_s", "dense_tokens_per_s",
           "baseline_tokens_per_s", "speedup", "speedup_vs_dense", "ideal_speedup", "efficiency",
           "nvium_roofline", "dense_roofline", "baseline_roofline", "flushes")
GRID_COLUMNS = ("prompt_tokens", "head", "router", "exit_distribution", "nvium_tokens_per_s",
                "dense_tokens_per_s", "baseline_tokens_per_s", "speedup", "speedup_vs_dense",
                "ideal_speedup", "efficiency", "nvium_roofline", "baseline_roofline")
PAPER_HEADS = {"greedy": dict(temperature=0.0), "T0.6": dict(temperature=0.6),
               "T1.0 top-k 50": dict(temperature=1.0, top_k=50)}
PAPER_ROUTERS = {"greedy": 0.0, "T0.6": 0.6, "T1.0": 1.0}


def paper_grid() -> list[dict]:
    """The paper's sampling cells (head × router, per-exit sampling): `head` and `router`
    name them, the rest are `bench_decode`'s sampler arguments."""
    return [dict(head=head, router=router, sampling="exit", router_temperature=tau_r,
                 **(dict(top_k=None, top_p=None) | transform))
            for head, transform in PAPER_HEADS.items() for router, tau_r in PAPER_ROUTERS.items()]


def cells(args) -> list[dict]:
    """(prompt tokens, batch, schedule, sampler) of every benchmark of this call."""
    if args.paper_grid:
        return [dict(prompt_tokens=p, batch=1, schedule="advance", **sampler)
                for p in (16, 512) for sampler in paper_grid()]
    sampler = dict(sampling=args.sampling, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, router_temperature=args.router_temperature)
    return [dict(prompt_tokens=int(p), batch=int(b), schedule=schedule, **sampler)
            for p in args.prompts.split(",") for b in args.batches.split(",")
            for schedule in (args.schedules.split(",") if int(b) > 1 else ["advance"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--prompts", default="16,128,512", help="prompt lengths (tokens)")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--schedules", default="advance")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default 64 (128 with --paper-grid)")
    parser.add_argument("--exit-rates", default=",".join(map(str, REFERENCE_EXIT_RATES)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--attention", default=None, help="auto | pallas | reference (default: config)")
    parser.add_argument("--sampling", choices=["mixture", "exit"], default="mixture")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--router-temperature", type=float, default=1.0)
    parser.add_argument("--paper-grid", action="store_true",
                        help="head {greedy, 0.6, 1.0 + top-k 50} × router {greedy, 0.6, 1.0}, batch 1, "
                             "prompts 16 and 512, 128 new tokens (default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.paper_grid else 64
    config = load_config(args.config, args.overrides)
    model = build_model(config.model, seed=0)
    rates = [float(x) for x in args.exit_rates.split(",")]
    bandwidth = stream_read_gbps()
    records = []
    for cell in cells(args):
        names = {key: cell.pop(key) for key in ("head", "router") if key in cell}
        record = bench_decode(
            model, max_new_tokens=args.max_new_tokens, exit_rates=rates, repeats=args.repeats,
            window=config.decode.window if args.window is None else args.window,
            attention=args.attention or config.decode.attention, bandwidth_gbps=bandwidth, **cell,
        )
        record["schedule"] = cell["schedule"] if cell["batch"] > 1 else "-"
        record |= {f"{path}_roofline": record["roofline_fraction"][path] for path in PATHS}
        records.append(record | names)
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(records))
        return 0
    columns = GRID_COLUMNS if args.paper_grid else COLUMNS
    sampler = "paper grid (sampling=exit)" if args.paper_grid else ", ".join(
        f"{k}={records[0][k]}" for k in ("sampling", "temperature", "top_k", "top_p",
                                         "router_temperature"))
    print(f"{records[0]['device']}, {args.config} {' '.join(args.overrides)}, exit rates {rates}, "
          f"{sampler}, {records[0]['new_tokens']} new tokens per row, streaming read "
          f"{bandwidth:.1f} GB/s, {datetime.date.today()}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for record in records:
        print("| " + " | ".join(str(record[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
