"""`nvium eval`: every number against a dense pass of `model(tokens)` aggregated naively, the
trainer's own logged held-out loss, the plots' plotted values, a run trained on 8 devices
loaded in a 1-device process, and the bad inputs."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import nvium_jax
from nvium_jax.cli import main
from nvium_jax.eval import plots
from nvium_jax.eval.evaluate import evaluate_windows, frequency_ranks, position_buckets
from nvium_jax.eval.scoring import position_chunk, score_tokens
from nvium_jax.model import build_model, mixture_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def naive_record(model, windows_NxBxT1, counts_V):
    """The eval numbers from `model(tokens)` (dense, full vocabulary), token by token."""
    K, depths = model.config.n_exits, np.asarray(model.config.exit_depths, np.float64)
    mix, exit_lp, route, agree, pos, tgt = [], [], [], [], [], []
    forward = nnx.jit(lambda m, tokens: m(tokens))  # the plain dense pass, compiled once
    for window_BxT1 in windows_NxBxT1:
        out = forward(model, window_BxT1[:, :-1])
        exit_logp = np.asarray(out.exit_logp_KxBxTxV, np.float64)
        mixture = np.asarray(mixture_logprobs(out.exit_logp_KxBxTxV, out.route_logp_BxTxK))
        targets = window_BxT1[:, 1:]
        B, T = targets.shape
        for b in range(B):
            for t in range(T):
                y = targets[b, t]
                mix.append(mixture[b, t, y])
                exit_lp.append([exit_logp[k, b, t, y] for k in range(K)])
                route.append(np.exp(np.asarray(out.route_logp_BxTxK[b, t], np.float64)))
                final = np.argmax(exit_logp[K - 1, b, t])
                agree.append([np.argmax(exit_logp[k, b, t]) == final for k in range(K)])
                pos.append(t)
                tgt.append(y)
    mix, exit_lp, route, agree = map(np.asarray, (mix, exit_lp, route, agree))
    pos, tgt = np.asarray(pos), np.asarray(tgt)
    ranks = np.argsort(np.argsort(-counts_V, kind="stable"), kind="stable") + 1
    return dict(mix=mix, exit_lp=exit_lp, route=route, agree=agree, pos=pos, rank=ranks[tgt],
                depths=depths)


def test_eval_numbers_equal_a_dense_pass(small_cfg):
    model = build_model(small_cfg, seed=3)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, small_cfg.vocab_size, size=(2, 2, 11)).astype(np.int32)
    counts = rng.integers(0, 50, size=small_cfg.vocab_size)
    got = evaluate_windows(model, windows, token_counts_V=counts)
    ref = naive_record(model, windows, counts)
    n = len(ref["mix"])
    assert got["tokens"] == n == 2 * 2 * 10 and got["n_layers"] == small_cfg.n_layers
    np.testing.assert_allclose(got["mixture_ppl"], np.exp(-ref["mix"].mean()), rtol=1e-5)
    mass = ref["route"].mean(axis=0)
    np.testing.assert_allclose(got["expected_depth"], mass @ ref["depths"], rtol=1e-5)
    assert [e["index"] for e in got["exits"]] == [0, 1, 2, 3]
    assert [e["depth"] for e in got["exits"]] == list(small_cfg.exit_depths)
    np.testing.assert_allclose([e["ppl"] for e in got["exits"]], np.exp(-ref["exit_lp"].mean(axis=0)), rtol=1e-5)
    np.testing.assert_allclose([e["mass"] for e in got["exits"]], mass, atol=1e-6)
    assert sum(e["mass"] for e in got["exits"]) == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose([e["agreement_with_final"] for e in got["exits"]],
                               ref["agree"].mean(axis=0), atol=1e-6)
    assert got["exits"][-1]["agreement_with_final"] == 1.0
    # routing by position: buckets 0, 1, 2–3, 4–7, 8–9
    assert [r["positions"] for r in got["by_position"]] == [[0, 0], [1, 1], [2, 3], [4, 7], [8, 9]]
    for row in got["by_position"]:
        lo, hi = row["positions"]
        sel = (ref["pos"] >= lo) & (ref["pos"] <= hi)
        assert row["tokens"] == sel.sum()
        np.testing.assert_allclose(row["mass"], ref["route"][sel].mean(axis=0), atol=1e-6)
    # by the frequency rank of the target: 1–10, 11–37
    assert [r["ranks"] for r in got["by_frequency"]] == [[1, 10], [11, 37]]
    for row in got["by_frequency"]:
        lo, hi = row["ranks"]
        sel = (ref["rank"] >= lo) & (ref["rank"] <= hi)
        assert row["tokens"] == sel.sum()
        np.testing.assert_allclose(row["mass"], ref["route"][sel].mean(axis=0), atol=1e-6)
        np.testing.assert_allclose(row["mixture_ppl"], np.exp(-ref["mix"][sel].mean()), rtol=1e-4)


def test_scores_do_not_depend_on_the_position_chunk(small_cfg, monkeypatch):
    """The head runs over chunks of positions; a chunk of 2 (with padding) gives the same."""
    from nvium_jax.eval import scoring

    model = build_model(small_cfg, seed=1)
    rng = np.random.default_rng(1)
    inputs, targets = (rng.integers(0, small_cfg.vocab_size, size=(2, 7)) for _ in range(2))
    whole = score_tokens(model, inputs, targets)
    monkeypatch.setattr(scoring, "LOGIT_BUDGET", 4 * 2 * small_cfg.vocab_size * 2)
    assert position_chunk(4, 2, 7, small_cfg.vocab_size) == 2
    chunked = score_tokens(model, inputs, targets)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole.route_BxTxK.sum(-1), 1, rtol=1e-5)


def test_buckets_and_ranks():
    assert position_buckets(32) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32)]
    assert position_buckets(12) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 12)]
    assert frequency_ranks(np.array([5, 9, 0, 9])).tolist() == [3, 1, 4, 2]


def test_plots_show_the_record():
    record = {"step": 3, "n_layers": 4, "mixture_ppl": 9.5, "expected_depth": 2.2,
              "exits": [{"index": 0, "depth": 1, "ppl": 12.0, "mass": 0.5},
                        {"index": 1, "depth": 4, "ppl": 10.0, "mass": 0.5}],
              "by_position": [{"positions": [0, 0], "mass": [0.1, 0.9]},
                              {"positions": [1, 3], "mass": [0.6, 0.4]}]}
    mass_ax = plots.exit_mass_figure(record).axes[0]
    assert [p.get_height() for p in mass_ax.patches] == [0.5, 0.5]
    ppl_ax = plots.exit_ppl_figure(record).axes[0]
    assert [p.get_height() for p in ppl_ax.patches] == [12.0, 10.0]
    assert ppl_ax.lines[0].get_ydata()[0] == 9.5
    pos_ax = plots.routing_by_position_figure(record).axes[0]
    bars = [(p.get_y(), p.get_height()) for p in pos_ax.patches]
    assert bars == [(0, 0.1), (0, 0.6), (0.1, 0.9), (0.6, 0.4)]  # stacked per bucket


@pytest.mark.slow
def test_nvium_eval_cli_reproduces_the_trainers_held_out_loss(trained_run, capsys):
    run_dir, _ = trained_run
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["eval", "--run", str(run_dir), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    for key in ("step", "tokens", "n_layers", "mixture_ppl", "expected_depth", "exits",
                "by_position", "by_frequency"):
        assert key in record, key
    assert record["step"] == 12 and record["n_layers"] == 3
    assert record["tokens"] == 2 * 8 * 32  # train.eval_batches × micro-batch × context
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in logged if r["step"] == 12 and "val_mixture_ce" in r)
    # the trainer's chunked loss on its 8-way sharded model, the same windows
    assert math.log(record["mixture_ppl"]) == pytest.approx(val["val_mixture_ce"], rel=1e-5)
    np.testing.assert_allclose([e["mass"] for e in record["exits"]], val["val_exit_mass"], atol=1e-5)
    np.testing.assert_allclose([math.log(e["ppl"]) for e in record["exits"]], val["val_exit_ce"], rtol=1e-5)
    out = run_dir / "eval" / "step_12"
    assert json.loads((out / "eval.json").read_text())["mixture_ppl"] == record["mixture_ppl"]
    for name in ("exit_mass.png", "exit_ppl.png", "routing_by_position.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(p.name for p in run_dir.iterdir()) == sorted({*before, "eval"})
    # an earlier checkpoint, fewer windows, and the text summary
    assert main(["eval", "--run", str(run_dir), "--step", "6", "--batches", "1", "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("step 6 · 256 tokens · mixture ppl") and "agrees w/ final" in text
    assert not list((run_dir / "eval" / "step_6").glob("*.png"))


@pytest.mark.slow
def test_eval_bad_inputs_are_one_line_and_change_nothing(trained_run, tmp_path, capsys):
    from nvium_jax.data import prepare
    from tests.conftest import write_word_corpus

    run_dir, _ = trained_run
    listing = lambda: sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                             if "eval" not in p.relative_to(run_dir).parts)
    before = listing()
    other = tmp_path / "other"
    prepare([str(write_word_corpus(tmp_path / "c.txt", documents=50, seed=1))], other,
            tokenizer="bpe:280", val_fraction=0.2)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    cases = [
        (["--run", str(run_dir), "--step", "7"], r"no checkpoint at step 7; it has steps [6, 12]"),
        (["--run", str(empty)], "has no checkpoints yet"),
        (["--run", str(tmp_path)], "is not a run directory"),
        (["--run", str(run_dir), "--data", str(other)], "prepared with another tokenizer"),
        (["--run", str(run_dir), "--exit", "1"], "--exit goes with --tasks"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert listing() == before


@pytest.mark.slow
def test_a_run_trained_on_8_devices_loads_in_a_1_device_process(trained_run):
    run_dir, data_dir = trained_run
    script = f"""
import json, jax, numpy as np, nvium_jax
from nvium_jax.data import eval_windows
from nvium_jax.model.loss import nvium_loss
assert jax.device_count() == 1
run = nvium_jax.load_run({str(run_dir)!r})
leaves = jax.tree.leaves(nvium_jax.runs.nnx.state(run.model))
assert all(len(x.sharding.device_set) == 1 for x in leaves)
windows = eval_windows({str(data_dir)!r}, context=32, batch=8, n_batches=2)
ce = np.mean([float(nvium_loss(run.model, w, chunk=16).mixture_ce) for w in windows])
print(json.dumps({{"step": run.step, "ce": ce}}))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in logged if r["step"] == 12 and "val_mixture_ce" in r)
    assert got["step"] == 12 and got["ce"] == pytest.approx(val["val_mixture_ce"], rel=1e-5)
    # in this 8-device process too, the parameters land on one device
    run = nvium_jax.load_run(run_dir)
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(nvium_jax.runs.nnx.state(run.model))} == {1}
