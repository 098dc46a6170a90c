"""Prints the README's parameter table from the closed-form count (tests check the README
holds exactly this table): `python scripts/param_table.py`."""

from __future__ import annotations

import pathlib

from nvium_jax.config import load_config
from nvium_jax.model.count import param_count

SIZES = ("tiny", "125m", "350m", "760m", "1.5b")
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def table() -> str:
    rows = [
        "| size | N-vium params | exits after layers | baseline params | baseline d_ff | difference |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for size in SIZES:
        nvium = load_config(CONFIGS / f"nvium-{size}.yaml").model
        base = load_config(CONFIGS / f"baseline-{size}.yaml").model
        n, b = param_count(nvium), param_count(base)
        rows.append(
            f"| {size} | {n:,} | {', '.join(map(str, nvium.early_exits))} | {b:,} | "
            f"{base.d_ff} (vs {nvium.d_ff}) | {100 * (b - n) / n:+.3f}% |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
