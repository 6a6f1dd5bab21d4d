"""Decode-once image cache: a uint8 (N, C, H, W) file on disk opened as a numpy memmap.

Each cache lives in `<cache_dir>/<key>/` (images.u8 + meta.json). The key hashes everything that
changes the pixels (file list with sizes and mtimes, resize settings, CACHE_VERSION), so any change
builds a new cache and an unchanged dataset reuses the old one across runs. A build writes into a
`.partial-*` folder and renames it into place at the end: an interrupted build is never served.
Nothing is ever loaded whole into RAM, so caches larger than memory work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np

from imgarena.data.images import BadImage, decode_image
from imgarena.data.parallel import map_chunks

CACHE_VERSION = 2
IMAGES = "images.u8"
META = "meta.json"


@dataclass
class CacheEntry:
    path: str
    images: np.memmap  # (N, C, H, W) uint8, read-only, bad rows already removed
    meta: dict  # img_size, channels, shape, sections {name: [start, count]}, bad [[row, reason]], mean, std


def make_key(parts: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_stats(paths) -> list[tuple[int, int]]:
    """(size, mtime_ns) per file, (-1, -1) when missing: the content part of a cache key."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((-1, -1))
    return out


def _open(folder: str, meta: dict, mode: str = "r") -> np.memmap:
    shape = tuple(meta["shape"])
    if shape[0] == 0:  # numpy cannot map an empty file
        return np.zeros(shape, np.uint8)
    return np.memmap(os.path.join(folder, IMAGES), dtype=np.uint8, mode=mode, shape=shape)


def lookup(cache_dir: str, key: str) -> CacheEntry | None:
    folder = os.path.join(cache_dir, key)
    try:
        with open(os.path.join(folder, META)) as f:
            meta = json.load(f)
        expected = int(np.prod(meta["shape"]))
        if os.path.getsize(os.path.join(folder, IMAGES)) != expected:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return CacheEntry(folder, _open(folder, meta), meta)


def read_alias(cache_dir: str, key: str):
    """(img_size, channels) that automatic settings resolved to for `key`, or None."""
    try:
        with open(os.path.join(cache_dir, key + ".auto.json")) as f:
            v = json.load(f)
        return int(v["img_size"]), int(v["channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_alias(cache_dir: str, key: str, settings: tuple[int, int]) -> None:
    path = os.path.join(cache_dir, key + ".auto.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"img_size": int(settings[0]), "channels": int(settings[1])}, f)
    os.replace(tmp, path)


def remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_partials(cache_dir: str, key: str) -> None:
    """Remove leftovers of interrupted builds of this key (their process is gone)."""
    for name in os.listdir(cache_dir):
        if name.startswith(key + ".partial-"):
            try:
                pid = int(name.split("-")[-2])
            except (ValueError, IndexError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


# ---- worker functions (run in child processes; numpy + Pillow only) ----

def _decode_chunk(args, start: int, paths: list[str]):
    folder, shape, img_size, channels, resize = args
    mm = np.memmap(os.path.join(folder, IMAGES), dtype=np.uint8, mode="r+", shape=tuple(shape))
    bad, infos = [], []
    for row, p in enumerate(paths, start):
        try:
            mm[row], info = decode_image(p, channels=channels, img_size=img_size, resize=resize)
            infos.append(info)
        except BadImage as e:
            bad.append((row, str(e)))
            infos.append(None)
    del mm
    return bad, infos


class _Bound:
    """A picklable fn(start, chunk) with fixed leading arguments (lambdas don't pickle)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __call__(self, start, chunk):
        return self.fn(self.args, start, chunk)


# ---- building ----

def channel_stats(images: np.ndarray, start: int, count: int, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0..1 scale) of rows [start, start+count), streamed in chunks."""
    c = images.shape[1]
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    n = 0
    for i in range(start, start + count, chunk):
        block = np.asarray(images[i : min(i + chunk, start + count)], dtype=np.float64) / 255.0
        s += block.sum(axis=(0, 2, 3))
        s2 += np.square(block).sum(axis=(0, 2, 3))
        n += block.shape[0] * block.shape[2] * block.shape[3]
    if n == 0:
        return [0.5] * c, [0.5] * c
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(max(v, 1e-3)), 6) for v in std]


def _compact(path: str, shape: tuple, bad_rows: set[int], chunk: int = 4096) -> int:
    """Drop bad rows in place (keeping order) and truncate the file; returns the new row count."""
    n = shape[0]
    keep = np.array([r for r in range(n) if r not in bad_rows], dtype=np.int64)
    mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    # keep[i] >= i, so each block reads rows at or after the rows it writes: safe in place.
    for j in range(0, len(keep), chunk):
        mm[j : j + len(keep[j : j + chunk])] = mm[keep[j : j + chunk]]
    mm.flush()
    del mm
    row_bytes = int(np.prod(shape[1:]))
    os.truncate(path, len(keep) * row_bytes)
    return len(keep)


def build(cache_dir: str, key: str, *, n: int, channels: int, img_size: int, sections: dict[str, int],
          fill, meta: dict, stats_section: str = "train", extra=None) -> CacheEntry:
    """Create cache `key` with `n` rows: `fill(folder, shape)` writes rows and returns [(row, reason)]
    for rows that failed. Rows are laid out in `sections` order (e.g. train, val, test); bad rows are
    removed, per-channel mean/std of `stats_section` computed, `extra()` (a dict, called after fill)
    merged into the metadata, and the folder renamed into place."""
    os.makedirs(cache_dir, exist_ok=True)
    _clean_stale_partials(cache_dir, key)
    final = os.path.join(cache_dir, key)
    tmp = os.path.join(cache_dir, f"{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        shape = (n, channels, img_size, img_size)
        path = os.path.join(tmp, IMAGES)
        with open(path, "wb") as f:
            f.truncate(int(np.prod(shape)))  # sparse file; rows are written by the fill processes
        bad = sorted(fill(tmp, shape)) if n else []
        bad_rows = {r for r, _ in bad}
        if bad_rows:
            kept = _compact(path, shape, bad_rows)
            shape = (kept, *shape[1:])
        # Section bounds after bad rows are gone.
        bounds, start, row = {}, 0, 0
        for name, count in sections.items():
            nbad = sum(1 for r in range(row, row + count) if r in bad_rows)
            bounds[name] = [start, count - nbad]
            start += count - nbad
            row += count
        meta = {**meta, "version": CACHE_VERSION, "shape": list(shape), "img_size": img_size,
                "channels": channels, "sections": bounds, "bad": [[int(r), reason] for r, reason in bad],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra() if extra else {})}
        images = _open(tmp, meta)
        if stats_section in bounds:
            meta["mean"], meta["std"] = channel_stats(images, *bounds[stats_section])
        del images
        with open(path, "rb+") as f:
            os.fsync(f.fileno())  # rows written through other processes' mappings reach the disk
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = lookup(cache_dir, key)
    if entry is None:
        raise RuntimeError(f"image cache {final} could not be read back after building it")
    return entry


class FileFill:
    """A `fill` for build(): decode `paths` into rows 0..N-1 in parallel processes. Afterwards
    `infos[row]` is (width, height, gray) of each decoded file (None where it failed)."""

    def __init__(self, paths: list[str], *, img_size: int, channels: int, resize: str, workers: int = 0,
                 progress: bool = True):
        self.paths, self.img_size, self.channels, self.resize = paths, img_size, channels, resize
        self.workers, self.progress = workers, progress
        self.infos: list = []

    def __call__(self, folder, shape):
        args = (folder, list(shape), self.img_size, self.channels, self.resize)
        bad, self.infos = [], []
        for part_bad, part_infos in map_chunks(_Bound(_decode_chunk, args), self.paths, workers=self.workers,
                                               progress=self.progress, desc="decoding images"):
            bad += part_bad
            self.infos += part_infos
        return bad
