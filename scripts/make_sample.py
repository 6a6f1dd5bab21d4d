"""Build the embedded `sample` dataset: a stratified Fashion-MNIST subset shipped in the package.

    python scripts/make_sample.py [--src /usr/share/datasets/fashion-mnist] [--train 400 --test 100]

Writes src/imgarena/data/sample/fashion_mnist_sample.npz (per class: --train train images and --test
test images, seeded, so rebuilding gives the same file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from imgarena.data.builtin import FASHION_CLASSES, SAMPLE_FILE, read_fashion_dir


def pick(labels: np.ndarray, per_class: int, rng) -> np.ndarray:
    idx = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(idx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--train", type=int, default=400, help="training images per class")
    ap.add_argument("--test", type=int, default=100, help="test images per class")
    ap.add_argument("--out", default=str(SAMPLE_FILE))
    a = ap.parse_args()
    data = read_fashion_dir(a.src)
    rng = np.random.default_rng(0)
    out = {}
    for split, per_class in (("train", a.train), ("test", a.test)):
        x, y = data.parts[split]
        keep = pick(y, per_class, rng)
        out[f"x_{split}"], out[f"y_{split}"] = x[keep, 0], y[keep].astype(np.uint8)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, classes=np.array(FASHION_CLASSES), **out)
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.2f} MB): "
          f"{len(out['y_train'])} train + {len(out['y_test'])} test images")


if __name__ == "__main__":
    main()
