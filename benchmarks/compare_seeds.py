"""What `imgarena compare --seeds N` costs against one seed: only training should scale with N.

    python benchmarks/compare_seeds.py                 # mlp,cnn_s on the sample, 16 px, seeds 1 and 3
    python benchmarks/compare_seeds.py --models mixer_t4,vit_t4 --img-size 28 --subset 2000

Runs the same compare twice in fresh folders (seeds=1, then seeds=N) and times its phases by
wrapping the functions that do them (this script only; nothing in the library is instrumented):
data loading (once per compare, whatever N), training (`run_training`, of which the engine's own
end-of-run artifacts, `_final_artifacts`), the compare's per-run scoring of the ranked checkpoint
(`run_predictions`), inference timing (`measure_speed`, once per model), and the report
(`write_report`). Prints one JSON object; ratios are seeds=N over seeds=1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time


def _timed(mod, name, totals):
    f = getattr(mod, name)

    @functools.wraps(f)
    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t

    setattr(mod, name, g)
    return f


def run(seeds: int, args, root: str) -> dict:
    import imgarena.comparison as C
    import imgarena.data.prepare as P
    import imgarena.engine.train as T
    from imgarena.config import CompareConfig, DataConfig

    totals: dict[str, float] = {}
    originals = [(m, n, _timed(m, n, totals)) for m, n in ((T, "run_training"), (T, "_final_artifacts"),
                                                           (C, "run_predictions"), (C, "measure_speed"),
                                                           (C, "write_report"), (P, "load_data"))]
    out = os.path.join(root, f"seeds{seeds}")
    cfg = CompareConfig(data=DataConfig(source=args.data, img_size=args.img_size, subset=args.subset,
                                        cache_dir=os.path.join(root, "cache")),
                        models=args.models.split(","), epochs=args.epochs, batch_size=args.batch_size,
                        seeds=seeds, device=args.device, out=out)
    t0 = time.perf_counter()
    try:
        res = C.run_compare(cfg, progress=False, log=lambda *a: None)
    finally:
        for mod, name, f in originals:
            setattr(mod, name, f)
    wall = time.perf_counter() - t0
    train_s = sum(r.get("train_time_s") or 0 for r in res["runs"])
    phases = {k: round(v, 2) for k, v in totals.items()}
    return {"seeds": seeds, "runs": len(res["runs"]), "wall_s": round(wall, 2), "train_time_s": round(train_s, 2),
            "phases_s": phases, "not_training_s": round(wall - totals.get("run_training", 0.0), 2),
            "headline": res["headline"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sample")
    ap.add_argument("--models", default="mlp,cnn_s")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=16)
    ap.add_argument("--subset", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="compare-seeds-")
    try:
        run(1, args, root)  # warm-up: imports, the decoded-image cache, first-call kernels
        shutil.rmtree(os.path.join(root, "seeds1"))
        one, many = run(1, args, root), run(args.seeds, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = lambda k: round(many[k] / one[k], 2) if one.get(k) else None  # noqa: E731
    print(json.dumps({"load_average": os.getloadavg(), "one": one, "many": many,
                      "ratio_wall": ratio("wall_s"), "ratio_train_time": ratio("train_time_s"),
                      "ratio_not_training": ratio("not_training_s")}, indent=2))


if __name__ == "__main__":
    main()
