"""How fast is `imgarena predict`, and what does ONNX Runtime buy at batch size 1?

1. Images/s of `imgarena.predict.run_predict` on a folder of PNGs (Fashion-MNIST test images,
   28x28 grayscale) against seed 004's way: for each file, PIL open + a torchvision transform +
   the model on a batch of one + softmax. Both use the same checkpoint, threads and preprocessing,
   and must agree on every top-1 class. Target: at least 5x with seed 004's own model (`mlp`, its
   MyNet). A compute-heavy model (mixer_t4) is shown too: there the model's FLOPs, not the
   per-image overhead, bound the gain on a CPU.
2. Median latency of one image through PyTorch vs ONNX Runtime (exported with `imgarena export`,
   parity-checked) for one small variant of every model family.

    python benchmarks/predict.py            # 10,000 PNGs, every family
    python benchmarks/predict.py --quick    # 1,000 PNGs, fewer repeats (a smoke run)

Weights are untrained: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# one small-image variant per family; a family missing here is skipped with a note
FAMILY_VARIANTS = {
    "mlp": "mlp", "mixer": "mixer_t4", "vit": "vit_t4", "convnext": "convnext_atto_cifar",
    "resnet": "resnet18_cifar", "mobilenet": "mobilenetv2_cifar", "swin": "swin_t_cifar",
    "cnn": "cnn_s",
}
FMNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def write_pngs(folder: Path, n: int) -> list[str]:
    """n 28x28 grayscale PNGs: Fashion-MNIST test images when installed, else seeded noise."""
    from PIL import Image

    if os.path.exists(FMNIST_TEST):
        from imgarena.data.builtin import read_idx

        imgs = read_idx(FMNIST_TEST)
    else:
        imgs = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i // 1000:02d}" / f"{i:05d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(imgs[i % len(imgs)], "L").save(p)
        paths.append(str(p))
    return paths


def make_run(run_dir: Path, model_name: str, img_size: int, channels: int, classes: int = 10) -> Path:
    import torch

    from imgarena.checkpoint import save_checkpoint
    from imgarena.models import create_model

    torch.manual_seed(0)
    m = create_model(model_name, num_classes=classes, in_chans=channels, img_size=img_size)
    meta = {"model": {"name": m.model_name, "kwargs": m.model_kwargs}, "num_classes": classes,
            "class_names": [f"c{i}" for i in range(classes)],
            "preprocessing": {"img_size": img_size, "channels": channels, "resize": "squash",
                              "mean": [0.286] * channels, "std": [0.353] * channels}}
    save_checkpoint(run_dir / "best.safetensors", m, meta)
    return run_dir


def seed_style_loop(run_dir: Path, paths: list[str]) -> list[int]:
    """Seed 004's inference: one file at a time through PIL, torchvision transforms and the model."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    from imgarena.checkpoint import load_model

    model, meta = load_model(run_dir)
    pre = meta["preprocessing"]
    tf = transforms.Compose([transforms.Resize((pre["img_size"], pre["img_size"])), transforms.ToTensor(),
                             transforms.Normalize(pre["mean"], pre["std"])])
    mode = "L" if pre["channels"] == 1 else "RGB"
    top1 = []
    with torch.no_grad():
        for p in paths:
            x = tf(Image.open(p).convert(mode)).unsqueeze(0)
            probs = F.softmax(model(x), dim=1)
            top1.append(int(probs.argmax(1)))
    return top1


def bench_predict(args, work: Path, paths: list[str], model_name: str) -> None:
    from imgarena.config import PredictConfig
    from imgarena.predict import run_predict

    run = make_run(work / f"run-{model_name}", model_name, 28, 1)
    base_paths = paths[: args.baseline_images or len(paths)]

    t = time.perf_counter()
    base_top1 = seed_style_loop(run, base_paths)
    base_s = time.perf_counter() - t

    cfg = PredictConfig(checkpoint=str(run), inputs=[str(Path(paths[0]).parent.parent)], topk=1, batch_size=args.batch_size,
                        device="cpu", workers=args.workers)
    run_predict(PredictConfig(**{**cfg.__dict__, "inputs": base_paths[:64]}), progress=False)  # warm-up
    t = time.perf_counter()
    rows = run_predict(cfg, progress=False)
    ours_s = time.perf_counter() - t

    names = {f"c{i}": i for i in range(10)}
    ours_top1 = {r.path: names[r.label] for r in rows}
    agree = sum(ours_top1[p] == b for p, b in zip(base_paths, base_top1))
    base_rate, ours_rate = len(base_paths) / base_s, len(rows) / ours_s
    print(f"\n== predict on {len(rows)} PNGs (28x28 gray), model {model_name}, {args.threads} torch thread(s)")
    print(f"seed-004 loop (PIL + torchvision + model per image, {len(base_paths)} images): {base_rate:8.0f} img/s")
    print(f"imgarena predict (threaded decode, batch {args.batch_size}):                 {ours_rate:8.0f} img/s")
    print(f"speed-up: {ours_rate / base_rate:.1f}x (target >= 5x); top-1 agrees on {agree}/{len(base_paths)}")


def interleaved_medians_ms(fns, repeats: int, warmup: int = 3) -> list[float]:
    """Median ms of each fn, calling them in turn so that load from other processes on a shared
    machine hits all of them alike (timing one after the other lets a busy minute favour one)."""
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) * 1e3 for t in times]


def bench_latency(args, work: Path) -> None:
    import torch

    from imgarena.checkpoint import load_model
    from imgarena.config import ExportConfig
    from imgarena.export import run_export
    from imgarena.models import get_entry, list_models
    from imgarena.onnx_predict import ort_session

    families = sorted({get_entry(n).family for n in list_models()})
    print(f"\n== batch-1 latency, {args.latency_size}px RGB, median of {args.repeats} calls, "
          f"{args.threads} thread(s) (ms; lower is better)")
    print(f"{'family':<10} {'model':<22} {'pytorch':>9} {'onnxrt':>9} {'ort speed-up':>13}")
    for fam in families:
        name = FAMILY_VARIANTS.get(fam)
        if name is None or name not in list_models():
            print(f"{fam:<10} (no small variant listed in FAMILY_VARIANTS; skipped)")
            continue
        run = make_run(work / f"lat-{name}", name, args.latency_size, 3)
        try:
            res = run_export(ExportConfig(checkpoint=str(run), format="onnx"))
        except Exception as e:  # one family failing to export must not hide the others' numbers
            print(f"{fam:<10} {name:<22} export failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        model, _ = load_model(run)
        x = torch.randn(1, 3, args.latency_size, args.latency_size)
        sess = ort_session(res.path)
        xn = x.numpy()

        def torch_call():
            with torch.inference_mode():
                model(x)

        pt, ort = interleaved_medians_ms([torch_call, lambda: sess.run(None, {"input": xn})], args.repeats)
        ok = "" if res.parity.ok else "  (parity FAILED)"
        print(f"{fam:<10} {name:<22} {pt:9.3f} {ort:9.3f} {pt / ort:12.2f}x{ok}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 images, 20 latency repeats")
    ap.add_argument("--images", type=int, default=None, help="PNGs to predict (default 10,000; --quick 1,000)")
    ap.add_argument("--baseline-images", type=int, default=None, help="images for the slow loop (default: all)")
    ap.add_argument("--models", default="mlp,mixer_t4", help="models for the throughput part (default mlp,mixer_t4)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0, help="decode threads (default: min(8, cores))")
    ap.add_argument("--threads", type=int, default=None, help="torch/ORT threads (default: OMP_NUM_THREADS or all cores)")
    ap.add_argument("--latency-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per latency (default 200; --quick 20)")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args(argv)
    args.images = args.images or (1000 if args.quick else 10_000)
    args.repeats = args.repeats or (20 if args.quick else 200)
    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by our ONNX Runtime sessions
    os.environ.setdefault("IMGARENA_PROGRESS", "0")

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="imgarena-bench-predict-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        paths = write_pngs(work / "pngs", args.images)
        print(f"wrote {len(paths)} PNGs in {time.perf_counter() - t:.1f}s")
        for name in args.models.split(","):
            bench_predict(args, work, paths, name.strip())
        if not args.skip_latency:
            bench_latency(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
