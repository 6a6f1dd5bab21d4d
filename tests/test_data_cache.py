"""The decoded-image cache: reused when nothing changed, rebuilt on any change, never half-served."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from _data_files import write_class_folder
from imgarena.config import DataConfig
from imgarena.data import cache, load_data


def _cfg(root, cache_dir, **kw):
    return DataConfig(source=str(root), cache_dir=str(cache_dir), workers=1, val_fraction=0.25, **kw)


def _images_file(d):
    return os.path.join(d.cache_path, cache.IMAGES)


def test_cache_reused_then_rebuilt_after_a_file_changes(tmp_path):
    root = write_class_folder(tmp_path / "d", per_class=4)
    a = load_data(_cfg(root, tmp_path / "c"))
    ino = os.stat(_images_file(a)).st_ino
    b = load_data(_cfg(root, tmp_path / "c"))
    assert b.cache_path == a.cache_path and os.stat(_images_file(b)).st_ino == ino  # same file, not rebuilt

    changed = os.path.join(root, "dog", "dog_001.png")
    Image.fromarray(np.full((12, 12), 7, np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    c = load_data(_cfg(root, tmp_path / "c"))
    assert c.cache_path != a.cache_path
    split = c.train if changed in c.train.paths else c.val
    assert split.images[split.paths.index(changed), 0, 5, 5] == 7

    d = load_data(_cfg(root, tmp_path / "c", resize="crop"))  # resize settings are part of the key
    assert d.cache_path not in (a.cache_path, c.cache_path)


def test_interrupted_build_is_never_served(tmp_path):
    cdir = str(tmp_path / "c")

    def failing_fill(folder, shape):
        mm = np.memmap(os.path.join(folder, cache.IMAGES), np.uint8, "r+", shape=shape)
        mm[:2] = 9
        raise KeyboardInterrupt  # the user pressed Ctrl-C half way

    with pytest.raises(KeyboardInterrupt):
        cache.build(cdir, "k1", n=4, channels=1, img_size=4, sections={"train": 4}, fill=failing_fill, meta={})
    assert cache.lookup(cdir, "k1") is None and os.listdir(cdir) == []

    def good_fill(folder, shape):
        mm = np.memmap(os.path.join(folder, cache.IMAGES), np.uint8, "r+", shape=shape)
        mm[:] = np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1)
        mm.flush()
        return [(1, "broken")]

    entry = cache.build(cdir, "k1", n=4, channels=1, img_size=4, sections={"train": 3, "val": 1}, fill=good_fill,
                        meta={})
    # The bad row 1 is dropped; rows stay in order and sections shrink accordingly.
    assert entry.images[:, 0, 0, 0].tolist() == [0, 2, 3]
    assert entry.meta["sections"] == {"train": [0, 2], "val": [2, 1]}
    assert cache.lookup(cdir, "k1").meta["bad"] == [[1, "broken"]]


def test_parallel_build_matches_serial(tmp_path):
    root = write_class_folder(tmp_path / "d", per_class=120, size=8)
    serial = load_data(_cfg(root, tmp_path / "c1"))
    par = load_data(DataConfig(source=root, cache_dir=str(tmp_path / "c2"), workers=2, val_fraction=0.25))
    assert np.array_equal(np.asarray(serial.train.images), np.asarray(par.train.images))
    assert serial.mean == par.mean
