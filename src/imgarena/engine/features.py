"""Per-image arrays computed once and kept on disk: pooled backbone features (the linear probe), teacher
logits (distillation), anything that is a fixed function of one cached image.

    store = FeatureStore(cache_dir, {"kind": "features", "weights": weights_digest(model),
                                     "pixels": pixel_key(data), "preprocessing": data.preprocessing, ...})
    feats = store.get_or_compute(rows, compute)   # rows: pixel-cache row indices (split_rows(split))
    store.computed, store.reused                  # how many rows the last call computed / read back

`compute(missing_rows) -> array (len(missing_rows), ...)` gets the rows not stored yet, in ascending
order; `get_or_compute` returns one row per requested row, in the requested order, and adds the new
ones to the entry. An entry is one file `<cache_dir>/features/<key>.safetensors`, key = sha256 of
the key parts (JSON), holding `rows` (ascending pixel-cache row indices) and `values` (one row each)
with the key parts and a crc32 of both arrays in its header. Rows are the pixel cache's, not a
split's positions, so other splits, folds, subsets and seeds of the same images reuse an entry. An
entry that fails its checks (truncated, bit-flipped, another key) is logged, removed and recomputed;
writes are atomic (temp file + rename) and best effort: a full disk costs only the recomputation
next time. Two runs adding rows to one entry at once may lose one's additions (recomputed later).
Entries are never deleted; `<cache_dir>/features/` can be removed at any time.

What belongs in a key: everything the values depend on. For features (`feature_key_parts`): the
backbone weights' sha256 (`weights_digest`, so another weights file gives another key), the model
name and kwargs, the pixel cache entry's key (`pixel_key`: it changes with any image file), the
preprocessing (mean/std, img_size, crop_pct, ...), the autocast dtype, and the view: "center" (the
eval view, the centre img_size crop) or an augmented view (augment preset, seed, view index).

Compute helpers: `forward_rows(fn, images, rows, ...)` runs `fn` over cached images in batches under
torch.inference_mode, on the eval view or on augmented view v of each row (augment_batch seeded per
(seed, view, row), so a row's view does not depend on which other rows were computed with it);
`pooled(model)` is the linear probe's fn. `FeatureLoader` batches stored features like BatchLoader
batches images (same epoch order rule), for training a head through the normal engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from typing import Callable

import numpy as np
import torch

from imgarena.data.cache import RowView, write_best_effort

log = logging.getLogger(__name__)

STORE_VERSION = 1
FOLDER = "features"
_VIEW_SALT = 0xFEA7
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_malloc_tuned = False


# ---------------------------------------------------------------------- keys

def store_key(parts: dict) -> str:
    blob = json.dumps({"store_version": STORE_VERSION, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def weights_digest(model: torch.nn.Module, *, include_head: bool = False) -> str:
    """sha256 of the model's weights and buffers (names, dtypes, shapes, bytes), without the classifier
    (get_classifier()) unless include_head: the backbone's identity for a feature key."""
    head = set()
    if not include_head and hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        mods = clf if isinstance(clf, (tuple, list)) else (clf,)
        head = {t.data_ptr() for m in mods for t in (*m.parameters(), *m.buffers())}
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in head and t.numel():
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def pixel_key(data) -> str | None:
    """The key of the pixel cache entry `data`'s images come from (None: not from the cache)."""
    path = getattr(data, "cache_path", "") or ""
    return os.path.basename(os.path.normpath(path)) if path else None


def split_rows(split) -> np.ndarray | None:
    """Pixel-cache row index of each image of `split` (None when its images are not cache rows)."""
    images = getattr(split, "images", None)
    return np.asarray(images.rows, np.int64) if isinstance(images, RowView) else None


def feature_key_parts(model, data, *, weights: str, amp: torch.dtype | None, view: str | int = "center",
                      augment: str | None = None, seed: int | None = None) -> dict:
    """The key parts of `model`'s pooled features of `data`'s images (see the module docstring)."""
    parts = {"kind": "pooled_features", "weights": weights, "model": getattr(model, "model_name", "") or
             type(model).__name__, "model_kwargs": dict(getattr(model, "model_kwargs", {}) or {}),
             "pixels": pixel_key(data), "preprocessing": dict(data.preprocessing),
             "amp": str(amp).replace("torch.", "") if amp else "fp32", "view": view}
    if view != "center":
        parts.update(augment=augment, seed=int(seed or 0))
    return parts


# ---------------------------------------------------------------------- the store

class FeatureStore:
    """One entry: values for pixel-cache rows under one key (see the module docstring)."""

    def __init__(self, cache_dir: str, key_parts: dict):
        self.key_parts = dict(key_parts)
        self.key = store_key(self.key_parts)
        self.path = os.path.join(str(cache_dir), FOLDER, f"{self.key}.safetensors")
        self.computed = 0
        self.reused = 0

    def load(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, values) of a sound entry, else None (a damaged one is removed with a warning)."""
        if not os.path.exists(self.path):
            return None
        from safetensors import SafetensorError

        try:
            rows, values = self._read()
        except (OSError, ValueError, KeyError, SafetensorError) as e:  # torn, truncated or bit-flipped
            log.warning("feature store %s is damaged (%s): recomputing it", self.path, str(e)[:200] or type(e).__name__)
            try:
                os.remove(self.path)
            except OSError:
                pass
            return None
        return rows, values

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        from safetensors import safe_open

        with safe_open(self.path, framework="np") as f:
            meta = f.metadata() or {}
            rows, values = f.get_tensor("rows"), f.get_tensor("values")
        if meta.get("key") != self.key or int(meta.get("version", -1)) != STORE_VERSION:
            raise ValueError("its header names another key")
        if rows.ndim != 1 or len(rows) != len(values) or (len(rows) > 1 and not np.all(rows[1:] > rows[:-1])):
            raise ValueError("its rows are not one ascending index per value")
        if meta.get("crc32") != _crc(rows, values):
            raise ValueError("its contents do not match their checksum")
        return rows.astype(np.int64, copy=False), values

    def save(self, rows: np.ndarray, values: np.ndarray) -> bool:
        from safetensors.numpy import save

        rows = np.ascontiguousarray(rows, np.int64)
        values = np.ascontiguousarray(values)
        meta = {"key": self.key, "version": str(STORE_VERSION), "crc32": _crc(rows, values),
                "key_parts": json.dumps(self.key_parts, sort_keys=True, default=str)}
        blob = save({"rows": rows, "values": values}, metadata=meta)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return write_best_effort(self.path, lambda f: f.write(blob), what=f"feature store {self.path}")

    def get_or_compute(self, rows, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Values of `rows` (in that order): stored ones read back, the others computed (one call
        to `compute` with the missing rows, ascending) and added to the entry."""
        rows = np.asarray(rows, np.int64)
        want = np.unique(rows)
        if len(want) == 0:
            self.reused = self.computed = 0
            return np.zeros((0,), np.float32)
        have = self.load()
        old_rows, old_values = have if have is not None else (np.zeros(0, np.int64), None)
        missing = want[~_isin_sorted(want, old_rows)]
        self.reused, self.computed = len(want) - len(missing), len(missing)
        if len(missing):
            new = np.asarray(compute(missing))
            if len(new) != len(missing):
                raise RuntimeError(f"compute returned {len(new)} rows for {len(missing)}")
            all_rows = np.concatenate([old_rows, missing])
            order = np.argsort(all_rows, kind="stable")
            all_values = new if old_values is None else np.concatenate([old_values, new])
            all_rows, all_values = all_rows[order], all_values[order]
            self.save(all_rows, all_values)
        else:
            all_rows, all_values = old_rows, old_values
        return all_values[np.searchsorted(all_rows, rows)]


def _isin_sorted(values: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    if len(sorted_ref) == 0:
        return np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(sorted_ref, values), len(sorted_ref) - 1)
    return sorted_ref[pos] == values


def _crc(rows: np.ndarray, values: np.ndarray) -> str:
    crc = zlib.crc32(memoryview(np.ascontiguousarray(rows)).cast("B"))
    crc = zlib.crc32(memoryview(np.ascontiguousarray(values)).cast("B"), crc)
    return f"{crc:08x}:{values.dtype.str}:{'x'.join(map(str, values.shape))}"


# ---------------------------------------------------------------------- computing

def pooled(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear probe's features: what get_classifier() maps to logits."""
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def forward_rows(fn: Callable[[torch.Tensor], torch.Tensor], images, rows: np.ndarray, *, img_size: int, mean, std,
                 device, amp: torch.dtype | None = None, batch_size: int = 64, channels_last: bool = False,
                 augment: str = "none", seed: int = 0, view: int = 0, stats: dict | None = None) -> np.ndarray:
    """`fn` of each cached image `images[rows]` ((N, C, S, S) uint8, S the store size) as float32,
    batched under torch.inference_mode. The input is the eval view (centre img_size crop) with
    augment "none", else view `view` of `augment` (photo: a random resized crop; the others: the
    centre crop, augmented), drawn per row from (seed, view, row). `stats` gets images and seconds."""
    from imgarena.data.augment import augment_batch
    from imgarena.data.images import center_crop
    from imgarena.data.loader import _mix_seed
    from imgarena.engine.evaluate import autocast

    device = torch.device(device)
    if device.type == "cpu":
        _retain_freed_memory()
    rows = np.asarray(rows, np.int64)
    c = images.shape[1]
    m = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, c, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, c, 1, 1)
    fill = torch.tensor(list(mean), dtype=torch.float32)
    out, start = None, time.perf_counter()
    for a in range(0, len(rows), batch_size):
        chunk = rows[a:a + batch_size]
        u8 = np.asarray(images[chunk])
        if augment == "none":
            x = torch.from_numpy(np.ascontiguousarray(center_crop(u8, img_size))).to(device).float().div_(255.0)
        else:
            x = torch.from_numpy(u8).float().div_(255.0)
            views = []
            for i, r in enumerate(chunk):
                gen = torch.Generator().manual_seed(_mix_seed(seed, view, int(r), _VIEW_SALT))
                views.append(augment_batch(x[i:i + 1], augment, gen, fill=fill, inplace=True, out_size=img_size))
            x = torch.cat(views).to(device)
        x = x.sub_(m).div_(s)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device, amp):
            y = fn(x)
        y = y.float().cpu().numpy()
        if out is None:
            out = np.empty((len(rows), *y.shape[1:]), np.float32)
        out[a:a + len(chunk)] = y
    if stats is not None:
        stats["images"] = stats.get("images", 0) + len(rows)
        stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - start
    return out if out is not None else np.zeros((0,), np.float32)


def _retain_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of unmapping it (once per process, Linux).

    A ResNet-50 batch of 64 at 224 px allocates activations of ~200 MB per layer; glibc serves
    blocks that large with fresh mmaps, so every layer page-faults them in again: 10,000 faults and
    ~18% of the CPU time per image in system time (measured: 7.7 -> 6.4 CPU-seconds per 64 images,
    faults 650k -> 13k). Raising the mmap and trim thresholds makes freed blocks reusable. The
    process keeps its peak memory mapped afterwards, which the next batches use anyway."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune
        pass


# ---------------------------------------------------------------------- training on stored features

class FeatureLoader:
    """Iterate (features float32 (B, ...), labels int64 (B,)) on `device` from stored features, with
    BatchLoader's rules: the order a pure function of (seed, epoch), shards padded to equal length
    across ranks, drop_last, and a resume offset (set_epoch(epoch, start_step)). `views` (V, N, ...)
    holds V views of each sample; epoch e uses view e % V."""

    def __init__(self, views: torch.Tensor, labels, batch_size: int, *, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, device="cpu", rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.views = views.to(self.device)
        self.labels = torch.as_tensor(np.asarray(labels, np.int64), device=self.device)
        self.n = int(self.views.shape[1])
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), shuffle, int(seed), drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0

    @property
    def samples_per_rank(self) -> int:
        return self.n // self.world_size if self.drop_last else -(-self.n // self.world_size)

    def __len__(self) -> int:
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        from imgarena.data.loader import _mix_seed

        order = (np.random.default_rng(_mix_seed(self.seed, epoch, 0x0DE5)).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        total = self.samples_per_rank * self.world_size
        if total > self.n:  # pad by wrapping so every rank has as many samples
            order = np.concatenate([order, np.resize(order, total - self.n)])
        return order[:total][self.rank::self.world_size]

    def __iter__(self):
        epoch, start = self.epoch, self.start_step
        self.start_step = 0  # a resume offset applies to one pass only
        order = self.epoch_indices(epoch)
        feats = self.views[epoch % self.views.shape[0]]
        for step in range(start, len(self)):
            idx = torch.from_numpy(np.sort(order[step * self.batch_size:(step + 1) * self.batch_size]))
            idx = idx.to(self.device)
            yield feats.index_select(0, idx), self.labels.index_select(0, idx)
