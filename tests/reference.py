"""Independent references for the tests: the model written as plain NumPy loops (float64),
reading the same weights, plus helpers that make exits and routers non-trivial."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from scipy import stats
from scipy.special import erf


def randomize_exit_weights(model, seed: int = 0, scale: float = 0.5) -> None:
    """Router and adapter output weights start at zero, which would make every gate a
    constant; give them random values so a gate that reads the wrong layer shows."""
    key = jax.random.key(seed)
    for i, exit_ in enumerate(model.exits):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        exit_.router_out[...] = scale * jax.random.normal(k1, exit_.router_out.shape)
        exit_.adapter_out[...] = 0.2 * jax.random.normal(k2, exit_.adapter_out.shape)
    if model.final_adapter is not None:
        adapter_out = model.final_adapter.adapter_out
        adapter_out[...] = 0.2 * jax.random.normal(jax.random.fold_in(key, 1000), adapter_out.shape)


def numpy_params(model) -> dict:
    state = nnx.state(model, nnx.Param)
    flat = {}
    for path, value in nnx.to_flat_state(state):
        flat[".".join(map(str, path))] = np.asarray(value.get_value() if hasattr(value, "get_value") else value, np.float64)
    return flat


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rotate_pairs(x, position, theta):
    """RoPE, half-split: dims i and i+E/2 rotate together by position·θ^(−2i/E)."""
    E = x.shape[-1]
    out = np.empty_like(x)
    for i in range(E // 2):
        angle = position * theta ** (-2.0 * i / E)
        a, b = x[..., i], x[..., i + E // 2]
        out[..., i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., i + E // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out


def naive_attention(x_BxTxD, wq, wk, wv, wo, theta, positions=None):
    """Per query, per head: explicit loops over what each query may see."""
    B, T, _ = x_BxTxD.shape
    H, G = wq.shape[1], wk.shape[1]
    positions = np.arange(T) if positions is None else positions
    out = np.zeros(x_BxTxD.shape)
    for b in range(B):
        q = np.einsum("td,dhe->the", x_BxTxD[b], wq)
        k = np.einsum("td,dge->tge", x_BxTxD[b], wk)
        v = np.einsum("td,dge->tge", x_BxTxD[b], wv)
        for t in range(T):
            heads = []
            for h in range(H):
                g = h // (H // G)
                qt = rotate_pairs(q[t, h], positions[t], theta)
                seen = [s for s in range(T) if positions[s] <= positions[t]]
                scores = np.array([qt @ rotate_pairs(k[s, g], positions[s], theta) for s in seen])
                scores /= np.sqrt(q.shape[-1])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                heads.append(sum(w * v[s, g] for w, s in zip(weights, seen)))
            out[b, t] = np.einsum("he,hed->d", np.stack(heads), wo)
    return out


def naive_forward(model, tokens_BxT):
    """Returns (exit log-softmax [K,B,T,V], log routing weights [B,T,K]) in float64."""
    cfg = model.config
    p = numpy_params(model)
    tokens = np.asarray(tokens_BxT)
    act = {"gelu": gelu, "silu": silu}[cfg.adapter_activation]
    h = p["embedding"][tokens]
    exit_logp, gates_q = [], []
    for layer in range(cfg.n_layers):
        w = {k[len("blocks."):]: v[layer] for k, v in p.items() if k.startswith("blocks.")}
        x = rms_norm(h, w["attn_norm.scale"], cfg.norm_eps)
        h = h + naive_attention(x, w["attn.wq"], w["attn.wk"], w["attn.wv"], w["attn.wo"], cfg.rope_theta)
        x = rms_norm(h, w["mlp_norm.scale"], cfg.norm_eps)
        gate = x @ w["mlp.w_gate"]
        h = h + (gate / (1 + np.exp(-gate)) * (x @ w["mlp.w_up"])) @ w["mlp.w_down"]
        if layer + 1 in cfg.early_exits:
            k = cfg.early_exits.index(layer + 1)
            e = {n[len(f"exits.{k}."):]: v for n, v in p.items() if n.startswith(f"exits.{k}.")}
            z = rms_norm(h, e["norm.scale"], cfg.norm_eps)
            hidden = gelu(z @ e["router_in"] + e["router_in_bias"])
            if cfg.router_head == "reference":  # MLP back to D, RMSNorm, then the head
                hidden = hidden @ e["router_mid"] + e["router_mid_bias"]
                hidden = rms_norm(hidden, e["router_norm.scale"], cfg.norm_eps)
            logits = hidden @ e["router_out"] + e["router_out_bias"]
            gates_q.append(1.0 / (1.0 + np.exp(-(logits[..., 0] - logits[..., 1]))))
            adapted = z + act(z @ e["adapter_in"]) @ e["adapter_out"]
            exit_logp.append(log_softmax(adapted @ p["head"]))
    z = rms_norm(h, p["final_norm.scale"], cfg.norm_eps)
    if cfg.final_adapter:
        z = z + act(z @ p["final_adapter.adapter_in"]) @ p["final_adapter.adapter_out"]
    exit_logp.append(log_softmax(z @ p["head"]))
    weights = []  # π_k = q_k Π_{j<k}(1 − q_j), π_K = Π_{j<K}(1 − q_j)
    for k in range(len(gates_q) + 1):
        reach = np.prod([1 - q for q in gates_q[:k]], axis=0) if k else np.ones(tokens.shape)
        weights.append(reach * gates_q[k] if k < len(gates_q) else reach)
    return np.stack(exit_logp), np.log(np.stack(weights, axis=-1))


def log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mixture_logp_naive(exit_logp_KxBxTxV, route_logp_BxTxK):
    """log Σ_k π_k p_k, summing probabilities directly (no log-space trick)."""
    probs = np.einsum("kbtv,btk->btv", np.exp(exit_logp_KxBxTxV), np.exp(route_logp_BxTxK))
    return np.log(probs)


def chi_square_p(counts, expected_probs, n: int) -> float:
    """Pearson's test of observed counts against n draws of `expected_probs`, the cells
    expecting fewer than 5 pooled into one."""
    expected = expected_probs.ravel() * n
    counts = counts.ravel()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(observed, expected).pvalue


def peaked_model(cfg, vocab: int = 6):
    """The chi-square tests' subject: a `vocab`-token model whose gates fire often (router
    bias −0.4, exit weights scaled up) and whose exits' distributions clearly differ (head
    × 60), so a sampler drawing from the wrong exit or law is caught."""
    import dataclasses

    from nvium_jax.model import build_model

    model = build_model(dataclasses.replace(cfg, vocab_size=vocab, router_bias_init=-0.4), seed=3)
    randomize_exit_weights(model, seed=4, scale=2.0)
    model.head[...] = model.head[...] * 60.0
    return model


def check_first_three(out, joint, wrong, n_exits: int) -> None:
    """`generate`'s first three tokens of n identical prompts (`out`) follow the joint law
    `joint` [V, V, V] (chi-square), the exits vary enough for that to test routing, and the
    same test rejects `n` draws from the planted wrong law `wrong` (its power)."""
    exits, n = out.exits_BxN, out.tokens_BxN.shape[0]
    assert 0.2 <= np.mean(exits < n_exits - 1) and np.mean(exits[:, 1:] > 0) >= 0.2
    counts = np.zeros(joint.shape)
    np.add.at(counts, tuple(out.tokens_BxN.T), 1)
    assert chi_square_p(counts, joint, n) > 1e-3
    wrong_counts = np.random.default_rng(0).multinomial(n, wrong.ravel())
    assert chi_square_p(wrong_counts, joint, n) < 1e-6
