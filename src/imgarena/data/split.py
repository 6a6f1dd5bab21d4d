"""Seeded, stratified index splits. Each class draws from its own RNG stream (seed, class id), so
adding images to one class never reshuffles another class's split."""

from __future__ import annotations

import numpy as np


def _class_rng(seed: int, cls: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(cls), 0x5EED])


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), sorted. Every class with >= 2 items gets at least one val item."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    labels = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = idx[_class_rng(seed, c).permutation(len(idx))]
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, int(round(len(idx) * fraction))))
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(train).astype(np.int64), cat(val).astype(np.int64)


def stratified_subset(labels, n: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `n` items keeping class proportions (at least one per class)."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    if n < 1:
        raise ValueError(f"subset must be at least 1, got {n}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n / len(labels))
    take = np.maximum(1, np.floor(quota)).astype(np.int64)
    # Hand the remaining slots to the largest remainders so the total is exactly max(n, #classes).
    rest = n - take.sum()
    if rest > 0:
        order = np.argsort(-(quota - np.floor(quota)), kind="stable")
        for i in order[:rest]:
            take[i] += 1
    take = np.minimum(take, counts)
    keep = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        keep.append(idx[_class_rng(seed + 1, c).permutation(len(idx))[:k]])
    return np.sort(np.concatenate(keep)).astype(np.int64)
