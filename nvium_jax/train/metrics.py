"""Training FLOPs and MFU, and the metric sinks: metrics.jsonl, wandb, a progress line."""

from __future__ import annotations

import json
import pathlib
import time
import uuid
from typing import Optional

import jax
import rich.console

from nvium_jax.config import Config, ModelConfig, config_to_dict
from nvium_jax.model.count import (
    adapter_param_count, block_matmul_param_count, final_adapter_param_count, router_param_count,
)
from nvium_jax.paths import atomic_write_text

# dense bf16 peak FLOP/s per device, by jax device_kind prefix
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3× forward, no remat).

    Forward, per token: 2·(matmul weights of the L blocks) + attention 2·2·L·T·H·E
    (QKᵀ and AV over the whole window, as PaLM counts it) + K head projections 2·K·D·V
    (N-vium evaluates the shared head at every exit) + the K−1 adapters and routers (and
    the final exit's adapter under `model.final_adapter`).
    The embedding lookup is free.
    """
    D, E, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    exits = (len(cfg.early_exits) * (adapter_param_count(cfg) + router_param_count(cfg))
             + final_adapter_param_count(cfg))
    forward = 2 * (L * block_matmul_param_count(cfg) + cfg.n_exits * D * cfg.vocab_size + exits)
    forward += 4 * L * seq_len * cfg.n_heads * E
    return 3.0 * forward


def peak_flops(device) -> Optional[float]:
    kind = getattr(device, "device_kind", "")
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int) -> Optional[float]:
    peak = peak_flops(jax.devices()[0])
    if peak is None:
        return None
    return tokens_per_s * train_flops_per_token(cfg, seq_len) / (peak * jax.device_count())


class MetricsSink:
    """Appends JSON lines to metrics.jsonl, mirrors them to wandb, prints a progress line."""

    def __init__(self, run_dir: pathlib.Path, config: Config, resume_step: int):
        self.is_main = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.total_steps = config.train.steps
        self.started = time.time()
        self.start_step = resume_step
        self.console = rich.console.Console(stderr=True)
        if self.is_main:
            trim_metrics(self.path, resume_step)
        if self.is_main and config.run.wandb != "disabled":
            self.wandb = _start_wandb(run_dir, config)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {}
            for key, value in record.items():
                if isinstance(value, list):
                    flat.update({f"{key}/{i}": v for i, v in enumerate(value)})
                elif value is not None and key != "step":
                    flat[key] = value
            self.wandb.log(flat, step=record["step"])

    def progress(self, record: dict) -> None:
        if not self.is_main:
            return
        step = record["step"]
        done = max(step - self.start_step, 1)
        eta = (time.time() - self.started) / done * (self.total_steps - step)
        mfu_text = "–" if record.get("mfu") is None else f"{100 * record['mfu']:.1f}%"
        self.console.print(
            f"[bold]step {step}/{self.total_steps}[/bold] · loss {record['loss']:.4f} · "
            f"ce {record['mixture_ce']:.4f} · depth {record['expected_depth']:.2f} · "
            f"{record['tokens_per_s']:,.0f} tok/s · MFU {mfu_text} · ETA {_clock(eta)}",
            highlight=False, soft_wrap=True,
        )

    def note(self, text: str) -> None:
        if self.is_main:
            self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: pathlib.Path) -> list[dict]:
    """metrics.jsonl rows; a torn or foreign line (one a trainer is writing now) is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def trim_metrics(path: pathlib.Path, resume_step: int) -> None:
    """Before (re)starting at `resume_step`: metrics.jsonl keeps the valid rows up to that
    step — a row torn by a kill is dropped, and rows of steps that will be run again move
    to metrics.redone.jsonl (kept, not lost) — so a reader finds one row per step."""
    if not path.is_file():
        return
    kept, redone = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue  # torn or foreign
        (kept if 0 < resume_step and step <= resume_step else redone).append(line)
    if redone:
        with path.with_name("metrics.redone.jsonl").open("a") as f:
            f.write("".join(line + "\n" for line in redone))
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _start_wandb(run_dir: pathlib.Path, config: Config):
    import wandb

    id_path = run_dir / "wandb_id"
    run_id = id_path.read_text().strip() if id_path.is_file() else uuid.uuid4().hex[:8]
    id_path.write_text(run_id)
    return wandb.init(
        project="nvium_jax", name=config.run.name or run_dir.name, id=run_id, resume="allow",
        dir=str(run_dir), mode=config.run.wandb, config=config_to_dict(config),
        settings=wandb.Settings(silent=True),
    )
