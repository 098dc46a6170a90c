"""The model against a NumPy loop over layers, and the routing against its formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nvium_jax.config import ModelConfig
from nvium_jax.model import build_model, mixture_logprobs
from tests.reference import mixture_logp_naive, naive_forward, randomize_exit_weights


@pytest.fixture
def model(small_cfg):
    model = build_model(small_cfg, seed=3)
    randomize_exit_weights(model, seed=4)
    return model


def test_forward_equals_numpy_layer_loop(model, tokens_BxT):
    expected_exit_logp, expected_route_logp = naive_forward(model, tokens_BxT)
    out = model(tokens_BxT)
    np.testing.assert_allclose(out.exit_logp_KxBxTxV, expected_exit_logp, atol=2e-5)
    np.testing.assert_allclose(out.route_logp_BxTxK, expected_route_logp, atol=2e-5)


def test_routing_weights_are_the_sequential_halting_product(model, tokens_BxT):
    out = model(tokens_BxT)
    weights_BxTxK = np.exp(np.asarray(out.route_logp_BxTxK, np.float64))
    np.testing.assert_allclose(weights_BxTxK.sum(-1), 1.0, atol=1e-6)
    # q_k recovered from the gates of the model itself, one exit at a time
    h = model.embed(tokens_BxT)
    positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    q = []
    for k, (start, stop) in enumerate(model.config.segments[:-1]):
        h, _ = model.run_layers(h, positions, start, stop)
        q.append(np.exp(np.asarray(model.gate_logp(k, model.exit_norm(k, h))[..., 0], np.float64)))
    expected = [q[0], (1 - q[0]) * q[1], (1 - q[0]) * (1 - q[1]) * q[2],
                (1 - q[0]) * (1 - q[1]) * (1 - q[2])]
    np.testing.assert_allclose(weights_BxTxK, np.stack(expected, -1), atol=1e-6)
    assert weights_BxTxK.min() > 0.02, "test routing should put mass on every exit"


def test_mixture_is_normalised_and_equals_summed_probabilities(model, tokens_BxT):
    out = model(tokens_BxT)
    logp_BxTxV = mixture_logprobs(*out)
    np.testing.assert_allclose(jax.nn.logsumexp(logp_BxTxV, axis=-1), 0.0, atol=1e-5)
    expected = mixture_logp_naive(np.asarray(out.exit_logp_KxBxTxV, np.float64),
                                  np.asarray(out.route_logp_BxTxK, np.float64))
    np.testing.assert_allclose(logp_BxTxV, expected, atol=1e-5)


def _copy_backbone(src, dst):
    for name in ("embedding", "head"):
        getattr(dst, name)[...] = getattr(src, name)[...]
    nnx.update(dst.blocks, nnx.state(src.blocks))
    nnx.update(dst.final_norm, nnx.state(src.final_norm))


def test_router_that_never_exits_is_exactly_the_baseline(model, small_cfg, tokens_BxT):
    for exit_ in model.exits:  # q_k = sigmoid(−1e4) = 0 in float32
        exit_.router_out_bias[...] = jnp.array([-1e4, 0.0])
    baseline = build_model(dataclasses.replace(small_cfg, exits=()), seed=99)
    _copy_backbone(model, baseline)
    out = model(tokens_BxT)
    mixture = mixture_logprobs(*out)
    np.testing.assert_array_equal(mixture, out.exit_logp_KxBxTxV[-1])
    base = baseline(tokens_BxT)
    assert base.exit_logp_KxBxTxV.shape[0] == 1
    np.testing.assert_array_equal(base.route_logp_BxTxK, 0.0)
    np.testing.assert_array_equal(mixture, base.exit_logp_KxBxTxV[0])


def test_default_exits_are_quarter_depths(small_cfg):
    cfg = dataclasses.replace(small_cfg, n_layers=12, exits=None)
    assert cfg.early_exits == (3, 6, 9) and cfg.exit_depths == (3, 6, 9, 12)
    cfg = dataclasses.replace(small_cfg, n_layers=2, exits=None)
    assert cfg.early_exits == (1,)  # 2//4 = 0 dropped, 2//2 = 3·2//4 = 1 once
    assert len(build_model(cfg).exits) == 1


@pytest.mark.parametrize("remat", [pytest.param("full", marks=pytest.mark.slow), "dots",
                                   pytest.param("dots_no_batch", marks=pytest.mark.slow)])
def test_remat_and_unroll_change_no_number(model, tokens_BxT, remat):
    h = model.embed(tokens_BxT)
    positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    plain, _ = model.run_layers(h, positions, 0, 4)
    unrolled, _ = model.run_layers(h, positions, 0, 4, unroll=True)
    np.testing.assert_allclose(unrolled, plain, atol=1e-6)

    def total(m, remat_name):
        return jnp.sum(m.run_layers(h, positions, 1, 4, remat=remat_name)[0] ** 2)

    g_plain = nnx.grad(total)(model, "none")
    g_remat = nnx.grad(total)(model, remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_params_carry_logical_axes(model):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim, path
        if path[0] == "blocks":
            assert axes[0] == "layers", path
    assert model.blocks.attn.wk.get_metadata()["logical_axes"] == (
        "layers", "embed", "kv_heads", "head_dim")
    assert model.head.get_metadata()["logical_axes"] == ("embed", "vocab")


def test_compute_dtype_is_separate_from_parameter_dtype(small_cfg, tokens_BxT):
    model = build_model(dataclasses.replace(small_cfg, dtype="bfloat16"))
    assert model.blocks.mlp.w_up.get_value().dtype == jnp.float32
    assert model.embed(tokens_BxT).dtype == jnp.bfloat16
    out = model(tokens_BxT)
    assert out.exit_logp_KxBxTxV.dtype == jnp.float32  # log-softmax in float32
    reference = build_model(small_cfg)(tokens_BxT)
    np.testing.assert_allclose(out.exit_logp_KxBxTxV, reference.exit_logp_KxBxTxV, atol=0.1)


@pytest.mark.parametrize("bad", [-1, 37, 1000])
def test_token_ids_outside_the_vocabulary_are_an_error(model, bad):
    tokens = np.array([[1, 2, bad]])
    with pytest.raises(ValueError, match=rf"token id {bad}.*\[0, 37\)"):
        model(tokens)


# ---- the paper code's exits as options (model.router_head, adapter_*, final_adapter) ----
PAPER_EXITS = dict(router_head="reference", adapter_activation="silu", adapter_init="reference",
                   final_adapter=True)


@pytest.mark.parametrize("options", [
    PAPER_EXITS,
    dict(router_head="reference", router_hidden=None),
    dict(adapter_activation="silu", final_adapter=True),
])
def test_reference_exits_equal_numpy_layer_loop(small_cfg, tokens_BxT, options):
    model = build_model(dataclasses.replace(small_cfg, **options), seed=3)
    randomize_exit_weights(model, seed=4)
    expected_exit_logp, expected_route_logp = naive_forward(model, tokens_BxT)
    out = model(tokens_BxT)
    np.testing.assert_allclose(out.exit_logp_KxBxTxV, expected_exit_logp, atol=2e-5)
    np.testing.assert_allclose(out.route_logp_BxTxK, expected_route_logp, atol=2e-5)


def _params(model) -> dict:
    return {".".join(map(str, path)): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_each_exit_option_changes_only_its_part(small_cfg, tokens_BxT):
    D = small_cfg.d_model
    base = build_model(small_cfg, seed=3)
    randomize_exit_weights(base, seed=4)
    base_params, base_out = _params(base), base(tokens_BxT)

    # adapter_activation: the same weights; only the early exits' distributions move
    silu = build_model(dataclasses.replace(small_cfg, adapter_activation="silu"), seed=3)
    randomize_exit_weights(silu, seed=4)
    assert _params(silu).keys() == base_params.keys()
    out = silu(tokens_BxT)
    np.testing.assert_array_equal(out.route_logp_BxTxK, base_out.route_logp_BxTxK)
    np.testing.assert_array_equal(out.exit_logp_KxBxTxV[-1], base_out.exit_logp_KxBxTxV[-1])
    assert np.abs(out.exit_logp_KxBxTxV[:-1] - base_out.exit_logp_KxBxTxV[:-1]).max() > 1e-3

    # adapter_init: the same draws, W_in scaled from init_std to 1/√D; nothing else
    ref_init = _params(build_model(dataclasses.replace(small_cfg, adapter_init="reference"), seed=3))
    plain = _params(build_model(small_cfg, seed=3))
    for name, value in plain.items():
        if name.endswith("adapter_in"):
            np.testing.assert_allclose(ref_init[name], value * (D ** -0.5 / small_cfg.init_std), rtol=1e-6)
        else:
            np.testing.assert_array_equal(ref_init[name], value, err_msg=name)

    # router_head: three more leaves per exit and a D→2 head; with every shared weight
    # copied over, the exits' distributions are the same and only the routing differs
    ref = build_model(dataclasses.replace(small_cfg, router_head="reference"), seed=3)
    ref_params = _params(ref)
    added = {f"exits.{k}.{leaf}" for k in range(3)
             for leaf in ("router_mid", "router_mid_bias", "router_norm.scale")}
    assert ref_params.keys() - base_params.keys() == added and base_params.keys() <= ref_params.keys()
    assert ref_params["exits.0.router_out"].shape == (D, 2)
    np.testing.assert_array_equal(ref_params["exits.0.router_out_bias"], np.float32([-0.3, 0.0]))
    np.testing.assert_array_equal(ref_params["exits.0.router_mid_bias"], 0.0)
    shared = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    for exit_state in shared["exits"].values():
        for leaf in ("router_out", "router_out_bias"):
            del exit_state[leaf]
    nnx.update(ref, shared)
    out = ref(tokens_BxT)
    np.testing.assert_array_equal(out.exit_logp_KxBxTxV, base_out.exit_logp_KxBxTxV)
    assert np.abs(out.route_logp_BxTxK - base_out.route_logp_BxTxK).max() > 1e-2


def test_final_adapter_starts_as_the_identity_then_moves_only_the_final_exit(small_cfg, tokens_BxT):
    base = build_model(small_cfg, seed=3)
    randomize_exit_weights(base, seed=4)
    model = build_model(dataclasses.replace(small_cfg, final_adapter=True), seed=3)
    randomize_exit_weights(model, seed=4)
    model.final_adapter.adapter_out[...] = jnp.zeros_like(model.final_adapter.adapter_out[...])
    base_out, out = base(tokens_BxT), model(tokens_BxT)  # W_out zero: the same numbers
    np.testing.assert_array_equal(out.exit_logp_KxBxTxV, base_out.exit_logp_KxBxTxV)
    np.testing.assert_array_equal(out.route_logp_BxTxK, base_out.route_logp_BxTxK)
    randomize_exit_weights(model, seed=4)  # W_out random: only the final exit moves
    out = model(tokens_BxT)
    np.testing.assert_array_equal(out.exit_logp_KxBxTxV[:-1], base_out.exit_logp_KxBxTxV[:-1])
    np.testing.assert_array_equal(out.route_logp_BxTxK, base_out.route_logp_BxTxK)
    assert np.abs(out.exit_logp_KxBxTxV[-1] - base_out.exit_logp_KxBxTxV[-1]).max() > 1e-3


@pytest.mark.slow
def test_reference_router_starts_near_even_odds(small_cfg):
    """The paper code's head init, normal(0.4/√D) on an RMS-normalised input: each logit has
    std ≈ 0.4, so the exit-minus-continue logit has std ≈ 0.4·√2 and q ≈ 0.5 on average."""
    cfg = dataclasses.replace(small_cfg, d_model=64, router_head="reference", router_hidden=None,
                              router_bias_init=0.0)
    tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, cfg.vocab_size)
    q_BxTxK1 = np.asarray(build_model(cfg, seed=0).exit_states(tokens).exit_q_BxTxK1, np.float64)
    assert np.all((q_BxTxK1.mean(axis=(0, 1)) > 0.4) & (q_BxTxK1.mean(axis=(0, 1)) < 0.6))
    logit_std = np.log(q_BxTxK1 / (1 - q_BxTxK1)).std(axis=(0, 1))
    assert np.all((logit_std > 0.4 * np.sqrt(2) / 2) & (logit_std < 0.4 * np.sqrt(2) * 2)), logit_std


@pytest.mark.slow
def test_deferred_decode_equals_dense_with_the_paper_exits():
    """The reference router head, SiLU adapters and a final adapter reach decoding through
    the model's exit methods: deferred (with its delayed layers) draws what dense draws."""
    from nvium_jax.inference import generate

    cfg = ModelConfig(vocab_size=37, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                      context=64, exits=(1,), adapter_hidden=24, dtype="float32", **PAPER_EXITS)
    model = build_model(cfg, seed=0)
    randomize_exit_weights(model, seed=1, scale=0.3)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    dense = generate(model, prompts, 16, seed=0, decode="dense")
    deferred = generate(model, prompts, 16, seed=0)
    np.testing.assert_array_equal(deferred.tokens_BxN, dense.tokens_BxN)
    np.testing.assert_array_equal(deferred.exits_BxN, dense.exits_BxN)
    exits = np.asarray(deferred.exits_BxN).ravel()
    assert 0.2 <= np.mean(exits == 0) <= 0.8  # both exits drawn: the second layer deferred
