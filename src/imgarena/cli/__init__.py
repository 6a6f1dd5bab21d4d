"""`imgarena` command line: one module per subcommand, each exposing `register(subparsers)`.

A subcommand module's `register` adds its parser and sets `func=run`; `run(args) -> int` converts
the argparse namespace into a typed config once and calls library code. User mistakes raise
`UserError`, printed here as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from imgarena import __version__
from imgarena.errors import UserError

# Order is the order shown in --help. Only modules that define `register` appear.
COMMANDS = ("data", "models", "train", "eval", "compare", "bench", "predict", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgarena",
        description="Train image classifiers on your own images, compare architectures, put the winner to work.",
        epilog="Run `imgarena COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"imgarena {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"imgarena.cli.{name}")
        if hasattr(mod, "register"):
            mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"imgarena: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgarena: interrupted", file=sys.stderr)
        return 130
