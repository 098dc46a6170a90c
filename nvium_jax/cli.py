"""`nvium` command line. A user's mistake ends in one `error:` line and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys

from nvium_jax.config import ConfigError, InputError, dump_config, load_config
from nvium_jax.paths import data_location, local_path, run_location


def os_error_line(err: OSError) -> str:
    """`[Errno 28] No space left on device: 'x'` as one line that names the file and the fix."""
    import errno

    name = errno.errorcode.get(err.errno, "")
    where = f" writing {err.filename}" if err.filename else ""
    hint = {"ENOSPC": "free some space", "EROFS": "use a writable run.dir",
            "EACCES": "check the permissions", "EDQUOT": "free some quota"}.get(name, "")
    return (f"{err.strerror or err} ({name}){where}" + (f"; {hint} and run the same command to resume"
                                                          if hint else "")
            + "; every checkpoint saved before is intact")


def _set_simulated_devices(n: int) -> None:
    """CPU device count for `plan`; must run before jax is imported."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])


def _print_record(record: dict, as_json: bool) -> None:
    """One JSON object, or one aligned `key: value` line per field."""
    if as_json:
        print(json.dumps(record))
        return
    for key, value in record.items():
        print(f"{key:>24}: {value:,}" if isinstance(value, int) else f"{key:>24}: {value}")


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.print_config:
        from nvium_jax.model.count import param_count

        m = config.model
        print(
            f"# {args.config}: {param_count(m):,} parameters, {m.n_layers} layers, "
            f"exits after layers {list(m.exit_depths)}",
            file=sys.stderr,
        )
        print(dump_config(config), end="")
        return 0
    from nvium_jax.train.distributed import initialize_from_env

    initialize_from_env(os.environ)
    from nvium_jax.train.loop import NonFiniteLoss, train

    try:
        summary = train(config)
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        _print_record(summary, as_json=True)
    return 0


def _parse_mesh(text: str) -> list[str]:
    overrides = []
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("data", "fsdp", "tensor"):
            raise ConfigError(f"--mesh {text!r}: expected data=N,fsdp=N,tensor=N (e.g. data=2,fsdp=4,tensor=1)")
        overrides.append(f"mesh.{key.strip()}={value.strip()}")
    return overrides


def _plan(args: argparse.Namespace) -> int:
    config = load_config(args.config, [*args.overrides, *_parse_mesh(args.mesh or "")])
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    n_devices = args.devices if -1 in sizes else sizes[0] * sizes[1] * sizes[2]
    _set_simulated_devices(n_devices)
    import jax

    from nvium_jax.train.plan import plan

    accelerators = jax.devices()  # an accelerator host with exactly the mesh's devices plans on them
    on_accelerators = accelerators[0].platform != "cpu" and len(accelerators) == n_devices
    devices = accelerators if on_accelerators else jax.devices("cpu")[:n_devices]
    _print_record(plan(config, devices, decode_batch=args.decode_batch), args.json)
    return 0


def _bench(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from nvium_jax.train.bench import bench_train

    record = bench_train(config, steps=args.steps, name=" ".join([args.config, *args.overrides]))
    _print_record(record, args.json)
    return 0


def _decode_model(args: argparse.Namespace):
    """(model, decode config) from --run (its latest checkpoint) or --config (fresh weights)."""
    if (args.run is None) == (args.config is None):
        raise ConfigError("give exactly one of --run RUN_DIR or --config CFG.yaml")
    if args.run is not None:
        from nvium_jax.runs import load_run

        run = load_run(args.run)
        return run.model, run.config.decode
    config = load_config(args.config, args.overrides)
    from nvium_jax.model import build_model

    return build_model(config.model, seed=0), config.decode


def _bench_decode(args: argparse.Namespace) -> int:
    from nvium_jax.eval.decode_bench import bench_decode

    rates = None
    if args.exit_rates:
        try:
            rates = [float(x) for x in args.exit_rates.split(",")]
        except ValueError:
            raise ConfigError(f"--exit-rates {args.exit_rates!r}: give K comma-separated fractions, "
                              f"e.g. 0.35,0.25,0.15,0.25") from None
    model, decode = _decode_model(args)
    record = bench_decode(
        model, batch=args.batch, prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens, exit_rates=rates, repeats=args.repeats,
        window=decode.window if args.window is None else args.window, schedule=args.schedule,
        attention=decode.attention, **_sampler_args(args),
    )
    _print_record(record, args.json)
    return 0


def _sampler_args(args: argparse.Namespace) -> dict:
    """`generate`'s sampler arguments from --sampling, --temperature, --top-k, --top-p and
    --router-temperature (unset: 1, none, none, 1)."""
    return dict(sampling=args.sampling,
                temperature=1.0 if args.temperature is None else args.temperature,
                top_k=args.top_k, top_p=args.top_p,
                router_temperature=1.0 if args.router_temperature is None else args.router_temperature)


def _generate(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from nvium_jax.inference import DecodeOptions, generate
    from nvium_jax.inference.decode import non_exact_options
    from nvium_jax.runs import load_run

    non_exact = non_exact_options(args.temperature, args.top_k, args.top_p)
    decode = args.decode
    if decode is None:  # per-exit sampling decodes deferred with every option
        decode = "dense" if non_exact and args.sampling == "mixture" else "deferred"
        if decode == "dense":
            print(f"note: {', '.join(non_exact)} on the mixture needs every exit's head: decoding "
                  f"with --decode dense (--sampling exit applies it to the chosen exit and stays "
                  f"deferred)", file=sys.stderr)
    if args.prompts_file is not None:
        try:
            texts = [line.rstrip("\n") for line in open(args.prompts_file, encoding="utf-8")]
        except OSError as err:
            raise ConfigError(f"--prompts-file {args.prompts_file}: {err.strerror}") from None
        texts = [text for text in texts if text.strip()]
        if not texts:
            raise ConfigError(f"--prompts-file {args.prompts_file} has no prompts (one per line)")
    else:
        texts = [args.prompt]
    run = load_run(args.run)
    prefix = [] if run.bos_id is None else [run.bos_id]
    prompts = [prefix + run.tokenizer.encode(text).ids for text in texts]
    streamed = {"n": 0}

    def stream(tokens_BxN, lengths_B):
        n = int(lengths_B[0])
        text = run.tokenizer.decode(tokens_BxN[0, :n].tolist())
        print(text[streamed["n"]:], end="", flush=True)
        streamed["n"] = len(text)

    streaming = len(texts) == 1 and not args.json
    if streaming:
        print(texts[0], end="", flush=True)
    start = time.perf_counter()
    out = generate(
        run.model, prompts, args.max_new_tokens, seed=args.seed, decode=decode,
        window=run.config.decode.window, eos_id=run.eos_id, **_sampler_args(args),
        options=DecodeOptions(attention=run.config.decode.attention,
                              on_tokens=stream if streaming else None),
    )
    seconds = time.perf_counter() - start
    samples = []
    for b, text in enumerate(texts):
        n = int(out.lengths_B[b])
        tokens = out.tokens_BxN[b, :n].tolist()
        samples.append({"prompt": text, "text": run.tokenizer.decode(tokens), "tokens": tokens,
                        "exits": out.exits_BxN[b, :n].tolist()})
    tokens_per_s = float(np.sum(out.lengths_B)) / seconds
    if args.json:
        print(json.dumps({"samples": samples, "tokens_per_s": round(tokens_per_s, 2),
                          "flushes": out.flushes}))
        return 0
    if streaming:
        print()
    else:
        for sample in samples:
            print(f"{sample['prompt']}{sample['text']}\n")
    exits = out.exits_BxN[out.exits_BxN >= 0]
    mix = (", exits " + " ".join(f"{x:.2f}" for x in np.bincount(exits, minlength=run.model.config.n_exits)
                                 / exits.size)) if exits.size else ""
    print(f"[{int(out.lengths_B.sum())} tokens, {tokens_per_s:.1f} tokens/s incl. compile, "
          f"{out.flushes} flushes, decode={decode}, sampling={args.sampling}{mix}]", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    run_location(args.run, "--run")
    if args.tasks:
        return _eval_tasks(args)
    for flag in ("include_path", "limit", "exit", "sampling"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} goes with --tasks (lm-eval tasks)")
    if args.data is not None:
        data_location(args.data, "--data")
    from nvium_jax.eval.evaluate import eval_dir, evaluate_run
    from nvium_jax.run_store import open_run
    from nvium_jax.runs import load_run

    store = open_run(args.run, "--run", kind="read")  # a bucket: evaluated in its read mirror
    run = load_run(args.run, args.step)
    record = evaluate_run(run, store.mirror if store else args.run, data_dir=args.data,
                          batches=args.batches, batch_size=args.batch_size,
                          plots=not args.no_plots, progress=sys.stderr.isatty())
    if store is not None:  # eval.json and the plots go to the run dir in the bucket
        rel = eval_dir("", run.step).as_posix()
        store.push_tree(rel)
        if record.get("plots"):
            record["plots"] = [f"{store.url}/{rel}/{pathlib.Path(p).name}" for p in record["plots"]]
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"step {record['step']} · {record['tokens']:,} tokens · mixture ppl "
          f"{record['mixture_ppl']:.3f} · expected depth {record['expected_depth']:.2f} of "
          f"{record['n_layers']} layers")
    print(f"{'exit':>5} {'depth':>6} {'ppl':>10} {'mass':>7} {'agrees w/ final':>16}")
    for e in record["exits"]:
        print(f"{e['index']:>5} {e['depth']:>6} {e['ppl']:>10.3f} {e['mass']:>7.3f} "
              f"{e['agreement_with_final']:>16.3f}")
    if record.get("plots"):
        print(f"plots: {record['plots'][0].rsplit('/', 1)[0]}/")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    for flag in ("data", "batches"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag} is for held-out perplexity; lm-eval tasks bring their own data")
    try:
        from nvium_jax.eval.harness import run_tasks
    except ImportError as err:
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness ({err}); "
                          f"install it with pip install 'nvium_jax[eval]'") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_tasks(args.run, tasks, include_path=args.include_path, limit=limit,
                        exit=args.exit, step=args.step, batch_size=args.batch_size or 8,
                        sampling=args.sampling or "mixture")
    if args.json:
        keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
        print(json.dumps({k: results[k] for k in keep if k in results}, default=str))
    else:
        from lm_eval.utils import make_table

        print(make_table(results))
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.direction == "hf-import":
        local_path(args.src, "SRC_DIR")
    else:
        run_location(args.src, "RUN_DIR")
    run_location(args.out, "--out")
    from nvium_jax.interop.hf import hf_export, hf_import

    if args.direction == "hf-import":
        exits = None
        if args.exits is not None:
            try:
                exits = tuple(int(x) for x in args.exits.split(",") if x.strip())
            except ValueError:
                raise ConfigError(f"--exits {args.exits!r}: give comma-separated layer depths, e.g. 4,8,12") from None
        summary = hf_import(args.src, args.out, exits=exits, context=args.context,
                            command=[pathlib.Path(sys.argv[0]).name, *sys.argv[1:]])
        if not args.json:
            print(f"{args.out}: {summary['params']:,} parameters, {summary['n_layers']} layers, new "
                  f"exits after layers {summary['exits']} (inert until trained); fine-tune with "
                  f"nvium train --config {args.out}/config.yaml data.path=DIR", file=sys.stderr)
    else:
        summary = hf_export(args.src, args.out, dtype=args.dtype, step=args.step)
        if not args.json:
            dropped = summary["dropped_exits"]
            print(f"{args.out}: Llama folder of step {summary['step']} ({summary['dtype']}); "
                  + (f"the early exits after layers {dropped} are dropped (the final exit is the model)"
                     if dropped else "no early exits to drop"), file=sys.stderr)
    if args.json:
        _print_record(summary, as_json=True)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    data_location(args.out, "--out")
    from nvium_jax.data import prepare

    meta = prepare(args.input, args.out, tokenizer=args.tokenizer, field=args.field,
                   val_fraction=args.val_fraction, workers=args.workers, strict=args.strict,
                   progress=True)
    if args.json:
        _print_record(meta, as_json=True)
    else:
        skipped = sum(meta["skipped"].values())
        print(f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
              f"from {meta['documents']:,} documents, vocabulary {meta['vocab_size']:,}"
              + (f", {skipped:,} records skipped" if skipped else "")
              + (f", {meta['replaced_utf8']:,} invalid UTF-8 sequences replaced"
                 if meta["replaced_utf8"] else ""))
    return 0


def _add_sampler_flags(parser: argparse.ArgumentParser, note: str) -> None:
    parser.add_argument(
        "--sampling", choices=["mixture", "exit"], default="mixture",
        help="mixture: the exact learned distribution (temperature/top-k/top-p act on the whole "
             "mixture and need --decode dense); exit: the paper's decoder — route first (gate k "
             "exits when u < sigmoid(logit/R)), then sample the chosen exit with the head "
             f"transform; deferred with every option ({note})")
    parser.add_argument("--temperature", type=float, default=None,
                        help="head temperature, 0 = greedy (with --sampling mixture: dense only)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="keep the k likeliest tokens (with --sampling mixture: dense only)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus mass (with --sampling mixture: dense only)")
    parser.add_argument("--router-temperature", type=float, default=None, metavar="R",
                        help="--sampling exit only: 0 = exit where the exit logit wins, 1 = the "
                             "learned gate (default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvium",
        description="Pretrain and decode N-vium mixture-of-exits transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train from a config (resumes when the run dir has checkpoints)",
        description="Train from a YAML config; `section.key=value` arguments override it.",
    )
    train.add_argument("--config", required=True, help="a YAML config, e.g. configs/nvium-tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides such as train.lr=3e-4 or model.exits=[3,6,9]")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
    train.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    train.set_defaults(handler=_train)

    plan = commands.add_parser(
        "plan",
        help="compile the train step ahead of time for a mesh and report memory",
        description="Lower and compile the train step for a mesh (simulated CPU devices when "
                    "no accelerator matches; nothing is allocated) and print parameters, "
                    "optimizer bytes, per-device memory and the decode KV-cache size.",
    )
    plan.add_argument("--config", required=True)
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--mesh", help="mesh sizes, e.g. data=2,fsdp=4,tensor=1")
    plan.add_argument("--devices", type=int, default=8,
                      help="devices to simulate when a mesh axis is -1 (default 8)")
    plan.add_argument("--decode-batch", type=int, default=1)
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(handler=_plan)

    bench = commands.add_parser("bench", help="benchmarks (train, decode)")
    bench_kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND")
    bench_train = bench_kinds.add_parser(
        "train", help="N-vium vs its matched baseline: step time, tokens/s, MFU",
        description="Time train steps of the config's model and of its parameter-matched "
                    "baseline side by side (medians, compile excluded).",
    )
    bench_train.add_argument("--config", required=True)
    bench_train.add_argument("overrides", nargs="*", metavar="key=value")
    bench_train.add_argument("--steps", type=int, default=10)
    bench_train.add_argument("--json", action="store_true")
    bench_train.set_defaults(handler=_bench)
    bench_decode = bench_kinds.add_parser(
        "decode", help="deferred vs dense vs the matched baseline: tokens/s and the byte model",
        description="Decode the same random prompts with N-vium deferred, N-vium dense and the "
                    "parameter-matched baseline (fresh weights of the same size); print medians "
                    "of interleaved repeats of the decode loop (compile excluded; the prefill "
                    "timed apart as prefill_s), the speedups, the byte model's ideal speedup for "
                    "the measured exits and the efficiency.",
    )
    bench_decode.add_argument("--config", help="a YAML config (fresh weights)")
    bench_decode.add_argument("--run", help="a run dir (its latest checkpoint)")
    bench_decode.add_argument("overrides", nargs="*", metavar="key=value")
    bench_decode.add_argument("--batch", type=int, default=1)
    bench_decode.add_argument("--prompt-tokens", type=int, default=16,
                              help="random prompt tokens per row (default 16)")
    bench_decode.add_argument("--max-new-tokens", type=int, default=128)
    bench_decode.add_argument("--exit-rates", metavar="r1,..,rK",
                              help="force the fraction of tokens leaving at each exit through the "
                                   "router biases, e.g. 0.35,0.25,0.15,0.25")
    bench_decode.add_argument("--repeats", type=int, default=5)
    bench_decode.add_argument("--window", type=int, default=None, help="default: decode.window")
    bench_decode.add_argument("--schedule", choices=["advance", "lockstep", "wait", "wait+advance"],
                              default="advance", help="how a batch shares deep segments (README)")
    _add_sampler_flags(bench_decode, "all three paths use it (the baseline: the same head "
                                     "transform)")
    bench_decode.add_argument("--json", action="store_true")
    bench_decode.set_defaults(handler=_bench_decode)

    gen = commands.add_parser(
        "generate", help="sample text from a run (exact deferred decoding by default)",
        description="Sample continuations of prompts from a run's latest checkpoint. Without "
                    "--json a single prompt's text is streamed as it is produced.",
    )
    gen.add_argument("--run", required=True, metavar="RUN_DIR")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts-file", metavar="F", help="one prompt per line, decoded as a batch")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--decode", choices=["deferred", "dense"], default=None,
                     help="default deferred; dense when the mixture gets a non-exact sampler")
    _add_sampler_flags(gen, "default mixture")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(handler=_generate)

    ev = commands.add_parser(
        "eval", help="evaluate a checkpoint: perplexity per exit, routing, plots; lm-eval tasks",
        description="Held-out perplexity of the mixture and of each exit, routing mass per exit "
                    "(overall, by position, by token frequency), each exit's top-1 agreement "
                    "with the final exit, and PNG plots in RUN_DIR/eval/step_<N>/. With --tasks, "
                    "lm-evaluation-harness tasks instead.",
    )
    ev.add_argument("--run", required=True, metavar="RUN_DIR")
    ev.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the latest)")
    ev.add_argument("--data", metavar="DIR", default=None,
                    help="a prepared data dir with the run's tokenizer (default: the run's own)")
    ev.add_argument("--batches", type=int, default=None,
                    help="held-out batches (default train.eval_batches: the trainer's own windows)")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="windows per batch (default the training micro-batch); lm-eval: requests per batch")
    ev.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ev.add_argument("--tasks", default=None, metavar="T1,T2",
                    help="lm-eval task names, e.g. hellaswag,arc_easy,lambada_openai")
    ev.add_argument("--include-path", default=None, metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    ev.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (testing)")
    ev.add_argument("--exit", type=int, default=None,
                    help="lm-eval: score with exit K alone (0-based) instead of the mixture")
    ev.add_argument("--sampling", choices=["mixture", "exit"], default=None,
                    help="lm-eval generation: mixture (default; greedy tasks decode densely) or "
                         "exit (route first, then the chosen exit: greedy tasks decode deferred)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(handler=_eval)

    conv = commands.add_parser(
        "convert", help="Hugging Face Llama interop: hf-import (upcycle into N-vium), hf-export",
        description="hf-import SRC_DIR --out RUN_DIR: a Llama folder (config.json, safetensors) "
                    "becomes an N-vium run whose new exits start inert. hf-export RUN_DIR --out "
                    "DIR: a run's backbone and final exit as a Llama folder (early exits dropped).",
    )
    conv.add_argument("direction", choices=["hf-import", "hf-export"])
    conv.add_argument("src", metavar="SRC_DIR|RUN_DIR")
    conv.add_argument("--out", required=True, metavar="DIR",
                      help="a new (or empty) directory, or an s3:// or gs:// prefix")
    conv.add_argument("--exits", default=None, metavar="d1,d2,..",
                      help="hf-import: layers after which exits sit (default L/4, L/2, 3L/4)")
    conv.add_argument("--context", type=int, default=None,
                      help="hf-import: model.context (default max_position_embeddings)")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="hf-export: tensor dtype")
    conv.add_argument("--step", type=int, default=None, help="hf-export: a checkpoint step (default latest)")
    conv.add_argument("--json", action="store_true")
    conv.set_defaults(handler=_convert)

    prep = commands.add_parser(
        "prepare", help="tokenize text into a data dir (tensorstore token arrays)",
        description="Tokenize plain text, JSON lines (.jsonl/.json, optionally .gz) or parquet into "
                    "DIR/{train,val} token arrays, DIR/tokenizer.json and DIR/meta.json. A re-run "
                    "on the same inputs and tokenizer does nothing.",
    )
    prep.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                      help="input files or quoted globs, e.g. 'data/*.jsonl'")
    prep.add_argument("--out", required=True, metavar="DIR", help="the data dir to write")
    prep.add_argument("--tokenizer", default="bpe:8192", metavar="PATH|bpe:VOCAB",
                      help="a tokenizer.json, or bpe:VOCAB to train a byte-level BPE (default bpe:8192)")
    prep.add_argument("--field", default="text", help="JSON field / parquet column (default text)")
    prep.add_argument("--val-fraction", type=float, default=0.005,
                      help="share of tokens held out for validation (default 0.005)")
    prep.add_argument("--workers", type=int, default=None,
                      help="tokenization processes (default: one per CPU core)")
    prep.add_argument("--strict", action="store_true",
                      help="fail on a bad JSON line instead of skipping and counting it")
    prep.add_argument("--json", action="store_true", help="print meta.json as one JSON object")
    prep.set_defaults(handler=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # gcsfs logs a request that ran out of retries (an unreachable endpoint) at ERROR with its
    # traceback; the command's own error line names the URL and what to check
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    if args.command in ("generate", "eval", "bench"):  # the commands that compile to decode or score
        from nvium_jax.compile_cache import enable_compile_cache

        enable_compile_cache()
    try:
        return args.handler(args)
    except InputError as err:  # a user's mistake: one line, no traceback; a bug keeps its traceback
        message = str(err)
        while message.startswith("error: "):
            message = message[len("error: "):]
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's: a full or read-only disk, a file gone — one line
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
