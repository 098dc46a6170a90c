"""Hugging Face Llama import/export against a NumPy implementation of the HF Llama forward
(written here from the HF definition: rotate_half RoPE, repeat_kv GQA, RMSNorm, SwiGLU),
on checkpoints written here with HF's names and shapes through safetensors itself."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nvium_jax
from nvium_jax.cli import main
from nvium_jax.interop.hf import hf_export, hf_import
from nvium_jax.model import mixture_logprobs

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300,
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 500.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32",
}


def llama_tensors(cfg: dict, seed: int = 0, tied: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    D, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, G = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E = D // H
    w = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
    norm = lambda: (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    tensors = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": norm()}
    if not tied:
        tensors["lm_head.weight"] = w(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(H * E, D), p + "self_attn.k_proj.weight": w(G * E, D),
            p + "self_attn.v_proj.weight": w(G * E, D), p + "self_attn.o_proj.weight": w(D, H * E),
            p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
            p + "mlp.down_proj.weight": w(D, F),
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
        })
    return tensors


def write_llama(folder, tensors: dict, cfg: dict = HF_CONFIG, shards: int = 2, dtype=None):
    """An HF folder: config.json, safetensors (sharded with an index when shards > 1)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def llama_logp(tensors: dict, cfg: dict, tokens) -> np.ndarray:
    """log-softmax of HF LlamaForCausalLM's logits, [T, V], in float64 NumPy."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    D, H, G = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, eps, T = D // H, cfg["rms_norm_eps"], len(tokens)

    def rmsnorm(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    def rotate_half(x):
        half = x.shape[-1] // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)

    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, E, 2) / E)
    freqs = np.arange(T)[:, None] * inv_freq[None]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]  # [T, 1, E]
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, t[p + "input_layernorm.weight"])
        q = (h @ t[p + "self_attn.q_proj.weight"].T).reshape(T, H, E)
        k = (h @ t[p + "self_attn.k_proj.weight"].T).reshape(T, G, E)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(T, G, E)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)  # repeat_kv
        scores = np.einsum("the,she->hts", q, k) / np.sqrt(E)
        scores = np.where(np.tril(np.ones((T, T), bool))[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hts,she->the", probs, v).reshape(T, H * E)
        x = x + attn @ t[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, t[p + "post_attention_layernorm.weight"])
        gate = h @ t[p + "mlp.gate_proj.weight"].T
        mlp = (gate / (1 + np.exp(-gate))) * (h @ t[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ t[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, t["model.norm.weight"])
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    logits = x @ head.T
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


TOKENS = np.array([5, 17, 299, 0, 42, 42, 7, 123, 250, 3, 9, 11], np.int32)


def model_logp(model, tokens=TOKENS):
    out = model(tokens[None])
    mixture = mixture_logprobs(out.exit_logp_KxBxTxV, out.route_logp_BxTxK)[0]
    return np.asarray(out.exit_logp_KxBxTxV[-1, 0]), np.asarray(mixture)


@pytest.mark.parametrize("variant", ["sharded-f32", pytest.param("bf16", marks=pytest.mark.slow),
                                     pytest.param("tied", marks=pytest.mark.slow)])
def test_import_reproduces_the_llama(tmp_path, variant):
    import ml_dtypes

    tied = variant == "tied"
    cfg = dict(HF_CONFIG, tie_word_embeddings=tied)
    tensors = llama_tensors(cfg, seed=1, tied=tied)
    dtype = ml_dtypes.bfloat16 if variant == "bf16" else None
    src = write_llama(tmp_path / "llama", tensors, cfg, shards=2 if variant != "tied" else 1, dtype=dtype)
    summary = hf_import(src, tmp_path / "run")
    assert summary["exits"] == [1, 2, 3] and summary["tied_embeddings"] == tied
    run = nvium_jax.load_run(tmp_path / "run")
    assert run.step == 0 and run.model.config.n_kv_heads == 2 and run.model.config.rope_theta == 500.0
    assert not run.model.config.final_adapter and run.model.final_adapter is None  # a Llama has none
    stored = load_file(str(next(src.glob("*.safetensors")))) if dtype is not None else None
    if dtype is not None:  # the reference reads the very bf16 values the file holds
        tensors = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()}
        assert next(iter(stored.values())).dtype == ml_dtypes.bfloat16
    want = llama_logp(tensors, cfg, TOKENS)
    final, mixture = model_logp(run.model)
    np.testing.assert_allclose(final, want, atol=1e-4)
    np.testing.assert_allclose(mixture, want, atol=1e-4)  # the new exits start inert
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["command"][:3] == ["nvium", "convert", "hf-import"]


@pytest.mark.slow
def test_export_is_a_llama_and_import_of_it_is_exact(tmp_path, trained_run):
    run_dir, _ = trained_run
    run = nvium_jax.load_run(run_dir)
    summary = hf_export(run_dir, tmp_path / "hf")
    assert summary["dropped_exits"] == [1, 2] and summary["step"] == 12
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    for name in ("tokenizer.json", "generation_config.json", "model.safetensors"):
        assert (tmp_path / "hf" / name).is_file(), name
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tokens = TOKENS % run.model.config.vocab_size
    final, _ = model_logp(run.model, tokens)
    np.testing.assert_allclose(llama_logp(exported, cfg, tokens), final, atol=1e-4)
    # export → import gives the backbone back bit for bit
    hf_import(tmp_path / "hf", tmp_path / "again", exits=(1, 2))
    again = nvium_jax.load_run(tmp_path / "again")
    from flax import nnx

    a, b = nnx.to_pure_dict(nnx.state(run.model)), nnx.to_pure_dict(nnx.state(again.model))
    for key in ("embedding", "head", "blocks", "final_norm"):
        for x, y in zip(*(map(np.asarray, __import__("jax").tree.leaves(d[key])) for d in (a, b))):
            np.testing.assert_array_equal(x, y)
    # bfloat16 export
    hf_export(run_dir, tmp_path / "hf16", dtype="bfloat16")
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert str(next(iter(load_file(str(tmp_path / "hf16" / "model.safetensors")).values())).dtype) == "bfloat16"


@pytest.mark.slow
def test_export_loads_in_transformers(tmp_path, trained_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run_dir, _ = trained_run
    hf_export(run_dir, tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32)
    run = nvium_jax.load_run(run_dir)
    tokens = TOKENS % run.model.config.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].double().numpy()
    logits -= logits.max(-1, keepdims=True)
    theirs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(theirs, model_logp(run.model, tokens)[0], atol=1e-4)


@pytest.mark.slow
def test_imported_run_fine_tunes_from_its_parameters(tmp_path):
    from nvium_jax.config import load_config
    from nvium_jax.data import eval_windows, prepare
    from nvium_jax.data.tokenizer import train_bpe
    from nvium_jax.model.loss import nvium_loss
    from nvium_jax.train.loop import train
    from tests.conftest import write_word_corpus

    corpus = write_word_corpus(tmp_path / "corpus.txt", documents=200)
    src = write_llama(tmp_path / "llama", llama_tensors(HF_CONFIG, seed=2), shards=1)
    train_bpe([corpus.read_text()], 300).save(str(src / "tokenizer.json"))
    hf_import(src, tmp_path / "run", exits=(2,))
    prepare([str(corpus)], tmp_path / "data", tokenizer=str(src / "tokenizer.json"), val_fraction=0.1)
    config = load_config(tmp_path / "run" / "config.yaml", [
        f"data.path={tmp_path / 'data'}", "run.wandb=disabled", "train.steps=2", "train.batch_size=8",
        "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2", "train.warmup_steps=1",
        "train.log_every=1"])
    summary = train(config)
    assert summary["start_step"] == 0 and summary["step"] == 2
    imported = nvium_jax.load_run(tmp_path / "run", step=0)
    windows = eval_windows(tmp_path / "data", context=64, batch=8, n_batches=1)[0]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val0 = next(r for r in logged if r["step"] == 0 and "val_mixture_ce" in r)
    ce = float(nvium_loss(imported.model, windows, chunk=64).mixture_ce)
    assert val0["val_mixture_ce"] == pytest.approx(ce, rel=1e-5)  # training started from the Llama
    assert nvium_jax.load_run(tmp_path / "run").step == 2


def test_bad_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    tensors = llama_tensors(HF_CONFIG)
    broken = dict(tensors)
    del broken["model.layers.2.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    broken["model.layers.1.mlp.down_proj.weight"] = np.zeros((32, 40), np.float32)
    cases = [
        (write_llama(tmp_path / "broken", broken, shards=1),
         "missing model.layers.2.mlp.up_proj.weight; unexpected model.layers.0.self_attn.q_proj.bias; "
         "model.layers.1.mlp.down_proj.weight has shape (32, 40), expected (32, 48)"),
        (write_llama(tmp_path / "gpt2", tensors, dict(HF_CONFIG, model_type="gpt2", architectures=["GPT2LMHeadModel"]), shards=1),
         "model_type='gpt2'"),
        (write_llama(tmp_path / "bias", tensors, dict(HF_CONFIG, attention_bias=True), shards=1), "attention_bias=true"),
        (write_llama(tmp_path / "scaled", tensors, dict(HF_CONFIG, rope_scaling={"rope_type": "llama3", "factor": 8.0}), shards=1),
         "rope_scaling="),
    ]
    for src, message in cases:
        assert main(["convert", "hf-import", str(src), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    good = write_llama(tmp_path / "good", tensors, shards=1)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["convert", "hf-import", str(good), "--out", str(taken)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert main(["convert", "hf-import", str(good), "--out", str(tmp_path / "x"), "--exits", "2,9"]) == 2
    assert "--exits [2, 9]" in capsys.readouterr().err


def test_export_of_a_run_with_a_final_adapter_is_refused_in_one_line(tmp_path, capsys):
    """A Llama has no adapter on its final exit: hf-export names the key before it reads a
    checkpoint, and writes nothing."""
    import pathlib

    from nvium_jax.config import load_config
    from tests.conftest import write_yaml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tiny = pathlib.Path(__file__).resolve().parent.parent / "configs/nvium-tiny.yaml"
    write_yaml(load_config(tiny, ["model.final_adapter=true"]), run_dir / "config.yaml")
    assert main(["convert", "hf-export", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.final_adapter=true" in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()
