"""The GPU report's smoke run (scripts/gpu_report.sh --smoke): every section measured on tiny
shapes on CPU, the files written, and the roofline's bytes checked against a closed form."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from nvium_jax.config import load_config
from nvium_jax.model.count import block_param_count, kv_values_per_token, matched_baseline_model

REPO = pathlib.Path(__file__).resolve().parent.parent
SECTIONS = ["environment", "decode", "command_buffers", "batch8", "kernel", "train", "decode_125m"]
DECODE_KEYS = ["nvium_tokens_per_s", "dense_tokens_per_s", "baseline_tokens_per_s", "speedup",
               "speedup_vs_dense", "ideal_speedup", "efficiency", "baseline_bytes_per_token",
               "baseline_bytes_per_s", "baseline_roofline_fraction"]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report")
    # the workers run on one CPU device: the driver drops the 8 simulated ones itself
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_report.sh"), str(out), "--smoke"],
                          env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:] + (out / "worker.log").read_text()[-3000:]
    return json.loads((out / "gpu_report.json").read_text()), (out / "gpu_report.md").read_text()


def _numbers(record: dict, keys) -> list[float]:
    values = [record[key] for key in keys]
    assert all(isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in values), record
    return values


@pytest.mark.slow
def test_every_section_measures_numbers(smoke_report):
    report, markdown = smoke_report
    assert list(report["sections"]) == SECTIONS
    for name, entry in report["sections"].items():
        assert (entry["status"], entry["error"]) == ("ok", None), name
    sections = {name: entry["result"] for name, entry in report["sections"].items()}
    _numbers(sections["environment"], ["copy_bandwidth_bytes_per_s", "copy_s", "copy_bytes_moved"])
    for name, prompts in (("decode", 2), ("command_buffers", 1), ("batch8", 1), ("decode_125m", 2)):
        assert len(sections[name]["rows"]) == prompts, name
        for row in sections[name]["rows"]:
            _numbers(row, DECODE_KEYS)
    assert sections["batch8"]["rows"][0]["batch"] == 8
    assert "--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE" in sections["command_buffers"]["xla_flags"]
    _numbers(sections["command_buffers"], ["nvium_vs_default", "baseline_vs_default"])
    for row in sections["kernel"]["rows"]:  # interpreted Pallas, float32: equal to rounding
        assert row["max_abs_err_out"] < 1e-5 and row["max_abs_err_lse"] < 1e-5, row
        _numbers(row, ["pallas_s", "reference_s"])
    train = sections["train"]
    _numbers(train, ["nvium_step_s", "baseline_step_s", "step_ratio", "nvium_model_tflops_per_s",
                     "baseline_model_tflops_per_s"])
    assert train["baseline_mfu"] is None  # no peak FLOP/s is known for a CPU
    assert "| # | section | status | s | figures |" in markdown
    assert sum(line.startswith("| ") and " | ok | " in line for line in markdown.splitlines()) == len(SECTIONS)


@pytest.mark.slow
def test_baseline_roofline_bytes_match_the_closed_form(smoke_report):
    """A dense baseline step reads every block, the final norm, the head, and each layer's
    K/V at positions 0..t (t = P … P+N−2 over the loop's N−1 tokens): counted here by hand,
    against the decode loop's counters that the report converts to bytes."""
    report, _ = smoke_report
    environment = report["sections"]["environment"]["result"]
    decode = report["sections"]["decode"]["result"]
    cfg = matched_baseline_model(load_config(REPO / decode["config"], decode["overrides"]).model)
    size = np.dtype(cfg.dtype).itemsize
    L, D, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    for row in decode["rows"]:
        P, N = row["prompt_tokens"], row["new_tokens"]
        kv_positions = np.mean(np.arange(P, P + N - 1) + 1)
        expected = size * (L * block_param_count(cfg) + D + D * V
                           + L * kv_values_per_token(cfg) * kv_positions)
        assert row["baseline_bytes_per_token"] == pytest.approx(expected, rel=1e-9)
        fraction = expected * row["baseline_tokens_per_s"] / environment["copy_bandwidth_bytes_per_s"]
        assert row["baseline_roofline_fraction"] == pytest.approx(fraction, rel=1e-6)
