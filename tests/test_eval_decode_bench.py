"""The decode benchmark: forced exit rates, run counters against a count from the exits
themselves, and the `nvium bench decode` JSON."""

import dataclasses
import json

import numpy as np
import pytest

from nvium_jax.cli import main
from nvium_jax.config import ModelConfig, load_config
from nvium_jax.eval.decode_bench import (
    REFERENCE_EXIT_RATES,
    byte_costs,
    bytes_read,
    force_exit_rates,
    gate_probabilities,
)
from nvium_jax.inference import DecodeOptions, generate
from nvium_jax.model import build_model
from nvium_jax.model.count import matched_baseline_model

CFG = ModelConfig(vocab_size=50, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                  context=64, exits=(1, 2, 3), dtype="float32")


def test_gate_probabilities_closed_form():
    q = gate_probabilities(REFERENCE_EXIT_RATES)
    np.testing.assert_allclose(q, [0.35, 0.25 / 0.65, 0.15 / 0.40])
    with pytest.raises(ValueError, match="sum to 1"):
        gate_probabilities([0.5, 0.6])


def test_forced_rates_set_every_gate_exactly():
    model = build_model(CFG, seed=0)
    force_exit_rates(model, REFERENCE_EXIT_RATES)
    z = np.random.default_rng(0).standard_normal((2, 5, CFG.d_model)).astype(np.float32)
    for k, q in enumerate(gate_probabilities(REFERENCE_EXIT_RATES)):
        np.testing.assert_allclose(np.exp(model.gate_logp(k, z)[..., 0]), q, rtol=1e-5)


@pytest.mark.slow
def test_run_counters_match_a_count_from_the_exits():
    model = build_model(CFG, seed=0)
    force_exit_rates(model, REFERENCE_EXIT_RATES)
    # batch 1 (this seed needs no flush): token n ≥ 1 runs segments 0..exit_n at stop
    # position P + n, and each segment that runs evaluates its exit (norm, router, adapter)
    one = generate(model, [[1, 2, 3, 4]], 40, seed=1, window=16, return_state=True,
                   options=DecodeOptions(stats=True))
    stats = one.state.stats
    exits_n = one.exits_BxN[0, 1:]
    layers = np.diff((0, *CFG.exit_depths))
    runs = [(exits_n >= s).sum() for s in range(4)]
    np.testing.assert_array_equal(stats.segment_runs_K, runs)
    np.testing.assert_array_equal(stats.exit_runs_K, runs)
    kv = sum(layers[: e + 1].sum() * (4 + n) for n, e in enumerate(exits_n, start=1))
    assert float(stats.kv_reads) == kv
    assert int(stats.head_runs) == 39 and one.flushes == 0
    exits = one.exits_BxN[0]
    assert (exits == 0).any() and (exits == 3).any()
    costs = byte_costs(CFG)
    expected = (np.dot(runs, np.add(np.add(costs.segment_K, costs.router_K), costs.adapter_K))
                + 39 * costs.head + kv * costs.kv_per_layer_position)
    assert bytes_read(stats, costs) == pytest.approx(expected)
    # the closed form per piece: a layer's weights, a router, an adapter with its norm
    D, F, E, H, G = CFG.d_model, CFG.d_ff, CFG.head_dim, CFG.n_heads, CFG.kv_heads
    layer_bytes = 4 * (2 * D * H * E + 2 * D * G * E + 3 * D * F + 2 * D)
    assert costs.segment_K == tuple(layer_bytes * n for n in layers)
    assert costs.adapter_K[0] == 4 * (D + 2 * D * CFG.adapter_width)
    assert costs.kv_per_layer_position == 4 * 2 * G * E


@pytest.mark.slow
def test_bench_decode_cli_json(capsys):
    args = ["bench", "decode", "--config", "configs/nvium-tiny.yaml", "model.n_layers=4", "model.exits=[1,2,3]", "model.vocab_size=64",
            "model.context=48", "model.dtype=float32", "--max-new-tokens", "6", "--repeats", "1",
            "--exit-rates", "0.35,0.25,0.15,0.25", "--batch", "2", "--prompt-tokens", "5",
            "--json"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    keys = {"device", "batch", "new_tokens", "exit_distribution", "nvium_tokens_per_s",
            "dense_tokens_per_s", "baseline_tokens_per_s", "speedup", "speedup_vs_dense",
            "ideal_speedup", "efficiency"}
    assert keys <= set(record)
    assert record["batch"] == 2 and record["new_tokens"] == 6 and record["prompt_tokens"] == 5
    assert len(record["exit_distribution"]) == 4 and sum(record["exit_distribution"]) == pytest.approx(1, abs=1e-3)
    assert record["efficiency"] == pytest.approx(record["speedup_vs_dense"] / record["ideal_speedup"], rel=1e-3)
    assert record["speedup"] == pytest.approx(record["nvium_tokens_per_s"] / record["baseline_tokens_per_s"], rel=1e-3)
    assert 1.0 < record["ideal_speedup"] < 4.0
    # bytes per token: dense and the baseline read every weight once per iteration (shared by
    # the batch of 2), and per row the KV of every layer below each fed position (P + n for
    # new token n ≥ 1)
    nvium_cfg = load_config(args[3], args[4:9]).model
    positions = np.mean([5 + n for n in range(1, 6)])
    for path, cfg in (("dense", nvium_cfg), ("baseline", matched_baseline_model(nvium_cfg))):
        costs = byte_costs(cfg)
        expected = ((sum(costs.segment_K) + sum(costs.router_K) + sum(costs.adapter_K)
                     + costs.head) / 2 + costs.kv_per_layer_position * cfg.n_layers * positions)
        assert record["bytes_per_token"][path] == pytest.approx(expected, abs=1)
    per_token = record["bytes_per_token"]
    assert per_token["dense"] / per_token["nvium"] == pytest.approx(record["ideal_speedup"], rel=1e-3)
    for path in ("nvium", "dense", "baseline"):
        gbps = per_token[path] * record[f"{path}_tokens_per_s"] / 1e9
        assert record["gbps"][path] == pytest.approx(gbps, rel=1e-2, abs=1e-3)
        assert record["roofline_fraction"][path] == pytest.approx(
            record["gbps"][path] / record["bandwidth_gbps"], rel=1e-2, abs=1e-4)
    assert record["bandwidth_gbps"] > 0
    assert main(args[:-3] + ["--exit-rates", "0.5,0.5"]) == 2
    assert "has 2 numbers but the model has 4 exits" in capsys.readouterr().err


def test_byte_costs_count_the_final_adapter():
    with_adapter = dataclasses.replace(CFG, final_adapter=True)
    D, A = CFG.d_model, CFG.adapter_width
    assert byte_costs(CFG).adapter_K[-1] == 4 * D  # the final norm alone
    assert byte_costs(with_adapter).adapter_K[-1] == 4 * (D + 2 * D * A)
    assert byte_costs(with_adapter).adapter_K[:-1] == byte_costs(CFG).adapter_K[:-1]


@pytest.mark.slow
def test_bench_decode_cli_per_exit_sampling(capsys):
    """--sampling exit with a head transform and a router temperature: the same keys, the
    settings echoed, and the baseline decoded too (the same head transform)."""
    args = ["bench", "decode", "--config", "configs/nvium-tiny.yaml", "model.n_layers=4",
            "model.exits=[1,2,3]", "model.vocab_size=64", "model.context=48", "model.dtype=float32",
            "--max-new-tokens", "6", "--repeats", "1", "--exit-rates", "0.35,0.25,0.15,0.25",
            "--prompt-tokens", "5", "--sampling", "exit", "--temperature", "0.6", "--top-k", "5",
            "--router-temperature", "0.6", "--json"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"device", "batch", "new_tokens", "exit_distribution", "nvium_tokens_per_s",
            "dense_tokens_per_s", "baseline_tokens_per_s", "speedup", "speedup_vs_dense",
            "ideal_speedup", "efficiency"} <= set(record)
    assert (record["sampling"], record["temperature"], record["top_k"], record["top_p"],
            record["router_temperature"]) == ("exit", 0.6, 5, None, 0.6)
    assert record["baseline_tokens_per_s"] > 0 and len(record["exit_distribution"]) == 4
    # the mixture with a head option cannot run deferred: one clear error
    assert main(args[:-9] + ["--top-k", "5", "--json"]) == 2
    assert 'or use sampling="exit"' in capsys.readouterr().err


def test_paper_grid_reaches_bench_decode(monkeypatch, capsys):
    """`scripts/bench_decode.py --paper-grid` hands every head × router cell, at both prompt
    lengths, batch 1 and 128 new tokens, to `bench_decode` (faked here: no decoding)."""
    import scripts.bench_decode as script

    calls = []

    def fake(model, **kwargs):
        calls.append(kwargs)
        return {k: 0 for k in script.GRID_COLUMNS} | {
            "device": "cpu", "new_tokens": 128, "prompt_tokens": kwargs["prompt_tokens"],
            "roofline_fraction": dict.fromkeys(script.PATHS, 0.5)}

    monkeypatch.setattr(script, "bench_decode", fake)
    monkeypatch.setattr(script, "stream_read_gbps", lambda: 30.0)
    monkeypatch.setattr(script, "build_model", lambda cfg, seed: None)
    assert script.main(["--config", "configs/nvium-tiny.yaml", "--paper-grid"]) == 0
    cells = {(c["prompt_tokens"], c["temperature"], c["top_k"], c["router_temperature"]) for c in calls}
    assert len(calls) == len(cells) == 18
    assert {c["batch"] for c in calls} == {1} and {c["max_new_tokens"] for c in calls} == {128}
    assert {c["sampling"] for c in calls} == {"exit"}
    heads = {(t, k) for _, t, k, _ in cells}
    assert heads == {(0.0, None), (0.6, None), (1.0, 50)}
    assert {r for *_, r in cells} == {0.0, 0.6, 1.0} and {p for p, *_ in cells} == {16, 512}
    assert capsys.readouterr().out.count("\n| 512 |") == 9
