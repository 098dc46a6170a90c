"""The persistent compilation cache: a second process reads the decode loop the first one
compiled (counted by jax's own cache-hit events), and `NVIUM_COMPILE_CACHE=off` writes
nothing. Each process is a fresh interpreter, as a second CLI call is."""

import os
import subprocess
import sys

import pytest

SNIPPET = """
import jax
from nvium_jax.compile_cache import enable_compile_cache
from nvium_jax.config import ModelConfig
from nvium_jax.inference import generate
from nvium_jax.model import build_model

hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
print("dir", enable_compile_cache())
cfg = ModelConfig(vocab_size=37, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                  context=48, exits=(1, 2, 3), dtype="float32")
out = generate(build_model(cfg, seed=0), [[1, 2, 3]], 6, seed=1)
print("tokens", out.tokens_BxN[0].tolist())
print("hits", len(hits))
"""


def run_snippet(env):
    result = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True,
                            text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


@pytest.mark.slow
def test_a_second_process_reads_the_compiled_loop(tmp_path):
    env = dict(os.environ, NVIUM_COMPILE_CACHE=str(tmp_path / "jax"), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's process has
    first = run_snippet(env)
    assert first["dir"] == str(tmp_path / "jax") and any((tmp_path / "jax").iterdir())
    second = run_snippet(env)
    assert second["tokens"] == first["tokens"]
    assert int(first["hits"]) == 0 and int(second["hits"]) >= 2  # prefill and loop at least


def test_off_turns_the_cache_off_and_writes_nothing(tmp_path, monkeypatch):
    """`NVIUM_COMPILE_CACHE=off`: no directory made, jax's cache dir left unset; a dir that
    is already set (as tests/conftest.py sets one for the suite) is kept, never replaced."""
    import jax

    from nvium_jax.compile_cache import compile_cache_dir, enable_compile_cache

    suite_dir = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("NVIUM_CACHE", str(tmp_path / "home"))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        for value in ("off", "0", "None"):
            monkeypatch.setenv("NVIUM_COMPILE_CACHE", value)
            assert compile_cache_dir() is None and enable_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "home").exists()
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "set"))
        monkeypatch.setenv("NVIUM_COMPILE_CACHE", str(tmp_path / "other"))
        assert enable_compile_cache() == tmp_path / "set"
    finally:
        jax.config.update("jax_compilation_cache_dir", suite_dir)
    monkeypatch.setenv("NVIUM_COMPILE_CACHE", "")
    assert compile_cache_dir() == tmp_path / "home" / "jax"  # the default, not made until enabled
