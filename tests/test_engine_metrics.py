"""Metrics and figures: numbers checked by hand, PNGs opened, CSV columns read back."""

import csv
import io

import numpy as np
import pytest
from PIL import Image

from imgarena.evaluation import metrics, plots


def test_confusion_and_per_class_by_hand():
    t = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2, 2]
    cm = metrics.confusion_matrix(t, p, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    rep = metrics.per_class_report(cm)
    np.testing.assert_allclose(rep["precision"], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(rep["recall"], [2 / 3, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(rep["f1"][0], 2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert rep["support"].tolist() == [3, 2, 1, 0]
    s = metrics.summary_from_confusion(cm)
    assert s["acc"] == pytest.approx(4 / 6)
    # macro F1 over classes that have samples (class 3 has none)
    assert s["macro_f1"] == pytest.approx(np.mean(rep["f1"][:3]))
    with pytest.raises(ValueError):
        metrics.confusion_matrix([0, 5], [0, 1], 3)


def test_topk():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    assert metrics.topk_accuracy(scores, [2, 0, 0], k=1) == pytest.approx(1 / 3)
    assert metrics.topk_accuracy(scores, [2, 0, 0], k=2) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(scores, [2, 0, 0], k=5) == 1.0  # k larger than classes


def test_per_class_csv_columns():
    cm = metrics.confusion_matrix([0, 1, 1], [0, 1, 0], 2)
    rows = list(csv.DictReader(io.StringIO(metrics.per_class_csv(cm, ["a", "b"]))))
    assert list(rows[0]) == list(metrics.PER_CLASS_COLUMNS)
    assert [r["class"] for r in rows] == ["a", "b", "macro avg", "weighted avg"]
    assert float(rows[0]["precision"]) == 0.5 and float(rows[1]["recall"]) == 0.5
    assert int(rows[-1]["support"]) == 3
    text = metrics.format_report(cm, ["a", "b"])
    assert "precision" in text and "accuracy" in text


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_acc": 0.5 + e / 10, "val_acc": 0.4 + e / 10}
               for e in range(1, 4)]
    plots.plot_curves(history, tmp_path / "curves.png", title="t")
    cm = rng.integers(0, 9, (3, 3))
    plots.plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png")
    imgs = rng.integers(0, 255, (20, 3, 12, 12), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(3), 20)
    targets = rng.integers(0, 3, 20)
    n_wrong = int((probs.argmax(1) != targets).sum())
    assert plots.plot_errors(imgs, targets, probs, ["a", "b", "c"], tmp_path / "errors.png") == min(n_wrong, 36)
    # no mistakes: still a valid figure saying so
    assert plots.plot_errors(imgs, probs.argmax(1), probs, ["a", "b", "c"], tmp_path / "none.png") == 0
    for name in ("curves.png", "cm.png", "errors.png", "none.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
            assert im.format == "PNG"


def test_most_confident_errors_order():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    targets = np.array([1, 1, 1, 0])  # wrong: rows 0 (0.9), 2 (0.6), 3 (0.7)
    assert plots.most_confident_errors(probs, targets).tolist() == [0, 3, 2]
