"""The decode table: `nvium bench decode` over prompt lengths × batch sizes (and, for batch
> 1, batch schedules), on one model, printed as a Markdown table.

    python -m scripts.bench_decode --config configs/nvium-125m.yaml \
        [--prompts 16,128,512] [--batches 1,4,8] [--schedules advance] [--max-new-tokens 64] \
        [--exit-rates 0.35,0.25,0.15,0.25] [--repeats 5] [--attention auto] [--json]

Schedules: `lockstep` (a deep segment runs whenever a row needs it; rows that do not are
masked), `advance` (lockstep, and masked rows advance their own pending blocks through the
running segment), `wait` (a row waits until ≈ 3/8 of the batch needs its segment, or for
at most `wait_age` iterations), `wait+advance` (both). Every schedule returns the same tokens.
Tokens/s are those of the decode loop; the prefill is timed apart (`prefill_s`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from nvium_jax.config import load_config
from nvium_jax.eval.decode_bench import REFERENCE_EXIT_RATES, bench_decode
from nvium_jax.model import build_model

COLUMNS = ("prompt_tokens", "batch", "schedule", "nvium_tokens_per_s", "dense_tokens_per_s",
           "baseline_tokens_per_s", "speedup", "speedup_vs_dense", "ideal_speedup", "efficiency",
           "flushes")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--prompts", default="16,128,512", help="prompt lengths (tokens)")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--schedules", default="advance")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--exit-rates", default=",".join(map(str, REFERENCE_EXIT_RATES)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--attention", default=None, help="auto | pallas | reference (default: config)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    model = build_model(config.model, seed=0)
    rates = [float(x) for x in args.exit_rates.split(",")]
    records = []
    for prompt_tokens in [int(p) for p in args.prompts.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            for schedule in args.schedules.split(",") if batch > 1 else ["advance"]:
                record = bench_decode(
                    model, batch=batch, prompt_tokens=prompt_tokens,
                    max_new_tokens=args.max_new_tokens, exit_rates=rates, repeats=args.repeats,
                    schedule=schedule,
                    window=config.decode.window if args.window is None else args.window,
                    attention=args.attention or config.decode.attention,
                )
                record["schedule"] = schedule if batch > 1 else "-"
                records.append(record)
                print(json.dumps(record), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(records))
        return 0
    print(f"{records[0]['device']}, {args.config} {' '.join(args.overrides)}, exit rates {rates}, "
          f"{records[0]['new_tokens']} new tokens per row, {datetime.date.today()}\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for record in records:
        print("| " + " | ".join(str(record[c]) for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
