"""BatchLoader: cached uint8 images -> normalised, augmented float batches on the training device.

Everything random is a pure function of (seed, epoch, step): the epoch's order comes from
(seed, epoch) and each batch's augmentation generator is seeded from (seed, epoch, step), so a run
resumed at (epoch, step) sees exactly the batches it would have seen. A background thread gathers,
copies and augments the next batches while the training step runs.
"""

from __future__ import annotations

import atexit
import queue
import threading

import numpy as np
import torch

from imgarena.data.augment import PRESETS, augment_batch
from imgarena.data.images import center_crop


# (stop event, thread) of every prefetcher whose batch iterator has not been closed. An iterator
# abandoned without closing keeps its daemon thread making batches; a daemon thread still inside a
# torch op when the interpreter finalizes is killed in a C++ frame, which aborts the process. So
# stop and join them at exit, while threads can still run.
_LIVE_PREFETCHERS: set = set()


@atexit.register
def _stop_prefetchers() -> None:
    live = list(_LIVE_PREFETCHERS)
    for stop, _ in live:
        stop.set()
    for _, t in live:
        t.join(timeout=5)


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SeedSequence mixes them so nearby steps get unrelated streams)."""
    hi, lo = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


class BatchLoader:
    """Iterate (x float32 (B, C, out_size, out_size) normalised, y int64 (B,)) on `device` (plus the
    samples' positions in the split with return_index=True).

    out_size (default: the images' own size): augment "photo" takes a random resized crop of each
    stored image at this size; every other preset, and evaluation (augment "none"), its centre crop
    (the eval view, `imgarena.data.images.center_crop`), cut before the pixels leave uint8.

    shuffle: reshuffle every epoch (call set_epoch); drop_last: skip the last partial batch;
    rank/world_size: this process's shard. pad=True (training): every rank gets the same number of
    batches, the order padded by repeating samples when N is not divisible (as DistributedSampler
    does), because DDP needs every rank to take the same steps. pad=False (evaluation): rank r gets
    its own contiguous slice, so every sample is seen exactly once across ranks; shards may differ
    by one sample, which is fine when the per-rank sums are all-reduced afterwards.
    """

    def __init__(self, split, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 device="cpu", augment: str = "none", mean=(0.5,), std=(0.5,), rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, prefetch: int = 2, pad: bool = True, return_index: bool = False,
                 out_size: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if augment not in PRESETS:
            raise ValueError(f"augment must be one of {', '.join(PRESETS)}, got {augment!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.images, self.labels = split.images, np.asarray(split.labels, np.int64)
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), shuffle, int(seed), drop_last
        self.device = torch.device(device)
        self.augment, self.rank, self.world_size, self.pad = augment, rank, world_size, pad
        self.channels_last, self.prefetch = channels_last, max(1, prefetch)
        c, stored = self.images.shape[1], self.images.shape[-1]
        self.out_size = int(out_size or stored)
        if not 1 <= self.out_size <= min(self.images.shape[-2:]):
            raise ValueError(f"out_size {out_size} must be between 1 and the images' size {stored}")
        # the centre crop for every preset but photo; images already at out_size take the old path untouched
        self._center = augment != "photo" and tuple(self.images.shape[-2:]) != (self.out_size, self.out_size)
        mean, std = list(mean), list(std)
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self._pin = self.device.type == "cuda"
        self.return_index = return_index  # also yield each sample's position in the split (int64 (B,), on device)
        self.epoch, self.start_step = 0, 0

    # ---- order ----
    def __len__(self) -> int:
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def samples_per_rank(self) -> int:
        n, w = len(self.labels), self.world_size
        if not self.pad:
            return len(self._shard(n))
        return n // w if self.drop_last else -(-n // w)

    def _shard(self, n: int) -> range:
        """pad=False: this rank's contiguous positions in the epoch order (sizes differ by at most 1)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Next iteration yields epoch `epoch`'s batches from batch index `start_step` on."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's sample order for `epoch`."""
        n = len(self.labels)
        epoch = self.epoch if epoch is None else epoch
        order = (np.random.default_rng(_mix_seed(self.seed, epoch, 0x0DE5)).permutation(n) if self.shuffle
                 else np.arange(n))
        if not self.pad:
            shard = self._shard(n)
            return order[shard.start : shard.stop]
        total = self.samples_per_rank * self.world_size
        if total > n:  # pad by wrapping so every rank has as many samples
            order = np.concatenate([order, np.resize(order, total - n)])
        return order[:total][self.rank :: self.world_size]

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        idx = self.epoch_indices(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        # Sorted within the batch: memmap reads become sequential (matters when the cache is bigger
        # than RAM) and the order inside a batch does not change what the model learns.
        return np.sort(idx)

    # ---- producing one batch ----
    def _make(self, epoch: int, step: int, order: np.ndarray):
        idx = np.sort(order[step * self.batch_size : (step + 1) * self.batch_size])
        x = self.images[idx]
        if self._center:
            x = center_crop(x, self.out_size)
        x = torch.from_numpy(np.ascontiguousarray(x))
        y = torch.from_numpy(self.labels[idx])
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        y = y.to(self.device, non_blocking=True)
        if self.augment != "none":
            gen = torch.Generator(device=self.device).manual_seed(_mix_seed(self.seed, epoch, step, 0xA06))
            x = augment_batch(x, self.augment, gen, fill=self.mean.view(-1), inplace=True, out_size=self.out_size)
        x = x.sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.return_index:
            return x, y, torch.from_numpy(idx).to(self.device, non_blocking=True)
        return x, y

    def __iter__(self):
        epoch, start = self.epoch, self.start_step
        self.start_step = 0  # a resume offset applies to one pass only
        order = self.epoch_indices(epoch)
        steps = range(start, len(self))
        if self.prefetch <= 0 or len(steps) <= 1:
            for s in steps:
                yield self._make(epoch, s, order)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item):  # gives up once the consumer has gone (stop set)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce():
            # One intra-op thread here: the training step owns the cores, and two OpenMP teams
            # spinning on the same cores slowed loading ~40x on a 2-core machine. Per-thread setting.
            torch.set_num_threads(1)
            try:
                for s in steps:
                    if stop.is_set():
                        return
                    put(self._make(epoch, s, order))
                put(done)
            except BaseException as e:  # handed to the consumer and re-raised there
                put(e)

        t = threading.Thread(target=produce, name="imgarena-batch-prefetch", daemon=True)
        t.start()
        live = (stop, t)
        _LIVE_PREFETCHERS.add(live)
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=5)
            _LIVE_PREFETCHERS.discard(live)
