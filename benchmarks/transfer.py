"""Transfer learning on a small folder of own photos: scratch vs linear probe vs two-stage vs full fine-tune.

    python benchmarks/transfer.py                          # both parts, Fashion-MNIST if installed, else the sample
    python benchmarks/transfer.py --part table --per-class 10,50,200
    python benchmarks/transfer.py --part speed             # ResNet-50 linear probe at 224 px on 1,000 images

Part "table": a backbone is pretrained with imgarena itself on Fashion-MNIST classes 0-4 (T-shirt,
Trouser, Pullover, Dress, Coat), then each mode trains on classes 5-9 (Sandal, Shirt, Sneaker, Bag,
Ankle boot) from N images per class (val: 20 per class from the training part, test: Fashion-MNIST's
own test images of those classes). Every mode gets the same epochs, batch and seed; each row is one
`imgarena train` run (wall time of the whole run: data, training, evaluation, artifacts).

Part "speed": a ResNet-50 (our `resnet50`, the timm layout; random weights saved to a local file stand
in for ImageNet weights, which cannot be downloaded here: the speed is the same) linear-probed at
224 px on 1,000 PNGs of 256 px: the wall time of the whole `imgarena train --finetune linear` run
(goal: < 2 min), and the feature-extraction throughput as images/s and as a fraction of this
machine's fp32 matmul peak, measured in the same process (goal: >= 50%).

Prints one JSON object and a markdown table. The numbers are only meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
MODES = ("scratch", "linear", "two-stage", "full")


def _fashion(cache_dir: str, source: str):
    from imgarena.data.builtin import load_builtin

    b = load_builtin(source, cache_dir)
    x_tr, y_tr = b.parts["train"]
    x_te, y_te = b.parts["test"]
    return b.classes, x_tr, y_tr, x_te, y_te


def _write(folder: str, images: np.ndarray, labels: np.ndarray, classes, size: int | None = None) -> None:
    from PIL import Image

    for i, (x, y) in enumerate(zip(images, labels)):
        d = os.path.join(folder, classes[int(y)])
        os.makedirs(d, exist_ok=True)
        img = Image.fromarray(x[0])
        if size:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        img.save(os.path.join(d, f"{i:05d}.png"))


def _train(root: str, data: str, name: str, **kw) -> dict:
    from imgarena.config import DataConfig, TrainConfig
    from imgarena.engine.train import run_training

    data_kw = {k: kw.pop(k) for k in ("img_size", "channels", "crop_pct") if k in kw}
    cfg = TrainConfig(data=DataConfig(source=data, cache_dir=os.path.join(root, "cache"), **data_kw),
                      out_dir=os.path.join(root, "runs"), name=name, **kw)
    t = time.perf_counter()
    summary = run_training(cfg, progress=False)
    summary["wall_s"] = time.perf_counter() - t
    return summary


def table(args, root: str) -> dict:
    classes, x_tr, y_tr, x_te, y_te = _fashion(os.path.join(root, "cache"), args.source)
    rng = np.random.default_rng(0)
    src = os.path.join(root, "source")
    keep = np.isin(y_tr, SOURCE_CLASSES)
    _write(src, x_tr[keep], y_tr[keep], classes)
    pre = _train(root, src, "pretrained", model=args.model, epochs=args.pretrain_epochs, batch_size=64, seed=0)
    out = {"pretrain": {"images": int(keep.sum()), "epochs": args.pretrain_epochs, "val_acc": pre["best_val_acc"],
                        "wall_s": round(pre["wall_s"], 1)}, "rows": []}
    pretrained = pre["run_dir"]
    for n in args.per_class:
        tgt = os.path.join(root, f"target{n}")
        for c in TARGET_CLASSES:
            pool = rng.permutation(np.flatnonzero(y_tr == c))
            _write(os.path.join(tgt, "train"), x_tr[pool[:n]], y_tr[pool[:n]], classes)
            _write(os.path.join(tgt, "val"), x_tr[pool[n:n + 20]], y_tr[pool[n:n + 20]], classes)
            te = np.flatnonzero(y_te == c)
            _write(os.path.join(tgt, "test"), x_te[te], y_te[te], classes)
        for mode in MODES:
            kw = dict(model=args.model, epochs=args.epochs, batch_size=args.batch_size, seed=0)
            if mode != "scratch":
                kw.update(pretrained=pretrained, finetune=mode)
            s = _train(root, tgt, f"{mode}-{n}", **kw)
            row = {"per_class": n, "mode": mode, "test_acc": round(s["test_acc"], 4), "wall_s": round(s["wall_s"], 1),
                   "train_time_s": round(s.get("train_time_s") or 0.0, 1)}
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n matmul on all intra-op threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def speed(args, root: str) -> dict:
    import torch
    from safetensors.torch import save_file

    from imgarena.models import create_model
    from imgarena.models.flops import count_flops

    classes, x_tr, y_tr, _, _ = _fashion(os.path.join(root, "cache"), args.source)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(y_tr == c), args.speed_images // 10, replace=False)
                           for c in range(10)])
    photos = os.path.join(root, "photos")
    _write(photos, x_tr[rows], y_tr[rows], classes, size=256)
    torch.manual_seed(0)
    backbone = create_model("resnet50", num_classes=1000, img_size=224)
    weights = os.path.join(root, "resnet50.safetensors")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, weights)
    flops = count_flops(backbone, (3, 224, 224))
    peak = matmul_peak()
    s = _train(root, photos, "resnet50-linear", model="resnet50", pretrained=weights, finetune="linear",
               img_size=224, channels=3, crop_pct=0.875, epochs=10, batch_size=64, seed=0)
    peak_after = matmul_peak()
    feat = {k: v for k, v in (s.get("finetune") or {}).items() if k.startswith("feature")}
    img_s = feat.get("feature_img_s")
    out = {"images": len(rows), "wall_s": round(s["wall_s"], 1), "goal_wall_s": 120,
           "forward_gflop_per_image": round(flops / 1e9, 2), "matmul_peak_gflop_s": [round(peak, 1), round(peak_after, 1)],
           "features": feat, "threads": torch.get_num_threads()}
    if img_s:
        out["extraction_gflop_s"] = round(img_s * flops / 1e9, 1)
        out["fraction_of_peak"] = round(img_s * flops / 1e9 / max(peak, peak_after), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("table", "speed", "both"), default="both")
    ap.add_argument("--source", default=None, help="fashion-mnist (default when installed) or sample")
    ap.add_argument("--model", default="cnn_s")
    ap.add_argument("--per-class", default="10,50,200")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--speed-images", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    args.per_class = [int(v) for v in args.per_class.split(",")]
    if args.source is None:
        args.source = "fashion-mnist" if os.path.isdir("/usr/share/datasets/fashion-mnist") else "sample"
    root = tempfile.mkdtemp(prefix="transfer-")
    try:
        result = {"source": args.source, "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size}
        if args.part in ("table", "both"):
            result["table"] = table(args, root)
        if args.part in ("speed", "both"):
            result["speed"] = speed(args, root)
        print(json.dumps(result, indent=1))
        if "table" in result:
            print("\n| images/class | " + " | ".join(MODES) + " |\n|---|" + "---|" * len(MODES))
            for n in args.per_class:
                cells = [next(f"{r['test_acc']:.1%} ({r['wall_s']:.0f} s)" for r in result["table"]["rows"]
                              if r["per_class"] == n and r["mode"] == m) for m in MODES]
                print(f"| {n} | " + " | ".join(cells) + " |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
