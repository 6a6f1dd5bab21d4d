"""Decode-once image cache: a uint8 (N, C, H, W) file on disk opened as a numpy memmap.

Each cache lives in `<cache_dir>/<key>/` (images.u8 + meta.json). Nothing is ever loaded whole
into RAM, so caches larger than memory work.

What the key covers: every file's path, size, mtime_ns, ctime_ns and inode number, the source's own
parts (train/val/test folders or CSV split column: the row layout), the decode settings (the size
images are stored at, channels, resize mode, interpolation) and CACHE_VERSION -- nothing else. The
stored size is the store size (img_size / crop_pct), so a 224 px run at crop_pct 0.875 and a 256 px
run at 1.0 share one entry. Every file is stored once, in listing
order; labels, splits, folds and subsets are index records computed on top of it
(imgarena.data.prepare), so changing a seed, a fold or a subset never decodes again. Any change to
the files builds a new cache; an unchanged dataset reuses the old one across runs. The ctime is what makes this hold for
rewrites: the kernel sets it on every write, rename or metadata change and no user call can set it
back, so a file rewritten with the same size and a restored mtime (cp -p, rsync, tar, os.utime)
still changes the key. Copying, moving or restoring the dataset gives new inodes and ctimes: one
rebuild. Blind spot: a same-size rewrite within one tick of the file system's timestamp clock after
the cache read the file (milliseconds on Linux file systems; FAT keeps 2 s and no ctime).

What is checked when an entry is opened: meta.json parses, has the required fields and matches its
own sha256; images.u8 has exactly the bytes its shape needs and matches its crc32 (the whole file up
to FULL_CHECK_BYTES, else SAMPLE_BLOCKS blocks spread evenly over it, first and last included). An
entry that fails (a crash, a full disk or a bad copy while it was written) is logged, removed and
rebuilt.

A build reserves its disk space up front (a full disk is a UserError saying how much is needed),
writes into a `.partial-*` folder whose lock is held for the build's lifetime, and renames it into
place at the end: an interrupted build is never served, and its folder is removed by the next build
once its lock is free (its process, and with it the decode workers, are gone).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass

import numpy as np

from imgarena.data.images import BadImage, decode_image
from imgarena.data.parallel import map_chunks
from imgarena.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale partials are found by their pid alone
    fcntl = None

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 4: one row per file in listing order, keyed by files and decode settings only
IMAGES = "images.u8"
META = "meta.json"
LOCK = ".lock"
FULL_CHECK_BYTES = 64 << 20  # 60,000 28x28 images (47 MB) checksum in ~0.04 s
SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 1 << 20
_REQUIRED = ("version", "shape", "img_size", "channels", "sections", "bad", "checksum")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass
class CacheEntry:
    path: str
    images: np.memmap  # (N, C, H, W) uint8, read-only, bad rows already removed
    meta: dict  # img_size, channels, shape, sections {name: [start, count]}, bad [[row, reason]], mean, std


class RowView:
    """Read-only rows `rows` of a (N, C, H, W) array (the cache's memmap), indexed like an array:
    an int gives one image, a slice a lazy view, an int array (or bool mask) the images as an
    ndarray, read in file order (sequential reads when the cache is bigger than RAM).
    np.asarray(view) reads them all."""

    def __init__(self, base, rows):
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        self.rows.setflags(write=False)

    @property
    def shape(self) -> tuple:
        return (len(self.rows), *self.base.shape[1:])

    dtype = property(lambda self: self.base.dtype)
    ndim = property(lambda self: self.base.ndim)
    size = property(lambda self: int(np.prod(self.shape)))
    nbytes = property(lambda self: self.size * self.base.dtype.itemsize)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros((0, *self.base.shape[1:]), self.base.dtype)
        if np.all(rows[1:] >= rows[:-1]):
            return np.asarray(self.base[rows])
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.base.shape[1:]), self.base.dtype)
        out[order] = self.base[rows[order]]
        return out

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head, rest = (key[0], key[1:]) if key else (slice(None), ())
            if isinstance(head, (int, np.integer)):
                return self[head][rest]
            return self._read(self.rows[head] if isinstance(head, slice) else self._rows(head))[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            return np.asarray(self.base[self.rows[key]])
        if isinstance(key, slice):
            return RowView(self.base, self.rows[key])
        return self._read(self._rows(key))

    def _rows(self, key) -> np.ndarray:
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != self.rows.shape:
                raise IndexError(f"boolean index of length {len(idx)} for {len(self.rows)} images")
            return self.rows[idx]
        if idx.dtype.kind not in "iu":
            raise IndexError(f"images can be indexed by ints, slices or int/bool arrays, not {idx.dtype}")
        return self.rows[idx]

    def __array__(self, dtype=None, copy=None):
        a = self._read(self.rows)
        return a if dtype is None else a.astype(dtype, copy=False)

    def __iter__(self):
        for i in range(len(self.rows)):
            yield self[i]

    def __reduce__(self):
        # A memmap pickles as its whole contents; reopen the file instead (e.g. when sent to a process).
        if isinstance(self.base, np.memmap) and self.base.filename:
            return (_reopen_rows, (self.base.filename, self.base.offset, self.base.shape, self.rows))
        return (RowView, (np.asarray(self.base), self.rows))

    def __repr__(self) -> str:
        return f"RowView(shape={self.shape}, dtype={self.dtype})"


def _reopen_rows(filename, offset, shape, rows) -> RowView:
    return RowView(np.memmap(filename, dtype=np.uint8, mode="r", offset=offset, shape=tuple(shape)), rows)


def make_key(parts: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_stats(paths) -> list[tuple[int, int, int, int]]:
    """(size, mtime_ns, ctime_ns, inode) per file, all -1 when missing: the content part of a cache
    key (see the module docstring for why ctime makes rewrites visible)."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except OSError:
            out.append((-1, -1, -1, -1))
    return out


def _open(folder: str, meta: dict, mode: str = "r") -> np.memmap:
    shape = tuple(meta["shape"])
    if shape[0] == 0:  # numpy cannot map an empty file
        return np.zeros(shape, np.uint8)
    return np.memmap(os.path.join(folder, IMAGES), dtype=np.uint8, mode=mode, shape=shape)


# ---- verification ----

def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def images_checksum(path: str, nbytes: int) -> str:
    """crc32 of the whole images file up to FULL_CHECK_BYTES, else of SAMPLE_BLOCKS evenly spread blocks."""
    if nbytes == 0:
        return "crc32:empty"
    if nbytes <= FULL_CHECK_BYTES:
        ranges = [(0, nbytes)]
    else:
        starts = np.linspace(0, nbytes - SAMPLE_BLOCK, SAMPLE_BLOCKS).astype(np.int64)
        ranges = [(int(a), int(a) + SAMPLE_BLOCK) for a in starts]
    crc = 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            for a, b in ranges:
                with view[a:b] as part:
                    crc = zlib.crc32(part, crc)
        finally:
            view.release()
    return f"crc32:{crc:08x}:{len(ranges)}"


def verify(folder: str) -> tuple[dict | None, str]:
    """(meta, "") for a sound entry, else (None, what is wrong with it)."""
    try:
        with open(os.path.join(folder, META), "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, f"cannot read {META} ({e.strerror or e})"
    try:
        meta = json.loads(raw)
    except ValueError:
        return None, f"{META} is not valid JSON"
    if not isinstance(meta, dict) or any(k not in meta for k in _REQUIRED):
        return None, f"{META} lacks required fields"
    if not isinstance(meta["checksum"], dict) or meta["checksum"].get("meta") != _meta_digest(meta):
        return None, f"{META} does not match its checksum"
    path = os.path.join(folder, IMAGES)
    expected = int(np.prod(meta["shape"]))
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return None, f"cannot read {IMAGES} ({e.strerror or e})"
    if size != expected:
        return None, f"{IMAGES} has {size} bytes, its shape needs {expected}"
    if meta["checksum"].get("images") != images_checksum(path, size):
        return None, f"{IMAGES} does not match its checksum"
    return meta, ""


def _discard(path: str) -> None:
    """Take a damaged entry out of its key's place at once (rename), then delete it."""
    trash = f"{path}.damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    except OSError:
        trash = path
    if os.path.isdir(trash) and not os.path.islink(trash):
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.remove(trash)
        except OSError:
            pass


def lookup(cache_dir: str, key: str) -> CacheEntry | None:
    """The verified entry `key`, or None. A damaged entry is removed (with a warning) so it gets rebuilt."""
    folder = os.path.join(cache_dir, key)
    if not os.path.lexists(folder):
        return None
    meta, problem = verify(folder) if os.path.isdir(folder) else (None, "not a folder")
    if meta is None:
        log.warning("image cache %s is damaged (%s): rebuilding it", folder, problem)
        _discard(folder)
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
    """Best effort: the alias only saves reading headers next time, so failing to write it is no error."""
    text = json.dumps({"img_size": int(settings[0]), "channels": int(settings[1])})
    write_best_effort(os.path.join(cache_dir, key + ".auto.json"), lambda f: f.write(text.encode()))


def write_best_effort(path: str, write, what: str | None = None) -> bool:
    """Write `path` atomically (temp file, fsync, rename) with `write(binary_file)`, for files whose
    loss only costs time later (a remembered setting, stored hashes): a failure is a logged warning
    that leaves no temp file, never an error. Returns whether it was written."""
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("could not write %s (%s)", what or path, e.strerror or e)
        try:
            os.remove(tmp)
        except OSError:
            pass
        return False


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


def _hold_lock(folder: str) -> int | None:
    """Create and flock `folder`/.lock for this build; the kernel drops the lock when the process
    (and every decode worker that inherited the descriptor) is gone, however it ended."""
    fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without flock: stale partials are then found by pid
            pass
    return fd


def _build_alive(folder: str, name: str) -> bool:
    """Whether the build writing partial folder `name` may still be running."""
    if fcntl is not None:
        try:
            fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY)
        except FileNotFoundError:
            fd = None  # killed before it made its lock, or an older version's build
        except OSError:
            return True
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                return True
            except OSError:
                pass  # no flock here: judge by the pid
            finally:
                os.close(fd)
    try:  # <key>.partial-<pid>-<random>; a reused pid keeps a leftover, never serves it
        pid = int(name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return True
    return _pid_alive(pid)


def _clean_stale_partials(cache_dir: str) -> None:
    """Remove leftovers of interrupted builds (of any key) and of discarded damaged entries."""
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if ".damaged-" in name or (".partial-" in name and not _build_alive(path, name)):
            shutil.rmtree(path, ignore_errors=True)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _disk_full(cache_dir: str, nbytes: int) -> UserError:
    try:
        free = f", {_mb(shutil.disk_usage(cache_dir).free)} free"
    except OSError:
        free = ""
    return UserError(f"disk full at {cache_dir}: the image cache needs {_mb(nbytes)}{free}; free some space or "
                     "point --cache-dir (or IMGARENA_CACHE) at a disk with room")


def _reserve(path: str, nbytes: int) -> None:
    """Create `path` with `nbytes` allocated: a full disk fails here, not as SIGBUS in a process
    writing through a memory map later."""
    with open(path, "wb") as f:
        if nbytes == 0:
            return
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
            return
        except AttributeError:  # no posix_fallocate (macOS)
            pass
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise
        f.truncate(nbytes)  # file system without fallocate: a sparse file, as before
# ---- worker functions (run in child processes; numpy + Pillow only) ----

def _decode_chunk(args, start: int, paths: list[str]):
    folder, shape, img_size, channels, resize, interpolation = args
    mm = np.memmap(os.path.join(folder, IMAGES), dtype=np.uint8, mode="r+", shape=tuple(shape))
    bad, infos = [], []
    for row, p in enumerate(paths, start):
        try:
            mm[row], info = decode_image(p, channels=channels, img_size=img_size, resize=resize,
                                         interpolation=interpolation)
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
    shape = (n, channels, img_size, img_size)
    nbytes = int(np.prod(shape))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _clean_stale_partials(cache_dir)
        free = shutil.disk_usage(cache_dir).free
    except OSError as e:
        raise _cache_error(cache_dir, e, nbytes) from None
    if nbytes + (1 << 20) > free:  # 1 MiB for metadata and file system overhead
        raise _disk_full(cache_dir, nbytes)
    final = os.path.join(cache_dir, key)
    tmp = os.path.join(cache_dir, f"{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    lock = None
    try:
        os.makedirs(tmp)
        lock = _hold_lock(tmp)
        path = os.path.join(tmp, IMAGES)
        _reserve(path, nbytes)  # rows are written by the fill processes
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
        meta["checksum"] = {"images": images_checksum(path, os.path.getsize(path))}
        meta["checksum"]["meta"] = _meta_digest(meta)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        ours = _publish(cache_dir, key, tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (e.errno in _DISK_FULL or e.errno in _NOT_WRITABLE):
            raise _cache_error(cache_dir, e, nbytes) from None
        raise
    finally:
        if lock is not None:
            os.close(lock)
    if ours:
        return CacheEntry(final, _open(final, meta), meta)
    entry = lookup(cache_dir, key)
    if entry is None:
        raise RuntimeError(f"image cache {final} could not be read back after building it")
    return entry


def _publish(cache_dir: str, key: str, tmp: str, final: str) -> bool:
    """Rename the finished build into place; False when another process's sound entry is already there."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        pass
    if lookup(cache_dir, key) is not None:  # another process finished the same cache first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    os.rename(tmp, final)  # what was there was damaged, and lookup removed it
    return True


def _cache_error(cache_dir: str, e: OSError, nbytes: int) -> Exception:
    if e.errno in _DISK_FULL:
        return _disk_full(cache_dir, nbytes)
    if e.errno in _NOT_WRITABLE:
        return UserError(f"cannot write the image cache at {cache_dir} ({e.strerror}): point --cache-dir "
                         "(or IMGARENA_CACHE) at a writable folder")
    return e


class FileFill:
    """A `fill` for build(): decode `paths` into rows 0..N-1 in parallel processes, at `img_size`
    (the store size). Afterwards `infos[row]` is (width, height, gray) of each decoded file (None
    where it failed)."""

    def __init__(self, paths: list[str], *, img_size: int, channels: int, resize: str, workers: int = 0,
                 progress: bool = True, interpolation: str = "bilinear"):
        self.paths, self.img_size, self.channels, self.resize = paths, img_size, channels, resize
        self.interpolation = interpolation
        self.workers, self.progress = workers, progress
        self.infos: list = []

    def __call__(self, folder, shape):
        args = (folder, list(shape), self.img_size, self.channels, self.resize, self.interpolation)
        bad, self.infos = [], []
        for part_bad, part_infos in map_chunks(_Bound(_decode_chunk, args), self.paths, workers=self.workers,
                                               progress=self.progress, desc="decoding images"):
            bad += part_bad
            self.infos += part_infos
        return bad
