"""Figures a run leaves behind: learning curves, confusion matrix, most confident mistakes.

Uses matplotlib's object API with the Agg canvas (no pyplot global state, no display needed) and
numpy only, so reports and `compare` can draw them without importing training code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgarena.evaluation.metrics import normalize_rows


def new_figure(width: float, height: float):
    """A Figure on the Agg canvas, without pyplot's global state (safe to use from any thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> None:
    """Write `fig` as a PNG at `path`, atomically."""
    from imgarena.checkpoint import atomic_write

    # atomic: a report reading the run folder never sees half a PNG
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def plot_curves(history: list[dict], path, *, title: str | None = None) -> None:
    """Two panels like seed 000: accuracy (train vs val) and loss (train vs val) per epoch."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(11, 4)
    epochs = [r["epoch"] for r in history]
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "acc", "accuracy"), (fig.add_subplot(1, 2, 2), "loss", "loss")):
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [r.get(f"{split}_{key}") for r in history]
            pts = [(e, y) for e, y in zip(epochs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), style, markersize=3, label=f"{split}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(f"{'Accuracy' if key == 'acc' else 'Loss'}")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion_matrix(cm: np.ndarray, class_names, path, *, title: str | None = None) -> None:
    """Counts (left) and row-normalized recall (right); cell text only when the matrix is small."""
    cm = np.asarray(cm)
    n = cm.shape[0]
    names = [str(c)[:16] for c in class_names]
    side = min(max(4.0, 0.45 * n + 2.5), 16.0)
    fig = new_figure(2 * side + 1.5, side)
    fig.subplots_adjust(wspace=0.45)
    for i, (mat, sub, fmt) in enumerate(((cm, "counts", "d"), (normalize_rows(cm), "normalized by true class", ".2f"))):
        ax = fig.add_subplot(1, 2, i + 1)
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=(mat.max() or 1) if fmt == "d" else 1.0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(sub)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 40:
            ax.set_xticks(range(n), names, rotation=90 if n > 6 else 45, ha="center" if n > 6 else "right", fontsize=8)
            ax.set_yticks(range(n), names, fontsize=8)
        if n <= 20:
            thresh = (mat.max() or 1) / 2
            for r in range(n):
                for c in range(n):
                    v = mat[r, c]
                    ax.text(c, r, format(int(v) if fmt == "d" else float(v), fmt), ha="center", va="center",
                            fontsize=7, color="white" if v > thresh else "black")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def most_confident_errors(probs: np.ndarray, targets, limit: int = 36) -> np.ndarray:
    """Indices of misclassified rows, most confident (highest predicted probability) first."""
    probs = np.asarray(probs)
    t = np.asarray(targets)
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != t)
    conf = probs[wrong, pred[wrong]]
    order = np.argsort(-conf, kind="stable")
    return wrong[order][:limit]


def _to_display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    """uint8 (C,H,W) -> (H,W) gray or (H,W,3) RGB for imshow."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] == 1:
        return img[0], "gray"
    if img.ndim == 3:
        return np.transpose(img[:3], (1, 2, 0)), None
    return img, "gray"


def plot_errors(images, targets, probs, class_names, path, *, limit: int = 36, cols: int = 6,
                title: str | None = None) -> int:
    """Grid of the most confident mistakes: each tile shows the image, true and predicted label
    with the predicted probability. `images` is uint8 (N,C,H,W) aligned with `targets`/`probs`.
    Returns the number of mistakes drawn (a placeholder figure says so when there are none)."""
    idx = most_confident_errors(probs, targets, limit)
    names = [str(c) for c in class_names]
    if len(idx) == 0:
        fig = new_figure(4, 2)
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes on this split", ha="center", va="center")
        save_figure(fig, path)
        return 0
    cols = min(cols, len(idx))
    rows = int(np.ceil(len(idx) / cols))
    # One mosaic image in one axes (36 separate axes take seconds to lay out); labels go in the
    # band above each tile.
    first, cmap = _to_display(images[int(idx[0])])
    h, w = first.shape[:2]
    band, gap = max(h // 2, 10), max(w // 8, 2)
    shape = (rows * (h + band), cols * (w + gap)) + first.shape[2:]
    mosaic = np.full(shape, 255, dtype=np.uint8)
    fig = new_figure(cols * 1.9, rows * 2.3)
    ax = fig.add_axes((0, 0, 1, 0.94))
    pred = np.asarray(probs).argmax(axis=1)
    labels = []
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        y0, x0 = r * (h + band) + band, c * (w + gap)
        img, _ = _to_display(images[int(i)])
        mosaic[y0:y0 + h, x0:x0 + w] = img
        t, p = int(targets[int(i)]), int(pred[int(i)])
        labels.append((x0 + w / 2, y0 - 1, f"true: {names[t][:14]}\npred: {names[p][:14]} ({probs[int(i)][p]:.2f})"))
    ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    for x, y, text in labels:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=7, color="firebrick")
    ax.axis("off")
    fig.suptitle(title or "Most confident mistakes")
    save_figure(fig, path)
    return len(idx)


def save_all(out_dir, *, history=None, cm=None, class_names=None, images=None, targets=None, probs=None,
             title: str | None = None) -> list[Path]:
    """Write curves.png / confusion_matrix.png / errors.png for what is given; returns the paths."""
    out = Path(out_dir)
    written = []
    if history:
        plot_curves(history, out / "curves.png", title=title)
        written.append(out / "curves.png")
    if cm is not None:
        plot_confusion_matrix(cm, class_names, out / "confusion_matrix.png", title=title)
        written.append(out / "confusion_matrix.png")
    if images is not None and probs is not None:
        plot_errors(images, targets, probs, class_names, out / "errors.png", title=title)
        written.append(out / "errors.png")
    return written
