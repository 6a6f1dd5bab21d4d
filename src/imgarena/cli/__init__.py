"""`imgarena` command line: one module per subcommand, each exposing `register(subparsers)`.

A subcommand module's `register` adds its parser and sets `func=run`; `run(args) -> int` converts
the argparse namespace into a typed config once and calls library code. User mistakes raise
`UserError`, printed here as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from imgarena import __version__
from imgarena.errors import UserError

# Order is the order shown in --help. Only modules that define `register` appear.
COMMANDS = ("data", "models", "train", "eval", "compare", "bench", "predict", "explain", "export", "serve")


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
    """Run one command. Exit codes: 0 ok, 1 failed (or an internal error: a bug, traceback logged),
    2 user error (one line), 130 interrupted, 141 output pipe closed (`imgarena models | head`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_library_warnings()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
        return code
    except UserError as e:
        print(f"imgarena: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgarena: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except MemoryError:
        print("imgarena: error: out of memory: use a smaller --batch-size, --img-size or --subset "
              "(or fewer --workers)", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: say so, keep the traceback for the report
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
            print(f"imgarena: error: out of GPU memory ({str(e).splitlines()[0] if str(e) else 'CUDA'}): "
                  "use a smaller --batch-size or --img-size, or --amp bf16", file=sys.stderr)
            return 1
        log = _save_traceback(argv)
        first = (str(e).splitlines() or [""])[0][:300]
        where = f"the traceback is in {log}" if log else "rerun with PYTHONFAULTHANDLER=1 to see where"
        print(f"imgarena: internal error: {type(e).__name__}: {first} -- this is a bug; {where}", file=sys.stderr)
        return 1


def _show_library_warnings() -> None:
    """The library logs through `logging` (silent for API users who configure nothing else); the
    CLI shows its warnings as `imgarena: warning: ...` lines on stderr."""
    log = logging.getLogger("imgarena")
    if not any(getattr(h, "_imgarena_cli", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_LowerLevelFormatter("imgarena: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._imgarena_cli = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the message (tests swap it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record):
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return super().format(record)


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _save_traceback(argv) -> str | None:
    """Write the current exception's traceback under <cache>/logs/ (or the temp folder); its path."""
    import os
    import tempfile
    import time
    import traceback

    from imgarena.config import default_cache_dir

    text = (f"imgarena {__version__} internal error, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            f"argv: {sys.argv[:1] + list(argv if argv is not None else sys.argv[1:])}\n"
            f"python {sys.version.split()[0]} on {sys.platform}\n\n{traceback.format_exc()}")
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (os.path.join(default_cache_dir(), "logs"), tempfile.gettempdir()):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "w") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None
