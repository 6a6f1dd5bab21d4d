"""Folder / CSV / built-in sources, splits, bad files, the idx reader."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from PIL import Image

from _data_files import class_value, write_bad_files, write_class_folder
from imgarena.config import DataConfig
from imgarena.data import load_data
from imgarena.data.builtin import read_idx
from imgarena.data.scan import scan_folder
from imgarena.errors import UserError


def _cfg(source, **kw):
    return DataConfig(source=str(source), cache_dir=os.environ["IMGARENA_CACHE"], workers=1, **kw)


def test_scan_ignores_hidden_and_text_survives_loops_and_warns_on_empty(tmp_path):
    root = write_class_folder(tmp_path / "d", per_class=3)
    (tmp_path / "d" / "cat" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "d" / "cat" / "readme.txt").write_text("hi")
    os.makedirs(tmp_path / "d" / "empty_class")
    os.makedirs(tmp_path / "d" / ".git")
    os.symlink(tmp_path / "d", tmp_path / "d" / "dog" / "loop")  # would recurse forever if followed naively
    listing = scan_folder(root)
    assert listing.classes == ["cat", "dog", "owl"]
    assert len(listing.splits["all"]) == 9  # the loop adds no copies of other classes into dog
    assert listing.ignored == 1
    assert any("empty_class" in w for w in listing.warnings)


def test_fewer_than_two_classes_is_a_user_error(tmp_path):
    write_class_folder(tmp_path / "one", classes=("cat",), per_class=2)
    with pytest.raises(UserError, match="at least 2 class"):
        scan_folder(tmp_path / "one")
    with pytest.raises(UserError, match="does not exist"):
        load_data(_cfg(tmp_path / "missing"))


def test_auto_split_is_stratified_reproducible_and_does_not_leak(tmp_path):
    root = write_class_folder(tmp_path / "d", per_class=12)
    a = load_data(_cfg(root, val_fraction=0.25, split_seed=3))
    b = load_data(_cfg(root, val_fraction=0.25, split_seed=3))
    c = load_data(_cfg(root, val_fraction=0.25, split_seed=4))
    assert a.split_record["splits"] == b.split_record["splits"]
    assert a.split_record["splits"]["val"] != c.split_record["splits"]["val"]
    assert not set(a.train.paths) & set(a.val.paths)
    assert len(a.train) + len(a.val) == 36
    assert np.bincount(a.val.labels).tolist() == [3, 3, 3]
    # Pixels line up with labels in every split (class k images are filled with class_value(k)).
    for split in (a.train, a.val):
        assert (split.images[:, 0, 5, 5] == [class_value(int(y)) for y in split.labels]).all()
    assert a.channels == 1 and a.img_size == 12 and a.test is None


def test_tiny_classes_still_get_one_val_image(tmp_path):
    root = write_class_folder(tmp_path / "d", per_class=2)
    d = load_data(_cfg(root, val_fraction=0.1))
    assert sorted(d.val.labels.tolist()) == [0, 1, 2] and len(d.train) == 3


def test_train_valid_test_layout_and_bad_files_are_skipped(tmp_path):
    write_class_folder(tmp_path / "d" / "train", per_class=4)
    write_class_folder(tmp_path / "d" / "valid", per_class=2, start=50)
    write_class_folder(tmp_path / "d" / "test", per_class=1, start=90)
    bad = write_bad_files(tmp_path / "d" / "train" / "dog")
    d = load_data(_cfg(tmp_path / "d"))
    assert (len(d.train), len(d.val), len(d.test)) == (12, 6, 3)
    assert sorted(os.path.basename(p) for p, _ in d.bad_files) == sorted(os.path.basename(p) for p in bad.values())
    assert all(reason for _, reason in d.bad_files)
    assert (d.train.images[:, 0, 5, 5] == [class_value(int(y)) for y in d.train.labels]).all()
    assert all("/valid/" in p for p in d.val.paths)


def test_channels_auto_and_size_override(tmp_path):
    root = write_class_folder(tmp_path / "d", per_class=3)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "d" / "owl" / "color.jpg")
    d = load_data(_cfg(root, val_fraction=0.3))
    assert d.channels == 3 and d.img_size == 224  # one RGB image of another size: RGB, default size
    d = load_data(_cfg(root, val_fraction=0.3, img_size=16, channels=1))
    assert d.train.images.shape[1:] == (1, 16, 16) and len(d.mean) == 1


def test_csv_paths_relative_to_csv(tmp_path):
    write_class_folder(tmp_path / "imgs", per_class=4)
    rows = ["path,label"] + [f"imgs/{c}/{c}_{i:03d}.png,{c.upper()}" for c in ("cat", "dog") for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    d = load_data(_cfg(tmp_path / "labels.csv", val_fraction=0.25))
    assert d.classes == ["CAT", "DOG"] and len(d.train) == 6 and len(d.val) == 2
    (tmp_path / "one.csv").write_text("imgs/cat/cat_000.png,cat\n")
    with pytest.raises(UserError, match="at least 2"):
        load_data(_cfg(tmp_path / "one.csv"))


def test_subset_is_stratified(tmp_path):
    root = write_class_folder(tmp_path / "d", per_class=10)
    d = load_data(_cfg(root, subset=6, val_fraction=0.2))
    assert np.bincount(d.train.labels).tolist() == [2, 2, 2] and len(d.val) == 6


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_from_a_local_dir(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    d = tmp_path / "datasets" / "fashion-mnist"
    d.mkdir(parents=True)
    parts = {}
    for prefix, n in (("train", 40), ("t10k", 10)):
        x = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y)
        parts[prefix] = (x, y)
    assert np.array_equal(read_idx(d / "train-images-idx3-ubyte.gz"), parts["train"][0])
    monkeypatch.setenv("IMGARENA_DATASETS", str(tmp_path / "datasets"))
    data = load_data(_cfg("fashion-mnist", val_fraction=0.25))
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    assert data.train.images.shape[1:] == (1, 28, 28)
    i = int(data.train.paths[0].rsplit("/", 1)[1])
    assert np.array_equal(data.train.images[0, 0], parts["train"][0][i])
    assert np.array_equal(data.test.images[:, 0], parts["t10k"][0])
    (d / "bad-idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(d / "bad-idx")


def test_builtin_sample_is_real_fashion_mnist():
    d = load_data(_cfg("sample"))
    assert d.classes[0] == "T-shirt_top" and d.channels == 1 and d.img_size == 28
    assert len(d.train) + len(d.val) >= 2000 and len(d.test) >= 500
    assert 0.2 < d.mean[0] < 0.4  # Fashion-MNIST's pixel mean is ~0.286
    assert d.preprocessing == {"img_size": 28, "channels": 1, "resize": "squash", "crop_pct": 1.0,
                               "interpolation": "bilinear", "mean": list(d.mean), "std": list(d.std)}
    assert d.split_record["splits"]["val"][0].startswith("sample/train/")


def test_cifar10_from_local_python_batches(tmp_path, monkeypatch):
    import pickle

    d = tmp_path / "datasets" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (d / name).write_bytes(pickle.dumps(batch))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    monkeypatch.setenv("IMGARENA_DATASETS", str(tmp_path / "datasets"))
    data = load_data(_cfg("cifar10", val_fraction=0.5))
    assert data.channels == 3 and data.img_size == 32 and len(data.test) == 6
    assert len(data.train) + len(data.val) == 20 and data.classes[3] == "c3"
