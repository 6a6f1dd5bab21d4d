"""Classification metrics from predictions: confusion matrix, per-class precision/recall/F1, top-k.

Pure numpy (no torch) so reports, `compare` and the ONNX path can use them without training code.
"""

from __future__ import annotations

import csv
import io

import numpy as np

PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


def confusion_matrix(targets, preds, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true classes, columns predicted ones."""
    t = np.asarray(targets, dtype=np.int64).ravel()
    p = np.asarray(preds, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"targets ({t.size}) and preds ({p.size}) differ in length")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall per true class); empty rows stay zero."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


def per_class_report(cm: np.ndarray) -> dict[str, np.ndarray]:
    """precision, recall, f1 (float arrays) and support (int array) per class from a confusion matrix.

    A class never predicted has precision 0; a class with no samples has recall 0 (as sklearn's
    zero_division=0).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def summary_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-averaged and support-weighted F1 and balanced accuracy (mean recall)."""
    rep = per_class_report(cm)
    total = int(rep["support"].sum())
    present = rep["support"] > 0
    return {
        "acc": float(np.trace(cm) / total) if total else 0.0,
        "macro_f1": float(rep["f1"][present].mean()) if present.any() else 0.0,
        "weighted_f1": float((rep["f1"] * rep["support"]).sum() / total) if total else 0.0,
        "balanced_acc": float(rep["recall"][present].mean()) if present.any() else 0.0,
    }


def topk_accuracy(probs_or_logits, targets, k: int = 5) -> float:
    """Share of rows whose target is among the k highest scores (ties broken by index)."""
    scores = np.asarray(probs_or_logits)
    t = np.asarray(targets, dtype=np.int64).ravel()
    if scores.shape[0] == 0:
        return 0.0
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == t[:, None]).any(axis=1).mean())


def per_class_csv(cm: np.ndarray, class_names) -> str:
    """per_class.csv text: one row per class plus `macro avg` and `weighted avg` rows."""
    rep = per_class_report(cm)
    names = list(class_names)
    if len(names) != cm.shape[0]:
        raise ValueError(f"{len(names)} class names for a {cm.shape[0]}-class confusion matrix")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PER_CLASS_COLUMNS)
    for i, name in enumerate(names):
        w.writerow([name, f"{rep['precision'][i]:.4f}", f"{rep['recall'][i]:.4f}", f"{rep['f1'][i]:.4f}",
                    int(rep["support"][i])])
    total = int(rep["support"].sum())
    present = rep["support"] > 0
    for label, weights in (("macro avg", present.astype(np.float64)), ("weighted avg", rep["support"].astype(np.float64))):
        wsum = weights.sum()
        avg = [float((rep[m] * weights).sum() / wsum) if wsum else 0.0 for m in ("precision", "recall", "f1")]
        w.writerow([label, *(f"{a:.4f}" for a in avg), total])
    return buf.getvalue()


def format_report(cm: np.ndarray, class_names, *, width: int = 0) -> str:
    """A fixed-width per-class table for the terminal (like sklearn's classification_report)."""
    rep = per_class_report(cm)
    names = [str(n) for n in class_names]
    width = max([width, len("weighted avg"), *(len(n) for n in names)])
    lines = [f"{'':<{width}}  precision  recall     f1  support"]
    for i, n in enumerate(names):
        lines.append(f"{n:<{width}}  {rep['precision'][i]:9.3f}  {rep['recall'][i]:6.3f}  {rep['f1'][i]:5.3f}  "
                     f"{int(rep['support'][i]):7d}")
    s = summary_from_confusion(cm)
    total = int(rep["support"].sum())
    lines.append("")
    lines.append(f"{'accuracy':<{width}}  {'':9}  {'':6}  {s['acc']:5.3f}  {total:7d}")
    lines.append(f"{'macro f1':<{width}}  {'':9}  {'':6}  {s['macro_f1']:5.3f}  {total:7d}")
    return "\n".join(lines)


def format_confusion(cm: np.ndarray, class_names, *, max_name: int = 12) -> str:
    """Counts as a text table (rows true, columns predicted), names cut to `max_name` characters."""
    names = [str(n)[:max_name] for n in class_names]
    cw = max(5, max(len(n) for n in names), len(str(int(cm.max()) if cm.size else 0)))
    head = " " * (max(len(n) for n in names) + 2) + " ".join(f"{n:>{cw}}" for n in names)
    rows = [head]
    for n, row in zip(names, cm):
        rows.append(f"{n:<{max(len(x) for x in names)}}  " + " ".join(f"{int(v):>{cw}d}" for v in row))
    return "true \\ predicted\n" + "\n".join(rows)
