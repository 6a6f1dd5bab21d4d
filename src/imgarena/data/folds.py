"""K-fold cross-validation over already-loaded data (no image is decoded again).

    data = load_data(DataConfig(source=..., folds=5))        # fold 0 of repeat 0
    fold_data(data, folds=5, fold=2, repeat=1, seed=0)       # any other fold, from the same cache
    fold_assignments(data, folds=5, repeat=1, seed=0)        # [val ids of fold 0, ..., fold 4]

Folds are stratified and grouped (near-duplicates and `group_by` groups stay in one fold); within
one (seed, repeat) every image of the pool is validated exactly once. The pool is the source's
train and val parts (thinned by `subset`); a test part stays the test split of every fold.
"""

from __future__ import annotations

from imgarena.data.prepare import PreparedData, resplit


def fold_data(data: PreparedData, *, folds: int, fold: int, repeat: int = 0, seed: int | None = None) -> PreparedData:
    """`data` with fold `fold` of repeat `repeat` as its val split and the other folds as train; its
    `split_record` names folds/fold/repeat and lists every image of each side."""
    changes = {"folds": int(folds), "fold": int(fold), "repeat": int(repeat)}
    if seed is not None:
        changes["split_seed"] = int(seed)
    return resplit(data, **changes)


def fold_assignments(data: PreparedData, *, folds: int, repeat: int = 0, seed: int | None = None) -> list[list[str]]:
    """The val image ids (paths relative to the root, or built-in ids) of every fold of one repeat."""
    return [fold_data(data, folds=folds, fold=f, repeat=repeat, seed=seed).split_record["splits"]["val"]
            for f in range(int(folds))]
