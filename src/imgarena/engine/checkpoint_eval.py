"""`imgarena eval`: score a trained checkpoint on any image source with the checkpoint's own
preprocessing (size, channels, resize mode, mean/std), matching classes by name.

Images whose class the model does not know are listed, not scored; model classes absent from the
data simply get support 0 in the per-class report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imgarena.config import EvalConfig
from imgarena.errors import UserError

EVAL_SPLITS = ("auto", "test", "val", "train", "all")
ERRORS_SHOWN = 36


def evaluate_checkpoint(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Metrics, confusion matrix, per-class report and unknown-class images as a JSON-able dict;
    with `cfg.out` also eval.json, per_class.csv, confusion_matrix.png and errors.png there."""
    from imgarena import calibration
    from imgarena.checkpoint import load_model, resolve_checkpoint
    from imgarena.data import load_data
    from imgarena.data.loader import BatchLoader
    from imgarena.data.prepare import Split, with_preprocessing
    from imgarena.engine.distributed import resolve_device
    from imgarena.engine.evaluate import evaluate, metrics_from_sums, resolve_amp
    from imgarena.evaluation import metrics
    from imgarena.evaluation.tta import parse_tta

    if cfg.split not in EVAL_SPLITS:
        raise UserError(f"--split {cfg.split!r}: use one of {', '.join(EVAL_SPLITS)}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    tta = parse_tta(cfg.tta)
    ckpt = resolve_checkpoint(cfg.checkpoint, cfg.which)
    model, meta = load_model(ckpt, device=device)
    pre = meta["preprocessing"]
    names = [str(c) for c in meta["class_names"]]
    k = len(names)
    data = load_data(with_preprocessing(cfg.data, pre), progress=progress, need_val=False,
                     min_classes=1)  # new images of one of the model's classes are a valid test set

    # Data labels -> the model's class indices, by class name (-1: a class the model never saw).
    index = {c: i for i, c in enumerate(names)}
    to_model = np.array([index.get(c, -1) for c in data.classes], dtype=np.int64)
    parts, unknown, used = [], [], []
    for split_name, split in _chosen_splits(data, cfg.split):
        labels = to_model[np.asarray(split.labels, dtype=np.int64)]
        known = labels >= 0
        unknown += [{"path": split.paths[i], "class": data.classes[int(split.labels[i])]} for i in np.flatnonzero(~known)]
        if known.all():
            parts.append(Split(split.images, labels, list(split.paths)))
        elif known.any():
            keep = np.flatnonzero(known)
            parts.append(Split(split.images[keep], labels[keep], [split.paths[i] for i in keep]))
        used.append(split_name)
    if not parts:
        raise UserError(f"{cfg.data.source}: none of its classes ({', '.join(data.classes[:8])}) is one the model "
                        f"knows ({', '.join(names[:8])}): class folder names must match the training classes")

    outs = []
    for part in parts:
        loader = BatchLoader(part, cfg.batch_size, shuffle=False, device=device, augment="none",
                             mean=pre["mean"], std=pre["std"], out_size=int(pre["img_size"]))
        outs.append(evaluate(model, loader, num_classes=k, device=device, amp=amp, return_outputs=True, tta=tta))
    sums = {key: sum(o["sums"][key] for o in outs) for key in outs[0]["sums"]}
    scores = metrics_from_sums(sums, k)
    probs = np.concatenate([o["probs"] for o in outs])
    targets = np.concatenate([o["targets"] for o in outs])
    preds = probs.argmax(1)
    # What `predict` reports: probabilities with the stored temperature, thresholded by --min-prob.
    temperature = calibration.temperature_of(meta, ckpt)
    cal_probs = calibration.recalibrate(probs, temperature)
    cm = metrics.confusion_matrix(targets, preds, k)
    rep = metrics.per_class_report(cm)
    counts: dict[str, int] = {}
    for u in unknown:
        counts[u["class"]] = counts.get(u["class"], 0) + 1
    result = {
        "checkpoint": str(ckpt), "model": meta["model"]["name"], "source": data.source, "splits": used,
        "images": int(len(targets)), "tta": tta, "acc": scores["acc"], "loss": scores["loss"], "top5": scores["top5"],
        **{k_: v for k_, v in metrics.summary_from_confusion(cm).items() if k_ != "acc"},
        "class_names": names,
        "per_class": [{"class": n, "precision": float(rep["precision"][i]), "recall": float(rep["recall"][i]),
                       "f1": float(rep["f1"][i]), "support": int(rep["support"][i])} for i, n in enumerate(names)],
        "confusion_matrix": cm.tolist(),
        "unknown_classes": counts, "unknown_images": unknown,
        "missing_classes": [n for i, n in enumerate(names) if rep["support"][i] == 0],
        "bad_files": [{"path": p, "reason": r} for p, r in data.bad_files],
        "preprocessing": pre,
        "calibration": {"temperature": temperature, "ece_uncalibrated": calibration.ece(probs, targets),
                        "ece": calibration.ece(cal_probs, targets)},
        "coverage": calibration.coverage_table(cal_probs, targets),
    }
    if cfg.out:
        _write_outputs(Path(cfg.out), result, cm, parts, probs, targets)
    return result


def _chosen_splits(data, which: str):
    """auto: the test split when there is one (a held-out set), else every image in the source."""
    # empty splits left out: a folder of one image per class has no val split
    present = [(n, s) for n in ("train", "val", "test") if (s := getattr(data, n)) is not None and len(s)]
    if which == "auto":
        which = "test" if data.test is not None and len(data.test) else "all"
    if which == "all":
        return present
    chosen = [(n, s) for n, s in present if n == which]
    if not chosen:
        raise UserError(f"{data.source} has no {which} split: use --split all (or auto)")
    return chosen


def _write_outputs(out: Path, result: dict, cm, parts, probs, targets) -> None:
    from imgarena.checkpoint import atomic_write_text
    from imgarena.evaluation import metrics, plots

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "per_class.csv", metrics.per_class_csv(cm, result["class_names"]))
    title = f"{result['model']} on {result['source']} ({'+'.join(result['splits'])})"
    plots.plot_confusion_matrix(cm, result["class_names"], out / "confusion_matrix.png", title=title)
    # Gather only the images the error grid shows (the parts may be large memmaps).
    idx = plots.most_confident_errors(probs, targets, ERRORS_SHOWN)
    offsets = np.cumsum([0] + [len(p) for p in parts])
    imgs = []
    for i in idx:
        j = int(np.searchsorted(offsets, i, "right") - 1)
        imgs.append(parts[j].images[i - offsets[j]])
    shape = parts[0].images.shape[1:]
    images = np.stack(imgs) if imgs else np.zeros((0, *shape), np.uint8)
    plots.plot_errors(images, targets[idx], probs[idx], result["class_names"], out / "errors.png", title=title)


def format_eval(result: dict, *, max_unknown: int = 10) -> str:
    """The terminal report: headline metrics, per-class table, confusion matrix, unknown classes."""
    from imgarena.evaluation import metrics

    cm = np.asarray(result["confusion_matrix"])
    head = (f"{result['model']} on {result['source']} ({'+'.join(result['splits'])}, {result['images']} images"
            + (f", TTA {result['tta']}" if result["tta"] != "none" else "") + ")")
    lines = [head, f"accuracy {result['acc']:.2%}   loss {result['loss']:.4f}"
             + (f"   top-5 {result['top5']:.2%}" if result.get("top5") is not None else "")
             + f"   macro F1 {result['macro_f1']:.3f}", "", metrics.format_report(cm, result["class_names"])]
    if len(result["class_names"]) <= 20:
        lines += ["", metrics.format_confusion(cm, result["class_names"])]
    cal = result.get("calibration")
    if cal:
        t = f"temperature {cal['temperature']:.3f}" if cal.get("temperature") else "no calibration stored"
        lines += ["", f"calibration: {t}; expected calibration error {cal['ece']:.4f}"
                  + (f" (uncalibrated {cal['ece_uncalibrated']:.4f})" if cal.get("temperature") else "")]
    if result.get("coverage"):
        from imgarena.calibration import format_coverage

        lines += ["", "accuracy vs coverage (predict/serve --min-prob P labels rows below P 'unknown'):",
                  format_coverage(result["coverage"])]
    if result["missing_classes"]:
        lines += ["", f"model classes with no images here: {', '.join(result['missing_classes'])}"]
    if result["unknown_images"]:
        counts = ", ".join(f"{c} ({n})" for c, n in sorted(result["unknown_classes"].items()))
        lines += ["", f"{len(result['unknown_images'])} image(s) of classes the model does not know, not scored: {counts}"]
        lines += [f"  {u['path']}  [{u['class']}]" for u in result["unknown_images"][:max_unknown]]
        if len(result["unknown_images"]) > max_unknown:
            lines.append(f"  ... and {len(result['unknown_images']) - max_unknown} more (see --json)")
    if result["bad_files"]:
        lines += ["", f"{len(result['bad_files'])} unreadable file(s) skipped"]
    return "\n".join(lines) + "\n"
