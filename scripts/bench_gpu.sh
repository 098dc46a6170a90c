#!/usr/bin/env bash
# Decode benchmarks for a GPU machine: 125m, 350m and 1.5b shapes, 16- and 512-token prompts,
# batch 1 and 8, bf16
# (model.dtype=auto), the Pallas kernel against the reference attention, the reference
# exit distribution. Writes one JSON line per run to ${OUT:-bench_gpu}/decode.jsonl.
#   bash scripts/bench_gpu.sh            (from the repository root, package installed)
set -euo pipefail
out="${OUT:-bench_gpu}"
mkdir -p "$out"
python - <<'PY'
import jax
from nvium_jax.inference.kernels import cache_attention
import jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((8, 16, 12, 128)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((8, 12, 1024, 128)), jnp.float32) for _ in range(2))
cache_len = jnp.asarray(rng.integers(0, 1024, (8,)), jnp.int32)
(out_p, lse_p), (out_r, lse_r) = (cache_attention(q, k, v, cache_len, impl=i) for i in ("pallas", "reference"))
print("pallas vs reference max |diff|:", float(jnp.max(jnp.abs(out_p - out_r))), jax.devices()[0])
PY
for config in nvium-125m nvium-350m nvium-1.5b; do
  for prompt in 16 512; do
    for batch in 1 8; do
      for attention in pallas reference; do
        nvium bench decode --config "configs/$config.yaml" "decode.attention=$attention" \
          --batch "$batch" --prompt-tokens "$prompt" --max-new-tokens 128 \
          --exit-rates 0.35,0.25,0.15,0.25 --repeats 5 --json | tee -a "$out/decode.jsonl"
      done
    done
  done
done
