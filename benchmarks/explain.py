"""How fast is `imgarena explain`? Images/s on 100 PNGs at 32 px, one small variant per family.

Two numbers per family and method:
- maps   `imgarena.explain.explain_arrays` on the decoded batch (forward + backward + upsampling);
- files  the whole `run_explain`: expand inputs, decode, maps, and per image an overlay PNG and a
         .npy, plus grid.png and explain.csv (what the command does).

    python benchmarks/explain.py              # 100 images, every family
    python benchmarks/explain.py --images 20  # a smoke run

Weights are untrained (speed does not depend on their values); each family's checkpoint is saved
with imgarena's own writer so `run_explain` loads it like a trained run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

FAMILY_VARIANTS = {"cnn": "cnn_s", "mlp": "mlp", "mixer": "mixer_t4", "vit": "vit_t4", "swin": "swin_t_cifar",
                   "convnext": "convnext_atto_cifar", "resnet": "resnet18_cifar", "mobilenet": "mobilenetv2_cifar"}
SIZE = 32


def save_run(model_name: str, folder: Path) -> Path:
    import torch

    from imgarena.checkpoint import save_checkpoint
    from imgarena.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_chans=3, img_size=SIZE).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # Mixer's zero-initialised head has no map to show
    meta = {"model": {"name": model_name, "kwargs": dict(getattr(model, "model_kwargs", {}) or {"img_size": SIZE})},
            "num_classes": 10, "class_names": [f"c{i}" for i in range(10)],
            "preprocessing": {"img_size": SIZE, "channels": 3, "resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}}
    path = folder / f"{model_name}.safetensors"
    save_checkpoint(path, model, meta)
    return path


def main() -> None:
    import torch
    from PIL import Image

    from imgarena.explain import ExplainConfig, explain_arrays, run_explain

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--methods", default="layercam,gradcam,rollout,chefer")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imgarena-explain-bench-"))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (args.images, SIZE, SIZE, 3), dtype=np.uint8)
    (tmp / "images").mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp / "images" / f"img{i:04d}.png")
    chw = np.ascontiguousarray(imgs.transpose(0, 3, 1, 2))
    print(f"{args.images} PNGs at {SIZE} px, torch threads {torch.get_num_threads()}")
    print(f"{'family':10s} {'model':20s} {'method':9s} {'maps img/s':>10s} {'files img/s':>11s}")
    for family, name in FAMILY_VARIANTS.items():
        ckpt = save_run(name, tmp)
        from imgarena.checkpoint import load_model

        model, _ = load_model(ckpt)
        for method in args.methods.split(","):
            try:
                explain_arrays(model, chw[:8], [0.5] * 3, [0.5] * 3, method=method)  # warm-up
            except ValueError as e:  # NotExplainable: e.g. rollout without attention
                print(f"{family:10s} {name:20s} {method:9s} {'-':>10s} {'-':>11s}  ({str(e)[:60]})")
                continue
            t = time.perf_counter()
            explain_arrays(model, chw, [0.5] * 3, [0.5] * 3, method=method, batch_size=32)
            maps = args.images / (time.perf_counter() - t)
            t = time.perf_counter()
            run_explain(ExplainConfig(str(ckpt), [str(tmp / "images")], method=method, out=str(tmp / f"out-{name}-{method}"),
                                      device="cpu"))
            files = args.images / (time.perf_counter() - t)
            print(f"{family:10s} {name:20s} {method:9s} {maps:10.0f} {files:11.0f}")


if __name__ == "__main__":
    main()
