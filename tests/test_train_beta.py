"""The β controller (the paper's AdaptivePenaltyCallback rule): the update against a hand
table, the baseline curve it reads, and a training run matched to a baseline's curve —
every held-out row replayed by hand, and an exact resume."""

import json
import pathlib
import shutil

import pytest

from nvium_jax.config import ConfigError, TrainConfig
from nvium_jax.train import beta as controller
from nvium_jax.train.loop import train
from tests.conftest import small_config, write_yaml

PAPER = TrainConfig(beta_k_up=8.0, beta_k_down=4.0, beta_dead_band=0.005, beta_max_step=100.0,
                    beta_min=0.0, beta_max=10.0)
DEFAULTS = TrainConfig(beta_k_up=2.0, beta_k_down=4.0, beta_dead_band=0.005, beta_max_step=0.2,
                       beta_min=0.0, beta_max=2.0)


@pytest.mark.parametrize("cfg, beta, gap, expected", [
    (PAPER, 0.15, 0.004, 0.15),  # inside the dead band: hold
    (PAPER, 0.15, -0.0049, 0.15),
    (PAPER, 0.15, 0.05, 0.15 + 8 * 0.05),  # ahead: k_up · gap
    (PAPER, 0.15, -0.02, 0.15 - 4 * 0.02),  # behind: k_down · gap
    (PAPER, 0.15, -0.2, 0.0),  # clipped at beta_min
    (PAPER, 9.5, 0.3, 10.0),  # clipped at beta_max
    (DEFAULTS, 0.5, 0.3, 0.7),  # k_up · gap = 0.6, capped at max_step 0.2
    (DEFAULTS, 0.5, -0.3, 0.3),  # k_down · gap = −1.2, capped at −0.2
])
def test_next_beta_follows_the_papers_rule(cfg, beta, gap, expected):
    assert controller.next_beta(beta, gap, cfg) == pytest.approx(expected, abs=1e-12)


def test_the_baseline_curve_skips_torn_lines_and_picks_the_nearest_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "val_mixture_ce": 8.0}\n{"step": 5, "loss": 3.0}\n'
        '{"step": 10, "val_mixture_ce": 5.0}\n{"step": 20, "val_mixture_ce": 4.0}\n{"step": 30, "val_mix')
    curve = controller.held_out_curve(tmp_path)
    assert curve == {0: 8.0, 10: 5.0, 20: 4.0}
    assert [controller.nearest_ce(curve, s) for s in (3, 14, 15, 16, 99)] == [8.0, 5.0, 5.0, 4.0, 4.0]
    assert controller.nearest_ce({}, 7) is None
    assert controller.held_out_curve(tmp_path / "missing") == {}


def test_beta_holds_without_a_target_and_before_the_warm_up_ends():
    fixed = TrainConfig(beta=0.3)
    assert controller.update(0.3, 4.0, 100, fixed, 10) == (None, None, 0.3)
    target = TrainConfig(beta=0.3, beta_target=4.5)
    assert controller.update(0.3, 4.0, 5, target, 10) == (4.5, 0.5, 0.3)  # still warming up
    assert controller.update(0.3, 4.0, 10, target, 10).beta == pytest.approx(0.3 + 8 * 0.5)


def fake_baseline(data_dir, run_dir, curve, *overrides):
    """A baseline run dir as the controller reads it: config, tokenizer, held-out rows."""
    run_dir.mkdir(parents=True)
    write_yaml(small_config(data_dir, run_dir, "model.exits=[]", *overrides), run_dir / "config.yaml")
    shutil.copy(pathlib.Path(data_dir) / "tokenizer.json", run_dir / "tokenizer.json")
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "val_mixture_ce": ce}) + "\n" for s, ce in curve.items()))
    return run_dir


MATCHED = ("train.eval_every=2", "train.beta=0.1", "train.beta_k_up=0.5", "train.beta_k_down=0.5",
           "train.beta_max_step=0.3", "train.beta_max=1.0")


@pytest.fixture(scope="module")
def matched_run(word_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("beta")
    # a baseline curve the N-vium run crosses: above it early (β falls), below it late (β rises)
    baseline = fake_baseline(word_data, root / "baseline", {0: 5.9, 3: 5.5, 7: 5.0})
    run_dir = root / "nvium"
    train(small_config(word_data, run_dir, f"train.beta_match={baseline}", *MATCHED))
    return word_data, baseline, run_dir


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_matched_run_replays_the_controller_by_hand(matched_run):
    _, baseline, run_dir = matched_run
    logged = rows(run_dir)
    evals = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6, 8]
    curve = {0: 5.9, 3: 5.5, 7: 5.0}
    beta, moved = 0.1, 0
    for r in evals:
        target = curve[min(curve, key=lambda s: (abs(s - r["step"]), s))]
        assert r["beta_target_ce"] == target
        assert r["beta_gap"] == pytest.approx(target - r["val_mixture_ce"], abs=1e-12)
        # the held-out loss is taken at the β in force, before this evaluation's step
        assert r["val_depth_cost"] == pytest.approx(beta * r["val_expected_depth"] / 2, rel=1e-5)
        if r["step"] >= 2:  # the router warm-up ends at step 2 (0.25 × 8)
            gap = r["beta_gap"]
            step = 0 if abs(gap) < 0.005 else (min(0.5 * gap, 0.3) if gap > 0 else max(0.5 * gap, -0.3))
            new = min(max(beta + step, 0.0), 1.0)
            moved += new != beta
            beta = new
        assert r["beta"] == pytest.approx(beta, rel=1e-6)
        train_after = next((t for t in logged if t["step"] == r["step"] + 1 and "loss" in t), None)
        if train_after is not None:  # the next step trains with the β this evaluation set
            assert train_after["beta"] == pytest.approx(beta, rel=1e-6)
    assert moved >= 2, "the controller never moved β: the test would not see a wrong rule"


@pytest.mark.slow
def test_a_matched_run_resumes_exactly(matched_run, tmp_path):
    data_dir, baseline, run_dir = matched_run
    resumed = tmp_path / "nvium"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")  # as if killed after checkpoint 4
    train(small_config(data_dir, resumed, f"train.beta_match={baseline}", *MATCHED))
    key = lambda r: (r["step"], "val_loss" in r)
    straight = {key(r): r for r in rows(run_dir)}
    again = {key(r): r for r in rows(resumed)}
    assert sorted(again) == sorted(straight)
    for k, r in straight.items():
        for name in ("loss", "beta", "val_mixture_ce", "beta_gap"):
            if name in r:
                assert again[k][name] == r[name], (k, name)


def test_a_baseline_on_other_tokens_is_refused(word_data, tmp_path):
    baseline = fake_baseline(word_data, tmp_path / "baseline", {0: 5.0}, "model.context=32")
    config = small_config(word_data, tmp_path / "nvium", f"train.beta_match={baseline}")
    with pytest.raises(ConfigError, match=r"was not trained on the same tokens: model.context 32 ≠ 16"):
        controller.check_beta_match(config, pathlib.Path(word_data))
    with pytest.raises(ConfigError, match="is not a run directory"):
        controller.check_beta_match(
            small_config(word_data, tmp_path / "n2", f"train.beta_match={tmp_path / 'none'}"),
            pathlib.Path(word_data))
    with pytest.raises(ConfigError, match="not both"):
        small_config(word_data, tmp_path / "n3", f"train.beta_match={baseline}", "train.beta_target=4.0")
