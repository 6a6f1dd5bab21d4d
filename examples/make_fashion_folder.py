"""Build a small "own photos" folder of real PNG files from Fashion-MNIST, for the seed examples.

The seeds trained on folders of their own photos (rice grains, wrenches) that are not available
here, so these stand in for them: classes that look alike, the seeds' image counts, real files in
the layout `imgarena` reads.

    python examples/make_fashion_folder.py seed000 --out data/fashion3   # 3 classes, 224 px, train/ + val/
    python examples/make_fashion_folder.py seed004 --out data/shirts     # T-shirt vs shirt, 62 each, 28 px

seed000: pullover / coat / shirt (the three Fashion-MNIST classes most often confused, standing in
for seed 000's three grades of rice), 591 / 670 / 519 training and 25 / 25 / 25 validation images
like the seed's folder, upscaled from 28 to 224 px, written as OUT/train/<class>/ and OUT/val/<class>/.
seed004: t-shirt vs shirt, 62 each, at 28 px, written as OUT/<class>/ (imgarena carves the val split).
Images are drawn without replacement from Fashion-MNIST's training part with a fixed seed.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# preset -> class folder name -> (Fashion-MNIST label, training images, validation images); image size.
PRESETS = {
    "seed000": {"classes": {"pullover": (2, 591, 25), "coat": (4, 670, 25), "shirt": (6, 519, 25)}, "size": 224},
    "seed004": {"classes": {"tshirt": (0, 62, 0), "shirt": (6, 62, 0)}, "size": 28},
}


def make_folder(preset: str, out: str, *, size: int | None = None, scale: float = 1.0, seed: int = 0,
                source: str = "fashion-mnist", cache_dir: str | None = None) -> dict[str, int]:
    """Write the preset's PNGs under `out`; `scale` multiplies every class's image counts (at least 1
    each). `source` is "fashion-mnist" or "sample" (imgarena's embedded 4,000-image Fashion-MNIST
    subset: enough for scale <= 0.6). Returns {"<split>/<class>": count}."""
    from PIL import Image

    from imgarena.config import default_cache_dir
    from imgarena.data.builtin import load_builtin

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    size = int(size or spec["size"])
    if source not in ("fashion-mnist", "sample"):
        raise ValueError(f"source must be 'fashion-mnist' or 'sample', got {source!r}")
    images, labels = load_builtin(source, cache_dir or default_cache_dir()).parts["train"]
    rng = np.random.default_rng(seed)
    counts = {}
    for name, (label, n_train, n_val) in spec["classes"].items():
        n_train = max(1, round(n_train * scale))
        n_val = max(1, round(n_val * scale)) if n_val else 0
        pick = rng.choice(np.flatnonzero(labels == label), n_train + n_val, replace=False)
        parts = {"train": pick[:n_train], "val": pick[n_train:]} if n_val else {"": pick}
        for split, idx in parts.items():
            folder = os.path.join(out, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in idx:
                img = Image.fromarray(images[i, 0])
                if size != img.width:
                    img = img.resize((size, size), Image.BICUBIC)  # upscaled like a photo resized for a model
                img.save(os.path.join(folder, f"fmnist{int(i):05d}.png"))
            counts[f"{split}/{name}".lstrip("/")] = len(idx)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="folder to write (created; must not already hold images)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: 224 for seed000, 28 for seed004)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the per-class counts, e.g. 0.1 for a quick folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=["fashion-mnist", "sample"], default="fashion-mnist",
                   help="where the images come from (sample: imgarena's embedded subset, for small folders)")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and any(os.scandir(args.out)):
        print(f"{args.out} is not empty: pass a new --out folder (or delete it first)", file=sys.stderr)
        return 2
    counts = make_folder(args.preset, args.out, size=args.size, scale=args.scale, seed=args.seed, source=args.source)
    print(f"wrote {sum(counts.values())} PNGs to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
