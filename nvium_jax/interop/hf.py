"""Hugging Face Llama interop: `nvium convert hf-import` upcycles a Llama checkpoint into an
N-vium run (the backbone is the Llama's; the exits are new and start inert), and
`nvium convert hf-export` writes a run's backbone and final exit as a Llama folder.
Either side may be a bucket (`s3://…`, `gs://…`): an import is built in the run's local
mirror and pushed (checkpoint objects, its manifest, then the run files, as training
pushes), an export reads through `load_run` and puts the folder's files with `config.json`
last, so a folder that a failed export left half-written has none and is not a model.

Read and written with safetensors' numpy API: no torch, no pickle. Layouts: HF stores a
linear layer as [out, in]; ours are [in, out] with heads split out — q_proj [H·E, D] is
wq [D, H, E], o_proj [D, H·E] is wo [H, E, D]. Both use the half-split `rotate_half` RoPE,
so no permutation of q/k is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from nvium_jax.config import Config, ConfigError, ModelConfig, validate
from nvium_jax.paths import (
    check_bucket, is_url, local_path, run_location, store_error, store_errors, upload_tree, write_text,
)

# the exit-minus-continue logit of an imported router: q ≈ 1e-7, so the mixture equals the
# Llama to float precision, yet the gradient on the bias (≈ q) stays above Adam's epsilon
INERT_ROUTER_BIAS = -16.0
SUPPORTED = "LlamaForCausalLM (model_type llama) without attention/MLP biases or rope scaling, SiLU"


class ConvertError(ConfigError):
    pass


# ---- the HF config --------------------------------------------------------------------
def model_config_from_hf(hf: dict, exits: Optional[tuple[int, ...]], context: Optional[int]) -> ModelConfig:
    """Our ModelConfig for a Llama config.json, or a refusal naming what is unsupported."""
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise ConvertError(f"config.json describes model_type={hf.get('model_type')!r}, "
                           f"architectures={arch}; supported: {SUPPORTED}")
    unsupported = [name for name, bad in (
        ("attention_bias=true", hf.get("attention_bias")),
        ("mlp_bias=true", hf.get("mlp_bias")),
        (f"rope_scaling={hf.get('rope_scaling')}", hf.get("rope_scaling")),
        (f"hidden_act={hf.get('hidden_act')!r}", hf.get("hidden_act", "silu") != "silu"),
    ) if bad]
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, D // H):
        unsupported.append(f"head_dim={hf['head_dim']} (≠ hidden_size / heads = {D // H})")
    if unsupported:
        raise ConvertError(f"this Llama uses {', '.join(unsupported)}; supported: {SUPPORTED}")
    L = int(hf["num_hidden_layers"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), n_layers=L, d_model=D, n_heads=H,
        n_kv_heads=int(hf.get("num_key_value_heads") or H), d_ff=int(hf["intermediate_size"]),
        context=int(context or hf.get("max_position_embeddings", 2048)),
        rope_theta=float(hf.get("rope_theta", 10000.0)), exits=exits,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), router_bias_init=INERT_ROUTER_BIAS,
        dtype="auto", param_dtype="float32",
    )


def hf_config(cfg: ModelConfig, bos_id, eos_id, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.context,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype,
    }


# ---- tensors ----------------------------------------------------------------------------
def read_safetensors(src: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder: model.safetensors, or the shards an index names (or all)."""
    from safetensors.numpy import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{src} holds no *.safetensors files (pickled .bin checkpoints are not read)")
    tensors = {}
    for name in files:
        if not (src / name).is_file():
            raise ConvertError(f"{index} names {name}, which is missing from {src}")
        tensors.update(load_file(str(src / name)))
    return tensors


def hf_shapes(cfg: ModelConfig, tied: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a Llama of this config has (HF layout)."""
    D, F, V, H, G, E = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not tied:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (H * E, D), p + "self_attn.k_proj.weight": (G * E, D),
            p + "self_attn.v_proj.weight": (G * E, D), p + "self_attn.o_proj.weight": (D, H * E),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
        })
    return shapes


def check_tensors(tensors: dict, cfg: ModelConfig, tied: bool) -> None:
    """One error listing every missing, unexpected or mis-shaped tensor."""
    want = hf_shapes(cfg, tied)
    have = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k} has shape {tuple(have[k].shape)}, expected {want[k]}"
                 for k in want if k in have and tuple(have[k].shape) != want[k]]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; … {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ConvertError(f"the checkpoint does not match its config.json: {shown}")


def backbone_from_hf(tensors: dict, cfg: ModelConfig, tied: bool) -> dict:
    """Our parameter pure-dict pieces (embedding, blocks, final norm, head), float32."""
    f32 = lambda name: np.asarray(tensors[name], np.float32)
    D, H, G, E, L = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.n_layers

    def stack(suffix, fn):
        return np.stack([fn(f32(f"model.layers.{i}.{suffix}")) for i in range(L)])

    head = f32("model.embed_tokens.weight" if tied else "lm_head.weight").T.copy()
    return {
        "embedding": f32("model.embed_tokens.weight"),
        "blocks": {
            "attn_norm": {"scale": stack("input_layernorm.weight", lambda w: w)},
            "attn": {
                "wq": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, E)),
                "wk": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, G, E)),
                "wv": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, G, E)),
                "wo": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(H, E, D)),
            },
            "mlp_norm": {"scale": stack("post_attention_layernorm.weight", lambda w: w)},
            "mlp": {
                "w_gate": stack("mlp.gate_proj.weight", lambda w: w.T),
                "w_up": stack("mlp.up_proj.weight", lambda w: w.T),
                "w_down": stack("mlp.down_proj.weight", lambda w: w.T),
            },
        },
        "final_norm": {"scale": f32("model.norm.weight")},
        "head": head,
    }


def backbone_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF names and layouts of a run's backbone and final exit (float32 numpy)."""
    D, H, G, E = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    get = lambda x: np.asarray(x, np.float32)
    blocks = params["blocks"]
    out = {"model.embed_tokens.weight": get(params["embedding"]),
           "model.norm.weight": get(params["final_norm"]["scale"]),
           "lm_head.weight": get(params["head"]).T}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        attn, mlp = blocks["attn"], blocks["mlp"]
        out.update({
            p + "self_attn.q_proj.weight": get(attn["wq"][i]).reshape(D, H * E).T,
            p + "self_attn.k_proj.weight": get(attn["wk"][i]).reshape(D, G * E).T,
            p + "self_attn.v_proj.weight": get(attn["wv"][i]).reshape(D, G * E).T,
            p + "self_attn.o_proj.weight": get(attn["wo"][i]).reshape(H * E, D).T,
            p + "mlp.gate_proj.weight": get(mlp["w_gate"][i]).T,
            p + "mlp.up_proj.weight": get(mlp["w_up"][i]).T,
            p + "mlp.down_proj.weight": get(mlp["w_down"][i]).T,
            p + "input_layernorm.weight": get(blocks["attn_norm"]["scale"][i]),
            p + "post_attention_layernorm.weight": get(blocks["mlp_norm"]["scale"][i]),
        })
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---- the commands ---------------------------------------------------------------------
def _check_out(out: Any) -> None:
    """`out` (a local path, or an `epath` URL checked for its bucket) new or empty."""
    if is_url(out):
        check_bucket(str(out), "--out")
    try:
        taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except store_errors() as err:
        raise store_error(out, err, "listing") from None
    if taken:
        raise ConvertError(f"--out {out} exists and is not empty; give a new directory (nothing was written)")


def hf_import(src, out, exits: Optional[tuple[int, ...]] = None, context: Optional[int] = None,
              command: Optional[list[str]] = None) -> dict:
    """Upcycles the Llama in `src` into the run dir `out` (config.yaml, tokenizer.json,
    provenance.json, checkpoint 0 holding the parameters); returns a summary."""
    import jax
    from flax import nnx

    from nvium_jax.model import build_model
    from nvium_jax.run_store import RunStore
    from nvium_jax.runs import save_initial_params, write_run_files

    src, target = local_path(src, "SRC_DIR"), run_location(out, "--out")
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src} has no config.json: give a Hugging Face model folder")
    _check_out(target)
    store = RunStore(str(out)) if is_url(out) else None  # built in its mirror, then pushed
    out = target if store is None else store.mirror
    if store is not None and out.exists():
        shutil.rmtree(out)  # a scratch copy left by an import or a run that stopped
    hf = json.loads((src / "config.json").read_text())
    cfg = model_config_from_hf(hf, exits, context)
    early = cfg.early_exits
    if any(not 0 < d < cfg.n_layers for d in early) or list(early) != sorted(set(early)):
        raise ConvertError(f"--exits {list(early)}: give increasing depths between 1 and {cfg.n_layers - 1}")
    config = Config(model=cfg)
    validate(config)
    tied = bool(hf.get("tie_word_embeddings", False)) and "lm_head.weight" not in _tensor_names(src)
    tensors = read_safetensors(src)
    check_tensors(tensors, cfg, tied)
    source_dtypes = sorted({str(t.dtype) for t in tensors.values()})
    model = build_model(cfg, seed=0)
    params = nnx.to_pure_dict(nnx.state(model))
    backbone = backbone_from_hf(tensors, cfg, tied)
    params.update(backbone)
    for k in range(len(early)):  # an exit reads h as the final exit does: start from its norm
        params["exits"][k]["norm"]["scale"] = backbone["final_norm"]["scale"].copy()
    params = jax.tree.map(np.asarray, params)
    run_dir = str(out) if store is None else store.url
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=run_dir))
    tokenizer = src / "tokenizer.json"
    if tokenizer.is_file():
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=(
            str((out / "tokenizer.json").absolute()) if store is None else f"{store.url}/tokenizer.json")))
    out.mkdir(parents=True, exist_ok=True)
    write_run_files(out, config, tokenizer if tokenizer.is_file() else None,
                    command or ["nvium", "convert", "hf-import", str(src)])
    save_initial_params(out, params, config, source={
        "hf_import": str(src.absolute()), "dtypes": source_dtypes, "tied_embeddings": tied})
    if store is not None:
        store.push_all()  # checkpoint 0's objects, its manifest, then config.yaml and the rest
        shutil.rmtree(out)
    return {"run_dir": run_dir, "n_layers": cfg.n_layers, "exits": list(early),
            "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "source_dtypes": source_dtypes, "tied_embeddings": tied}


def _staging():
    """A scratch folder in the cache (an export into a bucket is written there, then put)."""
    from nvium_jax.run_store import mirror_root

    mirror_root().mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=mirror_root(), prefix="export-")


def _tensor_names(src: pathlib.Path) -> set[str]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names = set()
    for path in src.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            names.update(f.keys())
    return names


def hf_export(run_dir, out, dtype: str = "float32", step: Optional[int] = None) -> dict:
    """A run's backbone and final exit as a Llama folder; the early exits are dropped."""
    import jax
    from flax import nnx
    from safetensors.numpy import save_file

    from nvium_jax.runs import load_run, read_run_config

    from nvium_jax.run_store import open_run

    if dtype not in ("float32", "bfloat16"):
        raise ConvertError(f"--dtype {dtype}: give float32 or bfloat16")
    store = open_run(run_dir, "RUN_DIR", kind="read")
    files = store.pull_run_files() if store is not None else local_path(run_dir, "RUN_DIR")
    if read_run_config(files).model.final_adapter:
        raise ConvertError(f"{run_dir} was trained with model.final_adapter=true: a Llama has no "
                           f"adapter on its final exit, so it cannot be exported; export a run with "
                           f"model.final_adapter=false")
    target = run_location(out, "--out")
    _check_out(target)
    run = load_run(run_dir, step)
    cfg = run.model.config
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(run.model)))
    tensors = backbone_to_hf(params, cfg)
    if dtype == "bfloat16":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    generation = {"bos_token_id": run.bos_id, "eos_token_id": run.eos_id, "do_sample": True,
                  "temperature": 1.0, "max_length": cfg.context}
    config_json = json.dumps(hf_config(cfg, run.bos_id, run.eos_id, dtype), indent=2)
    with _staging() if is_url(target) else contextlib.nullcontext() as staging:
        folder = pathlib.Path(staging) if is_url(target) else target  # a bucket: staged, then put
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if (files / "tokenizer.json").is_file():
            shutil.copyfile(files / "tokenizer.json", folder / "tokenizer.json")
        if is_url(target):
            upload_tree(folder, target)
        write_text(target / "config.json", config_json)  # last: it makes the folder a model
    return {"out": str(out), "step": run.step, "dtype": dtype,
            "dropped_exits": list(cfg.early_exits), "tensors": len(tensors)}
