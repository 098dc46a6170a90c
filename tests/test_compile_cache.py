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
    off = run_snippet(dict(env, NVIUM_COMPILE_CACHE="off", NVIUM_CACHE=str(tmp_path / "home")))
    assert off["dir"] == "None" and int(off["hits"]) == 0 and not (tmp_path / "home").exists()
    assert off["tokens"] == first["tokens"]


def test_compile_bench_reports_first_less_second_and_the_per_layer_slope(monkeypatch, capsys):
    """`scripts/bench_compile.py`: exits at L/4, L/2, 3L/4, each phase's compile = first call
    less second (timings faked: no compile here), and the slope of a line through the rows."""
    import json

    import scripts.bench_compile as script

    assert [script.exits_for(n) for n in (2, 4, 8, 12)] == [[1], [1, 2, 3], [2, 4, 6], [3, 6, 9]]
    calls = []

    def fake_generate(model, prompts, n, decode, options):
        L = model.config.n_layers
        first = sum(1 for c in calls if c == (L, decode)) == 0
        calls.append((L, decode))
        loop = (2.0 + 0.5 * L) if decode == "deferred" else 0.25 * L  # compile seconds
        options.timings.update(prefill_s=0.1 + first, decode_s=0.3 + first * loop)

    monkeypatch.setattr(script, "generate", fake_generate)
    monkeypatch.setattr(script, "build_model", lambda cfg, seed: type("Fake", (), {"config": cfg})())
    assert script.main(["--layers", "4,8,16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["deferred"]["decode_s_compile_s"] for r in out["rows"]] == [4.0, 6.0, 10.0]
    assert {r["dense"]["prefill_s_compile_s"] for r in out["rows"]} == {1.0}
    assert out["loop_compile_s_per_layer"] == pytest.approx({"deferred": 0.5, "dense": 0.25})
