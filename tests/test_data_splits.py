"""Leak-free splits: near-duplicate and --group-by groups stay on one side, stratified K folds
validate every image once, and re-splitting never decodes the images again."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from imgarena.config import DataConfig
from imgarena.data import cache, dedup, load_data
from imgarena.data.folds import fold_assignments, fold_data
from imgarena.data.split import group_stratified_folds, group_stratified_split, stratified_split

CLASSES = ("ant", "bee", "cow")


def _photo(rng, size=48) -> Image.Image:
    """A distinct, textured RGB picture: smooth random blobs plus fine detail."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    arr = np.asarray(coarse).astype(np.int16) + rng.integers(-20, 20, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _folder(root, per_class=8, copies=(), rng_seed=0):
    """root/<class>/img<i>.png distinct pictures; for each (class, i) in `copies`, also real resized
    (64 px, 40 px) and re-encoded (JPEG q=70) copies of that picture. Returns {(class, i): [rel paths]}."""
    rng = np.random.default_rng(rng_seed)
    sets = {}
    for c in CLASSES:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            img = _photo(rng)
            img.save(os.path.join(root, c, f"img{i}.png"))
            if (c, i) in copies:
                img.resize((64, 64), Image.LANCZOS).save(os.path.join(root, c, f"img{i}_big.png"))
                img.resize((40, 40), Image.LANCZOS).save(os.path.join(root, c, f"img{i}_small.png"))
                img.save(os.path.join(root, c, f"img{i}_q70.jpg"), quality=70)
                sets[c, i] = sorted(f"{c}/img{i}{s}" for s in (".png", "_big.png", "_small.png", "_q70.jpg"))
    return sets


def _cfg(root, tmp_path, **kw):
    kw.setdefault("img_size", 32)
    return DataConfig(source=str(root), cache_dir=str(tmp_path / "cache"), workers=1, **kw)


def _ids(split, root):
    return {os.path.relpath(p, root) for p in split.paths}


def test_resized_and_reencoded_copies_are_grouped_and_never_split(tmp_path):
    root = tmp_path / "d"
    copies = {("ant", 0), ("ant", 3), ("bee", 1), ("cow", 5)}
    sets = _folder(root, copies=copies)
    data = load_data(_cfg(root, tmp_path, val_fraction=0.3))
    # Exactly the copy sets are groups: no distinct picture is taken for a copy.
    assert sorted(sorted(g) for g in data.split_record["groups"]) == sorted(sets.values())
    assert data.split_record["group_counts"]["near_duplicates"] == len(sets)
    for seed in range(6):
        d = fold_data(data, folds=1, fold=0, seed=seed) if seed else data  # folds=1: a plain re-split
        train, val = _ids(d.train, root), _ids(d.val, root)
        for members in sets.values():
            assert set(members) <= train or set(members) <= val, (seed, members)
        assert len(val) > 0 and np.bincount(d.val.labels, minlength=3).min() >= 1  # still stratified
    for fold in range(3):
        d = fold_data(data, folds=3, fold=fold)
        val = _ids(d.val, root)
        for members in sets.values():
            assert set(members) <= val or not set(members) & val

    # Without grouping some seed does put copies on both sides: the check above can fail.
    plain = load_data(_cfg(root, tmp_path, val_fraction=0.3, dedup=False))
    leaked = False
    for seed in range(10):
        d = fold_data(plain, folds=1, fold=0, seed=seed)
        val = _ids(d.val, root)
        leaked |= any(set(m) & val and not set(m) <= val for m in sets.values())
    assert leaked and plain.split_record["groups"] == []


def test_kfold_validates_every_image_once_stratified_and_repeats_reshuffle(tmp_path):
    root = tmp_path / "d"
    _folder(root, per_class=10, copies={("bee", 2)})
    data = load_data(_cfg(root, tmp_path, folds=5))
    everything = _ids(data.train, root) | _ids(data.val, root)
    assert len(everything) == 33
    folds = fold_assignments(data, folds=5)
    assert sorted(sum(folds, [])) == sorted(everything)  # each image validated exactly once
    for k, val_ids in enumerate(folds):
        d = fold_data(data, folds=5, fold=k)
        assert set(d.split_record["splits"]["val"]) == set(val_ids)
        assert not _ids(d.train, root) & _ids(d.val, root)
        assert _ids(d.train, root) | _ids(d.val, root) == everything
        assert d.split_record["folds"] == 5 and d.split_record["fold"] == k and d.split_record["repeat"] == 0
        counts = np.bincount(d.val.labels, minlength=3)
        assert counts.min() >= 1 and counts.max() <= 4  # stratified (ant/cow 2 each, bee 2 + its group of 4)
        bee_copies = {f"bee/img2{s}" for s in (".png", "_big.png", "_small.png", "_q70.jpg")}
        assert bee_copies <= set(val_ids) or not bee_copies & set(val_ids)
    # load_data's own fold matches fold_data's.
    assert data.split_record["splits"]["val"] == folds[0]
    again = fold_assignments(data, folds=5, repeat=1)
    assert sorted(sum(again, [])) == sorted(everything) and again != folds
    assert fold_assignments(data, folds=5, repeat=1) == again  # a repeat is reproducible


def test_group_by_regex_keeps_each_object_on_one_side(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "d"
    for c in CLASSES:
        os.makedirs(root / c)
        for obj in range(4):
            for view in range(3):  # distinct pictures: only the file names say they belong together
                _photo(rng, 16).save(root / c / f"obj{obj}_view{view}.png")
    data = load_data(_cfg(root, tmp_path, img_size=16, group_by=r"^(\w+/obj\d+)_", val_fraction=0.25))
    assert data.split_record["group_counts"]["near_duplicates"] == 0
    assert len(data.split_record["groups"]) == 12 and all(len(g) == 3 for g in data.split_record["groups"])
    for seed in range(4):
        d = fold_data(data, folds=1, fold=0, seed=seed) if seed else data
        val = _ids(d.val, root)
        objects = {p.rsplit("_", 1)[0] for p in val}
        assert {f"{o}_view{v}.png" for o in objects for v in range(3)} == val  # whole objects only
        assert np.bincount(d.val.labels, minlength=3).tolist() == [3, 3, 3]  # one object per class
    fold0 = fold_data(data, folds=4, fold=0)
    assert len(fold0.val) == 9 and len({p.rsplit("_", 1)[0] for p in _ids(fold0.val, root)}) == 3


def test_group_by_flag_reaches_the_config():
    import argparse

    from imgarena.cli.common import add_data_args, data_config_from_args

    p = argparse.ArgumentParser()
    add_data_args(p)
    cfg = data_config_from_args("d", p.parse_args(["--group-by", r"obj(\d+)", "--no-dedup", "--folds", "3",
                                                   "--fold", "2", "--repeat", "1"]))
    assert (cfg.group_by, cfg.dedup, cfg.folds, cfg.fold, cfg.repeat) == (r"obj(\d+)", False, 3, 2, 1)


def test_changing_seed_fold_or_subset_never_rebuilds_the_cache(tmp_path):
    root = tmp_path / "d"
    _folder(root, per_class=8, copies={("cow", 1)})
    first = load_data(_cfg(root, tmp_path))
    images = os.path.join(first.cache_path, cache.IMAGES)
    hashes = os.path.join(first.cache_path, dedup.FILE)
    stamp = lambda p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns)
    before = (stamp(images), stamp(hashes), sorted(os.listdir(tmp_path / "cache")), first.cache_path)
    seen = set()
    for kw in ({"split_seed": 7}, {"subset": 9}, {"folds": 4, "fold": 3}, {"folds": 4, "fold": 1, "repeat": 2},
               {"val_fraction": 0.4}):
        d = load_data(_cfg(root, tmp_path, **kw))
        assert (stamp(images), stamp(hashes), sorted(os.listdir(tmp_path / "cache")), d.cache_path) == before, kw
        seen.add(tuple(d.split_record["splits"]["val"]))
    assert len(seen) == 5  # each setting did make a different split
    # Pixels read through the split's view are each file's own decoded pixels.
    d = load_data(_cfg(root, tmp_path, split_seed=3, group_by=r"img(\d)"))
    assert (stamp(images), d.cache_path) == before[::3]
    for split in (d.train, d.val):
        for k in (0, len(split) - 1):
            own = np.asarray(Image.open(split.paths[k]).convert("RGB").resize((32, 32), Image.BILINEAR))
            assert np.abs(split.images[k].transpose(1, 2, 0).astype(int) - own).mean() < 3


def test_row_view_indexes_like_the_array_it_views(tmp_path):
    base = np.arange(10 * 1 * 2 * 2, dtype=np.uint8).reshape(10, 1, 2, 2)
    path = tmp_path / "x.u8"
    base.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=base.shape)
    rows = np.array([1, 3, 4, 8])
    v = cache.RowView(mm, rows)
    want = base[rows]
    assert v.shape == want.shape and len(v) == 4 and v.dtype == np.uint8 and v.ndim == 4
    assert np.array_equal(v[2], want[2]) and np.array_equal(v[-1], want[-1])
    assert np.array_equal(np.asarray(v[1:3]), want[1:3])
    assert np.array_equal(v[np.array([3, 0, 2])], want[[3, 0, 2]])  # unsorted
    assert np.array_equal(v[np.array([True, False, True, False])], want[[0, 2]])
    assert np.array_equal(v[:, 0, 1, 1], want[:, 0, 1, 1]) and v[2, 0, 1, 0] == want[2, 0, 1, 0]
    assert np.array_equal(np.asarray(v), want)
    import pickle

    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(v))), want)  # reopens the file


def test_ungrouped_split_is_the_plain_stratified_split():
    labels = np.repeat([0, 1, 2], [7, 11, 5])
    for seed in range(3):
        tr, va = group_stratified_split(labels, np.arange(len(labels)), 0.3, seed)
        a, b = stratified_split(labels, 0.3, seed)
        assert np.array_equal(tr, a) and np.array_equal(va, b)
    f = group_stratified_folds(labels, None, 4, seed=0)
    assert sorted(np.bincount(f).tolist()) == [5, 6, 6, 6]
    for k in range(4):
        assert np.bincount(labels[f == k], minlength=3).tolist() in ([2, 3, 1], [2, 3, 2], [2, 2, 1], [1, 3, 1],
                                                                    [1, 3, 2], [2, 2, 2], [1, 2, 1], [1, 2, 2])
        assert all(abs(np.sum(labels[f == k] == c) - n / 4) < 1 for c, n in enumerate((7, 11, 5)))


def test_copies_across_the_sources_own_train_and_val_are_a_leak_warning(tmp_path, capsys):
    rng = np.random.default_rng(2)
    root = tmp_path / "d"
    for part in ("train", "val"):
        for c in CLASSES:
            os.makedirs(root / part / c)
    for c in CLASSES:
        for i in range(4):
            _photo(rng).save(root / "train" / c / f"{i}.png")
        _photo(rng).save(root / "val" / c / "new.png")
    src = Image.open(root / "train" / "bee" / "2.png")
    buf = io.BytesIO()
    src.resize((40, 40), Image.LANCZOS).save(buf, "JPEG", quality=70)
    (root / "val" / "bee" / "copy.jpg").write_bytes(buf.getvalue())
    data = load_data(_cfg(root, tmp_path))
    err = capsys.readouterr().err
    assert "1 group(s) of near-duplicate images span the source's own train and val parts" in err
    assert "train/bee/2.png ~ val/bee/copy.jpg" in err
    assert len(data.val) == 4  # the source's own split is kept as it is

    from imgarena.data.inspect import format_report, inspect_source

    text = format_report(inspect_source(str(root), cache_dir=str(tmp_path / "cache"), workers=1, progress=False))
    assert "near-duplicates: 1 group(s), 2 images" in text and "train/bee/2.png ~ val/bee/copy.jpg" in text
    assert "span the data's own train/val/test parts" in text
