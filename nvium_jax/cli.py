"""`nvium` command line. A user's mistake ends in one `error:` line and exit status 2."""

from __future__ import annotations

import argparse
import sys

from nvium_jax.config import ConfigError, dump_config, load_config


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
    raise ConfigError(
        "training is not in this version yet (tracked as issue 11); "
        "`nvium train --config CFG --print-config` validates and prints a config"
    )


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
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
