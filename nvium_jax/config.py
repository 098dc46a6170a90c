"""Typed run configuration: model / data / train / mesh / decode / run.

A config is a YAML file with one mapping per section, plus `section.key=value`
overrides whose values are parsed as YAML (`train.lr=3e-4`, `model.exits=[3,6,9]`).
Every key is a field of a frozen dataclass below; an unknown key, a value of the wrong
type or an impossible combination raises `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Literal, Optional

import yaml


class InputError(ValueError):
    """A user's input is wrong — an argument, a file, a prompt — and the message names it and
    the fix: the CLI prints it as one line. Any other exception is a bug of ours and keeps
    its traceback."""


class ConfigError(InputError):
    """A user's config mistake; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone shape and N-vium exits. `exits=[]` is the matched baseline (one exit)."""

    vocab_size: int = 32000
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: Optional[int] = None  # None = n_heads (multi-head attention)
    d_ff: int = 2048
    context: int = 1024
    rope_theta: float = 10000.0
    exits: Optional[tuple[int, ...]] = None  # None = [L//4, L//2, 3L//4]; [] = baseline
    adapter_hidden: Optional[int] = None  # None = d_model
    router_hidden: Optional[int] = None  # None = d_model (ours) or ≈ 0.66·d_model (reference)
    router_bias_init: float = 0.0  # initial exit-minus-continue logit of every router
    # the exits' form: `ours` (DESIGN §1) or as the paper's code builds them (ETH-DISCO/n-vium)
    router_head: Literal["ours", "reference"] = "ours"  # reference: MLP → RMSNorm → Linear(D→2)
    adapter_activation: Literal["gelu", "silu"] = "gelu"
    adapter_init: Literal["ours", "reference"] = "ours"  # W_in std: init_std | 1/√d_model
    final_adapter: bool = False  # a residual adapter on the final exit too (the paper's code)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def early_exits(self) -> tuple[int, ...]:
        """Layers after which an early exit sits (depths d_1 < ... < d_{K-1})."""
        if self.exits is not None:
            return tuple(self.exits)
        depths = (self.n_layers // 4, self.n_layers // 2, 3 * self.n_layers // 4)
        return tuple(sorted({d for d in depths if 0 < d < self.n_layers}))

    @property
    def exit_depths(self) -> tuple[int, ...]:
        """Depth of every exit, shallow to final: d_1, ..., d_K = n_layers."""
        return (*self.early_exits, self.n_layers)

    @property
    def n_exits(self) -> int:
        """Early exits plus the final one (K)."""
        return len(self.early_exits) + 1

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """Layer ranges [start, stop) between consecutive exits; segment 1 starts at 0."""
        starts = (0, *self.early_exits)
        return tuple(zip(starts, self.exit_depths))

    @property
    def adapter_width(self) -> int:
        return self.d_model if self.adapter_hidden is None else self.adapter_hidden

    @property
    def router_width(self) -> int:
        """The router MLP's hidden width; the reference's default is 0.66·d_model rounded up
        to a multiple of 8 (its configs: 128 → 88, 256 → 176, 1536 → 1016)."""
        if self.router_hidden is not None:
            return self.router_hidden
        if self.router_head == "reference":
            return 8 * -(-66 * self.d_model // 800)
        return self.d_model


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = None  # a prepared data dir; None = the embedded corpus
    tokenizer: Optional[str] = None  # tokenizer.json path or bpe:VOCAB; None = bpe:<vocab>
    val_fraction: float = 0.005  # held-out share when the embedded corpus is prepared
    workers: int = 0  # grain worker processes (0 = load in the main process)
    prefetch: int = 2  # batches each worker prepares ahead
    # the embedded corpus (≈ 1 M tokens) is for models up to the tiny ones; a larger model
    # refuses it (it would repeat it thousands of times) unless this is set
    allow_embedded: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global sequences per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_steps: int = 100
    decay_frac: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    beta: float = 0.15  # weight of the expected-depth cost
    # the adaptive depth cost (nvium_jax/train/beta.py): a constant target CE, or a matched
    # baseline run whose held-out CE at the nearest logged step is the target; both null = fixed β
    beta_target: Optional[float] = None
    beta_match: Optional[str] = None
    beta_k_up: float = 8.0  # the paper's 1.5B constants
    beta_k_down: float = 4.0
    beta_dead_band: float = 0.005
    beta_max_step: float = 100.0
    beta_min: float = 0.0
    beta_max: float = 10.0
    router_warmup_frac: float = 0.05
    exit_lr_mult: float = 1.0  # learning-rate multiplier of the routers and adapters
    loss_chunk: int = 256  # tokens per chunk of the vocabulary projection
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "full"
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 500
    keep: int = 3
    on_nonfinite: Literal["stop", "skip"] = "stop"
    profile_steps: int = 0  # trace this many steps (after step 5) into the run dir
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ('data', 'fsdp', 'tensor'); -1 takes the devices left over."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    window: int = 16  # longest pending block W (counting the new token); 1 = no deferral
    attention: Literal["auto", "pallas", "reference"] = "auto"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: Optional[str] = None  # None = runs/<config file stem>
    wandb: Literal["offline", "online", "disabled"] = "offline"
    name: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    decode: DecodeConfig = DecodeConfig()
    run: RunConfig = RunConfig()


_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "decode": DecodeConfig,
    "run": RunConfig,
}


def load_config(path: str | pathlib.Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Reads a YAML config (a local file, or a run's `config.yaml` in a bucket: `s3://…`,
    `gs://…`), applies `section.key=value` overrides, validates everything."""
    from nvium_jax.paths import RUN_SCHEMES, location, store_error, store_errors

    path = location(path, "--config", RUN_SCHEMES)
    try:
        text = path.read_text() if path.is_file() else None
    except store_errors() as err:
        raise store_error(path, err, "reading") from None
    if text is None:
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    raw = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in raw.items()}
    for override in overrides:
        _apply_override(raw, override)
    config = config_from_dict(raw)
    if config.run.dir is None:
        config = dataclasses.replace(
            config, run=dataclasses.replace(config.run, dir=f"runs/{path.stem}")
        )
    return config


def config_from_dict(raw: dict) -> Config:
    """Builds and validates a Config from nested plain data (as YAML gives it)."""
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(
                f"unknown config section {name!r}; sections are {', '.join(_SECTION_TYPES)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, not {value!r}")
        sections[name] = _build_section(name, _SECTION_TYPES[name], value)
    config = Config(**sections)
    validate(config)
    return config


def config_to_dict(config: Config) -> dict:
    """Plain nested data (tuples as lists) that `config_from_dict` reads back."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(config, name)).items()}
        for name in _SECTION_TYPES
    }


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(
            f"override {override!r} is not of the form section.key=value (e.g. train.lr=3e-4)"
        )
    if section not in _SECTION_TYPES:
        raise ConfigError(
            f"override {override!r}: unknown section {section!r}; sections are "
            f"{', '.join(_SECTION_TYPES)}"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    raw.setdefault(section, {})[name] = value


def _key_name(section: str, key) -> str:
    """`section.key`, quoted when the key holds characters that would break the line."""
    name = f"{section}.{key}"
    return name if name.isprintable() else repr(name)


def _build_section(section: str, cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"unknown config key {_key_name(section, key)}; keys of {section} are: "
                f"{', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of integers"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(key: str, tp, value):
    """Checks `value` against the annotated type; YAML-ish strings of numbers are accepted."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{key}={value!r} is not valid; expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(key, inner, value)
        except ConfigError:
            raise wrong from None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise wrong
        return tuple(value)
    if tp in (bool, int, str):  # YAML's true is an int to Python: not a valid int here
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Impossible values and combinations, each with one message naming the key."""
    m = config.model
    for key in ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "context"):
        _require(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be at least 1")
    _require(
        m.d_model % m.n_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
        f"choose n_heads among the divisors of {m.d_model}",
    )
    _require(
        m.head_dim % 2 == 0,
        f"model.d_model/model.n_heads={m.head_dim} must be even for rotary embeddings",
    )
    _require(
        m.kv_heads >= 1 and m.n_heads % m.kv_heads == 0,
        f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}",
    )
    for key in ("adapter_hidden", "router_hidden"):
        value = getattr(m, key)
        _require(value is None or value >= 1, f"model.{key}={value} must be at least 1 (or null)")
    _require(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be positive")
    exits = m.early_exits
    _require(
        all(1 <= d <= m.n_layers - 1 for d in exits)
        and all(a < b for a, b in zip(exits, exits[1:])),
        f"model.exits={list(exits)} — exits must be increasing layer indices in "
        f"[1, {m.n_layers - 1}] (model.n_layers={m.n_layers}); [] is the baseline",
    )
    t = config.train
    for key in ("steps", "batch_size", "grad_accum", "loss_chunk", "eval_every", "log_every",
                "checkpoint_every", "keep", "eval_batches"):
        _require(getattr(t, key) >= 1, f"train.{key}={getattr(t, key)} must be at least 1")
    _require(
        t.batch_size % t.grad_accum == 0,
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
    )
    _require(t.lr > 0, f"train.lr={t.lr} must be positive")
    _require(0 <= t.router_warmup_frac <= 1, "train.router_warmup_frac must lie in [0, 1]")
    _require(t.exit_lr_mult >= 0,
             f"train.exit_lr_mult={t.exit_lr_mult} must be at least 0 (1.0 = the learning rate of "
             f"the rest; 0 freezes the routers and adapters)")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must lie in [0, 1]")
    _require(0 < t.decay_frac <= 1, "train.decay_frac must lie in (0, 1]")
    _require(t.warmup_steps >= 0, "train.warmup_steps must be at least 0")
    _require(t.beta >= 0, "train.beta must be at least 0")
    _require(t.beta_target is None or t.beta_match is None,
             "set one of train.beta_target (a constant CE) and train.beta_match (a baseline run "
             "dir), not both")
    for key in ("beta_k_up", "beta_k_down", "beta_dead_band", "beta_max_step", "beta_min"):
        _require(getattr(t, key) >= 0, f"train.{key}={getattr(t, key)} must be at least 0")
    _require(t.beta_min <= t.beta_max,
             f"train.beta_min={t.beta_min} must not exceed train.beta_max={t.beta_max}")
    _require(t.profile_steps >= 0, "train.profile_steps must be at least 0")
    d = config.data
    _require(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must lie in [0, 1)")
    _require(d.workers >= 0, f"data.workers={d.workers} must be at least 0")
    from nvium_jax.paths import data_location, local_path, run_location  # a URL is never folded into a folder

    if d.path is not None:
        data_location(d.path, "data.path")
    if not (d.tokenizer or "bpe:").startswith("bpe:"):
        data_location(d.tokenizer, "data.tokenizer")  # e.g. a run's own, in its bucket
    if config.run.dir is not None:
        run_location(config.run.dir, "run.dir")
    if t.beta_match is not None:
        local_path(t.beta_match, "train.beta_match")
    mesh = config.mesh
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    for key, value in sizes.items():
        _require(value == -1 or value >= 1, f"mesh.{key}={value} must be a positive size or -1")
    _require(
        list(sizes.values()).count(-1) <= 1,
        "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (the devices left over)",
    )
    _require(config.decode.window >= 1, f"decode.window={config.decode.window} must be at least 1")
