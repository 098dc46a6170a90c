"""PNG plots of an evaluation record and of a run's metrics.jsonl (matplotlib's object API
with the Agg canvas: no display and no pyplot state). Each `*_figure` returns the Figure, so
a notebook can show it and a test can read the plotted numbers back."""

from __future__ import annotations

import pathlib

from matplotlib.figure import Figure

from nvium_jax.train.metrics import read_metrics

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _exit_labels(record: dict) -> list[str]:
    return [f"exit {e['index']}\n(depth {e['depth']})" for e in record["exits"]]


def exit_mass_figure(record: dict) -> Figure:
    """Mean routing weight per exit: where the mixture puts its probability mass."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    masses = [e["mass"] for e in record["exits"]]
    ax.bar(_exit_labels(record), masses, color=COLORS[: len(masses)])
    ax.set_ylabel("routing mass")
    ax.set_ylim(0, max(1.0, max(masses) * 1.1))
    ax.set_title(f"exit mass · step {record['step']} · expected depth "
                 f"{record['expected_depth']:.2f} of {record['n_layers']}")
    return fig


def exit_ppl_figure(record: dict) -> Figure:
    """Each exit's own perplexity, and the mixture's as a line."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ppls = [e["ppl"] for e in record["exits"]]
    ax.bar(_exit_labels(record), ppls, color=COLORS[: len(ppls)])
    ax.axhline(record["mixture_ppl"], color="black", linestyle="--",
               label=f"mixture {record['mixture_ppl']:.2f}")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"perplexity per exit · step {record['step']}")
    ax.legend()
    return fig


def routing_by_position_figure(record: dict) -> Figure:
    """Routing mass per exit, stacked, for each bucket of positions in the window."""
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    rows = record["by_position"]
    labels = [f"{r['positions'][0]}" if r["positions"][0] == r["positions"][1]
              else f"{r['positions'][0]}–{r['positions'][1]}" for r in rows]
    bottom = [0.0] * len(rows)
    for k, exit_ in enumerate(record["exits"]):
        heights = [r["mass"][k] for r in rows]
        ax.bar(labels, heights, bottom=bottom, color=COLORS[k % len(COLORS)],
               label=f"exit {k} (depth {exit_['depth']})")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("position in the window")
    ax.set_ylabel("routing mass")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title("routing by position")
    return fig


def training_curves_figure(rows: list[dict]) -> Figure:
    """Loss and CE per exit (train, held-out dashed; the β controller's target CE dotted),
    expected depth, learning rate, and β (the depth cost's weight, set at evaluations when
    the controller is on)."""
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig = Figure(figsize=(10, 9), layout="constrained")
    loss_ax, ce_ax, depth_ax, lr_ax, beta_ax, gap_ax = fig.subplots(3, 2).reshape(-1)
    steps = [r["step"] for r in train]
    loss_ax.plot(steps, [r["loss"] for r in train], label="train loss")
    loss_ax.plot(steps, [r["mixture_ce"] for r in train], label="train mixture CE")
    if val:
        loss_ax.plot([r["step"] for r in val], [r["val_mixture_ce"] for r in val], "o--",
                     label="held-out mixture CE")
    targeted = [r for r in val if r.get("beta_target_ce") is not None]
    if targeted:
        loss_ax.plot([r["step"] for r in targeted], [r["beta_target_ce"] for r in targeted], "k:",
                     label="β target CE")
        gap_ax.plot([r["step"] for r in targeted], [r["beta_gap"] for r in targeted], "o-")
        gap_ax.axhline(0.0, color="gray", linewidth=0.8)
    gap_ax.set_title("β gap: target − held-out mixture CE")
    beta_ax.plot(steps, [r.get("beta", float("nan")) for r in train])
    beta_ax.set_title("β (depth-cost weight)")
    loss_ax.set_title("loss")
    loss_ax.legend(fontsize="small")
    n_exits = len(train[0]["exit_ce"]) if train else 0
    for k in range(n_exits):
        color = COLORS[k % len(COLORS)]
        ce_ax.plot(steps, [r["exit_ce"][k] for r in train], color=color, label=f"exit {k}")
        if val:
            ce_ax.plot([r["step"] for r in val], [r["val_exit_ce"][k] for r in val], "o--",
                       color=color)
    ce_ax.set_title("CE per exit (held-out dashed)")
    ce_ax.legend(fontsize="small")
    depth_ax.plot(steps, [r["expected_depth"] for r in train])
    depth_ax.set_title("expected depth (layers)")
    lr_ax.plot(steps, [r["lr"] for r in train])
    lr_ax.set_title("learning rate")
    for ax in (loss_ax, ce_ax, depth_ax, lr_ax, beta_ax, gap_ax):
        ax.set_xlabel("step")
    return fig


def write_plots(record: dict, run_dir: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """exit_mass.png, exit_ppl.png, routing_by_position.png and training_curves.png."""
    figures = {
        "exit_mass.png": exit_mass_figure(record),
        "exit_ppl.png": exit_ppl_figure(record),
        "routing_by_position.png": routing_by_position_figure(record),
    }
    rows = read_metrics(run_dir / "metrics.jsonl")
    if any("loss" in r for r in rows):
        figures["training_curves.png"] = training_curves_figure(rows)
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        paths.append(out / name)
    return paths


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for `IPython.display.Image` in a notebook)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
