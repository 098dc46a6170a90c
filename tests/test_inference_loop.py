"""What the compiled decode loop must not contain (structural regression tests, read off the
optimized HLO): no copy of a cache-sized buffer, and at most one conditional per deep
segment per iteration.

Why: XLA copies a buffer that a `lax.cond` branch updates into and out of the conditional,
and copies a loop-carried buffer whole when it is written after being read in the same
iteration — either way a copy of the KV cache per segment run, a cost that grows with the
context and that dense decoding does not pay (DESIGN §1 "What the loop costs besides
bytes"); on XLA GPU every conditional is also a host round trip. Tokens are checked against
the dense oracle in test_inference_decode.py; this file checks the cost structure."""

import re

import jax.numpy as jnp
import pytest

from nvium_jax.inference import decode as D
from tests.test_inference_decode import CFG, PROMPT_LENGTHS


def optimized_loop_hlo(model, batch: int, mode: str, schedule: str = "advance",
                       **sampler) -> tuple[str, tuple]:
    """The decode loop of the decode tests' shapes (same options: the compile is shared)."""
    P, N = max(PROMPT_LENGTHS), 64
    opts = D.loop_options(model, batch, N, mode, 16, options=D.DecodeOptions(schedule=schedule),
                          **sampler)
    weights = D.decode_weights(model)
    cache_len = D.cache_length(P, N, CFG.context)
    prompts = jnp.ones((batch, P), jnp.int32)
    state = D._prefill_jit(*weights, prompts, jnp.full((batch,), P, jnp.int32), D.row_keys(0, batch),
                           -1, cache_len, opts)
    hlo = D._loop_jit.lower(*weights, state, jnp.int32(N), opts).compile().as_text()
    return hlo, state.k_layers[0].shape


def cache_shaped_copies(hlo: str, batch: int, cache_shape: tuple) -> list[str]:
    """Copies or transposes of an array shaped like a layer's cache: [B·G, S, E], or any
    arrangement of its B, G, S, E axes (a [B, S, G, E] view, keys transposed, …)."""
    BG, S, E = cache_shape
    shapes = {tuple(sorted((BG, S, E))), tuple(sorted((batch, BG // batch, S, E)))}
    found = []
    for line in hlo.splitlines():
        match = re.search(r"= [a-z0-9]+\[([0-9,]*)\]\{[^}]*\} (copy|copy-start|transpose)\(", line)
        if match and match.group(1):
            dims = tuple(sorted(int(x) for x in match.group(1).split(",") if x != "1"))
            if dims in shapes:
                found.append(line.strip()[:160])
    return found


@pytest.fixture(scope="module")
def model():
    from nvium_jax.model import build_model

    return build_model(CFG, seed=0)


PER_EXIT = dict(sampling="exit", temperature=0.6, top_k=5, top_p=0.9, router_temperature=0.6)


@pytest.mark.parametrize("batch, mode, sampler", [
    pytest.param(4, "deferred", {}, id="4-deferred"), pytest.param(4, "dense", {}, id="4-dense"),
    pytest.param(4, "deferred", PER_EXIT, id="4-deferred-per-exit", marks=pytest.mark.slow)])
def test_no_cache_copies_and_one_conditional_per_deep_segment(model, batch, mode, sampler):
    """Per-exit sampling adds no conditional: its gates and head transform are arithmetic."""
    hlo, cache_shape = optimized_loop_hlo(model, batch, mode, **sampler)
    assert cache_shaped_copies(hlo, batch, cache_shape) == []
    conditionals = len(re.findall(r" conditional\(", hlo))
    assert conditionals == (CFG.n_exits - 1 if mode == "deferred" else 0)
    assert "searchsorted" not in hlo  # its default method lowers to while loops



@pytest.mark.slow
def test_compiled_decode_programs_are_bounded(monkeypatch):
    """A process that decodes many shapes keeps at most `MAX_COMPILED` programs per entry
    point: each loop maps ≈ 1,500 memory regions on XLA CPU (a few hundred for this small
    one), and an unbounded process passed `vm.max_map_count` and crashed in a compile.
    Dropped programs release their maps, and tokens do not change."""
    import dataclasses

    from nvium_jax.model import build_model

    small = build_model(dataclasses.replace(CFG, n_layers=1, exits=()), seed=0)
    monkeypatch.setattr(D, "MAX_COMPILED", 2)
    maps = lambda: sum(1 for _ in open("/proc/self/maps"))
    D._loop_jit.clear_cache()
    D._prefill_jit.clear_cache()
    before = maps()
    first = D.generate(small, [[1, 2, 3]], 3, decode="dense", seed=5).tokens_BxN
    one_call = maps() - before  # a prefill and a loop
    for n in (4, 5, 6):  # three new shapes: unbounded, three more of each
        out = D.generate(small, [[1, 2, 3]], n, decode="dense", seed=5)
        assert D._loop_jit._cache_size() <= 2 and D._prefill_jit._cache_size() <= 2
        assert (out.tokens_BxN[0, :3] == first[0]).all()
    assert maps() - before < 2.5 * one_call, (maps() - before, one_call)
