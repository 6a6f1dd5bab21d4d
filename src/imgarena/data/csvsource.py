"""A CSV of `path,label` rows (paths relative to the CSV). An optional third column `split`
(train/val/test) fixes the split per row.

A header row is optional and found, not assumed: the first row is a header when it names the
columns (path/file/filename/image..., label/class/target...; then columns may come in any order),
or when its path is neither an existing file nor an image file name while the other rows' paths are.
Rows repeating an image with the same label are dropped (the image would otherwise be drawn into
train and val alike); the same image with two labels or two splits is an error naming both rows.
"""

from __future__ import annotations

import csv
import os

from imgarena.data.images import IMAGE_EXTENSIONS
from imgarena.data.scan import Listing
from imgarena.errors import UserError

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
PATH_COLUMNS = frozenset({"path", "paths", "file", "files", "filename", "file_name", "filepath", "file_path",
                          "image", "images", "img", "image_path", "img_path", "image_file", "image_name", "fname"})
LABEL_COLUMNS = frozenset({"label", "labels", "class", "class_name", "classname", "target", "category",
                           "label_name", "y"})
SPLIT_COLUMNS = frozenset({"split", "subset", "set", "partition"})
_SNIFF_ROWS = 200  # rows looked at to decide whether the first row is a header


def _norm(cell: str) -> str:
    return cell.strip().lower().replace(" ", "_").replace("-", "_")


def _has_image_ext(cell: str) -> bool:
    return os.path.splitext(cell.strip())[1].lower() in IMAGE_EXTENSIONS


def _header_columns(first: list[str], rest: list[tuple[int, list[str]]], resolve) -> tuple[dict, str] | None:
    """({"path": i, "label": j, "split": k?}, how) when `first` is a header row, else None."""
    if not first or os.path.isfile(resolve(first[0])):
        return None  # an existing file is data, whatever it is called
    names = [_norm(c) for c in first]
    path_i = next((i for i, n in enumerate(names) if n in PATH_COLUMNS), None)
    label_i = next((i for i, n in enumerate(names) if n in LABEL_COLUMNS), None)
    split_i = next((i for i, n in enumerate(names) if n in SPLIT_COLUMNS), None)
    if path_i is not None and label_i is not None:
        cols = {"path": path_i, "label": label_i}
        if split_i is not None:
            cols["split"] = split_i
        return cols, "named"
    # Unknown column names: a header if its path cell does not look like a file while most rows do.
    if _has_image_ext(first[0]) or not rest:
        return None
    sample = [r for _, r in rest[:_SNIFF_ROWS]]
    filelike = sum(1 for r in sample if _has_image_ext(r[0]) or os.path.isfile(resolve(r[0])))
    if filelike * 2 > len(sample):
        return {"path": 0, "label": 1, "split": 2}, "guessed"
    return None


def read_csv(path: str, *, min_classes: int = 2) -> Listing:
    """Listing of a CSV source. Training needs `min_classes` = 2 labels; evaluation takes 1."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: pass a CSV file with columns path,label")
    base = os.path.dirname(path)

    def resolve(cell: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(cell.strip())))

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            # (line number, cells): line numbers are what an editor shows, blank lines included
            rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} ({e}): save it as a UTF-8 CSV with columns path,label") from None
    warnings: list[str] = []
    cols = {"path": 0, "label": 1, "split": 2}
    if rows:
        found = _header_columns(rows[0][1], rows[1:], resolve)
        if found:
            cols, how = found
            if how == "guessed":
                warnings.append(f"{path}: first row {','.join(rows[0][1])!r} read as a header (its path is not an "
                                "image file); name the columns path,label to make that explicit")
            rows = rows[1:]
    if not rows:
        raise UserError(f"{path} has no rows: add lines of path,label (paths relative to the CSV)")

    def cell(r: list[str], name: str) -> str:
        i = cols.get(name)
        return r[i].strip() if i is not None and i < len(r) else ""

    entries = []
    seen: dict[str, tuple[str, str, int]] = {}  # path -> (label, split, line)
    duplicates = []
    for line, r in rows:
        p_cell, lab = cell(r, "path"), cell(r, "label")
        if not p_cell or not lab:
            raise UserError(f"{path} row {line}: expected path,label, got {','.join(r)!r}")
        split = "all"
        if cell(r, "split"):
            split = _SPLIT_NAMES.get(cell(r, "split").lower())
            if split is None:
                raise UserError(f"{path} row {line}: split {cell(r, 'split')!r} must be one of train, val, test")
        p = resolve(p_cell)
        if p in seen:
            lab0, split0, line0 = seen[p]
            if lab0 != lab:
                raise UserError(f"{path} rows {line0} and {line}: {p_cell} is labelled both {lab0!r} and {lab!r}; "
                                "keep one row per image")
            if split0 != split:
                raise UserError(f"{path} rows {line0} and {line}: {p_cell} is put in both {split0} and {split}; "
                                "keep one row per image")
            duplicates.append(line)
            continue
        seen[p] = (lab, split, line)
        entries.append((p, lab, split))
    if duplicates:
        warnings.append(f"{path}: {len(duplicates)} repeated row(s) ignored (same path and label again, e.g. row "
                        f"{duplicates[0]}), so no image is drawn into both train and val")
    splits_used = {s for _, _, s in entries}
    if "all" in splits_used and len(splits_used) > 1:
        raise UserError(f"{path}: give every row a split (train/val/test) or none of them")
    classes = sorted({lab for _, lab, s in entries if s in ("all", "train")})
    if len(classes) < min_classes:
        raise UserError(f"{path} needs at least {min_classes} different labels among its training rows, "
                        f"found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    warnings += [f"{path}: label {lab!r} has no training rows; its rows are ignored"
                 for lab in sorted({lab for _, lab, _ in entries} - set(classes))]
    splits: dict[str, list] = {}
    for p, lab, s in entries:
        if lab in index:
            splits.setdefault(s, []).append((p, index[lab]))
    return Listing(root=base, classes=classes, splits=splits, warnings=warnings)
