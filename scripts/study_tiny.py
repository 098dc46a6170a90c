"""Speed versus quality at small scale: nvium-tiny trained at several depth costs β and
baseline-tiny on the same tokens, each evaluated on the held-out split (`nvium eval`'s
`evaluate_run`), each N-vium run's decode speedup over the matched baseline measured with
its *trained* routing (`nvium bench decode --run`'s `bench_decode`), and held-out perplexity
plotted against speedup with the baseline as the reference point.

    python -m scripts.study_tiny [--betas 0.02,0.05,0.15] [--out runs/study_tiny] \
        [--plot docs/study_tiny.png] [--repeats 5] [key=value ...]

Runs already trained in --out are resumed (or reused when done), so a second call only
re-measures. Tens of minutes on 2 CPU cores; a script, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def train_run(config_path: pathlib.Path, run_dir: pathlib.Path, overrides: list[str]):
    from nvium_jax.config import load_config
    from nvium_jax.train.loop import train

    config = load_config(config_path, [*overrides, f"run.dir={run_dir}", "run.wandb=disabled"])
    print(f"== training {run_dir} ({' '.join(overrides) or 'defaults'})", file=sys.stderr)
    train(config)


def measure(run_dir: pathlib.Path, decode: bool, args) -> dict:
    from nvium_jax.eval.decode_bench import bench_decode
    from nvium_jax.eval.evaluate import evaluate_run
    from nvium_jax.runs import load_run

    run = load_run(run_dir)
    record = evaluate_run(run, run_dir, plots=False, progress=False)
    row = {"run": str(run_dir), "step": run.step, "ppl": record["mixture_ppl"],
           "expected_depth": record["expected_depth"],
           "exit_mass": [e["mass"] for e in record["exits"]]}
    if decode:
        bench = bench_decode(run.model, batch=1, prompt_tokens=args.prompt_tokens,
                             max_new_tokens=args.max_new_tokens, exit_rates=None,
                             repeats=args.repeats, window=run.config.decode.window,
                             attention=run.config.decode.attention)
        row.update({key: bench[key] for key in (
            "speedup", "speedup_vs_dense", "ideal_speedup", "efficiency", "exit_distribution",
            "nvium_tokens_per_s", "dense_tokens_per_s", "baseline_tokens_per_s")})
    return row


def plot(rows: list[dict], baseline: dict, path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter([1.0], [baseline["ppl"]], marker="s", color="black", label="baseline-tiny")
    ax.scatter([r["speedup"] for r in rows], [r["ppl"] for r in rows], color="#4c72b0",
               label="nvium-tiny")
    for r in rows:
        ax.annotate(f"β={r['beta']:g}", (r["speedup"], r["ppl"]), textcoords="offset points",
                    xytext=(5, 4), fontsize="small")
    ax.axhline(baseline["ppl"], color="black", linewidth=0.6, linestyle=":")
    ax.axvline(1.0, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("decode speedup over the matched baseline (deferred, trained routing)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("nvium-tiny: speed versus quality")
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--betas", default="0.02,0.05,0.15")
    parser.add_argument("--out", default="runs/study_tiny")
    parser.add_argument("--plot", default="docs/study_tiny.png")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="applied to every run, e.g. train.steps=100")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    betas = [float(b) for b in args.betas.split(",")]
    train_run(ROOT / "configs/baseline-tiny.yaml", out / "baseline", args.overrides)
    for beta in betas:
        train_run(ROOT / "configs/nvium-tiny.yaml", out / f"nvium-beta{beta:g}",
                  [*args.overrides, f"train.beta={beta}"])
    baseline = measure(out / "baseline", decode=False, args=args)
    rows = [{"beta": beta, **measure(out / f"nvium-beta{beta:g}", decode=True, args=args)}
            for beta in betas]
    plot(rows, baseline, pathlib.Path(args.plot))
    record = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "baseline": baseline, "nvium": rows}
    (out / "study.json").write_text(json.dumps(record, indent=2))
    print("| run | β | held-out ppl | ppl ÷ baseline | expected depth | exit mass (eval) | "
          "decode exits | speedup ÷ baseline | ÷ dense | ideal | efficiency |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|")
    print(f"| baseline-tiny | – | {baseline['ppl']:.3f} | 1.000 | {baseline['expected_depth']:.2f} "
          f"| – | – | 1.000 | – | – | – |")
    for r in rows:
        mass = " / ".join(f"{m:.2f}" for m in r["exit_mass"])
        dist = " / ".join(f"{m:.2f}" for m in r["exit_distribution"])
        print(f"| nvium-tiny | {r['beta']:g} | {r['ppl']:.3f} | {r['ppl'] / baseline['ppl']:.3f} "
              f"| {r['expected_depth']:.2f} | {mass} | {dist} | {r['speedup']:.3f} "
              f"| {r['speedup_vs_dense']:.3f} | {r['ideal_speedup']:.3f} | {r['efficiency']:.3f} |")
    print(f"\nplot: {args.plot}; records: {out / 'study.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
