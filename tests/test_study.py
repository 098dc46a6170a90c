"""scripts/study.py's pieces that decide what the study reports: the runs it trains (the
baseline first, every N-vium run on the same tokens) and the Pareto front it draws."""

import itertools
import pathlib

from nvium_jax.config import load_config
from nvium_jax.model.count import matched_baseline_model, param_count
from scripts.study import ROOT, pareto, run_configs


def test_the_pareto_front_against_every_pair():
    points = [(1.0, 1.0), (1.2, 0.99), (1.3, 1.02), (1.1, 1.05), (1.3, 1.01), (0.9, 0.98)]
    front = pareto(points)
    # brute force: a point is on the front iff no other is at least as fast and as good
    expected = sorted(p for p in points if not any(
        q != p and q[0] >= p[0] and q[1] <= p[1] for q in points))
    assert front == expected == [(0.9, 0.98), (1.2, 0.99), (1.3, 1.01)]
    for a, b in itertools.combinations(front, 2):
        assert (a[0] < b[0]) == (a[1] < b[1])  # faster costs perplexity along the front


def test_the_runs_share_tokens_and_the_matched_run_reads_the_baseline(tmp_path):
    runs = run_configs("tiny", [0.0, 0.15], True, tmp_path, ["train.steps=50"])
    names = [r[0] for r in runs]
    assert names == ["baseline", "β=0", "β=0.15", "matched β"]
    assert runs[0][1].name == "baseline-tiny.yaml" and all(r[1].name == "nvium-tiny.yaml" for r in runs[1:])
    assert f"train.beta_match={tmp_path / 'tiny' / 'baseline'}" in runs[-1][3]
    for _, _, run_dir, overrides in runs:
        assert overrides[0] == "train.steps=50" and f"run.dir={run_dir}" in overrides
    assert len({r[2] for r in runs}) == 4 and all(isinstance(r[2], pathlib.Path) for r in runs)
    # the baseline of the shipped pair is the shipped baseline; overridden, the matched one
    configs = [load_config(path, overrides) for _, path, _, overrides in runs]
    assert configs[0].model == load_config(ROOT / "configs/baseline-tiny.yaml").model
    four = run_configs("tiny", [0.0], False, tmp_path,
                       ["model.n_layers=4", "model.exits=[1,2,3]", "model.final_adapter=true"])
    nvium4 = load_config(four[1][1], four[1][3]).model
    base4 = load_config(four[0][1], four[0][3]).model
    assert base4 == matched_baseline_model(nvium4) and abs(param_count(base4) / param_count(nvium4) - 1) < 0.005
