#!/usr/bin/env bash
# Decode benchmarks for a GPU machine: 125m, 350m and 1.5b shapes at batch 1 and 8, bf16
# (model.dtype=auto), the Pallas kernel against the reference attention, the reference
# exit distribution. Writes one JSON line per run to ${OUT:-bench_gpu}/decode.jsonl.
#   bash scripts/bench_gpu.sh            (from the repository root, package installed)
set -euo pipefail
out="${OUT:-bench_gpu}"
mkdir -p "$out"
python - <<'PY'
import jax
from nvium_jax.inference.kernels import block_attention, reference_attention
import jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((8, 16, 12, 128)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((8, 1024, 12, 128)), jnp.float32) for _ in range(2))
pos = jnp.asarray(rng.integers(0, 1008, (8, 1))[:, None] + np.arange(16), jnp.int32)[:, 0]
err = jnp.max(jnp.abs(block_attention(q, k, v, pos, impl="pallas") - reference_attention(q, k, v, pos)))
print("pallas vs reference max |diff|:", float(err), jax.devices()[0])
PY
for config in nvium-125m nvium-350m nvium-1.5b; do
  for batch in 1 8; do
    for attention in pallas reference; do
      nvium bench decode --config "configs/$config.yaml" "decode.attention=$attention" \
        --batch "$batch" --max-new-tokens 128 --exit-rates 0.35,0.25,0.15,0.25 --repeats 5 --json \
        | tee -a "$out/decode.jsonl"
    done
  done
done
