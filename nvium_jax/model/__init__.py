"""N-vium model family in Flax NNX.

Shape letters used in names throughout (`hidden_BxTxD`):
  B batch · T positions of a block (queries) · S cache positions (keys) · D d_model
  H query heads · G kv heads · R query heads per kv head · E head dim · F d_ff
  V vocabulary · L layers · K exits (early exits + the final one) · K1 early exits only
"""

from nvium_jax.model.count import matched_baseline_d_ff, param_count
from nvium_jax.model.transformer import (
    ExitStates,
    ModelOutput,
    Nvium,
    build_model,
    check_token_ids,
    mixture_logprobs,
)

__all__ = [
    "ExitStates",
    "ModelOutput",
    "Nvium",
    "build_model",
    "check_token_ids",
    "matched_baseline_d_ff",
    "mixture_logprobs",
    "param_count",
]
