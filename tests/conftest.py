"""Tests run on CPU with 8 simulated devices, float32; set before jax is imported."""

import atexit
import gc
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_collective_call_terminate_timeout_seconds=60",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval tasks in tests read local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NVIUM_COMPILE_CACHE", "off")  # tests compile afresh, write no user cache
# gcsfs's default client probes each bucket over gRPC (60 s against an emulator): the plain one
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

# One persistent compilation cache for this test process, in a temporary dir (subprocesses
# keep theirs off: a process killed by a fault test could leave a half-written entry). The
# module fixture below drops compiled programs, and each module would otherwise compile
# again what an earlier one compiled — the model's ≈ 30 initialiser programs alone cost
# ≈ 3.5 s per module. A hit loads the very executable the compile made. Set before any
# test module is imported: jax fixes its cache at the first compile.
# NVIUM_TEST_COMPILE_CACHE=off compiles everything afresh (to compare).
if os.environ.get("NVIUM_TEST_COMPILE_CACHE", "on") != "off":
    _compile_cache = tempfile.mkdtemp(prefix="nvium_tests_jax_cache_")
    atexit.register(shutil.rmtree, _compile_cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

from nvium_jax.config import ModelConfig  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's compiled programs after each test module. XLA's CPU backend maps its
    JIT'd code in many small regions (≈ 1,500 per decode loop on 2026-12's jax 0.10), and a
    process that keeps them all passes Linux's vm.max_map_count (65,530) part-way through
    the suite, where the next compile segfaults."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="session")
def _keep_every_decode_program():
    """Within a module the tests share compiled decode loops (one compile serves many
    checks), and the module fixture above already bounds what a process keeps, so
    `generate`'s own bound (`MAX_COMPILED`, which drops every program at once) is lifted:
    under it a module with more shapes compiled its shared loops again (+3 min to the
    suite). tests/test_inference_loop.py tests the bound itself."""
    from nvium_jax.inference import decode

    decode.MAX_COMPILED = 10**6


@pytest.fixture
def small_cfg() -> ModelConfig:
    """A model small enough for naive references: GQA (4 heads over 2), three early exits."""
    return ModelConfig(
        vocab_size=37, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
        context=32, exits=(1, 2, 3), adapter_hidden=24, router_hidden=16,
        router_bias_init=-0.3, dtype="float32",
    )


@pytest.fixture
def tokens_BxT(small_cfg):
    return jax.random.randint(jax.random.key(7), (2, 9), 0, small_cfg.vocab_size)


WORDS = ("the king said unto them that he would go into the land and the people of the city "
         "came out to meet him with bread and wine").split()


def write_word_corpus(path, documents: int = 400, seed: int = 0):
    """Random sentences over a 26-word vocabulary: a corpus a tiny model learns in steps."""
    import numpy as np

    rng = np.random.default_rng(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS, size=rng.integers(20, 60))) + "."
                                 for _ in range(documents)))
    return path


@pytest.fixture(scope="session")
def word_data(tmp_path_factory):
    """`write_word_corpus` prepared with a 300-token BPE, 5% held out: the small runs' data."""
    from nvium_jax.data import prepare

    root = tmp_path_factory.mktemp("word_corpus")
    prepare([str(write_word_corpus(root / "corpus.txt"))], root / "prepared", tokenizer="bpe:300",
            val_fraction=0.05)
    return root / "prepared"


def small_config(data_dir, run_dir, *overrides):
    """2 layers, one early exit, 16-token windows: a step takes milliseconds."""
    from nvium_jax.config import load_config

    return load_config(pathlib.Path(__file__).parent.parent / "configs/nvium-tiny.yaml", [
        f"data.path={data_dir}", f"run.dir={run_dir}", "run.wandb=disabled",
        "model.vocab_size=320", "model.context=16", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.d_ff=64", "model.exits=[1]", "model.dtype=float32",
        "train.batch_size=8", "train.steps=8", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=4",
        "train.loss_chunk=16", "train.router_warmup_frac=0.25", *overrides,
    ])


def write_yaml(config, path):
    import yaml

    from nvium_jax.config import config_to_dict

    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def cli_env(n_devices=8):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n_devices} "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=60")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(pathlib.Path(__file__).parent.parent)
    return env


@pytest.fixture(scope="session")
def trained_run(word_data, tmp_path_factory):
    """A 3-layer N-vium with exits after layers 1 and 2, trained 12 steps on 8 simulated
    devices (fsdp=8), checkpoints at 6 and 12: (run_dir, data_dir)."""
    from nvium_jax.config import load_config
    from nvium_jax.train.loop import train

    data_dir = word_data
    run_dir = tmp_path_factory.mktemp("trained_run") / "run"
    config = load_config(pathlib.Path(__file__).parent.parent / "configs/nvium-tiny.yaml", [
        f"data.path={data_dir}", f"run.dir={run_dir}", "run.wandb=disabled",
        "model.vocab_size=320", "model.context=32", "model.d_model=32", "model.n_layers=3",
        "model.n_heads=2", "model.d_ff=64", "model.exits=[1,2]", "model.dtype=float32",
        "train.batch_size=8", "train.steps=12", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=6", "train.eval_batches=2", "train.checkpoint_every=6",
        "train.loss_chunk=16", "train.router_warmup_frac=0.25", "mesh.fsdp=8",
    ])
    train(config)
    return run_dir, data_dir
