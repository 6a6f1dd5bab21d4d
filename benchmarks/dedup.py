"""Near-duplicate detection throughput over a decoded image cache (not part of the tests).

    python benchmarks/dedup.py DIR        # DIR: an image folder, e.g. the 60,000 Fashion-MNIST
                                          # training PNGs (imgarena data get fashion-mnist --out F; DIR=F/train)
    python benchmarks/dedup.py            # the fashion-mnist built-in's 70,000 images, no PNGs needed

Builds (or reuses) the folder's cache first -- decoding is not what is measured -- then times the
two steps every split runs once per cache entry: the signatures (reading every cached row) and
the matching (SimHash bands + cosine check + connected components), and reports the groups found.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from imgarena.config import DataConfig
from imgarena.data import dedup, load_data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", default="fashion-mnist", help="image folder, CSV or built-in")
    ap.add_argument("--cache-dir", default=None, help="default: a temporary folder (or $IMGARENA_CACHE)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    args = ap.parse_args(argv)
    cache_dir = args.cache_dir or os.environ.get("IMGARENA_CACHE") or tempfile.mkdtemp(prefix="imgarena-dedup-")
    t = time.perf_counter()
    data = load_data(DataConfig(source=args.source, cache_dir=cache_dir, dedup=False), need_val=False)
    print(f"cache ready in {time.perf_counter() - t:.1f} s (decode, not measured): {data.cache_path}")
    images = data.pool.entry.images
    n = len(images)
    best_h = best_m = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        h = dedup.compute_hashes(images)
        best_h = min(best_h, time.perf_counter() - t)
        t = time.perf_counter()
        labels = dedup.near_duplicate_labels(h)
        best_m = min(best_m, time.perf_counter() - t)
    groups = dedup.groups_of(labels)
    in_groups = sum(len(g) for g in groups)
    ids = data.pool.ids
    cache_ids = [ids[i] for i in np.flatnonzero(data.pool.cache_row >= 0)]
    print(f"{n} images {images.shape[1:]}: signatures {best_h:.2f} s ({n / best_h:,.0f} img/s), "
          f"matching {best_m:.2f} s ({n / best_m:,.0f} img/s), total {best_h + best_m:.2f} s "
          f"(best of {args.repeats}; {os.cpu_count()} cores)")
    print(f"{len(groups)} near-duplicate groups, {in_groups} images in them (largest {len(groups[0]) if groups else 0}); "
          f"{int(h.flat.sum())} featureless images not grouped")
    for g in groups[:5]:
        print("  " + " ~ ".join(cache_ids[i] for i in g[:4]) + (f" (+{len(g) - 4})" if len(g) > 4 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
