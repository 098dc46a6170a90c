"""The N-vium model: embedding, a scanned stack of blocks, early exits with routers, head.

Exit k (1-based, early) reads h_{d_k}: z = RMSNorm_k(h), z' = z + W_out·act(W_in·z), and
the shared head gives p_k = softmax(head(z')). Its router, an MLP on z alone, gives
q_k = P(exit at k | reached k); sequential halting makes the mixture weights
π_k = q_k Π_{j<k}(1 − q_j), π_K = Π_{j<K}(1 − q_j). The baseline is K = 1.
`model.router_head`, `adapter_activation`, `adapter_init` and `final_adapter` choose between
our exits and the paper code's (a deeper router head, SiLU, an adapter on the final exit).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvium_jax.config import InputError, ModelConfig
from nvium_jax.model.layers import Block, RMSNorm, constant_param, param

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class ModelOutput(NamedTuple):
    exit_logp_KxBxTxV: jax.Array  # log-softmax of every exit, shallow → final
    route_logp_BxTxK: jax.Array  # log routing weights log π_k


class ExitStates(NamedTuple):
    """What the loss needs: each exit's pre-head state and the routing, [K, B, T, D]."""

    exit_z_KxBxTxD: jax.Array
    route_logp_BxTxK: jax.Array
    exit_q_BxTxK1: jax.Array  # q_k of the early exits (the router warm-up loss reads it)


def compute_dtype(name: str):
    """`auto` is bfloat16 on GPU/TPU and float32 on CPU (bf16 runs ≈ 3× slower there)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)  # the erf form, as PyTorch's nn.GELU


_ACTIVATIONS = {"gelu": _gelu, "silu": jax.nn.silu}


class ResidualAdapter(nnx.Module):
    """z + W_out·act(W_in·z), no biases; W_out zero at init, so it starts as the identity."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype):
        D, A, pd = cfg.d_model, cfg.adapter_width, cfg.param_dtype
        in_std = cfg.init_std if cfg.adapter_init == "ours" else D ** -0.5  # reference: 1/√fan_in
        self.adapter_in = param(rngs, (D, A), ("embed", "adapter"), in_std, pd)
        self.adapter_out = param(rngs, (A, D), ("adapter", "embed"), 0.0, pd)
        self.activation = cfg.adapter_activation
        self.dtype = dtype

    def adapt(self, z_BxTxD: jax.Array) -> jax.Array:
        dt = self.dtype
        z = z_BxTxD.astype(dt)
        hidden = _ACTIVATIONS[self.activation](z @ self.adapter_in[...].astype(dt))
        return z + hidden @ self.adapter_out[...].astype(dt)


class EarlyExit(ResidualAdapter):
    """Per-exit norm, zero-initialised residual adapter and sequential-halting router (a
    subclass, so the adapter's weights sit beside the router's as they always have).

    Router `ours`: Linear(D→R) → GELU → Linear(R→2), the last zero at init. `reference` (the
    paper's code): Linear(D→R) → GELU → Linear(R→D) (bias zero) → RMSNorm → Linear(D→2), the
    last normal(0.4/√D) with bias 0, so q ≈ 0.5 ± 0.15 per token at init. Either way the
    exit-minus-continue bias starts at router_bias_init."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype):
        D, R, pd = cfg.d_model, cfg.router_width, cfg.param_dtype
        self.norm = RMSNorm(cfg, dtype)
        super().__init__(cfg, rngs, dtype)
        self.router_in = param(rngs, (D, R), ("embed", "router"), cfg.init_std, pd)
        self.router_in_bias = constant_param(jnp.zeros(R), ("router",), pd)
        if cfg.router_head == "ours":
            self.router_out = param(rngs, (R, 2), ("router", None), 0.0, pd)
        else:
            self.router_mid = param(rngs, (R, D), ("router", "embed"), cfg.init_std, pd)
            self.router_mid_bias = constant_param(jnp.zeros(D), ("embed",), pd)
            self.router_norm = RMSNorm(cfg, dtype)
            self.router_out = param(rngs, (D, 2), ("embed", None), 0.4 * D ** -0.5, pd)
        # logits (exit, continue): the exit-minus-continue logit starts at router_bias_init
        self.router_out_bias = constant_param([cfg.router_bias_init, 0.0], (None,), pd)
        self.router_head = cfg.router_head

    def gate_logp(self, z_BxTxD: jax.Array) -> jax.Array:
        """[log q, log(1 − q)] per position, float32, from the normalised state only."""
        dt = self.dtype
        hidden = _gelu(
            z_BxTxD.astype(dt) @ self.router_in[...].astype(dt) + self.router_in_bias[...].astype(dt)
        )
        if self.router_head == "reference":
            hidden = hidden @ self.router_mid[...].astype(dt) + self.router_mid_bias[...].astype(dt)
            hidden = self.router_norm(hidden)
        logits_BxTx2 = jnp.matmul(
            hidden, self.router_out[...].astype(dt), preferred_element_type=jnp.float32
        ) + self.router_out_bias[...].astype(jnp.float32)
        return jax.nn.log_softmax(logits_BxTx2, axis=-1)


def route_logp_from_gates(gate_logp_BxTxK1x2: jax.Array) -> jax.Array:
    """log π_k from the early gates' [log q_k, log(1 − q_k)]: sequential halting, [B, T, K]."""
    log_q, log_continue = gate_logp_BxTxK1x2[..., 0], gate_logp_BxTxK1x2[..., 1]
    reach_logp = jnp.cumsum(log_continue, axis=-1)  # log Π_{j≤k}(1 − q_j)
    reach_before = jnp.concatenate([jnp.zeros_like(reach_logp[..., :1]), reach_logp], axis=-1)
    exit_logp = jnp.concatenate([log_q, jnp.zeros_like(log_q[..., :1])], axis=-1)
    return reach_before + exit_logp


class Nvium(nnx.Module):
    """Decoder-only transformer with N-vium exits; `exits=[]` is the matched baseline."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg.dtype)
        V, D, pd = cfg.vocab_size, cfg.d_model, cfg.param_dtype
        self.config = cfg
        self.dtype = dtype
        self.embedding = param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, pd)
        self.blocks = Block(cfg, rngs, dtype, n_stack=cfg.n_layers)
        self.exits = nnx.List([EarlyExit(cfg, rngs, dtype) for _ in cfg.early_exits])
        self.final_norm = RMSNorm(cfg, dtype)
        self.head = param(rngs, (D, V), ("embed", "vocab"), cfg.init_std, pd)
        # drawn last, so the other weights of a seed are those of a model without it
        self.final_adapter = ResidualAdapter(cfg, rngs, dtype) if cfg.final_adapter else None

    # ---- pieces shared by training and decoding -------------------------------------
    def embed(self, tokens_BxT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.dtype)

    def run_layers(
        self,
        h_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        start: int,
        stop: int,
        *,
        remat: str = "none",
        unroll: bool = False,
        attend_fn=None,
        layer_states=None,
        return_kv: bool = False,
    ):
        """Layers [start, stop) on a block of positions; returns (h, kv).

        Training scans the stacked weights. Decoding runs the layers unrolled on
        `layer_states` (every layer's weights sliced out of the stack once, before its
        loop, so no layer copies its slice per token) with `attend_fn(layer, q, k, v)`
        attending to the KV cache of `layer`. With `return_kv`, kv is the pair of lists of
        each layer's new keys and values, [B, T, G, E]; else None."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(h, layer_state, index):
            attend = None if attend_fn is None else functools.partial(attend_fn, index)
            return nnx.merge(graphdef, layer_state)(h, positions_BxT, attend)

        if remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False,
                                   static_argnums=(2,))
        if unroll or layer_states is not None or attend_fn is not None:
            if layer_states is None:
                layer_states = {i: jax.tree.map(lambda w: w[i], stacked) for i in range(start, stop)}
            k_list, v_list = [], []
            for index in range(start, stop):
                h_BxTxD, (k_BxTxGxE, v_BxTxGxE) = layer(h_BxTxD, layer_states[index], index)
                k_list.append(k_BxTxGxE)
                v_list.append(v_BxTxGxE)
            return h_BxTxD, ((k_list, v_list) if return_kv else None)

        def scan_step(h, layer_state):
            h, kv = layer(h, layer_state, None)
            return h, (kv if return_kv else None)

        layers = jax.tree.map(lambda w: w[start:stop], stacked)
        h_BxTxD, kv = jax.lax.scan(scan_step, h_BxTxD, layers)
        if return_kv:
            kv = tuple(list(x) for x in kv)
        return h_BxTxD, kv

    def layer_states(self, dtype=None) -> list:
        """Every layer's weights sliced out of the stack (matrices cast to `dtype` when
        given): what `run_layers(layer_states=...)` reads, built once per decode."""
        _, stacked = nnx.split(self.blocks)
        n_layers = self.config.n_layers

        def piece(i):
            def leaf(w):
                w = w[i]
                return w.astype(dtype) if dtype is not None and w.ndim >= 2 else w
            return jax.tree.map(leaf, stacked)

        return [piece(i) for i in range(n_layers)]

    def exit_norm(self, k: int, h_BxTxD: jax.Array) -> jax.Array:
        """z_k: the normalised stream that exit k's router and adapter read (0-based k)."""
        if k == len(self.exits):
            return self.final_norm(h_BxTxD)
        return self.exits[k].norm(h_BxTxD)

    def exit_state(self, k: int, z_BxTxD: jax.Array) -> jax.Array:
        """What the shared head reads at exit k: z' (early, adapted), or the final z (adapted
        too with `model.final_adapter`) — training, evaluation and decoding all call this."""
        if k < len(self.exits):
            return self.exits[k].adapt(z_BxTxD)
        return z_BxTxD if self.final_adapter is None else self.final_adapter.adapt(z_BxTxD)

    def gate_logp(self, k: int, z_BxTxD: jax.Array) -> jax.Array:
        return self.exits[k].gate_logp(z_BxTxD)

    def logits(self, z_BxTxD: jax.Array) -> jax.Array:
        """The shared head, float32 logits."""
        return jnp.matmul(
            z_BxTxD.astype(self.dtype), self.head[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )

    # ---- whole-sequence forward ----------------------------------------------------
    def exit_states(self, tokens_BxT: jax.Array, remat: str = "none") -> ExitStates:
        """Every exit's head input and the routing for a batch of full sequences."""
        B, T = tokens_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
        h_BxTxD = self.embed(tokens_BxT)
        states, gates = [], []
        for k, (start, stop) in enumerate(self.config.segments):
            h_BxTxD, _ = self.run_layers(h_BxTxD, positions_BxT, start, stop, remat=remat)
            z_BxTxD = self.exit_norm(k, h_BxTxD)
            states.append(self.exit_state(k, z_BxTxD))
            if k < len(self.exits):
                gates.append(self.gate_logp(k, z_BxTxD))
        if gates:
            gate_BxTxK1x2 = jnp.stack(gates, axis=2)
            route_logp_BxTxK = route_logp_from_gates(gate_BxTxK1x2)
            exit_q_BxTxK1 = jnp.exp(gate_BxTxK1x2[..., 0])
        else:
            route_logp_BxTxK = jnp.zeros((B, T, 1), jnp.float32)
            exit_q_BxTxK1 = jnp.zeros((B, T, 0), jnp.float32)
        return ExitStates(jnp.stack(states), route_logp_BxTxK, exit_q_BxTxK1)

    def __call__(self, tokens_BxT) -> ModelOutput:
        """Dense forward with every exit's log-softmax — for small inputs (tests, notebooks);
        training uses the chunked loss."""
        if not isinstance(tokens_BxT, jax.core.Tracer):
            check_token_ids(tokens_BxT, self.config.vocab_size)
        states = self.exit_states(jnp.asarray(tokens_BxT))
        # one head matmul per exit: the same shapes (and rounding) as the baseline's
        exit_logp = jnp.stack(
            [jax.nn.log_softmax(self.logits(z_BxTxD), axis=-1) for z_BxTxD in states.exit_z_KxBxTxD]
        )
        return ModelOutput(exit_logp, states.route_logp_BxTxK)


def logsumexp_exact(x: jax.Array, axis: int = 0) -> jax.Array:
    """log Σ e^x as max + log1p(Σ_{others} e^{x − max}): when one term dominates the
    result is exactly that term (XLA's exp(0) may miss 1 by an ulp), which makes a router
    that never exits reproduce the baseline bit for bit."""
    x_max = jnp.max(x, axis=axis, keepdims=True)
    is_first_max = jax.nn.one_hot(jnp.argmax(x, axis=axis), x.shape[axis], axis=axis, dtype=bool)
    finite_max = jnp.where(jnp.isfinite(x_max), x_max, 0.0)
    others = jnp.exp(jnp.where(is_first_max, -jnp.inf, x - finite_max))
    out = x_max + jnp.log1p(jnp.sum(others, axis=axis, keepdims=True))
    return jnp.squeeze(out, axis)


def mixture_logprobs(exit_logp_KxBxTxV: jax.Array, route_logp_BxTxK: jax.Array) -> jax.Array:
    # log Σ_k π_k p_k(y), in log space so tiny routing weights stay exact
    route_logp_KxBxTx1 = jnp.moveaxis(route_logp_BxTxK, -1, 0)[..., None]
    return logsumexp_exact(exit_logp_KxBxTxV + route_logp_KxBxTx1, axis=0)


def check_token_ids(tokens, vocab_size: int, what: str = "tokens") -> None:
    """Host-side check where ids enter: an id outside [0, vocab_size) is a ValueError."""
    ids = np.asarray(tokens)
    if ids.size == 0:
        return
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{what} must be integer token ids, got dtype {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(
            f"{what} contain token id {bad}, outside the vocabulary [0, {vocab_size}) "
            f"(model.vocab_size={vocab_size}); check the tokenizer matches the model"
        )


def build_model(model_cfg: ModelConfig, seed: int = 0) -> Nvium:
    """A freshly initialised model; parameters carry `logical_axes` metadata."""
    return Nvium(model_cfg, nnx.Rngs(params=seed))
