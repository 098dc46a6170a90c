"""The paper's claim in miniature: for each size, the matched baseline, then N-vium at fixed
depth costs β and with β matched to the baseline's held-out curve (`train.beta_match`, the
paper's controller), all on the same tokens; each evaluated on the held-out split
(`evaluate_run`) and each N-vium run decoded with its *trained* routing — batch 1, prompts
cut from the held-out split — against the matched baseline (`bench_decode`), and the same
trained exit distribution forced onto the 125m shape (where this CPU is weight-bound), so
the speed the routing buys shows apart from a tiny model's fixed costs. One plot: held-out
perplexity ÷ baseline against speedup (measured and byte-model ideal), the Pareto front
per size.

    python -m scripts.study [--sizes tiny] [--betas 0,0.05,0.15] [--out runs/study] \
        [--plot docs/study.png] [--prompts 3] [--prompt-tokens 16] [--max-new-tokens 128] \
        [--repeats 5] [--transplant configs/nvium-125m.yaml | --transplant none] [key=value ...]

Sizes are config stems with a pair `configs/{nvium,baseline}-SIZE.yaml`. Resumable: a run
already trained to its steps is reused, an unfinished one resumed, and each run's
measurements are kept in RUN_DIR/study.json (deleted or `--remeasure` to measure again).
Tens of minutes per size on 2 CPU cores: a script, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH_KEYS = ("speedup", "speedup_vs_dense", "ideal_speedup", "efficiency",
              "nvium_tokens_per_s", "dense_tokens_per_s", "baseline_tokens_per_s")


def run_configs(size: str, betas: list[float], match: bool, out: pathlib.Path, overrides: list[str]):
    """(name, config path, run dir, overrides) of every run of one size, baseline first. The
    baseline is the matched one of the N-vium config as overridden (no exits, the FFN width
    of `matched_baseline_d_ff`), so `model.*` overrides change both alike."""
    from nvium_jax.config import load_config
    from nvium_jax.model.count import matched_baseline_d_ff

    base = out / size / "baseline"
    nvium = ROOT / f"configs/nvium-{size}.yaml"
    d_ff = matched_baseline_d_ff(load_config(nvium, overrides).model)
    runs = [("baseline", ROOT / f"configs/baseline-{size}.yaml", base,
             ["model.exits=[]", "model.final_adapter=false", f"model.d_ff={d_ff}"])]
    runs += [(f"β={b:g}", nvium, out / size / f"beta{b:g}", [f"train.beta={b}"]) for b in betas]
    if match:
        runs.append(("matched β", nvium, out / size / "match", [f"train.beta_match={base}"]))
    return [(name, path, run_dir, [*overrides, *extra, f"run.dir={run_dir}", "run.wandb=disabled"])
            for name, path, run_dir, extra in runs]


def train_run(config_path: pathlib.Path, overrides: list[str]):
    from nvium_jax.config import load_config
    from nvium_jax.runs import step_dirs
    from nvium_jax.train.loop import train

    config = load_config(config_path, overrides)
    run_dir = pathlib.Path(config.run.dir)
    if max(step_dirs(run_dir), default=-1) >= config.train.steps:
        print(f"== {run_dir}: trained, reused", file=sys.stderr)
        return
    print(f"== training {run_dir} ({' '.join(overrides)})", file=sys.stderr)
    train(config)


def held_out_prompts(run, n_prompts: int, prompt_tokens: int) -> np.ndarray:
    """[n, P] prompts: the starts of evenly spaced held-out windows (BOS first if any)."""
    from nvium_jax.data import eval_windows, resolve_data_dir

    windows = eval_windows(resolve_data_dir(run.config), context=run.config.model.context,
                           batch=n_prompts, n_batches=1)[0]
    prompts = windows[:, :prompt_tokens].copy()
    if run.bos_id is not None:
        prompts = np.concatenate([np.full((n_prompts, 1), run.bos_id, np.int32), prompts[:, :-1]], 1)
    return prompts


def decode_speed(model, prompts: np.ndarray, args, exit_rates=None) -> dict:
    """`bench_decode` at batch 1 on each prompt; medians over prompts, mean exit shares."""
    from nvium_jax.eval.decode_bench import bench_decode

    runs = [bench_decode(model, prompts=p[None], max_new_tokens=args.max_new_tokens,
                         exit_rates=exit_rates, repeats=args.repeats) for p in prompts]
    row = {key: round(statistics.median(r[key] for r in runs), 4) for key in BENCH_KEYS}
    shares = np.mean([r["exit_distribution"] for r in runs], axis=0)
    row["exit_distribution"] = (shares / shares.sum()).tolist()  # unrounded: rates to force
    row["new_tokens"] = runs[0]["new_tokens"]
    return row


def measure(name: str, run_dir: pathlib.Path, args) -> dict:
    """Held-out quality, and for N-vium the decode speed of its trained routing (small model
    and 125m transplant); cached in RUN_DIR/study.json."""
    from nvium_jax.eval.evaluate import evaluate_run
    from nvium_jax.runs import load_run

    cache = run_dir / "study.json"
    settings = {k: getattr(args, k) for k in ("prompts", "prompt_tokens", "max_new_tokens",
                                              "repeats", "transplant", "quality_only")}
    if cache.is_file() and not args.remeasure:
        row = json.loads(cache.read_text())
        if row.get("settings") == settings:
            return row
    run = load_run(run_dir)
    record = evaluate_run(run, run_dir, plots=False, progress=False)
    row = {"name": name, "run": str(run_dir), "step": run.step, "settings": settings,
           "ppl": record["mixture_ppl"], "expected_depth": record["expected_depth"],
           "n_layers": record["n_layers"],
           "exit_mass": [e["mass"] for e in record["exits"]],
           "exit_ppl": [e["ppl"] for e in record["exits"]]}
    if run.config.model.early_exits and not args.quality_only:
        print(f"== decoding {run_dir} with its trained routing", file=sys.stderr)
        row["decode"] = decode_speed(run.model, held_out_prompts(run, args.prompts, args.prompt_tokens), args)
        if args.transplant != "none":
            from nvium_jax.config import load_config
            from nvium_jax.model import build_model

            big = load_config(ROOT / args.transplant, ["model.dtype=float32"]).model
            if big.n_exits == run.config.model.n_exits:
                print(f"== the same exit distribution on {args.transplant}", file=sys.stderr)
                prompt = np.random.default_rng(0).integers(0, big.vocab_size, (1, args.prompt_tokens))
                row["transplant"] = decode_speed(build_model(big, seed=0), prompt, args,
                                                 exit_rates=row["decode"]["exit_distribution"])
    cache.write_text(json.dumps(row, indent=2))
    return row


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speedup (higher) and perplexity (lower),
    sorted by speedup."""
    front = [p for p in points
             if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]
    return sorted(front)


def plot(results: dict, path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    sizes = list(results)
    fig = Figure(figsize=(5.5 * len(sizes), 4.2), layout="constrained")
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for ax, size in zip(axes, sizes):
        baseline, rows = results[size]["baseline"], results[size]["nvium"]
        ratio = [r["ppl"] / baseline["ppl"] for r in rows]
        for key, marker, label in (("speedup", "o", "measured (this size)"),
                                   ("ideal_speedup", "^", "ideal (byte model)")):
            xs = [r["decode"][key] for r in rows]
            ax.scatter(xs, ratio, marker=marker, label=label,
                       facecolors="#4c72b0" if marker == "o" else "none", edgecolors="#4c72b0")
        if all("transplant" in r for r in rows):
            ax.scatter([r["transplant"]["speedup"] for r in rows], ratio, marker="s",
                       color="#dd8452", label="measured, routing on 125m")
        front = pareto([(r["decode"]["speedup"], q) for r, q in zip(rows, ratio)])
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="#4c72b0", linewidth=1,
                label="Pareto front (measured)")
        for r, q in zip(rows, ratio):
            ax.annotate(r["name"], (r["decode"]["speedup"], q), textcoords="offset points",
                        xytext=(5, 4), fontsize="small")
        ax.scatter([1.0], [1.0], marker="*", s=120, color="black", label="matched baseline")
        ax.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
        ax.axvline(1.0, color="black", linewidth=0.6, linestyle=":")
        ax.set_xlabel("decode speedup over the matched baseline (batch 1)")
        ax.set_ylabel("held-out perplexity ÷ baseline")
        ax.set_title(f"{size}: speed versus quality")
        ax.legend(fontsize="x-small", loc="center right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    lines = ["| size | run | step | held-out ppl | ÷ baseline | final exit ÷ baseline | E[depth]/L "
             "| exit mass (held-out) | decode exits | speedup | ÷ dense | ideal | efficiency "
             "| 125m speedup | 125m ideal |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for size, res in results.items():
        b = res["baseline"]
        lines.append(f"| {size} | baseline | {b['step']} | {b['ppl']:.3f} | 1.000 | 1.000 | 1.000 "
                     f"| – | – | 1.000 | – | – | – | – | – |")
        for r in res["nvium"]:
            d, t = r.get("decode"), r.get("transplant")
            mass = " / ".join(f"{m:.2f}" for m in r["exit_mass"])
            speed = (f"{' / '.join(f'{m:.2f}' for m in d['exit_distribution'])} | {d['speedup']:.3f} "
                     f"| {d['speedup_vs_dense']:.3f} | {d['ideal_speedup']:.3f} | {d['efficiency']:.3f}"
                     if d else "– | – | – | – | –")
            big = f"{t['speedup']:.3f} | {t['ideal_speedup']:.3f}" if t else "– | –"
            lines.append(
                f"| {size} | {r['name']} | {r['step']} | {r['ppl']:.3f} | {r['ppl'] / b['ppl']:.4f} "
                f"| {r['exit_ppl'][-1] / b['ppl']:.3f} | {r['expected_depth'] / r['n_layers']:.3f} "
                f"| {mass} | {speed} | {big} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny")
    parser.add_argument("--betas", default="0,0.05,0.15")
    parser.add_argument("--no-match", action="store_true", help="skip the train.beta_match run")
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--plot", default="docs/study.png")
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts, decoded one by one")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transplant", default="configs/nvium-125m.yaml",
                        help="config whose shape decodes the trained exit distribution; none = skip")
    parser.add_argument("--remeasure", action="store_true")
    parser.add_argument("--quality-only", action="store_true",
                        help="held-out evaluation only, no decode (ablations)")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="applied to every run, e.g. train.steps=200")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    betas = [float(b) for b in args.betas.split(",") if b.strip()]
    plan = {size: run_configs(size, betas, not args.no_match, out, args.overrides)
            for size in args.sizes.split(",")}
    for runs in plan.values():  # the baseline first: the matched run reads its curve
        for _, config_path, _, overrides in runs:
            train_run(config_path, overrides)
    if args.train_only:
        return 0
    results = {}
    for size, runs in plan.items():
        rows = [measure(name, run_dir, args) for name, _, run_dir, _ in runs]
        results[size] = {"baseline": rows[0], "nvium": rows[1:]}
    if not args.quality_only:
        plot(results, pathlib.Path(args.plot))
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "command": " ".join(["python -m scripts.study", *sys.argv[1:]]), "results": results}
    (out / "study.json").write_text(json.dumps(record, indent=2))
    print(table(results))
    print(f"\n{'' if args.quality_only else f'plot: {args.plot}; '}records: {out / 'study.json'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
