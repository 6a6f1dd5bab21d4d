"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import textwrap

# DataConfig field -> the flag `add_data_args` gives it.
DATA_FLAGS = ("img_size", "resize", "channels", "val_fraction", "split_seed", "subset", "cache_dir", "workers",
              "folds", "fold", "repeat", "group_by", "dedup", "crop_pct", "interpolation", "mean", "std")


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


def flag(key: str) -> str:
    """Config field -> its command-line flag: batch_size -> --batch-size."""
    return "--" + key.rpartition(".")[2].replace("_", "-")


def flags_for(keys, prefix: str = "") -> dict:
    """{dotted config key: flag} for naming bad values as the user typed them."""
    return {f"{prefix}{k}": flag(k) for k in keys}


def add_data_args(p: argparse.ArgumentParser, *, folds: bool = True) -> None:
    """Options that map onto `imgarena.config.DataConfig` (folds=False: without --folds/--fold/--repeat,
    for a command that has cross-validation flags of its own)."""
    from imgarena.config import INTERPOLATIONS, RESIZE_MODES

    g = p.add_argument_group("data")
    g.add_argument("--img-size", type=int, default=None, help="resize images to this square size (default: their own size when uniform, else 224)")
    g.add_argument("--resize", choices=list(RESIZE_MODES), default=None,
                   help="squash to a square (default), crop (shorter side + centre crop) or pad (letterbox: longer side, padded)")
    g.add_argument("--crop-pct", type=float, default=None,
                   help="centre-crop fraction: images are stored at size / crop-pct and cropped (default: the pretrained weights', "
                        "else 1; 0.875 with --augment photo)")
    g.add_argument("--interpolation", choices=list(INTERPOLATIONS), default=None, help="resampling filter (default: the weights', else bilinear)")
    g.add_argument("--mean", default=None, metavar="M[,M,M]", help="normalisation mean per channel (default: the weights', else the images' own)")
    g.add_argument("--std", default=None, metavar="S[,S,S]", help="normalisation std per channel (set with --mean)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=None, help="force 1 or 3 channels (default: 1 when every image is grayscale)")
    g.add_argument("--val-fraction", type=float, default=None, help="validation share when the data has no val split (default 0.1)")
    g.add_argument("--split-seed", type=int, default=None, help="seed of the train/val split (default 0)")
    g.add_argument("--subset", type=int, default=None, help="use at most this many training images (stratified)")
    g.add_argument("--cache-dir", default=None, help="where decoded-image caches live (default ~/.cache/imgarena or $IMGARENA_CACHE)")
    g.add_argument("--workers", type=int, default=None, help="processes that decode images into the cache (default: all cores)")
    g.add_argument("--group-by", default=None, metavar="REGEX", help="images whose path (under the data folder) gives the same match -- the first (group), else the whole match -- stay on one side of every split, e.g. '^[^/]+/(obj\\d+)_'")
    g.add_argument("--no-dedup", dest="dedup", action="store_const", const=False, default=None, help="do not keep near-duplicate images (resized / re-encoded copies) on one side of the split")
    if folds:
        g.add_argument("--folds", type=int, default=None, help="K-fold cross-validation: K stratified, grouped folds of the train (+ val) images (default 1: one split)")
        g.add_argument("--fold", type=int, default=None, help="with --folds: the fold to validate on, 0..K-1 (default 0)")
        g.add_argument("--repeat", type=int, default=None, help="with --folds: which reshuffle of the folds (default 0)")


def data_config_from_args(source: str, args, base: dict | None = None, *, where: str | None = None):
    """DataConfig from CLI args layered over `base` (e.g. a YAML file's data section, from file
    `where`). A bad value is named by its flag (--img-size, DATA) or as data.KEY in FILE."""
    from imgarena.config import DataConfig, from_dict, mapping_of

    d = mapping_of(base, "data", where)
    given = {}
    if source is not None:
        d["source"] = str(source)
        given["data.source"] = "DATA"
    d.setdefault("source", "sample")
    for key in DATA_FLAGS:
        v = getattr(args, key, None)
        if v is not None:
            d[key] = v
            given[f"data.{key}"] = flag(key)
    return from_dict(DataConfig, d, where=where, flags=given, _prefix="data.")

