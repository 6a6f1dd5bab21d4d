"""Data pipeline speed on Fashion-MNIST written as a folder of PNGs, ratios measured in one run.

    python benchmarks/data_pipeline.py            # full: 60,000 PNGs (the lead runs this)
    python benchmarks/data_pipeline.py --quick    # 6,000 PNGs, fewer batches: a smoke check

Prints
1. cache build rate (scan + probe + parallel decode + stats) vs a plain torchvision ImageFolder
   decode pass (single process, PIL loader);
2. steady-state loader batches/s with the `standard` preset vs the seeds' way (ImageFolder +
   seed 000's Albumentations set per sample + DataLoader(num_workers=2)), same batch size;
3. loader time as a fraction of one training step of mixer_t4;
4. the augmentation backend choice: our batched torch ops vs torchvision v2 (per-sample params need
   a per-sample loop) vs kornia (if installed), same `standard`-like op set, same batch;
5. `--sections presets`: steady-state BatchLoader batches/s of every preset on in-memory images
   (28 px gray, 32 px RGB, and photo-sized 256 px stored / 224 px out), no dataset needed.
Sections 1-3 need the Fashion-MNIST idx files (`make bench-data`) and the bench extra (albumentations).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from imgarena.config import DataConfig
from imgarena.data import load_data
from imgarena.data.augment import augment_batch
from imgarena.data.builtin import Builtin, read_fashion_dir, write_image_folder
from imgarena.data.loader import BatchLoader


def make_png_folder(src: str, work: str, n: int) -> str:
    root = os.path.join(work, f"fashion-mnist-png-{n}")
    if os.path.exists(os.path.join(root, ".complete")):
        return root
    shutil.rmtree(root, ignore_errors=True)
    data = read_fashion_dir(src)
    x, y = data.parts["train"]
    t = time.perf_counter()
    write_image_folder(Builtin("fashion-mnist", data.classes, {"train": (x[:n], y[:n])}, []), root)
    open(os.path.join(root, ".complete"), "w").close()
    print(f"wrote {n} PNGs to {root} in {time.perf_counter() - t:.1f}s")
    return root


def seed_albumentations(mean, std):
    """Seed 000's training transform (same limits and probabilities) + flip + Normalize."""
    import albumentations as A

    return A.Compose([
        A.ShiftScaleRotate(shift_limit=0.0625, scale_limit=0.2, rotate_limit=45, interpolation=1, border_mode=4,
                           p=0.3),
        A.RandomGamma(gamma_limit=(85, 150), p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.5, contrast_limit=0.5, brightness_by_max=True, p=0.4),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(50 / 224, 100 / 224),
                        hole_width_range=(50 / 224, 100 / 224), fill=0, p=0.4),
        A.HorizontalFlip(p=0.5),
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
    ])


class _AlbuTransform:
    def __init__(self, aug):
        self.aug = aug

    def __call__(self, img):
        return torch.from_numpy(self.aug(image=np.asarray(img))["image"].transpose(2, 0, 1).copy())


def time_iter(it, n_batches: int, warmup: int) -> float:
    """Batches/s over n_batches after `warmup` batches (worker start-up excluded)."""
    it = iter(it)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches / (time.perf_counter() - t)


def cycle(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_cache(root: str, workers: int, n: int) -> None:
    from torchvision.datasets import ImageFolder

    print("\n== 1. decode: cache build vs plain ImageFolder pass ==")
    rates = {}
    for w in (workers, 1) if workers > 1 else (1,):
        cdir = tempfile.mkdtemp(prefix="imgarena-bench-cache-")
        t = time.perf_counter()
        d = load_data(DataConfig(source=root, cache_dir=cdir, workers=w), progress=False)
        rates[w] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        load_data(DataConfig(source=root, cache_dir=cdir, workers=w), progress=False)
        reuse = time.perf_counter() - t
        shutil.rmtree(cdir)
        print(f"imgarena cache build, {w} worker(s): {rates[w]:9.0f} img/s   (reuse of the built cache: {reuse:.2f}s)")
    ds = ImageFolder(os.path.join(root, "train"))
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    base = len(ds) / (time.perf_counter() - t)
    print(f"torchvision ImageFolder decode pass:  {base:9.0f} img/s")
    print(f"ratio (cache build, {workers} workers / ImageFolder): {rates[workers] / base:.1f}x;  "
          f"per core (1 worker / ImageFolder): {rates[1] / base:.1f}x   [{d.channels} channel(s), {d.img_size}px]")


def bench_loader(root: str, batch: int, n_batches: int, workers: int):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    print(f"\n== 2. steady-state loader, standard augmentation, batch {batch} ==")
    data = load_data(DataConfig(source=root, workers=workers), progress=False)
    ours = BatchLoader(data.train, batch, shuffle=True, seed=0, augment="standard", mean=data.mean, std=data.std,
                       drop_last=True)
    ours_bps = time_iter(cycle(ours), n_batches, warmup=3)
    mean3, std3 = data.mean * 3 if data.channels == 1 else data.mean, data.std * 3 if data.channels == 1 else data.std
    ds = ImageFolder(os.path.join(root, "train"), transform=_AlbuTransform(seed_albumentations(mean3, std3)))
    seeds = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2, drop_last=True, persistent_workers=True)
    seeds_bps = time_iter(cycle(seeds), max(4, n_batches // 4), warmup=3)
    print(f"imgarena BatchLoader (standard, {data.channels}ch, on-batch): {ours_bps:8.1f} batches/s")
    print(f"seeds' way (ImageFolder + Albumentations + DataLoader(num_workers=2), RGB): {seeds_bps:8.1f} batches/s")
    print(f"ratio: {ours_bps / seeds_bps:.1f}x (target >= 10x)")
    return data, ours


def bench_step_fraction(data, loader: BatchLoader, batch: int, steps: int) -> None:
    print(f"\n== 3. loader time vs one training step (batch {batch}) ==")
    try:
        from imgarena.models import create_model

        model = create_model("mixer_t4", num_classes=len(data.classes), in_chans=data.channels, img_size=data.img_size)
        name = "mixer_t4"
    except Exception as e:  # models not available: an MLP-Mixer-sized matmul stack
        print(f"(mixer_t4 unavailable: {type(e).__name__}; using a matmul workload)")
        d = data.channels * data.img_size**2
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 1024), torch.nn.GELU(),
                                    torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 10))
        name = "matmul MLP"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lossf = torch.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        lossf(model(x), y).backward()
        opt.step()

    it = cycle(loader)
    x, y = next(it)
    for _ in range(3):
        step(x, y)
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    t_step = (time.perf_counter() - t) / steps
    # Loader work per batch measured alone (what it costs), then the wait the training loop actually
    # sees with the prefetch thread running alongside the steps.
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    t_load = (time.perf_counter() - t) / steps
    waited = 0.0
    t = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        waited += time.perf_counter() - t0
        step(x, y)
    t_loop = (time.perf_counter() - t) / steps
    print(f"{name} training step: {t_step * 1e3:.1f} ms;  loader work per batch: {t_load * 1e3:.2f} ms "
          f"= {100 * t_load / t_step:.1f}% of a step")
    print(f"in a training loop: {t_loop * 1e3:.1f} ms/step, waiting for data {100 * waited / steps / t_loop:.1f}% "
          f"of it (target <= 5%)")


def _tv2_standard():
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomApply([v2.RandomAffine(degrees=45, translate=(0.0625, 0.0625), scale=(0.8, 1.2),
                                        interpolation=v2.InterpolationMode.BILINEAR)], p=0.3),
        v2.RandomApply([v2.Lambda(lambda t: v2.functional.adjust_gamma(t, 1.2))], p=0.3),
        v2.RandomApply([v2.ColorJitter(brightness=0.5, contrast=0.5)], p=0.4),
        v2.RandomErasing(p=0.4, scale=(0.05, 0.2), value=0),
        v2.RandomHorizontalFlip(),
    ])


def _kornia_standard():
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomAffine(degrees=45, translate=(0.0625, 0.0625), scale=(0.8, 1.2), padding_mode="reflection", p=0.3),
        K.RandomGamma(gamma=(0.85, 1.5), p=0.3),
        K.ColorJitter(brightness=0.5, contrast=0.5, p=0.4),
        K.RandomErasing(scale=(0.05, 0.2), p=0.4),
        K.RandomHorizontalFlip(),
    )


def bench_augment_choice(reps: int) -> None:
    print("\n== 4. augmentation backend: standard-like set, per-sample parameters ==")
    for shape in ((256, 1, 28, 28), (64, 3, 224, 224)):
        x = torch.rand(*shape)
        g = torch.Generator().manual_seed(0)
        res = {}

        def timed(fn):
            fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) / reps * 1e3

        res["imgarena torch ops (batched)"] = timed(lambda: augment_batch(x, "standard", g))
        tv = _tv2_standard()
        res["torchvision v2 (per-sample loop)"] = timed(lambda: torch.stack([tv(s) for s in x]))
        res["torchvision v2 (whole batch, ONE draw - not per-sample)"] = timed(lambda: tv(x))
        try:
            k = _kornia_standard()
            res["kornia AugmentationSequential (batched)"] = timed(lambda: k(x))
        except ImportError:
            res["kornia (not installed)"] = float("nan")
        print(f"batch {tuple(shape)}:")
        for name, ms in res.items():
            print(f"  {name:58s} {ms:8.2f} ms/batch")


def bench_presets(batch: int, n_batches: int, reps: int = 3) -> None:
    """Batches/s per preset (best of `reps`), images already decoded (what a training loop sees)."""
    import inspect

    from imgarena.data.augment import PRESETS
    from imgarena.data.prepare import Split

    print(f"\n== 5. loader batches/s per preset, batch {batch} (best of {reps}) ==")
    has_out = "out_size" in inspect.signature(BatchLoader).parameters
    rng = np.random.default_rng(0)
    cases = [("28px gray", 1, 28, 28), ("32px RGB", 3, 32, 32)]
    if has_out:
        cases.append(("256->224 RGB (crop_pct .875)", 3, 256, 224))
    for label, c, store, out in cases:
        n = batch * (8 if store < 100 else 2)
        split = Split(rng.integers(0, 256, (n, c, store, store), dtype=np.uint8), np.zeros(n, np.int64),
                      [""] * n)
        row = []
        for preset in PRESETS:
            if preset == "photo" and not has_out:  # the old loader has no photo preset
                continue
            kw = {"out_size": out} if has_out else {}
            loader = BatchLoader(split, batch, shuffle=True, seed=0, augment=preset, mean=(0.5,) * c,
                                 std=(0.25,) * c, drop_last=True, **kw)
            nb = n_batches if store < 100 else max(3, n_batches // 10)
            best = max(time_iter(cycle(loader), nb, warmup=2) for _ in range(reps))
            row.append(f"{preset} {best:7.1f}")
        print(f"{label:30s} " + "   ".join(row))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6,000 images and fewer batches: a smoke check")
    ap.add_argument("--work", default="./bench-data", help="where the PNG folder is written (once)")
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="cache-building processes (default: all cores)")
    ap.add_argument("--sections", default="cache,loader,step,augment",
                    help="which parts to run (comma list of cache, loader, step, augment, presets)")
    a = ap.parse_args(argv)
    sections = set(a.sections.split(","))
    if sections == {"presets"}:
        bench_presets(a.batch_size, 30 if a.quick else 100)
        return 0
    if not os.path.isdir(a.src):
        print(f"{a.src} not found: run `make bench-data` (Debian's dataset-fashion-mnist) first", file=sys.stderr)
        return 2
    os.environ.setdefault("IMGARENA_PROGRESS", "0")
    from imgarena.data.parallel import default_workers

    workers = default_workers(a.workers)
    n = 6000 if a.quick else 60000
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, "
          f"{workers} decode workers, {n} images")
    if sections & {"cache", "loader", "step"}:
        root = make_png_folder(a.src, a.work, n)
    if "cache" in sections:
        bench_cache(root, workers, n)
    if sections & {"loader", "step"}:
        data, loader = bench_loader(root, a.batch_size, 30 if a.quick else 200, workers)
    if "step" in sections:
        bench_step_fraction(data, loader, a.batch_size, 5 if a.quick else 30)
    if "augment" in sections:
        bench_augment_choice(3 if a.quick else 20)
    if "presets" in sections:
        bench_presets(a.batch_size, 30 if a.quick else 100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
