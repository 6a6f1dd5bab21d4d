"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import textwrap


def add_command(sub, name: str, help: str, examples: str, func) -> argparse.ArgumentParser:
    """Add a subcommand whose --help ends with an Examples section."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Options that map onto `imgarena.config.DataConfig`."""
    g = p.add_argument_group("data")
    g.add_argument("--img-size", type=int, default=None, help="resize images to this square size (default: their own size when uniform, else 224)")
    g.add_argument("--resize", choices=["squash", "crop"], default=None, help="squash to a square (default) or shorter-side resize + centre crop")
    g.add_argument("--channels", type=int, choices=[1, 3], default=None, help="force 1 or 3 channels (default: 1 when every image is grayscale)")
    g.add_argument("--val-fraction", type=float, default=None, help="validation share when the data has no val split (default 0.1)")
    g.add_argument("--split-seed", type=int, default=None, help="seed of the train/val split (default 0)")
    g.add_argument("--subset", type=int, default=None, help="use at most this many training images (stratified)")
    g.add_argument("--cache-dir", default=None, help="where decoded-image caches live (default ~/.cache/imgarena or $IMGARENA_CACHE)")
    g.add_argument("--workers", type=int, default=None, help="processes that decode images into the cache (default: all cores)")


def data_config_from_args(source: str, args, base: dict | None = None):
    """DataConfig from CLI args layered over `base` (e.g. a YAML file's data section)."""
    from imgarena.config import DataConfig, from_dict

    d = dict(base or {})
    d["source"] = source if source is not None else d.get("source", "sample")
    for key in ("img_size", "resize", "channels", "val_fraction", "split_seed", "subset", "cache_dir", "workers"):
        v = getattr(args, key, None)
        if v is not None:
            d[key] = v
    return from_dict(DataConfig, d, where="data")
