"""`imgarena data inspect PATH` and `imgarena data get NAME --out DIR`."""

from __future__ import annotations

import os

from imgarena.cli.common import add_command
from imgarena.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect a dataset or write a built-in one as an image folder",
                       description="Inspect a dataset or write a built-in one as an image folder.")
    p.set_defaults(func=lambda args: _usage(p))
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    ins = add_command(
        dsub, "inspect", "classes, counts per split, sizes and modes, unreadable files, imbalance and leak warnings",
        """
        imgarena data inspect ./photos            # DATA/<class>/… or DATA/train|val|test/<class>/…
        imgarena data inspect labels.csv          # CSV of path,label (paths relative to the CSV)
        imgarena data inspect sample              # the built-in sample
        """, run_inspect)
    ins.add_argument("path", help="image folder, CSV file, or built-in name (sample, fashion-mnist, cifar10)")
    ins.add_argument("--workers", type=int, default=0, help="processes that check images (default: all cores)")
    get = add_command(
        dsub, "get", "write a built-in dataset as a folder of PNGs (OUT/train|test/<class>/*.png)",
        """
        imgarena data get sample --out ./sample-data
        imgarena data get fashion-mnist --out ./fmnist && imgarena data inspect ./fmnist
        """, run_get)
    get.add_argument("name", help="sample, fashion-mnist or cifar10")
    get.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    get.add_argument("--workers", type=int, default=0, help="processes that write PNGs (default: all cores)")


def _usage(parser) -> int:
    parser.print_help()  # `imgarena data` without an action
    return 2


def run_inspect(args) -> int:
    from imgarena.data.inspect import format_report, inspect_source

    if args.workers < 0:
        raise UserError(f"--workers must be >= 0 (0: all cores), got {args.workers}")
    print(format_report(inspect_source(args.path, workers=args.workers)))
    return 0


def run_get(args) -> int:
    from imgarena.config import default_cache_dir
    from imgarena.data.builtin import BUILTINS, load_builtin, write_image_folder
    from imgarena.errors import closest_matches

    if args.name not in BUILTINS:
        hint = closest_matches(args.name, BUILTINS)
        raise UserError(f"unknown built-in dataset {args.name!r}: choose one of {', '.join(BUILTINS)}"
                        + (f" (did you mean {hint[0]}?)" if hint else ""))
    from imgarena.paths import ensure_writable_dir

    out = os.path.abspath(os.path.expanduser(args.out))
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--out {out} already exists and is not empty: pass a new or empty folder")
    parent = os.path.dirname(out)
    if not os.path.lexists(parent):
        raise UserError(f"--out {out}: its parent folder {parent} does not exist: create it first or pick another path")
    ensure_writable_dir(out, "--out")  # a file in the way, read-only, full, ... -> one line
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0 (0: all cores), got {args.workers}")
    cache = default_cache_dir()
    ensure_writable_dir(cache, "the cache folder ($IMGARENA_CACHE)")
    counts = write_image_folder(load_builtin(args.name, cache), out, workers=args.workers)
    print(f"wrote {args.name} to {out}: " + ", ".join(f"{s} {n}" for s, n in counts.items())
          + f" PNGs (try: imgarena data inspect {args.out})")
    return 0
