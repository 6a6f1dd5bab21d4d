"""Seeded, stratified index splits and K folds. Each class draws from its own RNG stream (seed,
class id), so adding images to one class never reshuffles another class's split. The grouped
versions keep every group (near-duplicates, one photographed object) on one side."""

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


# ---- grouped splits and folds: near-duplicates and user groups never straddle two sides ----

def _fold_rng(seed: int, k: int, repeat: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(k), int(repeat), *map(int, extra), 0xF01D])


def _multi_groups(groups, n: int) -> list[np.ndarray]:
    """Member indices of every group with more than one member (largest first, ties by first member)."""
    if groups is None:
        return []
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    vals = groups[order]
    starts = np.flatnonzero(np.r_[True, vals[1:] != vals[:-1]]) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    return [np.sort(order[s : s + z]) for s, z in zip(starts, sizes) if z > 1]


def _assign(labels: np.ndarray, multi: list[np.ndarray], targets: np.ndarray, rng: np.random.Generator,
            class_perm) -> np.ndarray:
    """Side (0..S-1) per item. Groups first, largest first (ties in random order), each into the side
    whose per-class counts are furthest below target for the group's classes: the side where it
    least increases the squared deviation from target relative to the target (so a big group is not
    dropped into a small val side it would overfill); then each class's remaining single items, in the order `class_perm(c, idx)` gives,
    fill the sides up to their targets (leftovers go to the emptiest sides)."""
    classes = np.unique(labels)
    col = {int(c): i for i, c in enumerate(classes)}
    n_sides = targets.shape[0]
    side = np.full(len(labels), -1, np.int64)
    count = np.zeros_like(targets)
    order = rng.permutation(len(multi))
    order = order[np.argsort([-len(multi[i]) for i in order], kind="stable")]
    for gi in order:
        members = multi[gi]
        g = np.zeros(len(classes))
        np.add.at(g, [col[int(c)] for c in labels[members]], 1)
        t = np.maximum(targets, 0.5)  # a class a side should not have at all: strongly penalised
        cost = (((count + g - targets) / t) ** 2 - ((count - targets) / t) ** 2).sum(axis=1)
        tie = rng.permutation(n_sides)
        best = tie[np.argmin(cost[tie])]
        side[members] = best
        count[best] += g.astype(count.dtype)
    for c in classes:
        idx = class_perm(int(c), np.flatnonzero((labels == c) & (side < 0)))
        j = col[int(c)]
        pos = 0
        for s in range(n_sides):
            take = int(max(0, min(targets[s, j] - count[s, j], len(idx) - pos)))
            side[idx[pos : pos + take]] = s
            count[s, j] += take
            pos += take
        for i in idx[pos:]:  # groups overfilled this class: the rest to the emptiest sides
            s = int(np.argmin(count[:, j] / np.maximum(targets[:, j], 1)))
            side[i] = s
            count[s, j] += 1
    return side


def group_stratified_split(labels, groups, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), sorted, with every group (items sharing a `groups` value) on one side and
    per-class val counts as close to stratified_split's as the groups allow. Without any group of
    two or more it is stratified_split itself (the same split for the same seed)."""
    labels = np.asarray(labels)
    multi = _multi_groups(groups, len(labels))
    if not multi:
        return stratified_split(labels, fraction, seed)
    counts = np.unique(labels, return_counts=True)[1]
    n_val = np.array([0 if n < 2 else min(n - 1, max(1, int(round(n * fraction)))) for n in counts])
    targets = np.stack([counts - n_val, n_val])

    def perm(c, idx):  # the same per-class streams as stratified_split
        return idx[_class_rng(seed, c).permutation(len(idx))]

    side = _assign(labels, multi, targets, np.random.default_rng([int(seed), 0x6A0]), perm)
    return np.flatnonzero(side == 0).astype(np.int64), np.flatnonzero(side == 1).astype(np.int64)


def group_stratified_folds(labels, groups, k: int, seed: int, repeat: int = 0) -> np.ndarray:
    """Fold (0..k-1) of every item: stratified K-fold with every group inside one fold, so each item
    is validated exactly once per repeat. Each repeat reshuffles, from (seed, repeat)."""
    labels = np.asarray(labels)
    if k < 2:
        raise ValueError(f"folds must be at least 2, got {k}")
    counts = np.unique(labels, return_counts=True)[1]
    rng = _fold_rng(seed, k, repeat)
    targets = np.zeros((k, len(counts)), np.int64)
    for j, n in enumerate(counts):  # n // k each, the remainder to folds in a random order
        targets[:, j] = n // k
        targets[rng.permutation(k)[: n % k], j] += 1

    def perm(c, idx):
        return idx[_fold_rng(seed, k, repeat, c).permutation(len(idx))]

    return _assign(labels, _multi_groups(groups, len(labels)), targets, rng, perm)
