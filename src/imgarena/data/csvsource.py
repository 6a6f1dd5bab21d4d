"""A CSV of `path,label` rows (paths relative to the CSV; a header row is optional). An optional
third column `split` (train/val/test) fixes the split per row."""

from __future__ import annotations

import csv
import os

from imgarena.data.scan import Listing
from imgarena.errors import UserError

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_csv(path: str) -> Listing:
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: pass a CSV file with columns path,label")
    base = os.path.dirname(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} ({e}): save it as a UTF-8 CSV with columns path,label") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise UserError(f"{path} has no rows: add lines of path,label (paths relative to the CSV)")
    entries = []
    for n, r in enumerate(rows, 1):
        if len(r) < 2 or not r[0].strip() or not r[1].strip():
            raise UserError(f"{path} row {n}: expected path,label, got {','.join(r)!r}")
        split = "all"
        if len(r) >= 3 and r[2].strip():
            split = _SPLIT_NAMES.get(r[2].strip().lower())
            if split is None:
                raise UserError(f"{path} row {n}: split {r[2]!r} must be one of train, val, test")
        p = os.path.normpath(os.path.join(base, os.path.expanduser(r[0].strip())))
        entries.append((p, r[1].strip(), split))
    splits_used = {s for _, _, s in entries}
    if "all" in splits_used and len(splits_used) > 1:
        raise UserError(f"{path}: give every row a split (train/val/test) or none of them")
    classes = sorted({lab for _, lab, s in entries if s in ("all", "train")})
    if len(classes) < 2:
        raise UserError(f"{path} needs at least 2 different labels among its training rows, found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    warnings = [f"{path}: label {lab!r} has no training rows; its rows are ignored"
                for lab in sorted({lab for _, lab, _ in entries} - set(classes))]
    splits: dict[str, list] = {}
    for p, lab, s in entries:
        if lab in index:
            splits.setdefault(s, []).append((p, index[lab]))
    return Listing(root=base, classes=classes, splits=splits, warnings=warnings)
