"""`nvium generate` with per-exit sampling: the tokens `generate` gives, decoded deferred
(the CLI does not switch to dense for it), and one-line errors for misused flags."""

import json

import pytest

import nvium_jax
from nvium_jax.cli import main
from nvium_jax.inference import generate


def run_prompt(run, text):
    return ([] if run.bos_id is None else [run.bos_id]) + run.tokenizer.encode(text).ids


@pytest.mark.slow
def test_generate_cli_per_exit_sampling(trained_run, capsys):
    run_dir, _ = trained_run
    flags = ["--sampling", "exit", "--temperature", "0.6", "--top-k", "5", "--router-temperature",
             "0.6", "--max-new-tokens", "6", "--seed", "3"]
    assert main(["generate", "--run", str(run_dir), "--prompt", "the king", *flags, "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    run = nvium_jax.load_run(run_dir)
    out = generate(run.model, [run_prompt(run, "the king")], 6, seed=3, eos_id=run.eos_id,
                   sampling="exit", temperature=0.6, top_k=5, router_temperature=0.6,
                   decode="dense")  # the same tokens as deferred: any decode is a reference
    n = int(out.lengths_B[0])
    assert sample["tokens"] == out.tokens_BxN[0, :n].tolist()
    assert sample["exits"] == out.exits_BxN[0, :n].tolist() and min(sample["exits"]) >= 0
    # without --json the summary says how it decoded: deferred, by itself
    assert main(["generate", "--run", str(run_dir), "--prompt", "the king", *flags]) == 0
    err = capsys.readouterr().err
    assert "decode=deferred, sampling=exit" in err and "--decode dense" not in err
    # the mixture with a head option still switches to dense, and says so
    assert main(["generate", "--run", str(run_dir), "--prompt", "the", "--top-k", "5",
                 "--max-new-tokens", "2"]) == 0
    assert "decoding with --decode dense" in capsys.readouterr().err
    for argv, message in [
        (["--router-temperature", "0.5"], 'router_temperature=0.5 applies to sampling="exit" only'),
        (["--sampling", "exit", "--router-temperature", "-1"], "router_temperature=-1.0"),
        (["--sampling", "exit", "--top-p", "0"], "top_p=0.0"),
    ]:
        assert main(["generate", "--run", str(run_dir), "--prompt", "the", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
