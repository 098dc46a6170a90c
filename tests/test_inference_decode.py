"""Exact deferred decoding against independent references: the dense decode (every layer,
same random stream), a full-sequence pass for the cache, the exact mixture probabilities of
`model(tokens)` for the distribution of the first three tokens (chi-square), and the
mixture's argmax for greedy."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from nvium_jax.config import ModelConfig
from nvium_jax.inference import DecodeOptions, flush, generate
from nvium_jax.inference.sampling import truncate_logits
from nvium_jax.model import build_model, mixture_logprobs
from tests.reference import check_first_three, peaked_model, randomize_exit_weights

CFG = ModelConfig(
    vocab_size=37, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, context=96,
    exits=(1, 2, 3), adapter_hidden=24, router_hidden=16, router_bias_init=-0.6, dtype="float32",
)
PROMPT_LENGTHS = (3, 7, 1, 12)


@pytest.fixture(scope="module")
def model():
    model = build_model(CFG, seed=0)
    randomize_exit_weights(model, seed=1, scale=1.0)
    return model


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def dense_cache(model, tokens):
    """Every layer's K/V of one sequence from a full-sequence pass (the training layout,
    causal self-attention, no cache), [L, T, G, E]."""
    T = len(tokens)
    h = model.embed(jnp.asarray(tokens)[None])
    _, (k_list, v_list) = model.run_layers(h, jnp.arange(T)[None], 0, CFG.n_layers, return_kv=True)
    return np.stack([k[0] for k in k_list]), np.stack([v[0] for v in v_list])


@pytest.mark.parametrize(
    "window, schedule", [(16, "advance"), pytest.param(3, "lockstep", marks=pytest.mark.slow),
                         pytest.param(3, "wait+advance", marks=pytest.mark.slow)],
)
def test_deferred_equals_dense(model, prompts, window, schedule):
    all_exits = []
    for seed in (0, 1, 2):
        dense = generate(model, prompts, 64, seed=seed, decode="dense")
        deferred = generate(
            model, prompts, 64, seed=seed, window=window, options=DecodeOptions(schedule=schedule)
        )
        np.testing.assert_array_equal(deferred.tokens_BxN, dense.tokens_BxN)
        np.testing.assert_array_equal(deferred.exits_BxN, dense.exits_BxN)
        np.testing.assert_array_equal(deferred.lengths_B, [64] * 4)
        if window == 3:
            assert deferred.flushes > 0
        all_exits.append(deferred.exits_BxN)
    exits = np.concatenate(all_exits).ravel()
    assert np.mean(exits < CFG.n_exits - 1) >= 0.2  # early exits happen …
    assert np.mean(exits > 0) >= 0.2  # … and tokens go past the first exit: blocks ran


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["advance", "lockstep", "wait", "wait+advance"])
def test_packed_batch_of_eight_equals_dense(model, schedule):
    """Batch 8: deep segments run the rows' ragged blocks as one packed token list (or one
    token per row); W = 4 makes rows flush."""
    rng = np.random.default_rng(3)
    batch = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (5, 1, 9, 2, 14, 3, 7, 4)]
    dense = generate(model, batch, 40, seed=7, decode="dense")
    deferred = generate(model, batch, 40, seed=7, window=4, options=DecodeOptions(schedule=schedule))
    np.testing.assert_array_equal(deferred.tokens_BxN, dense.tokens_BxN)
    np.testing.assert_array_equal(deferred.exits_BxN, dense.exits_BxN)
    assert np.mean(deferred.exits_BxN < CFG.n_exits - 1) >= 0.2 and np.mean(deferred.exits_BxN > 0) >= 0.2


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["advance", "lockstep"])
def test_rows_whose_blocks_do_not_fit_a_run_wait_their_turn(model, schedule):
    """Runs capped at 8 tokens for 8 rows (W = 4): gated rows and flushes that do not fit
    wait for a later iteration, taking turns; the tokens stay those of dense."""
    from nvium_jax.inference import decode as D

    options = DecodeOptions(schedule=schedule, max_run_tokens=8)
    rng = np.random.default_rng(4)
    batch = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (5, 1, 9, 2, 14, 3, 7, 4)]
    dense = generate(model, batch, 40, seed=3, decode="dense")
    deferred = generate(model, batch, 40, seed=3, window=4, return_state=True, options=options)
    assert D.loop_options(model, 8, 40, "deferred", 4, options=options).run_shapes[-1] == (8, 4)
    np.testing.assert_array_equal(deferred.tokens_BxN, dense.tokens_BxN)
    np.testing.assert_array_equal(deferred.exits_BxN, dense.exits_BxN)
    # rows waited: more iterations than the longest row's tokens, and flushes happened
    assert int(deferred.state.iteration) > 39 and deferred.flushes > 0


@pytest.mark.slow
def test_flush_completes_the_cache(model, prompts):
    # the options (and shapes) of the first case above: the compiled loop is reused
    out = generate(model, prompts, 64, seed=5, return_state=True)
    assert out.state.stats is None  # the default loop counts nothing for the byte model
    state = flush(model, out.state)
    pending = 0.0
    for b, prompt in enumerate(prompts):
        fed = prompt + out.tokens_BxN[b, : out.lengths_B[b] - 1].tolist()
        k_ref, v_ref = dense_cache(model, fed)
        T = len(fed)
        np.testing.assert_allclose(state.k_cache[:, b, :T], k_ref, atol=1e-5)
        np.testing.assert_allclose(state.v_cache[:, b, :T], v_ref, atol=1e-5)
        pending = max(pending, float(np.abs(out.state.k_cache[:, b, :T] - k_ref).max()))
    assert pending > 1e-2  # before the flush some upper layers were still deferred


@pytest.mark.slow
def test_rows_are_independent_and_stop_on_their_own(model, prompts):
    """EOS in one row, the context limit in another, a one-token prompt, W = 1 and a
    budget that ends mid-window; a row's tokens never depend on the other rows."""
    context_row = np.random.default_rng(1).integers(0, CFG.vocab_size, CFG.context - 3).tolist()
    batch = [prompts[2], prompts[1], context_row]
    free = generate(model, batch, 12, seed=4, window=1)  # W = 1: no deferral
    eos = int(free.tokens_BxN[1, 5])
    out = generate(model, batch, 12, seed=4, window=16, eos_id=eos)
    for b in range(3):
        row = free.tokens_BxN[b]
        stop = min(int(np.argmax(row == eos)) + 1 if (row == eos).any() else 12, 12)
        if b == 2:
            stop = min(stop, 3)  # prompt length + new tokens reaches the context
        assert out.lengths_B[b] == stop
        np.testing.assert_array_equal(out.tokens_BxN[b, :stop], row[:stop])
        np.testing.assert_array_equal(out.exits_BxN[b, :stop], free.exits_BxN[b, :stop])
        assert (out.tokens_BxN[b, stop:] == -1).all() and (out.exits_BxN[b, stop:] == -1).all()
    # row 0 beside other prompts (and deferred, W = 16) gives the tokens it gave with W = 1
    other = generate(model, [prompts[2], prompts[3][:7], context_row], 12, seed=4, window=16)
    np.testing.assert_array_equal(other.tokens_BxN[0], free.tokens_BxN[0])
    np.testing.assert_array_equal(other.exits_BxN[0], free.exits_BxN[0])


@pytest.mark.slow
def test_streaming_chunks_equal_one_loop(model, prompts):
    seen = []
    options = DecodeOptions(schedule="wait+advance", stream_every=16,
                            on_tokens=lambda tokens, n: seen.append(n.copy()))
    streamed = generate(model, prompts, 64, seed=9, window=3, options=options)
    whole = generate(model, prompts, 64, seed=9, window=3,
                     options=DecodeOptions(schedule="wait+advance"))
    np.testing.assert_array_equal(streamed.tokens_BxN, whole.tokens_BxN)
    assert len(seen) == 5 and (np.diff(np.array(seen), axis=0) >= 0).all()


@pytest.mark.slow
def test_pallas_attention_in_the_loop(model, prompts):
    pallas = generate(model, prompts[1:2], 4, seed=2, window=2,
                      options=DecodeOptions(attention="pallas"))
    reference = generate(model, prompts[1:2], 4, seed=2, window=2,
                         options=DecodeOptions(attention="reference"))
    np.testing.assert_array_equal(pallas.tokens_BxN, reference.tokens_BxN)
    np.testing.assert_array_equal(pallas.exits_BxN, reference.exits_BxN)


@pytest.mark.slow
def test_greedy_follows_the_mixture_argmax(model, prompts):
    greedy = generate(model, [prompts[1]], 6, temperature=0.0, decode="dense")
    assert (greedy.exits_BxN == -2).all()
    sequence = np.array(prompts[1] + greedy.tokens_BxN[0].tolist())
    out = model(sequence[None])
    logp = np.asarray(mixture_logprobs(out.exit_logp_KxBxTxV, out.route_logp_BxTxK))[0]
    P = len(prompts[1])
    np.testing.assert_array_equal(logp[P - 1 : P + 5].argmax(-1), greedy.tokens_BxN[0])


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    probs = np.array([[0.05, 0.4, 0.1, 0.25, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda **kw: np.isfinite(np.asarray(truncate_logits(logits, **kw)))
    np.testing.assert_array_equal(kept(top_k=2, top_p=None)[0], [0, 1, 0, 1, 0])
    # top-p 0.6: 0.4 + 0.25 reaches it; 0.66 needs the 0.2 as well (ties at the cut are kept)
    np.testing.assert_array_equal(kept(top_k=None, top_p=0.6)[0], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(kept(top_k=None, top_p=0.66)[0], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(kept(top_k=3, top_p=1.0)[0], [0, 1, 0, 1, 1])
    assert kept(top_k=None, top_p=0.1)[0].sum() == 1 and kept(top_k=None, top_p=0.5)[1].sum() >= 3


@pytest.fixture(scope="module")
def baseline():
    return build_model(dataclasses.replace(CFG, exits=()), seed=0)


def test_baseline_model_decodes_like_its_dense_pass(baseline):
    deferred = generate(baseline, [[1, 2, 3]], 8, seed=1)
    dense = generate(baseline, [[1, 2, 3]], 8, seed=1, decode="dense")
    np.testing.assert_array_equal(deferred.tokens_BxN, dense.tokens_BxN)
    assert (deferred.exits_BxN == 0).all() and deferred.flushes == 0


@pytest.mark.parametrize("option", [
    dict(temperature=0.0), pytest.param(dict(top_k=5), marks=pytest.mark.slow),
    pytest.param(dict(temperature=0.6), marks=pytest.mark.slow),
    pytest.param(dict(top_p=0.9), marks=pytest.mark.slow),
    pytest.param(dict(temperature=0.6, top_k=5, top_p=0.9), marks=pytest.mark.slow),
], ids=lambda option: ",".join(f"{k}={v}" for k, v in option.items()))
def test_baseline_decodes_with_every_option(baseline, option):
    """One exit: the transformed mixture is the head transform of that exit, so the mixture
    (dense only), per-exit deferred and per-exit dense return the same tokens."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    mixture = generate(baseline, prompts, 8, seed=2, decode="dense", **option)
    exit_dense = generate(baseline, prompts, 8, seed=2, decode="dense", sampling="exit", **option)
    exit_deferred = generate(baseline, prompts, 8, seed=2, sampling="exit", **option)
    np.testing.assert_array_equal(exit_dense.tokens_BxN, mixture.tokens_BxN)
    np.testing.assert_array_equal(exit_deferred.tokens_BxN, mixture.tokens_BxN)
    assert (mixture.exits_BxN == -2).all() and (exit_deferred.exits_BxN == 0).all()
    assert (mixture.tokens_BxN >= 0).all()
    if option.get("temperature") == 0.0:  # greedy: the argmax of one full pass
        for b, prompt in enumerate(prompts):
            sequence = np.array(prompt + mixture.tokens_BxN[b].tolist())
            logp = np.asarray(baseline(sequence[None]).exit_logp_KxBxTxV[0, 0])
            np.testing.assert_array_equal(logp[len(prompt) - 1 : -1].argmax(-1), mixture.tokens_BxN[b])
    if "top_k" in option:  # every token among the k likeliest of its step
        for b, prompt in enumerate(prompts):
            sequence = np.array(prompt + mixture.tokens_BxN[b].tolist())
            logp = np.asarray(baseline(sequence[None]).exit_logp_KxBxTxV[0, 0])[len(prompt) - 1 : -1]
            rank = (logp > logp[np.arange(8), mixture.tokens_BxN[b]][:, None]).sum(-1)
            assert (rank < option["top_k"]).all()


@pytest.mark.slow
def test_exit_sampling_at_temperature_one_is_the_mixture(model, prompts):
    """τ_r = τ_h = 1, no truncation: the same draws as exact mixture sampling (whose compiled
    loop the first test above made)."""
    mixture = generate(model, prompts, 64, seed=0)
    per_exit = generate(model, prompts, 64, seed=0, sampling="exit", router_temperature=1.0)
    np.testing.assert_array_equal(per_exit.tokens_BxN, mixture.tokens_BxN)
    np.testing.assert_array_equal(per_exit.exits_BxN, mixture.exits_BxN)


def joint_first_three(model, prompt, vocab, final_exit_only=False):
    """Exact P(y1, y2, y3 | prompt) from the dense forward, [V, V, V] — or, for the power
    check, that of a wrong sampler that always draws from the final exit."""
    V, P = vocab, len(prompt)
    grid = np.array([[a, b] for a in range(V) for b in range(V)])
    out = model(np.concatenate([np.tile(prompt, (V * V, 1)), grid], axis=1))
    route_logp = out.route_logp_BxTxK
    if final_exit_only:
        route_logp = jnp.zeros_like(route_logp).at[..., :-1].set(-jnp.inf)
    logp = np.asarray(mixture_logprobs(out.exit_logp_KxBxTxV, route_logp), np.float64)
    p1 = np.exp(logp[0, P - 1])
    p2 = np.exp(logp[::V, P]).reshape(V, V)  # [y1, y2]
    p3 = np.exp(logp[:, P + 1]).reshape(V, V, V)  # [y1, y2, y3]
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return joint / joint.sum()


@pytest.mark.slow
def test_first_three_tokens_follow_the_exact_mixture():
    model, prompt = peaked_model(CFG), [1, 4, 2]
    out = generate(model, [prompt] * 5000, 3, seed=11, window=4)
    # power: a sampler that always uses the final exit
    check_first_three(out, joint_first_three(model, prompt, 6),
                      joint_first_three(model, prompt, 6, final_exit_only=True), CFG.n_exits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[1, 99]]), "token id 99, outside the vocabulary"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1] * CFG.context]), "must be shorter than the context"),
        (dict(top_k=5), 'needs decode="dense"'),
        (dict(temperature=0.7), 'needs decode="dense"'),
        (dict(top_p=0.9), 'needs decode="dense"'),
        (dict(decode="fast"), 'use "deferred" or "dense"'),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(top_k=5), 'or use sampling="exit"'),
        (dict(sampling="beam"), "sampling='beam': use \"mixture\""),
        (dict(temperature=-0.5, sampling="exit"), "temperature=-0.5: give a number ≥ 0"),
        (dict(router_temperature=-1.0, sampling="exit"), "router_temperature=-1.0"),
        (dict(router_temperature=0.6), 'applies to sampling="exit" only'),
        (dict(sampling="exit", top_p=1.5), "top_p=1.5"),
        (dict(sampling="exit", top_k=0), "top_k=0"),
        (dict(options="lockstep"), "options='lockstep': give a nvium_jax.inference.DecodeOptions"),
        (dict(options=DecodeOptions(schedule="fifo")), "options.schedule='fifo'"),
    ],
)
def test_bad_inputs_raise_one_clear_error(model, kwargs, message):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_kth_largest_equals_top_k():
    """The bisection threshold of top-k sampling against `lax.top_k`'s k-th value: random
    rows with repeats, negatives, −inf and a 32000-wide vocabulary."""
    import jax

    from nvium_jax.inference.sampling import kth_largest

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 300)).astype(np.float32) * 5
    rows[1] = np.round(rows[1])  # many repeats
    rows[2, ::3] = -np.inf
    rows[3] = -np.abs(rows[3])  # all negative
    rows[4, :] = 0.0
    rows[4, 7] = -0.0
    wide = rng.standard_normal((2, 32000)).astype(np.float32)
    for x in (rows, wide):
        for k in (1, 2, 3, 50, 299):
            want = jax.lax.top_k(jnp.asarray(x), k)[0][:, -1:]
            np.testing.assert_array_equal(np.asarray(kth_largest(jnp.asarray(x), k)), want)
