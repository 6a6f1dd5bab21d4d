"""Transfer learning end to end on real images: a backbone pretrained by imgarena itself on
Fashion-MNIST classes 0-4 carries over to classes 5-9 learned from 20 images per class.

Real PNG folders (drawn from the embedded Fashion-MNIST sample), real `imgarena train` runs
through the Python engine; held-out images are the sample's own test images of classes 5-9.
"""

from __future__ import annotations

import numpy as np
import pytest

from imgarena.config import DataConfig, TrainConfig
from imgarena.engine.train import run_training

PER_CLASS = 20
EPOCHS = 4
BATCH = 20


def _write(folder, images, labels, classes):
    from PIL import Image

    for i, (x, y) in enumerate(zip(images, labels)):
        d = folder / classes[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(d / f"{i:05d}.png")


def _train(root, source, name, **kw):
    cfg = TrainConfig(data=DataConfig(source=str(source), cache_dir=str(root / "cache")), out_dir=str(root / "runs"),
                      name=name, seed=0, **kw)
    return run_training(cfg, progress=False)


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    from imgarena.data.builtin import SAMPLE_FILE

    root = tmp_path_factory.mktemp("transfer")
    d = np.load(SAMPLE_FILE)
    classes = [str(c) for c in d["classes"]]
    x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    src = y_tr < 5
    _write(root / "source", x_tr[src], y_tr[src], classes)
    rng = np.random.default_rng(0)
    for c in range(5, 10):
        pool = rng.permutation(np.flatnonzero(y_tr == c))
        _write(root / "target" / "train", x_tr[pool[:PER_CLASS]], y_tr[pool[:PER_CLASS]], classes)
        _write(root / "target" / "val", x_tr[pool[PER_CLASS:2 * PER_CLASS]], y_tr[pool[PER_CLASS:2 * PER_CLASS]], classes)
        te = np.flatnonzero(y_te == c)
        _write(root / "target" / "test", x_te[te], y_te[te], classes)
    pre = _train(root, root / "source", "pretrained", model="cnn_s", epochs=3, batch_size=64)
    common = dict(model="cnn_s", epochs=EPOCHS, batch_size=BATCH)
    runs = {"scratch": _train(root, root / "target", "scratch", **common)}
    for mode in ("linear", "two-stage"):
        runs[mode] = _train(root, root / "target", mode, pretrained=pre["run_dir"], finetune=mode, **common)
    return pre, runs


def test_pretrained_backbone_beats_scratch_on_few_images(transfer):
    pre, runs = transfer
    assert pre["best_val_acc"] > 0.8  # the source task was learned
    scratch = runs["scratch"]["test_acc"]
    assert runs["scratch"]["test_images"] == 500
    for mode in ("linear", "two-stage"):
        assert runs[mode]["finetune"]["mode"] == mode
        assert runs[mode]["test_acc"] >= scratch + 0.10, (mode, runs[mode]["test_acc"], scratch)
