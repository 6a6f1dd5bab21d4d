"""Small real PNG folders for the engine tests: learnable, but noisy enough to make mistakes."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_class_folder(root, classes=("cat", "dog", "fish"), per_class: int = 14, size: int = 16) -> Path:
    """root/<class>/<i>.png: RGB noise (0..119) with channel `class index % 3` raised by 110."""
    rng = np.random.default_rng(0)
    root = Path(root)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
            img[..., c % 3] += 110
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root
