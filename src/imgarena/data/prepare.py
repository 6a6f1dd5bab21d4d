"""`load_data(cfg)`: any source (folder, CSV, built-in) -> decoded, cached, split, ready to batch."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from imgarena.config import DataConfig
from imgarena.data import cache
from imgarena.data.builtin import BUILTINS, Builtin, load_builtin
from imgarena.data.csvsource import read_csv
from imgarena.data.images import RESIZE_MODES, prepare_pil
from imgarena.data.parallel import progress_enabled
from imgarena.data.scan import Listing, scan_folder
from imgarena.data.split import stratified_split, stratified_subset
from imgarena.errors import UserError

DEFAULT_IMG_SIZE = 224
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, C, H, W), a read-only np.memmap into the cache
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocessing(self) -> dict:
        """What inference needs to reproduce training inputs (stored in checkpoints)."""
        return {"img_size": self.img_size, "channels": self.channels, "resize": self.resize,
                "mean": list(self.mean), "std": list(self.std)}


def _validate(cfg: DataConfig) -> None:
    if cfg.resize not in RESIZE_MODES:
        raise UserError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {cfg.resize!r}")
    if cfg.channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 or 3 (or left unset for automatic), got {cfg.channels!r}")
    if cfg.img_size is not None and not (isinstance(cfg.img_size, int) and 8 <= cfg.img_size <= 4096):
        raise UserError(f"img_size must be a whole number of pixels between 8 and 4096, got {cfg.img_size!r}")
    if not 0.0 < float(cfg.val_fraction) < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {cfg.val_fraction!r}")
    if cfg.subset is not None and int(cfg.subset) < 2:
        raise UserError(f"subset must be at least 2 images, got {cfg.subset!r}")


def _assign_splits(labels_by_split: dict[str, np.ndarray], cfg: DataConfig) -> dict[str, dict[str, np.ndarray]]:
    """{"train"/"val"/"test": {source_part: indices}} from the parts a source provides.

    A source without a val part gets a stratified, seeded val split carved out of its train (or
    only) part; `subset` then thins the training part, stratified."""
    base = "train" if "train" in labels_by_split else "all"
    labels = labels_by_split[base]
    out: dict[str, dict[str, np.ndarray]] = {}
    if "val" in labels_by_split:
        tr = np.arange(len(labels), dtype=np.int64)
        out["val"] = {"val": np.arange(len(labels_by_split["val"]), dtype=np.int64)}
    else:
        tr, va = stratified_split(labels, float(cfg.val_fraction), int(cfg.split_seed))
        out["val"] = {base: va}
    if cfg.subset is not None and cfg.subset < len(tr):
        tr = tr[stratified_subset(labels[tr], int(cfg.subset), int(cfg.split_seed))]
    out["train"] = {base: tr}
    if "test" in labels_by_split:
        out["test"] = {"test": np.arange(len(labels_by_split["test"]), dtype=np.int64)}
    return {k: out[k] for k in SPLITS if k in out}


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
    labels_by = {k: np.array([lab for _, lab in v], np.int64) for k, v in listing.splits.items()}
    plan = _assign_splits(labels_by, cfg)
    rows: list[tuple[str, int]] = []
    sections: dict[str, int] = {}
    for split, parts in plan.items():
        for part, idx in parts.items():
            rows += [listing.splits[part][i] for i in idx]
        sections[split] = sum(len(i) for i in parts.values())
    paths = [p for p, _ in rows]
    labels = np.array([lab for _, lab in rows], np.int64)
    rel = [_relative(p, listing.root) for p in paths]
    base = {"kind": kind, "files": rel, "labels": labels.tolist(), "stats": cache.file_stats(paths),
            "resize": cfg.resize, "sections": sections, "root": listing.root}
    auto = cfg.img_size is None or cfg.channels is None
    # With automatic size/channels, a small alias file remembers what they resolved to, so an
    # unchanged dataset is found again without reading any image.
    auto_key = cache.make_key({**base, "img_size": cfg.img_size, "channels": cfg.channels})
    resolved = cache.read_alias(cfg.cache_dir, auto_key) if auto else (cfg.img_size, cfg.channels)

    def get(settings):
        key = cache.make_key({**base, "img_size": settings[0], "channels": settings[1]})
        entry = cache.lookup(cfg.cache_dir, key)
        if entry is None:
            fill = cache.FileFill(paths, img_size=settings[0], channels=settings[1], resize=cfg.resize,
                                  workers=cfg.workers, progress=progress)
            entry = cache.build(cfg.cache_dir, key, n=len(rows), channels=settings[1], img_size=settings[0],
                                sections=sections, fill=fill, meta={"source": cfg.source},
                                extra=lambda: {"facts": _facts(fill.infos)})
        return entry

    entry = get(resolved or _resolve_auto(cfg, _guess_facts(paths)))
    if auto:
        # The cache records every decoded file's real size and mode (broken files excluded): if the
        # guess was wrong, build again with the right settings.
        actual = _resolve_auto(cfg, entry.meta["facts"])
        if actual != (entry.meta["img_size"], entry.meta["channels"]):
            stale, entry = entry.path, get(actual)
            cache.remove(stale)
        cache.write_alias(cfg.cache_dir, auto_key, (entry.meta["img_size"], entry.meta["channels"]))
    return _assemble(entry, cfg, listing.classes, paths, labels, rel, listing.root, kind, listing.warnings)


def _assemble(entry: cache.CacheEntry, cfg, classes, paths, labels, ids, root, kind, warnings) -> PreparedData:
    meta = entry.meta
    bad_rows = {r: reason for r, reason in meta["bad"]}
    keep = np.array([r for r in range(len(paths)) if r not in bad_rows], np.int64)
    splits: dict[str, Split] = {}
    record_splits: dict[str, list] = {}
    for name, (start, count) in meta["sections"].items():
        rows = keep[start : start + count]
        splits[name] = Split(entry.images[start : start + count], labels[rows], [paths[r] for r in rows])
        record_splits[name] = [ids[r] for r in rows]
    bad_files = [(paths[r], reason) for r, reason in sorted(bad_rows.items())]
    counts = {k: len(v) for k, v in splits.items()}
    record = {
        "source": cfg.source, "kind": kind, "root": root, "classes": list(classes),
        "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "subset": cfg.subset,
        "img_size": meta["img_size"], "channels": meta["channels"], "resize": cfg.resize,
        "counts": counts, "cache_key": os.path.basename(entry.path),
        "bad_files": [[os.path.relpath(p, root) if root else p, r] for p, r in bad_files],
        "splits": record_splits,
    }
    return PreparedData(
        source=cfg.source, classes=list(classes), channels=int(meta["channels"]), img_size=int(meta["img_size"]),
        resize=cfg.resize, train=splits["train"], val=splits["val"], test=splits.get("test"),
        mean=tuple(meta["mean"]), std=tuple(meta["std"]), bad_files=bad_files, split_record=record,
        warnings=list(warnings), cache_path=entry.path,
    )


def _array_filler(arrays: list[np.ndarray], native_size: int, img_size: int, channels: int, resize: str):
    """`fill` for built-ins: copy (and if needed resize / change channels) in-memory images."""

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
                    mm[row + i] = prepare_pil(img, channels=channels, img_size=img_size, resize=resize)
            row += len(x)
        mm.flush()
        del mm
        return []

    return fill


def _builtin_data(b: Builtin, cfg: DataConfig) -> PreparedData:
    labels_by = {k: y for k, (_, y) in b.parts.items()}
    plan = _assign_splits(labels_by, cfg)
    arrays, labels, ids, sections = [], [], [], {}
    for split, parts in plan.items():
        sections[split] = 0
        for part, idx in parts.items():
            x, y = b.parts[part]
            arrays.append(x[idx])
            labels.append(y[idx])
            ids += [f"{b.name}/{part}/{i}" for i in idx]
            sections[split] += len(idx)
    native_c, native = arrays[0].shape[1], arrays[0].shape[2]
    img_size = cfg.img_size or native
    channels = cfg.channels or native_c
    key = cache.make_key({
        "kind": "builtin", "name": b.name, "stats": cache.file_stats(b.files), "files": b.files,
        "img_size": img_size, "channels": channels, "resize": cfg.resize, "sections": sections,
        "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "subset": cfg.subset,
    })
    entry = cache.lookup(cfg.cache_dir, key) or cache.build(
        cfg.cache_dir, key, n=len(ids), channels=channels, img_size=img_size, sections=sections,
        fill=_array_filler(arrays, native, img_size, channels, cfg.resize), meta={"source": cfg.source})
    return _assemble(entry, cfg, b.classes, ids, np.concatenate(labels), ids, "", "builtin", [])


def load_data(cfg: DataConfig, *, progress: bool = True, need_val: bool = True) -> PreparedData:
    """Turn `cfg.source` into cached, split, ready-to-batch data. Unreadable files are listed in
    `bad_files` and skipped (with one warning summary), never fatal. Training needs a non-empty val
    split; evaluation (`need_val=False`) takes a folder of one image per class as it is."""
    _validate(cfg)
    src = str(cfg.source)
    progress = progress_enabled(progress)
    if src in BUILTINS:
        data = _builtin_data(load_builtin(src, cfg.cache_dir), cfg)
    elif src.lower().endswith(".csv"):
        data = _files_data(read_csv(src), cfg, progress=progress, kind="csv")
    elif os.path.isfile(os.path.expanduser(src)):
        raise UserError(f"{src} is a file: pass a folder of class subfolders, a .csv of path,label, or a built-in name")
    elif os.path.exists(os.path.expanduser(src)) or os.sep in src or src.startswith("."):
        data = _files_data(scan_folder(src), cfg, progress=progress, kind="folder")
    else:
        from imgarena.errors import closest_matches

        hint = closest_matches(src, BUILTINS)
        raise UserError(f"{src!r} is neither an existing folder/CSV nor a built-in dataset"
                        + (f" (did you mean {', '.join(hint)}?)" if hint else f"; built-ins: {', '.join(BUILTINS)}"))
    for k in ("train", "val") if need_val else ("train",):
        if len(getattr(data, k)) == 0:
            skipped = f" ({len(data.bad_files)} unreadable files skipped)" if data.bad_files else ""
            raise UserError(f"{cfg.source}: no usable {k} images{skipped}: add images (an automatic val split "
                            "needs at least 2 images in a class)")
    for w in data.warnings:
        _warn(w)
    if data.bad_files:
        shown = "; ".join(f"{p}: {r}" for p, r in data.bad_files[:3])
        more = f" (+{len(data.bad_files) - 3} more, see `imgarena data inspect`)" if len(data.bad_files) > 3 else ""
        _warn(f"skipped {len(data.bad_files)} unreadable image file(s): {shown}{more}")
    return data
