"""`imgarena data inspect`: what is in a dataset and what is wrong with it, before training on it."""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from imgarena.data.builtin import BUILTINS, load_builtin
from imgarena.data.csvsource import read_csv
from imgarena.data.images import DECODE_ERRORS, BadImage, load_image, open_image
from imgarena.data.parallel import map_chunks
from imgarena.data.scan import Listing, scan_folder
from imgarena.errors import UserError

IMBALANCE_RATIO = 3.0  # warn when the largest class has this many times the images of the smallest
TINY_CLASS = 10  # warn when a class has fewer training images than this


@dataclass
class Report:
    source: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> count (usable images)
    sizes: Counter = field(default_factory=Counter)  # "WxH" -> images
    modes: Counter = field(default_factory=Counter)  # Pillow mode -> images
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of identical files across splits
    near_duplicates: list[list[str]] = field(default_factory=list)  # resized / re-encoded copies, largest first
    near_duplicates_across: list[list[str]] = field(default_factory=list)  # of those, the groups spanning the data's own train/val/test parts
    featureless: int = 0  # near-blank images, not checked for near-duplicates
    warnings: list[str] = field(default_factory=list)
    ignored: int = 0


def _check_file(path: str):
    """(sha1 of bytes, 'WxH', mode) or the reason the file is unusable."""
    try:
        with open_image(path) as img:  # empty / non-image / bomb checks
            size, mode = f"{img.size[0]}x{img.size[1]}", img.mode
        with open(path, "rb") as f:
            data = f.read()
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img.load()  # catches truncated and corrupt files
        return hashlib.sha1(data).hexdigest(), size, mode
    except BadImage as e:
        return str(e)
    except DECODE_ERRORS:  # report exactly what load_image would say about this file
        try:
            load_image(path, channels=3, img_size=8)
        except BadImage as e:
            return str(e)
        return "unreadable"


def _check_chunk(start, paths):
    return [_check_file(p) for p in paths]


def _layout(listing: Listing, kind: str) -> str:
    if kind == "csv":
        return "CSV of path,label" + (" with a split column" if "all" not in listing.splits else "")
    if "all" in listing.splits:
        return "DATA/<class>/ folders (a stratified, seeded val split is made at training time)"
    return "DATA/" + " + ".join(f"{s}/" for s in listing.splits) + " class folders"


def _from_listing(listing: Listing, source: str, kind: str, workers: int, progress: bool) -> Report:
    rows = [(split, p, lab) for split, lst in listing.splits.items() for p, lab in lst]
    results = []
    for part in map_chunks(_check_chunk, [p for _, p, _ in rows], workers=workers, progress=progress,
                           desc="checking images"):
        results += part
    counts = {s: Counter() for s in listing.splits}
    rep = Report(source, _layout(listing, kind), listing.classes, {}, warnings=list(listing.warnings),
                 ignored=listing.ignored)
    by_hash: dict[str, list[tuple[str, str]]] = {}
    for (split, path, lab), res in zip(rows, results):
        if isinstance(res, str):
            rep.bad_files.append((path, res))
            continue
        digest, size, mode = res
        counts[split][listing.classes[lab]] += 1
        rep.sizes[size] += 1
        rep.modes[mode] += 1
        by_hash.setdefault(digest, []).append((split, path))
    rep.counts = {s: {c: counts[s][c] for c in listing.classes} for s in counts}
    for group in by_hash.values():
        # Identical files in different splits leak; in an unsplit folder any copy may land in both.
        if len(group) > 1 and (len({s for s, _ in group}) > 1 or group[0][0] == "all"):
            rep.duplicates.append([p for _, p in group])
    return rep


def _from_builtin(name: str, cache_dir: str) -> Report:
    b = load_builtin(name, cache_dir)
    rep = Report(name, "built-in (train + test parts; val is split from train at training time)", b.classes, {})
    by_hash: dict[bytes, set] = {}
    for split, (x, y) in b.parts.items():
        rep.counts[split] = {c: int((y == i).sum()) for i, c in enumerate(b.classes)}
        rep.sizes[f"{x.shape[3]}x{x.shape[2]}"] += len(y)
        rep.modes["L" if x.shape[1] == 1 else "RGB"] += len(y)
        for i in range(len(y)):
            by_hash.setdefault(hashlib.sha1(x[i].tobytes()).digest(), set()).add((split, i))
    rep.duplicates = [[f"{name}/{s}/{i}" for s, i in sorted(g)] for g in by_hash.values()
                      if len({s for s, _ in g}) > 1]
    return rep


def _add_near_duplicates(rep: Report, source: str, cache_dir: str | None, workers: int, progress: bool) -> None:
    """Near-duplicate groups over the decoded cache (the one training with default settings uses),
    with the same detector every split uses."""
    from imgarena.config import DataConfig, default_cache_dir
    from imgarena.data import dedup
    from imgarena.data.prepare import _load

    data = _load(DataConfig(source=source, cache_dir=cache_dir or default_cache_dir(), workers=workers),
                 progress=progress, min_classes=1)
    pool = data.pool
    if pool.groups is None:
        return
    part = np.zeros(len(pool.ids), np.int64)
    for k, rows in enumerate(pool.parts.values()):
        part[rows] = k
    groups = dedup.groups_of(pool.groups)
    rep.near_duplicates = [[pool.ids[i] for i in g] for g in groups]
    rep.near_duplicates_across = [[pool.ids[i] for i in g] for g in groups if len(np.unique(part[g])) > 1]
    rep.featureless = dedup.stored_featureless(pool.entry.path) or 0


def _add_warnings(rep: Report) -> None:
    train = rep.counts.get("train", rep.counts.get("all", {}))
    nonzero = {c: n for c, n in train.items() if n}
    if nonzero:
        big, small = max(nonzero, key=nonzero.get), min(nonzero, key=nonzero.get)
        if nonzero[big] >= IMBALANCE_RATIO * nonzero[small]:
            rep.warnings.append(f"class imbalance: {big!r} has {nonzero[big]} training images, {small!r} only "
                                f"{nonzero[small]} (consider class_weights: auto or collecting more)")
    tiny = [f"{c} ({n})" for c, n in train.items() if n < TINY_CLASS]
    if tiny:
        rep.warnings.append(f"tiny classes (< {TINY_CLASS} training images): {', '.join(tiny)}")
    if rep.duplicates:
        ex = " == ".join(rep.duplicates[0][:2])
        rep.warnings.append(f"{len(rep.duplicates)} group(s) of identical files across splits would leak between "
                            f"train and val/test, e.g. {ex}")
    if rep.near_duplicates_across:
        rep.warnings.append(f"{len(rep.near_duplicates_across)} group(s) of near-duplicate images span the data's own "
                            "train/val/test parts (a leak no split can undo: scores on val/test are inflated by "
                            "them), e.g. " + " ~ ".join(rep.near_duplicates_across[0][:2]))
    if rep.bad_files:
        rep.warnings.append(f"{len(rep.bad_files)} unreadable file(s) will be skipped (listed above)")


def inspect_source(source: str, *, cache_dir: str | None = None, workers: int = 0, progress: bool = True) -> Report:
    from imgarena.config import default_cache_dir

    src = str(source)
    if src in BUILTINS:
        rep = _from_builtin(src, cache_dir or default_cache_dir())
    elif src.lower().endswith(".csv"):
        rep = _from_listing(read_csv(src), src, "csv", workers, progress)
    elif os.path.isfile(os.path.expanduser(src)):
        raise UserError(f"{src} is a file: pass a folder of class subfolders, a .csv of path,label, or a built-in name")
    else:
        rep = _from_listing(scan_folder(src), src, "folder", workers, progress)
    if any(rep.counts[s] and sum(rep.counts[s].values()) for s in rep.counts):
        _add_near_duplicates(rep, src, cache_dir, workers, progress)
    _add_warnings(rep)
    return rep


def _top(counter: Counter, n: int = 6) -> str:
    items = [f"{k} ({v})" for k, v in counter.most_common(n)]
    if len(counter) > n:
        items.append(f"… {len(counter) - n} more")
    return ", ".join(items) or "none"


def format_report(rep: Report, max_listed: int = 20) -> str:
    splits = list(rep.counts)
    lines = [f"source:  {rep.source}", f"layout:  {rep.layout}", f"classes: {len(rep.classes)}", ""]
    width = max([len(c) for c in rep.classes] + [5])
    lines.append(f"  {'class':<{width}} " + " ".join(f"{s:>7}" for s in splits))
    for c in rep.classes:
        lines.append(f"  {c:<{width}} " + " ".join(f"{rep.counts[s].get(c, 0):>7}" for s in splits))
    lines.append(f"  {'total':<{width}} " + " ".join(f"{sum(rep.counts[s].values()):>7}" for s in splits))
    lines += ["", f"sizes:   {_top(rep.sizes)}", f"modes:   {_top(rep.modes)}"]
    if rep.ignored:
        lines.append(f"ignored: {rep.ignored} non-image file(s)")
    if rep.bad_files:
        lines += ["", f"unreadable files ({len(rep.bad_files)}):"]
        lines += [f"  {p}: {r}" for p, r in rep.bad_files[:max_listed]]
        if len(rep.bad_files) > max_listed:
            lines.append(f"  … {len(rep.bad_files) - max_listed} more")
    if rep.near_duplicates:
        n_img = sum(len(g) for g in rep.near_duplicates)
        lines += ["", (f"near-duplicates: {len(rep.near_duplicates)} group(s), {n_img} images (resized / re-encoded "
                       "copies; every split keeps a group on one side)")]
        lines += [f"  {' ~ '.join(g[:4])}" + (f" (+{len(g) - 4} more)" if len(g) > 4 else "")
                  for g in rep.near_duplicates[:5]]
        if len(rep.near_duplicates) > 5:
            lines.append(f"  … {len(rep.near_duplicates) - 5} more groups")
    if rep.featureless:
        lines.append(f"featureless: {rep.featureless} near-blank image(s), not checked for near-duplicates")
    if rep.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in rep.warnings]
    else:
        lines += ["", "no problems found"]
    return "\n".join(lines)
