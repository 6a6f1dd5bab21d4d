"""Shared by the predict / export / API tests: untrained checkpoints with real metadata, and real
image files (PNG, JPEG, grayscale, odd sizes, a corrupt one) written to disk."""

from pathlib import Path

import numpy as np
from PIL import Image

from imgarena.checkpoint import save_checkpoint
from imgarena.models import create_model

CLASSES = ["cat", "dog", "eel"]


def save_run(run_dir, model: str = "mlp", *, classes=CLASSES, img_size: int = 16, channels: int = 3,
             resize: str = "squash", mean=None, std=None, seed: int = 0, **overrides) -> Path:
    """run_dir/best.safetensors: an untrained (seeded) model with the metadata training would write."""
    import torch

    torch.manual_seed(seed)
    m = create_model(model, num_classes=len(classes), in_chans=channels, img_size=img_size, **overrides)
    meta = {
        "model": {"name": m.model_name, "kwargs": m.model_kwargs},
        "num_classes": len(classes),
        "class_names": list(classes),
        "preprocessing": {"img_size": img_size, "channels": channels, "resize": resize,
                          "mean": list(mean or [0.4, 0.5, 0.6][:channels]), "std": list(std or [0.2, 0.25, 0.3][:channels])},
        "metrics": {"val_acc": 0.0},
        "epoch": 0,
    }
    run_dir = Path(run_dir)
    save_checkpoint(run_dir / "best.safetensors", m, meta)
    return run_dir


def write_images(root) -> dict:
    """A folder of real files: 4 PNG (RGB, gray, RGBA, odd sizes), a JPEG in a subfolder, a corrupt
    PNG, a truncated JPEG and a non-image text file. Returns {'good': [...], 'bad': [...]} paths."""
    rng = np.random.default_rng(0)
    root = Path(root)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    good = []
    for i, (shape, mode) in enumerate([((20, 24, 3), "RGB"), ((16, 16), "L"), ((9, 31, 4), "RGBA"), ((40, 40, 3), "RGB")]):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p)
        good.append(p)
    jpg = root / "sub" / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (32, 28, 3), dtype=np.uint8)).save(jpg, quality=90)
    good.append(jpg)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not image data")
    truncated = root / "sub" / "truncated.jpg"
    truncated.write_bytes(jpg.read_bytes()[:200])
    (root / "notes.txt").write_text("not an image, and not listed")
    return {"good": sorted(map(str, good)), "bad": sorted([str(corrupt), str(truncated)])}
