"""Helpers for the data tests: write small real image files and datasets to disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def class_value(label: int) -> int:
    """Every pixel of a class-`label` test image has this value, so labels can be checked from pixels."""
    return 20 + 40 * label


def write_class_folder(root, classes=("cat", "dog", "owl"), per_class=10, size=12, mode="L", start=0):
    """root/<class>/<i>.png with constant pixels class_value(label); returns root."""
    for k, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(start, start + per_class):
            v = class_value(k)
            arr = np.full((size, size) if mode == "L" else (size, size, 3), v, np.uint8)
            arr[0, 0] = i % 256  # make files distinct (duplicates are reported separately)
            Image.fromarray(arr, mode).save(os.path.join(root, c, f"{c}_{i:03d}.png"))
    return str(root)


def write_bad_files(folder):
    """A truncated JPEG, a zero-byte file and a text file named .jpg in `folder`."""
    os.makedirs(folder, exist_ok=True)
    good = os.path.join(folder, "_tmp_full.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    data = open(good, "rb").read()
    os.remove(good)
    paths = {
        "truncated": os.path.join(folder, "truncated.jpg"),
        "empty": os.path.join(folder, "empty.png"),
        "text": os.path.join(folder, "notes.jpg"),
    }
    open(paths["truncated"], "wb").write(data[: len(data) // 2])
    open(paths["empty"], "wb").close()
    open(paths["text"], "w").write("this is not an image\n")
    return paths


def write_noisy_rgb_folder(root, classes=("cat", "dog", "fish"), per_class: int = 14, size: int = 16):
    """Learnable but noisy enough to make mistakes (engine tests). root/<class>/<i>.png: RGB noise (0..119) with channel `class index % 3` raised by 110."""
    rng = np.random.default_rng(0)
    root = Path(root)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
            img[..., c % 3] += 110
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root
