"""Find images and labels in a folder: DATA/train|val|test/<class>/… or DATA/<class>/…."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from imgarena.data.images import is_image_file
from imgarena.errors import UserError

IGNORED_DIRS = frozenset({"__MACOSX", "__pycache__"})  # archive/tool debris, never a class
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass
class Listing:
    """Files found in a source: `splits[name]` = [(path, label_index)]; name in train/val/test/all."""

    root: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    warnings: list[str] = field(default_factory=list)
    ignored: int = 0  # non-image / hidden files skipped


def _visible_dirs(path: str) -> list[str]:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot read folder {path} ({e.strerror}): check its permissions") from None
    return [e.name for e in entries if not e.name.startswith(".") and e.name not in IGNORED_DIRS and e.is_dir()]


def _dir_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def walk_images(folder: str, outer: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """Image files under `folder` (recursively, following symlinks but never a loop, nor a link back
    into the `outer` folders such as the dataset root), and the number of non-image files ignored.
    Sorted, so listings are reproducible."""
    found, ignored = [], 0
    seen: set[tuple[int, int]] = {_dir_id(d) for d in outer}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # symlink loop or a second link to a visited folder
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in IGNORED_DIRS)
        for name in filenames:
            if is_image_file(name):
                found.append(os.path.join(dirpath, name))
            elif not name.startswith("."):
                ignored += 1
    return sorted(found), ignored


def _find_split_dir(root: str, names, children) -> str | None:
    lower = {c.lower(): c for c in children}
    for n in names:
        if n in lower:
            return os.path.join(root, lower[n])
    return None


def scan_folder(root: str, *, min_classes: int = 2) -> Listing:
    """Listing of an image folder. Raises UserError when it is missing or has fewer than
    `min_classes` classes (training needs 2; evaluating a model on new images of one class, 1)."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.exists(root):
        raise UserError(f"{root} does not exist: pass an image folder, a CSV of path,label, or a built-in name")
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder: pass a folder of class subfolders or a .csv file")
    children = _visible_dirs(root)
    split_dirs = {k: _find_split_dir(root, names, children) for k, names in SPLIT_DIRS.items()}
    warnings: list[str] = []
    if split_dirs["train"]:
        per_split = {k: d for k, d in split_dirs.items() if d}
    else:
        per_split = {"all": root}
        if split_dirs["val"] or split_dirs["test"]:
            warnings.append(f"{root} has a val/test folder but no train/ folder: treating every subfolder as a class")

    # Class names come from the training folders (or the only folder); val/test classes must match.
    class_root = per_split.get("train", per_split.get("all"))
    class_names = _visible_dirs(class_root)
    files: dict[str, list[tuple[str, str]]] = {}
    ignored = 0
    for split, d in per_split.items():
        files[split] = []
        for cname in _visible_dirs(d):
            if split in ("all", "train") or cname in class_names:
                imgs, ign = walk_images(os.path.join(d, cname), outer=(root, d))
                ignored += ign
                files[split] += [(p, cname) for p in imgs]
            else:
                warnings.append(f"{os.path.join(d, cname)}: class {cname!r} has no train/ folder; ignored")
    counts = {c: sum(1 for lst in files.values() for _, n in lst if n == c) for c in class_names}
    empty = [c for c in class_names if counts[c] == 0]
    for c in empty:
        warnings.append(f"class folder {os.path.join(class_root, c)} has no images; class {c!r} skipped")
    classes = [c for c in class_names if counts[c] > 0]
    if len(classes) < min_classes:
        found = f"found {len(classes)} ({', '.join(classes)})" if classes else "found none"
        need = f"{min_classes} class subfolders" if min_classes > 1 else "1 class subfolder"
        raise UserError(
            f"{class_root} needs at least {need} with images ({found}): "
            "put each class's images in its own subfolder, e.g. DATA/cat/*.jpg DATA/dog/*.jpg"
        )
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: [(p, index[c]) for p, c in lst if c in index] for s, lst in files.items()}
    if not splits.get("train", splits.get("all")):
        raise UserError(f"{class_root} has no training images: add images to its class folders")
    return Listing(root=root, classes=classes, splits=splits, warnings=warnings, ignored=ignored)
