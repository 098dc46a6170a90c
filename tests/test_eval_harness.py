"""The lm-eval adapter: local tasks (jsonl + YAML written here, offline) through lm-eval's own
evaluator, each logged response checked against log-probs computed directly from
`model(tokens)`, lm-eval's own rolling windows, and a naive greedy loop."""

import json
import textwrap

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from nvium_jax.cli import main  # noqa: E402
from nvium_jax.eval.harness import NviumLM, cut_at, rolling_windows  # noqa: E402
from nvium_jax.model import mixture_logprobs  # noqa: E402

MC = [{"context": "the king said unto", "choices": [" them", " bread", " wine"], "label": 0},
      {"context": "the people of the", "choices": [" city", " king"], "label": 1},
      {"context": "", "choices": ["the king", "wine bread"], "label": 0}]
ROLLING = [{"text": "the king said unto them that he would go into the land."},
           {"text": " ".join(["the people of the city came out to meet him"] * 8)}]
GEN = [{"q": "the king said", "a": " unto"}, {"q": "and the people of", "a": " the city"},
       {"q": "bread", "a": " and"}]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    specs = {
        "nvium_test_mc": (MC, """
            output_type: multiple_choice
            doc_to_text: "{{context}}"
            target_delimiter: ""
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{label}}"
            metric_list:
              - metric: acc"""),
        "nvium_test_rolling": (ROLLING, """
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity"""),
        "nvium_test_gen": (GEN, """
            output_type: generate_until
            doc_to_text: "{{q}}"
            doc_to_target: "{{a}}"
            generation_kwargs:
              until: ["."]
              do_sample: false
              max_gen_toks: 6
            metric_list:
              - metric: exact_match"""),
    }
    for name, (rows, body) in specs.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {root / (name + '.jsonl')}\ntest_split: test"
            + textwrap.dedent(body) + "\n")
    return root


_FORWARD = {}


def dense_logp(model, tokens):
    """[len(tokens), V] log-probs of the mixture and of every exit from one dense
    `model(tokens)` pass, right-padded to the context (causal: the padding changes nothing
    before it) so one compiled forward serves every call."""
    if id(model) not in _FORWARD:
        def forward(m, tokens_1xT):
            out = m(tokens_1xT)
            return mixture_logprobs(out.exit_logp_KxBxTxV, out.route_logp_BxTxK)[0], out.exit_logp_KxBxTxV[:, 0]
        _FORWARD[id(model)] = nnx.jit(forward)
    padded = np.zeros((1, model.config.context), np.int32)
    padded[0, :len(tokens)] = tokens
    mixture, exits = _FORWARD[id(model)](model, padded)
    return np.asarray(mixture, np.float64)[:len(tokens)], np.asarray(exits, np.float64)[:, :len(tokens)]


def direct_logp(model, sequence, n_scored, exit=None):
    """Σ log p of the last n tokens given the ones before them, and whether each was the argmax."""
    mixture, exits = dense_logp(model, sequence[:-1])
    logp = mixture if exit is None else exits[exit]
    positions = range(len(sequence) - 1 - n_scored, len(sequence) - 1)
    total = sum(logp[t, sequence[t + 1]] for t in positions)
    return total, all(np.argmax(logp[t]) == sequence[t + 1] for t in positions)


def evaluate(lm, tasks, tasks_dir):
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)


def test_rolling_windows_are_lm_evals():
    tokens = list(range(100, 137))
    for context in (4, 8, 37, 40):
        ours = rolling_windows(tokens, 7, context)
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, context, 1)]
        assert ours == [(ctx + pred, len(pred)) for ctx, pred in theirs]
    assert cut_at("he said. and", [".", "\n"]) == "he said" and cut_at("abc", ["."]) == "abc"


@pytest.mark.slow
def test_loglikelihood_tasks_equal_direct_log_probs(trained_run, tasks_dir):
    run_dir, _ = trained_run
    lm = NviumLM(run=str(run_dir), batch_size=2)
    model, bos = lm.model, lm.loaded.bos_id
    out = evaluate(lm, ["nvium_test_mc", "nvium_test_rolling"], tasks_dir)
    correct = []
    for sample, doc in zip(sorted(out["samples"]["nvium_test_mc"], key=lambda s: s["doc_id"]), MC):
        context = lm.encode(doc["context"]) if doc["context"] else []
        context = ([bos] if bos is not None else []) + context or [lm.loaded.eos_id]
        scores = []
        for (logp, greedy), choice in zip([r[0] for r in sample["resps"]], doc["choices"]):
            cont = lm.encode(choice)
            want, want_greedy = direct_logp(model, context + cont, len(cont))
            assert logp == pytest.approx(want, abs=1e-4) and greedy == want_greedy
            scores.append(want)
        correct.append(int(np.argmax(scores)) == doc["label"])
    assert out["results"]["nvium_test_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    # rolling: every token predicted once, in lm-eval's own windows of model.context
    prefix = bos if bos is not None else lm.loaded.eos_id
    words, total = 0, 0.0
    for sample, doc in zip(sorted(out["samples"]["nvium_test_rolling"], key=lambda s: s["doc_id"]), ROLLING):
        tokens = lm.encode(doc["text"])
        want = sum(direct_logp(model, ctx + pred, len(pred))[0] for ctx, pred in
                   map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, 32, 1)))
        assert sample["resps"][0][0] == pytest.approx(want, abs=1e-3)
        total += want
        words += len(doc["text"].split())
    assert len(lm.encode(ROLLING[1]["text"])) > 2 * 32  # the long text spans several windows
    assert out["results"]["nvium_test_rolling"]["word_perplexity,none"] == pytest.approx(
        np.exp(-total / words), rel=1e-4)
    # exit=K scores with that exit alone
    shallow = NviumLM(run=str(run_dir), exit=0, batch_size=4)
    request = type("Request", (), {"args": ("the king said", " unto them")})()
    (logp, _), = shallow.loglikelihood([request])
    sequence = shallow.context_ids("the king said") + shallow.encode(" unto them")
    assert logp == pytest.approx(direct_logp(model, sequence, len(shallow.encode(" unto them")), exit=0)[0], abs=1e-4)


@pytest.mark.slow
def test_generate_until_is_greedy_and_cut(trained_run, tasks_dir):
    run_dir, _ = trained_run
    lm = NviumLM(run=str(run_dir), batch_size=2)
    out = evaluate(lm, ["nvium_test_gen"], tasks_dir)
    eos = lm.loaded.eos_id
    for sample, doc in zip(sorted(out["samples"]["nvium_test_gen"], key=lambda s: s["doc_id"]), GEN):
        tokens = lm.context_ids(doc["q"])
        new = []
        for _ in range(6):  # naive greedy loop over the exact mixture, one dense pass per token
            nxt = int(np.argmax(dense_logp(lm.model, tokens + new)[0][-1]))
            if nxt == eos:
                break
            new.append(nxt)
        want = lm.loaded.tokenizer.decode(new)
        want = want[:want.index(".")] if "." in want else want
        assert sample["resps"][0][0] == want
    # deferred sampling at temperature 1 is what `generate` samples
    sampled = lm.generate_until([type("Request", (), {"args": ("the king", {"do_sample": True, "max_gen_toks": 5})})()])
    from nvium_jax.inference import generate

    ref = generate(lm.model, [lm.context_ids("the king")], 5, seed=0, eos_id=eos)
    ids = [t for t in ref.tokens_BxN[0, :int(ref.lengths_B[0])].tolist() if t != eos]
    assert sampled == [lm.loaded.tokenizer.decode(ids)]


_ROUTED = {}


def greedy_routed_step(model, tokens):
    """The paper's deterministic decode from one full pass (padded to the context): the first
    exit whose q_k > 1/2 (exit logit above continue), q_k = π_k / (1 − Σ_{j<k} π_j) from the
    mixture weights of `model(tokens)`, and that exit's argmax."""
    if id(model) not in _ROUTED:
        _ROUTED[id(model)] = nnx.jit(lambda m, tokens_1xT: m(tokens_1xT))
    padded = np.zeros((1, model.config.context), np.int32)
    padded[0, :len(tokens)] = tokens
    out = _ROUTED[id(model)](model, padded)
    last = len(tokens) - 1
    pi = np.exp(np.asarray(out.route_logp_BxTxK[0, last], np.float64))
    q = (pi / (1.0 - np.cumsum(pi) + pi))[:-1]
    fired = np.flatnonzero(q > 0.5)
    k = int(fired[0]) if fired.size else len(pi) - 1
    return int(np.argmax(out.exit_logp_KxBxTxV[k, 0, last]))


def test_unknown_sampling_is_one_clear_error():
    from nvium_jax.config import ConfigError

    with pytest.raises(ConfigError, match="sampling=beam: use mixture"):
        NviumLM(run="no_such_run", sampling="beam")


@pytest.mark.slow
def test_generate_until_with_per_exit_sampling_is_the_papers_greedy_decode(trained_run, tasks_dir):
    """model_args sampling=exit: a greedy task decodes deferred with greedy routing and the
    chosen exit's argmax, as a naive loop of full passes does."""
    run_dir, _ = trained_run
    lm = NviumLM(run=str(run_dir), batch_size=2, sampling="exit")
    out = evaluate(lm, ["nvium_test_gen"], tasks_dir)
    eos = lm.loaded.eos_id
    for sample, doc in zip(sorted(out["samples"]["nvium_test_gen"], key=lambda s: s["doc_id"]), GEN):
        tokens, new = lm.context_ids(doc["q"]), []
        for _ in range(6):
            nxt = greedy_routed_step(lm.model, tokens + new)
            if nxt == eos:
                break
            new.append(nxt)
        want = lm.loaded.tokenizer.decode(new)
        assert sample["resps"][0][0] == (want[:want.index(".")] if "." in want else want)


@pytest.mark.slow
def test_nvium_eval_tasks_cli(trained_run, tasks_dir, capsys):
    run_dir, _ = trained_run
    assert main(["eval", "--run", str(run_dir), "--tasks", "nvium_test_mc", "--include-path",
                 str(tasks_dir), "--limit", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["results"]) == {"nvium_test_mc"}
    assert record["n-samples"]["nvium_test_mc"]["effective"] == 2
    for argv, message in [
        (["--tasks", "no_such_task_xyz", "--include-path", str(tasks_dir)], "unknown lm-eval task(s) no_such_task_xyz"),
        (["--tasks", "nvium_test_mc", "--include-path", str(tasks_dir), "--exit", "3"], "exit=3: run"),
        (["--tasks", "nvium_test_mc", "--batches", "2"], "--batches is for held-out perplexity"),
    ]:
        assert main(["eval", "--run", str(run_dir), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_nvium_eval_sampling_reaches_the_adapter(monkeypatch, capsys):
    """`nvium eval --tasks T --sampling exit` hands sampling=exit to the lm-eval model (the
    decode it selects is tested above); without --tasks it is one clear error."""
    import nvium_jax.eval.harness as harness

    calls = []
    monkeypatch.setattr(harness, "run_tasks", lambda *a, **kw: calls.append(kw) or {"results": {}})
    for argv, sampling in ([], "mixture"), (["--sampling", "exit"], "exit"):
        assert main(["eval", "--run", "runs/x", "--tasks", "t", "--json", *argv]) == 0
        assert calls[-1]["sampling"] == sampling
    capsys.readouterr()
    assert main(["eval", "--run", "runs/x", "--sampling", "exit"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --sampling goes with --tasks (lm-eval tasks)\n", err
