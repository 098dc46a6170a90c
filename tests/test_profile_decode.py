"""scripts/profile_decode.py: the per-op profile of a decode loop, read from XLA's own thunk
trace and the optimized HLO of the same compile — checked against the byte model: the weight
matrices its matrix-vector products read per token are the model's, and each loop dot runs
once per token in a dense decode."""

import json
import subprocess
import sys

import pytest

from nvium_jax.config import load_config
from nvium_jax.eval.decode_bench import byte_costs
from nvium_jax.model.count import matched_baseline_model
from scripts.profile_decode import hlo_dots, is_matvec, shape_bytes
from tests.conftest import cli_env

TINY = "configs/nvium-tiny.yaml"


def test_hlo_dots_reads_operand_shapes():
    hlo = """ENTRY %main {
  %p.1 = f32[768,1]{1,0} parameter(0)
  %w.2 = f32[768,2048]{1,0} parameter(1)
  %dot.3 = f32[1,2048]{1,0} dot(%p.1, %w.2), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %k.4 = f32[12,80,64]{2,1,0} parameter(2)
  %q.5 = f32[12,64,1]{2,1,0} parameter(3)
  ROOT %dot.6 = f32[12,80,1]{2,1,0} dot(%k.4, %q.5), lhs_batch_dims={0}
}"""
    dots = hlo_dots(hlo)
    assert dots == {"dot.3": ("f32[768,1]", "f32[768,2048]", "f32[1,2048]"),
                    "dot.6": ("f32[12,80,64]", "f32[12,64,1]", "f32[12,80,1]")}
    assert is_matvec(dots["dot.3"]) and not is_matvec(dots["dot.6"])
    assert shape_bytes("f32[768,2048]") == 768 * 2048 * 4 and shape_bytes("bf16[3]") == 6


@pytest.mark.slow
def test_profile_of_the_tiny_loops_reads_the_models_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.profile_decode", "--config", TINY, "--max-new-tokens", "6",
         "--repeats", "1", "--json"], env=cli_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    nvium = load_config(TINY).model
    for name, cfg in (("dense", nvium), ("baseline", matched_baseline_model(nvium))):
        row = record[name]
        costs = byte_costs(cfg)  # every token reads every piece in a dense decode
        model_bytes = sum(costs.segment_K) + sum(costs.router_K) + sum(costs.adapter_K) + costs.head
        # the matrices are all but the norms' and biases' vectors
        assert 0.97 * model_bytes <= row["matvec_weight_bytes_per_token"] <= model_bytes, name
        assert all(r["calls_per_token"] == int(r["calls_per_token"]) for r in row["matvecs"]), name
        assert row["ms_per_token"]["dot"] > 0 and row["ms_per_token_total"] >= row["ms_per_token"]["dot"]
