"""`load_data(cfg)`: any source (folder, CSV, built-in) -> decoded, cached, split, ready to batch."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from imgarena.config import DataConfig, validate
from imgarena.data import cache
from imgarena.data.builtin import BUILTINS, Builtin, load_builtin
from imgarena.data.csvsource import read_csv
from imgarena.data.images import decode_settings, prepare_pil, store_size
from imgarena.data.parallel import progress_enabled
from imgarena.data.scan import Listing, scan_folder
from imgarena.data.split import group_stratified_folds, group_stratified_split, stratified_subset
from imgarena.errors import UserError

DEFAULT_IMG_SIZE = 224
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, C, S, S) at the store size: a read-only cache.RowView of the cache's rows (or any array)
    labels: np.ndarray  # int64 (N,)
    paths: list[str]  # file paths, or ids like "fashion-mnist/train/123" for built-ins

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class PreparedData:
    source: str
    classes: list[str]
    channels: int
    img_size: int
    resize: str
    train: Split
    val: Split
    test: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    split_record: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cache_path: str = ""
    pool: Pool | None = field(default=None, repr=False, compare=False)  # for re-splitting without the cache
    # Images are stored at store_size = floor(img_size / crop_pct); the model's (eval) input is their
    # centre img_size crop (BatchLoader(out_size=img_size)), the photo preset crops them at random.
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def store_size(self) -> int:
        """The side of Split.images (== img_size when crop_pct is 1)."""
        return store_size(self.img_size, self.crop_pct)

    @property
    def preprocessing(self) -> dict:
        """What inference needs to reproduce training inputs (stored in checkpoints)."""
        return {"img_size": self.img_size, "channels": self.channels, "resize": self.resize,
                "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}


def _warn(msg: str) -> None:
    print(f"imgarena: warning: {msg}", file=sys.stderr)


def _facts(infos: list) -> dict:
    """What automatic settings depend on, from (width, height, gray) per file (None = unreadable)."""
    good = [i for i in infos if i is not None]
    sizes = {(w, h) for w, h, _ in good}
    return {"size": list(sizes.pop()) if len(sizes) == 1 else None, "gray": bool(good) and all(g for *_, g in good)}


def _resolve_auto(cfg: DataConfig, facts: dict) -> tuple[int, int]:
    """img_size: the images' own size when they all share one square size, else 224;
    channels: 1 when every image is grayscale, else 3. Explicit settings win."""
    size = facts["size"]
    img_size = cfg.img_size or (min(max(size[0], 8), 4096) if size and size[0] == size[1] else DEFAULT_IMG_SIZE)
    channels = cfg.channels or (1 if facts["gray"] else 3)
    return img_size, channels


PROBE_SAMPLE = 64  # headers read to guess automatic settings before the (single) decode pass


def _guess_facts(paths: list[str]) -> dict:
    """Facts guessed from the headers of an even sample of files; the decode pass then records the
    real facts of every file, and a wrong guess is rebuilt (rare)."""
    from imgarena.data.images import BadImage, probe

    infos = []
    for i in np.unique(np.linspace(0, len(paths) - 1, min(PROBE_SAMPLE, len(paths))).astype(int)):
        try:
            w, h, _, gray = probe(paths[i])
            infos.append((w, h, gray))
        except BadImage:
            pass
    return _facts(infos)


def _relative(path: str, root: str) -> str:
    prefix = root.rstrip(os.sep) + os.sep
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)  # relpath is slow


def _files_data(listing: Listing, cfg: DataConfig, *, progress: bool, kind: str) -> PreparedData:
    # Every file once, in listing order (the source's own parts one after another): the cache
    # depends on the files and decode settings only, never on a split, fold or subset.
    # An unsplit source's one part is its training pool, the same as a lone train/ folder.
    parts = {("train" if name == "all" else name): len(rows) for name, rows in listing.splits.items()}
    rows = [r for rows in listing.splits.values() for r in rows]
    paths = [p for p, _ in rows]
    labels = np.array([lab for _, lab in rows], np.int64)
    rel = [_relative(p, listing.root) for p in paths]
    crop_pct, interpolation = _crop_pct(cfg), _interpolation(cfg)
    base = {"kind": kind, "files": rel, "stats": cache.file_stats(paths), "resize": cfg.resize,
            "interpolation": interpolation, "parts": list(parts.items()), "root": listing.root}
    auto = cfg.img_size is None or cfg.channels is None
    # With automatic size/channels, a small alias file remembers what they resolved to, so an
    # unchanged dataset is found again without reading any image.
    auto_key = cache.make_key({**base, "img_size": cfg.img_size, "channels": cfg.channels})
    resolved = cache.read_alias(cfg.cache_dir, auto_key) if auto else (cfg.img_size, cfg.channels)

    def get(settings):
        # settings: the training (img_size, channels); the pixels are stored at the store size, so
        # the key holds that size (what the pixels are), not img_size and crop_pct apart.
        stored = store_size(settings[0], crop_pct)
        key = cache.make_key({**base, "img_size": stored, "channels": settings[1]})
        entry = cache.lookup(cfg.cache_dir, key)
        if entry is None:
            fill = cache.FileFill(paths, img_size=stored, channels=settings[1], resize=cfg.resize,
                                  interpolation=interpolation, workers=cfg.workers, progress=progress)
            entry = cache.build(cfg.cache_dir, key, n=len(rows), channels=settings[1], img_size=stored,
                                sections=parts, fill=fill, meta={"source": cfg.source},
                                stats_section=_stats_part(parts), extra=lambda: {"facts": _facts(fill.infos)})
        return entry

    settings = resolved or _resolve_auto(cfg, _guess_facts(paths))
    entry = get(settings)
    if auto:
        # The cache records every decoded file's real size and mode (broken files excluded): if the
        # guess was wrong, build again with the right settings.
        actual = _resolve_auto(cfg, entry.meta["facts"])
        if actual != tuple(settings):
            stale, entry = entry.path, get(actual)
            cache.remove(stale)
            settings = actual
        cache.write_alias(cfg.cache_dir, auto_key, settings)
    return _prepare(entry, cfg, listing.classes, parts, paths, labels, rel, listing.root, kind, listing.warnings,
                    img_size=int(settings[0]))


def _crop_pct(cfg: DataConfig) -> float:
    return 1.0 if cfg.crop_pct is None else float(cfg.crop_pct)


def _interpolation(cfg: DataConfig) -> str:
    return cfg.interpolation or "bilinear"


def with_preprocessing(cfg: DataConfig, preprocessing: dict) -> DataConfig:
    """`cfg` with a checkpoint's preprocessing: decoded the same way (size, channels, resize, crop_pct,
    interpolation; keys an older checkpoint lacks get the values it was made with) and normalised
    with its mean/std, so `load_data` gives the images the model was evaluated on."""
    d = decode_settings(preprocessing)
    return dataclasses.replace(cfg, img_size=d["img_size"], channels=d["channels"], resize=d["resize"],
                               crop_pct=d["crop_pct"], interpolation=d["interpolation"],
                               mean=[float(v) for v in preprocessing["mean"]],
                               std=[float(v) for v in preprocessing["std"]])


def _stats_part(parts) -> str:
    """Normalisation statistics come from the images training draws from: the source's train part
    (all of it for an unsplit folder), the same for every split seed, fold and subset."""
    return "train" if "train" in parts else next(iter(parts))


@dataclass
class Pool:
    """Every listed file of a source, decoded once, and what splitting it needs; splits, folds and
    subsets are index records made from this (`split_pool`), so they never touch the cache again."""

    cfg: DataConfig
    entry: cache.CacheEntry
    classes: list[str]
    parts: dict[str, np.ndarray]  # the source's own part (train/val/test/all) -> its rows (ascending)
    labels: np.ndarray  # int64 per row
    paths: list[str]  # per row
    ids: list[str]  # per row: the path relative to the root, or "fashion-mnist/train/123" for built-ins
    cache_row: np.ndarray  # per row: its row in the cache, -1 for unreadable files
    root: str
    kind: str
    bad_files: list[tuple[str, str]]
    groups: np.ndarray | None = None  # per row: group label (near-duplicates and group_by), None without groups
    group_counts: dict = field(default_factory=dict)  # multi-member groups found by each source of groups
    img_size: int = 0  # the training size (the cache holds the images at store_size(img_size, crop_pct))


def _chain_pairs(labels: np.ndarray) -> np.ndarray:
    """Edges joining consecutive members of each label: their components are the label's groups."""
    order = np.argsort(labels, kind="stable")
    same = labels[order[1:]] == labels[order[:-1]]
    return np.stack([order[:-1][same], order[1:][same]], 1)


def _find_groups(pool: Pool, cfg: DataConfig) -> None:
    """Set pool.groups: near-duplicates (cfg.dedup) joined with cfg.group_by's path groups."""
    from imgarena.data import dedup

    n = len(pool.labels)
    edges, counts = [], {}
    if cfg.dedup and len(pool.entry.images):
        per_cache = dedup.entry_labels(pool.entry.path, pool.entry.images)
        good = pool.cache_row >= 0
        lab = np.arange(n, dtype=np.int64) + (int(per_cache.max()) + 1)  # unreadable files: alone
        lab[good] = per_cache[pool.cache_row[good]]
        edges.append(_chain_pairs(lab))
        counts["near_duplicates"] = len(dedup.groups_of(lab))
    if cfg.group_by:
        rx = re.compile(cfg.group_by)
        keys: dict[str, int] = {}
        lab = np.arange(n, dtype=np.int64) + n  # no match: a group of its own
        matched = 0
        for i, rid in enumerate(pool.ids):
            m = rx.search(rid.replace(os.sep, "/"))
            if m:
                lab[i] = keys.setdefault(m.group(1) if m.groups() and m.group(1) is not None else m.group(0), len(keys))
                matched += 1
        edges.append(_chain_pairs(lab))
        counts["group_by"] = len(dedup.groups_of(lab))
        counts["group_by_matched"] = matched
    pool.group_counts = counts
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    pool.groups = dedup._components(n, pairs.astype(np.int64)) if len(pairs) else None


def _leak_warnings(pool: Pool, cfg: DataConfig) -> list[str]:
    """Groups that span parts the split keeps as they are (the source's own val or test): a leak
    no split can undo, so it is reported."""
    if pool.groups is None:
        return []
    side = np.zeros(len(pool.labels), np.int64)
    names = {0: "train"}
    fixed = ["test"] if (cfg.folds > 1 or "val" not in pool.parts) else ["val", "test"]
    for k, name in enumerate(fixed, 1):
        if name in pool.parts:
            side[pool.parts[name]] = k
            names[k] = name
    if len(names) < 2:
        return []
    from imgarena.data.dedup import groups_of

    span = [g for g in groups_of(pool.groups) if len(np.unique(side[g])) > 1]
    if not span:
        return []
    kinds = "near-duplicate" + (" or --group-by" if cfg.group_by else "")
    sides = sorted({names[int(s)] for g in span for s in np.unique(side[g])}, key=list(names.values()).index)
    first = span[0]
    ex = " ~ ".join(pool.ids[first[np.flatnonzero(side[first] == v)[0]]] for v in np.unique(side[first])[:2])
    return [f"{len(span)} group(s) of {kinds} images span the source's own {' and '.join(sides)} parts (e.g. {ex}): "
            f"scores on {'/'.join(s for s in sides if s != 'train')} are inflated by them; move or remove the copies "
            "(`imgarena data inspect` lists them)"]


def _plan(pool: Pool, cfg: DataConfig) -> tuple[dict[str, np.ndarray], dict]:
    """{"train"/"val"/"test": rows (ascending)} and what the record says about how they were made.

    Without folds: the source's own val part when it has one, else a stratified, seeded, grouped
    val split of its train (or only) part; `subset` then thins the training part, stratified.
    With folds: the train and val parts (or the only part) are pooled, thinned by `subset`, and
    cut into `folds` stratified, grouped folds (reshuffled per repeat); fold `fold` is val."""
    parts, labels, seed = pool.parts, pool.labels, int(cfg.split_seed)
    groups = pool.groups
    info: dict = {}
    if cfg.folds > 1:
        base = np.sort(np.concatenate([parts[p] for p in ("train", "val", "all") if p in parts]))
        base = base[pool.cache_row[base] >= 0]  # unreadable files take no place in a fold
        if cfg.subset is not None and cfg.subset < len(base):
            base = base[stratified_subset(labels[base], int(cfg.subset), seed)]
        fold_of = group_stratified_folds(labels[base], None if groups is None else groups[base], int(cfg.folds),
                                         seed, int(cfg.repeat))
        train, val = base[fold_of != cfg.fold], base[fold_of == cfg.fold]
        info = {"pool": [p for p in ("train", "val", "all") if p in parts], "fold_sizes": np.bincount(
            fold_of, minlength=int(cfg.folds)).tolist()}
    else:
        if "val" in parts:
            train, val = parts["train"], parts["val"]
        else:
            base = parts["train"] if "train" in parts else parts["all"]
            tr, va = group_stratified_split(labels[base], None if groups is None else groups[base],
                                            float(cfg.val_fraction), seed)
            train, val = base[tr], base[va]
        if cfg.subset is not None and cfg.subset < len(train):
            train = train[stratified_subset(labels[train], int(cfg.subset), seed)]
    out = {"train": train, "val": val}
    if "test" in parts:
        out["test"] = parts["test"]
    return out, info


def split_pool(pool: Pool, cfg: DataConfig, warnings=()) -> PreparedData:
    """The PreparedData of `cfg`'s split, fold or subset of `pool` (no image is read)."""
    plan, info = _plan(pool, cfg)
    meta = pool.entry.meta
    splits: dict[str, Split] = {}
    record_splits: dict[str, list] = {}
    for name, rows in plan.items():
        rows = rows[pool.cache_row[rows] >= 0]
        splits[name] = Split(cache.RowView(pool.entry.images, pool.cache_row[rows]), pool.labels[rows],
                             [pool.paths[r] for r in rows])
        record_splits[name] = [pool.ids[r] for r in rows]
    if cfg.folds > 1 and len(splits["val"]) == 0:
        raise UserError(f"{cfg.source}: fold {cfg.fold} of {cfg.folds} is empty: the data has fewer than {cfg.folds} "
                        "groups of images (near-duplicates and --group-by groups stay together): use fewer folds")
    used = np.zeros(len(pool.labels), bool)
    for rows in plan.values():
        used[rows] = True
    from imgarena.data.dedup import groups_of

    groups = [] if pool.groups is None else [[pool.ids[i] for i in g if used[i]] for g in groups_of(pool.groups)]
    root = pool.root
    crop_pct = _crop_pct(cfg)
    channels = int(meta["channels"])
    if cfg.mean is None:
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
    else:  # explicit statistics (the pretrained weights') replace the data's own
        mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
        if len(mean) != channels or len(std) != channels:
            raise UserError(f"--mean/--std: {len(mean)} value(s) for the {channels}-channel images of {cfg.source}: "
                            f"give {channels} values each, one per channel (or set --channels {len(mean)})")
    record = {
        "source": cfg.source, "kind": pool.kind, "root": root, "classes": list(pool.classes),
        "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "subset": cfg.subset,
        "folds": cfg.folds, "fold": cfg.fold, "repeat": cfg.repeat, **info,
        "dedup": cfg.dedup, "group_by": cfg.group_by, "group_counts": dict(pool.group_counts),
        "img_size": pool.img_size, "channels": channels, "resize": cfg.resize, "crop_pct": crop_pct,
        "interpolation": _interpolation(cfg), "store_size": int(meta["img_size"]),
        "counts": {k: len(v) for k, v in splits.items()}, "cache_key": os.path.basename(pool.entry.path),
        "bad_files": [[os.path.relpath(p, root) if root else p, r] for p, r in pool.bad_files],
        "groups": [g for g in groups if len(g) > 1],  # kept on one side; those spanning own parts are warned about
        "splits": record_splits,
    }
    return PreparedData(
        source=cfg.source, classes=list(pool.classes), channels=channels, img_size=int(pool.img_size),
        resize=cfg.resize, train=splits["train"], val=splits["val"], test=splits.get("test"),
        mean=mean, std=std, bad_files=list(pool.bad_files), split_record=record,
        warnings=list(warnings), cache_path=pool.entry.path, pool=pool, crop_pct=crop_pct,
        interpolation=_interpolation(cfg),
    )


_GROUP_FIELDS = ("dedup", "group_by")


def resplit(data: PreparedData, **changes) -> PreparedData:
    """`data` with other split settings (split_seed, val_fraction, subset, folds, fold, repeat, and
    dedup/group_by), made from the same decoded images: nothing is read or decoded again."""
    pool = data.pool
    if pool is None:
        raise ValueError("this PreparedData was not made by load_data: it cannot be re-split")
    allowed = {"split_seed", "val_fraction", "subset", "folds", "fold", "repeat", *_GROUP_FIELDS}
    if set(changes) - allowed:
        raise TypeError(f"resplit() takes only {', '.join(sorted(allowed))}, got {', '.join(sorted(set(changes) - allowed))}")
    cfg = dataclasses.replace(pool.cfg, **changes)  # validated like any DataConfig
    if any(getattr(cfg, k) != getattr(pool.cfg, k) for k in _GROUP_FIELDS):
        pool = dataclasses.replace(pool, cfg=cfg)
        _find_groups(pool, cfg)
        warnings = [w for w in data.warnings if w not in _leak_warnings(data.pool, data.pool.cfg)]
        warnings += _leak_warnings(pool, cfg)
    else:
        pool = dataclasses.replace(pool, cfg=cfg)
        warnings = data.warnings
    return split_pool(pool, cfg, warnings)


def _prepare(entry: cache.CacheEntry, cfg, classes, parts: dict[str, int], paths, labels, ids, root, kind,
             warnings, *, img_size: int) -> PreparedData:
    meta = entry.meta
    n = len(paths)
    bad_rows = {int(r): reason for r, reason in meta["bad"]}
    cache_row = np.full(n, -1, np.int64)
    good = np.array([r not in bad_rows for r in range(n)], bool)
    cache_row[good] = np.arange(int(good.sum()))
    part_rows, start = {}, 0
    for name, count in parts.items():
        part_rows[name] = np.arange(start, start + count, dtype=np.int64)
        start += count
    bad_files = [(paths[r], reason) for r, reason in sorted(bad_rows.items())]
    pool = Pool(cfg, entry, list(classes), part_rows, labels, list(paths), list(ids), cache_row, root, kind, bad_files,
                img_size=img_size)
    if store_size(img_size, _crop_pct(cfg)) != int(entry.meta["img_size"]):
        raise RuntimeError(f"cache {entry.path} holds {entry.meta['img_size']} px images, not the store size of "
                           f"{img_size} px at crop_pct {_crop_pct(cfg)}")
    _find_groups(pool, cfg)
    return split_pool(pool, cfg, list(warnings) + _leak_warnings(pool, cfg))


def _array_filler(arrays: list[np.ndarray], native_size: int, img_size: int, channels: int, resize: str,
                  interpolation: str = "bilinear"):
    """`fill` for built-ins: copy (and if needed resize to `img_size`, the store size, or change
    channels) in-memory images, decoded as image files of the same pixels would be."""

    def fill(folder, shape):
        mm = np.memmap(os.path.join(folder, cache.IMAGES), dtype=np.uint8, mode="r+", shape=shape)
        row = 0
        for x in arrays:
            if img_size == native_size and x.shape[1] == channels:
                mm[row : row + len(x)] = x
            elif img_size == native_size:  # gray -> RGB (or RGB -> gray via Pillow's luma below)
                if channels == 3:
                    mm[row : row + len(x)] = np.repeat(x, 3, axis=1)
                else:
                    mm[row : row + len(x)] = np.rint(
                        np.tensordot(x.astype(np.float32), np.array([0.299, 0.587, 0.114], np.float32),
                                     axes=([1], [0])))[:, None].clip(0, 255).astype(np.uint8)
            else:
                from PIL import Image

                for i in range(len(x)):
                    img = Image.fromarray(x[i, 0] if x.shape[1] == 1 else x[i].transpose(1, 2, 0))
                    mm[row + i] = prepare_pil(img, channels=channels, img_size=img_size, resize=resize,
                                              interpolation=interpolation)
            row += len(x)
        mm.flush()
        del mm
        return []

    return fill


def _builtin_data(b: Builtin, cfg: DataConfig) -> PreparedData:
    parts = {name: len(y) for name, (_, y) in b.parts.items()}
    arrays = [x for x, _ in b.parts.values()]
    labels = np.concatenate([y for _, y in b.parts.values()]).astype(np.int64)
    ids = [f"{b.name}/{name}/{i}" for name, count in parts.items() for i in range(count)]
    native_c, native = arrays[0].shape[1], arrays[0].shape[2]
    img_size = cfg.img_size or native
    channels = cfg.channels or native_c
    stored, interpolation = store_size(img_size, _crop_pct(cfg)), _interpolation(cfg)
    key = cache.make_key({
        "kind": "builtin", "name": b.name, "stats": cache.file_stats(b.files), "files": b.files,
        "img_size": stored, "channels": channels, "resize": cfg.resize, "interpolation": interpolation,
        "parts": list(parts.items()),
    })
    entry = cache.lookup(cfg.cache_dir, key) or cache.build(
        cfg.cache_dir, key, n=len(ids), channels=channels, img_size=stored, sections=parts,
        fill=_array_filler(arrays, native, stored, channels, cfg.resize, interpolation), meta={"source": cfg.source},
        stats_section=_stats_part(parts))
    return _prepare(entry, cfg, b.classes, parts, ids, labels, ids, "", "builtin", [], img_size=img_size)


def _load(cfg: DataConfig, *, progress: bool = True, min_classes: int = 2) -> PreparedData:
    """load_data without its checks and printed warnings (they are in the result)."""
    validate(cfg)  # DataConfig checks itself when built; this also catches fields changed after that
    src = str(cfg.source)
    progress = progress_enabled(progress)
    if src in BUILTINS:
        data = _builtin_data(load_builtin(src, cfg.cache_dir), cfg)
    elif src.lower().endswith(".csv"):
        data = _files_data(read_csv(src, min_classes=min_classes), cfg, progress=progress, kind="csv")
    elif os.path.isfile(os.path.expanduser(src)):
        raise UserError(f"{src} is a file: pass a folder of class subfolders, a .csv of path,label, or a built-in name")
    elif os.path.exists(os.path.expanduser(src)) or os.sep in src or src.startswith("."):
        data = _files_data(scan_folder(src, min_classes=min_classes), cfg, progress=progress, kind="folder")
    else:
        from imgarena.errors import closest_matches

        hint = closest_matches(src, BUILTINS)
        raise UserError(f"{src!r} is neither an existing folder/CSV nor a built-in dataset"
                        + (f" (did you mean {', '.join(hint)}?)" if hint else f"; built-ins: {', '.join(BUILTINS)}"))
    return data


def load_data(cfg: DataConfig, *, progress: bool = True, need_val: bool = True, min_classes: int = 2) -> PreparedData:
    """Turn `cfg.source` into cached, split, ready-to-batch data. Unreadable files are listed in
    `bad_files` and skipped (with one warning summary), never fatal. Training needs a non-empty val
    split and 2 classes; evaluation (`need_val=False, min_classes=1`) takes a folder of one image per
    class, or new images of a single class, as it is."""
    data = _load(cfg, progress=progress, min_classes=min_classes)
    skipped = f" ({len(data.bad_files)} unreadable files skipped)" if data.bad_files else ""
    for k in ("train", "val") if need_val else ():
        if len(getattr(data, k)) == 0:
            grouped = (" or near-duplicate / --group-by groups too few to split (see the split's groups)"
                       if data.split_record.get("groups") else "")
            raise UserError(f"{cfg.source}: no usable {k} images{skipped}: add images (an automatic val split "
                            f"needs at least 2 images in a class{grouped})")
    if not need_val and not any(s is not None and len(s) for s in (data.train, data.val, data.test)):
        raise UserError(f"{cfg.source}: no usable images{skipped}: add images to its class folders")
    for w in data.warnings:
        _warn(w)
    if data.bad_files:
        shown = "; ".join(f"{p}: {r}" for p, r in data.bad_files[:3])
        more = f" (+{len(data.bad_files) - 3} more, see `imgarena data inspect`)" if len(data.bad_files) > 3 else ""
        _warn(f"skipped {len(data.bad_files)} unreadable image file(s): {shown}{more}")
    return data
