"""Compile time of the decode loop against depth: what the first `generate` of a shape pays.

    python -m scripts.bench_compile [--config configs/nvium-tiny.yaml] [--layers 4,8,12,16] \
        [--max-new-tokens 40] [--json]

For each depth L the config's model gets `n_layers=L` and exits at L/4, L/2, 3L/4; `generate`
runs twice per decode mode (deferred, dense), compiled programs cleared between depths and no
persistent cache (a 2-layer decode first takes JAX's one-time costs), and the compile of each phase is the
first call's seconds less the second's (`DecodeOptions(timings=…)`: `prefill_s`, `decode_s`).
The per-layer figure is the least-squares slope of the loop's compile seconds over L.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import jax
import numpy as np

from nvium_jax.config import load_config
from nvium_jax.inference import DecodeOptions, generate
from nvium_jax.model import build_model


def exits_for(n_layers: int) -> list[int]:
    return sorted({max(1, n_layers // 4), n_layers // 2, 3 * n_layers // 4} - {0, n_layers})


def compile_seconds(model, prompts, max_new_tokens: int, decode: str) -> dict:
    """Seconds the first call spends beyond the second, per phase."""
    first, second = {}, {}
    for timings in (first, second):
        generate(model, prompts, max_new_tokens, decode=decode, options=DecodeOptions(timings=timings))
    return {f"{phase}_compile_s": round(first[phase] - second[phase], 3)
            for phase in ("prefill_s", "decode_s")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/nvium-tiny.yaml")
    parser.add_argument("--layers", default="4,8,12,16")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    warm = load_config(args.config, ["model.n_layers=2", "model.exits=[1]"])
    compile_seconds(build_model(warm.model, seed=0), [[1, 2, 3]], 4, "deferred")  # JAX's one-time costs
    rows = []
    for n_layers in (int(x) for x in args.layers.split(",")):
        exits = exits_for(n_layers)
        config = load_config(args.config, [f"model.n_layers={n_layers}", f"model.exits={exits}"])
        model = build_model(config.model, seed=0)
        prompts = np.arange(1, 13, dtype=np.int32)[None] % config.model.vocab_size
        jax.clear_caches()
        row = {"n_layers": n_layers, "exits": exits}
        for decode in ("deferred", "dense"):
            row[decode] = compile_seconds(model, prompts, args.max_new_tokens, decode)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    depth = np.array([r["n_layers"] for r in rows], np.float64)
    slope = {decode: float(np.polyfit(depth, [r[decode]["decode_s_compile_s"] for r in rows], 1)[0])
             if len(rows) > 1 else None for decode in ("deferred", "dense")}
    if args.json:
        print(json.dumps({"rows": rows, "loop_compile_s_per_layer": slope}))
        return 0
    print(f"{jax.devices()[0].platform}, {args.config}, batch 1, {args.max_new_tokens} new tokens, "
          f"jax {jax.__version__}, {datetime.date.today()}\n")
    print("| layers | exits | deferred loop s | deferred prefill s | dense loop s | dense prefill s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        d, n = r["deferred"], r["dense"]
        print(f"| {r['n_layers']} | {r['exits']} | {d['decode_s_compile_s']} | {d['prefill_s_compile_s']} "
              f"| {n['decode_s_compile_s']} | {n['prefill_s_compile_s']} |")
    if slope["deferred"] is not None:
        print(f"\nloop compile per layer: deferred {slope['deferred']:.3f} s, dense {slope['dense']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
