"""Reliability of the data pipeline on real files and real processes: a cache key that sees
rewrites, damaged cache entries rebuilt, decode workers that die with a killed parent, a full disk,
FIFOs, CSV headers and duplicates, planted pickles, bugs not dressed up as bad files, and
evaluation on a single class folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from _data_files import write_bad_files, write_class_folder
from imgarena.config import DataConfig
from imgarena.data import cache, images, load_data
from imgarena.data.builtin import SAMPLE_FILE
from imgarena.errors import UserError


def _cfg(src, cache_dir, **kw):
    kw.setdefault("val_fraction", 0.25)
    return DataConfig(source=str(src), cache_dir=str(cache_dir), workers=kw.pop("workers", 1), **kw)


def _pixel(data, path):
    """The cached (0, 1, 1) pixel of `path`, wherever the split put it."""
    for split in (data.train, data.val, data.test):
        if split is not None and path in split.paths:
            return int(split.images[split.paths.index(path), 0, 1, 1])
    raise AssertionError(f"{path} not in the data")


def _all_pixels(data):
    return np.concatenate([np.asarray(data.train.images), np.asarray(data.val.images)])


# ---------------------------------------------------------------- 1. cache key sees rewrites

def test_same_size_rewrite_with_restored_mtime_is_rebuilt(tmp_path):
    root = tmp_path / "d"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(4):  # BMP: the file size does not depend on the pixels
            Image.fromarray(np.full((12, 12), 50 if c == "cat" else 150, np.uint8)).save(root / c / f"{i}.bmp")
    target = str(root / "cat" / "0.bmp")
    first = load_data(_cfg(root, tmp_path / "c"))
    assert _pixel(first, target) == 50

    before = os.stat(target)
    new = tmp_path / "new.bmp"
    Image.fromarray(np.full((12, 12), 222, np.uint8)).save(new)
    with open(target, "r+b") as f:  # rewritten in place: same inode, same size
        f.write(new.read_bytes())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime put back
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)

    second = load_data(_cfg(root, tmp_path / "c"))
    assert second.cache_path != first.cache_path
    assert _pixel(second, target) == 222


# ---------------------------------------------------------------- 2. damaged entries are rebuilt

def _damage_truncate(entry_dir):
    path = os.path.join(entry_dir, cache.IMAGES)
    os.truncate(path, os.path.getsize(path) // 2)


def _damage_meta_garbage(entry_dir):
    with open(os.path.join(entry_dir, cache.META), "r+b") as f:
        f.seek(10)
        f.write(b"\x00garbage{{{")


def _damage_meta_edit(entry_dir):  # valid JSON, wrong content: the sections no longer match the rows
    path = os.path.join(entry_dir, cache.META)
    meta = json.load(open(path))
    meta["sections"]["train"][1] += 1
    json.dump(meta, open(path, "w"))


def _damage_zeroed_rows(entry_dir):  # right size, but a block of rows lost (e.g. a bad copy)
    path = os.path.join(entry_dir, cache.IMAGES)
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\x00" * 400)


def _damage_meta_missing(entry_dir):
    os.remove(os.path.join(entry_dir, cache.META))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_meta_garbage, _damage_meta_edit, _damage_zeroed_rows,
                                    _damage_meta_missing])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    root = write_class_folder(tmp_path / "d", per_class=6)
    cfg = _cfg(root, tmp_path / "c", img_size=12, channels=1)
    good = load_data(cfg)
    expected = _all_pixels(good).copy()
    damage(good.cache_path)

    with caplog.at_level(logging.WARNING, logger="imgarena.data.cache"):
        again = load_data(cfg)
    assert any("damaged" in r.getMessage() and good.cache_path in r.getMessage() for r in caplog.records)
    assert again.cache_path == good.cache_path  # same key, rebuilt in place
    assert np.array_equal(_all_pixels(again), expected)
    assert sorted(os.listdir(tmp_path / "c")) == [os.path.basename(good.cache_path)]  # no leftovers

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imgarena.data.cache"):
        third = load_data(cfg)  # the rebuilt entry checks out and is reused
    assert not caplog.records and np.array_equal(_all_pixels(third), expected)


def test_checksum_covers_samples_of_a_large_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "FULL_CHECK_BYTES", 4096)  # pretend this small file is a large cache
    monkeypatch.setattr(cache, "SAMPLE_BLOCK", 512)
    monkeypatch.setattr(cache, "SAMPLE_BLOCKS", 4)

    def fill(folder, shape):
        mm = np.memmap(os.path.join(folder, cache.IMAGES), np.uint8, "r+", shape=shape)
        mm[:] = 1
        mm.flush()
        return []

    e = cache.build(str(tmp_path), "k", n=128, channels=1, img_size=8, sections={"train": 128}, fill=fill, meta={})
    assert e.meta["checksum"]["images"].endswith(":4")  # sampled, not whole
    del e
    path = os.path.join(tmp_path, "k", cache.IMAGES)
    with open(path, "r+b") as f:  # the last block is always sampled: a lost tail is caught
        f.seek(os.path.getsize(path) - 10)
        f.write(b"\x00" * 10)
    assert cache.lookup(str(tmp_path), "k") is None and not os.path.exists(tmp_path / "k")


# ---------------------------------------------------------------- 3. workers die with a killed parent

def _children(pid: int) -> set[int]:
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = open(f"/proc/{name}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait for a reaper that never comes)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _write_sample_pngs(root, n: int) -> dict[str, np.ndarray]:
    with np.load(SAMPLE_FILE) as z:
        x, y, classes = z["x_train"][:n], z["y_train"][:n], [str(c) for c in z["classes"]]
    written = {}
    for i, (img, lab) in enumerate(zip(x, y)):
        d = os.path.join(root, classes[int(lab)])
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"{i:05d}.png")
        Image.fromarray(img).save(p, compress_level=0)
        written[p] = img
    return written


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to find the worker processes")
def test_kill_9_during_cache_build_leaves_no_workers_and_no_served_half_entry(tmp_path):
    root, cdir = str(tmp_path / "d"), str(tmp_path / "c")
    written = _write_sample_pngs(root, 2000)
    script = ("import sys\nfrom imgarena.config import DataConfig\nfrom imgarena.data import load_data\n"
              "load_data(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], workers=2, img_size=28, channels=1),"
              " progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, root, cdir], stderr=subprocess.PIPE)
    try:
        # Both decode workers exist only while the build runs, before its entry is renamed into place.
        assert _wait_until(lambda: len(_children(proc.pid)) >= 2 or proc.poll() is not None, 120)
        workers = _children(proc.pid)
        assert proc.poll() is None and len(workers) == 2, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    try:
        assert _wait_until(lambda: not any(_running(p) for p in workers), 10), "decode workers outlived their parent"
    finally:
        for p in workers:  # do not leave orphans behind when the assertion fails
            if _running(p):
                os.kill(p, signal.SIGKILL)
    left = os.listdir(cdir)
    assert left and all(".partial-" in n for n in left)  # killed mid-build: nothing complete

    data = load_data(DataConfig(source=root, cache_dir=cdir, workers=1, img_size=28, channels=1), progress=False)
    assert not any(".partial-" in n for n in os.listdir(cdir))  # the dead build's folder is cleaned up
    assert len(data.train) + len(data.val) == len(written) and not data.bad_files
    for split in (data.train, data.val):
        for i in range(0, len(split), 97):
            assert np.array_equal(split.images[i, 0], written[split.paths[i]])


def test_leftover_of_a_dead_build_is_removed_even_when_its_pid_is_reused(tmp_path):
    # In a container the main process often has the same pid every run: judge by the build's lock.
    dead = tmp_path / f"old.partial-{os.getpid()}-deadbeef"
    dead.mkdir()
    (dead / cache.LOCK).write_bytes(b"")
    (dead / cache.IMAGES).write_bytes(b"half")
    live = tmp_path / f"other.partial-{os.getpid()}-0badf00d"  # a build running right now
    live.mkdir()
    fd = cache._hold_lock(str(live))
    try:
        cache.build(str(tmp_path), "k", n=2, channels=1, img_size=4, sections={"train": 2}, fill=lambda f, s: [],
                    meta={})
        assert sorted(os.listdir(tmp_path)) == ["k", live.name]
    finally:
        os.close(fd)


def test_watchdog_ends_a_worker_where_prctl_is_unavailable(tmp_path):
    script = textwrap.dedent("""
        import multiprocessing as mp, os, sys, time
        from imgarena.data import parallel
        parallel._set_parent_death_signal = lambda: False  # as on macOS: only the watchdog thread
        def child(ppid):
            parallel.die_with_parent(ppid)
            time.sleep(600)
        if __name__ == "__main__":
            p = mp.get_context("fork").Process(target=child, args=(os.getpid(),))
            p.start()
            print(p.pid, flush=True)
            time.sleep(600)
    """)
    (tmp_path / "s.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "s.py")], stdout=subprocess.PIPE)
    try:
        child = int(proc.stdout.readline())
        assert _running(child)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait_until(lambda: not _running(child), 10)
    finally:
        proc.kill()
        proc.stdout.close()


# ---------------------------------------------------------------- 4. full disk

@pytest.fixture
def tiny_disk(tmp_path, monkeypatch):
    """A 1 MiB file system (tmpfs) when this process may mount one; else ENOSPC injected at the
    allocation, where a real full disk reports it. Yields (folder, real)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    real = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True).returncode == 0 if shutil.which("mount") else False
    if not real:
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
    try:
        yield mnt, real
    finally:
        if real:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_clear_error_and_leaves_no_temp_files(tmp_path, tiny_disk, monkeypatch):
    mnt, real = tiny_disk
    root = write_class_folder(tmp_path / "d", per_class=40, size=12, mode="RGB")
    cfg = _cfg(root, mnt / "cache", img_size=64, channels=3)  # 120 x 3 x 64 x 64 = 1.5 MB > 1 MiB
    if real:  # the free-space check
        with pytest.raises(UserError, match=r"disk full at .*cache: the image cache needs 1\.5 MB"):
            load_data(cfg)
        assert os.listdir(mnt / "cache") == []

    # The space went between the check and the writes (another process filled the disk): the file
    # system's own ENOSPC gives the same message, and nothing is left behind.
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 10**12))
    with pytest.raises(UserError, match=r"disk full at .*cache: the image cache needs 1\.5 MB"):
        load_data(cfg)
    assert os.listdir(mnt / "cache") == []


# ---------------------------------------------------------------- 5. FIFOs and other special files

class _Hung(BaseException):  # not an OSError: no except clause in the decoder may swallow it
    pass


@pytest.fixture
def alarm():
    def on_alarm(signum, frame):
        raise _Hung("hung opening a special file")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_in_a_class_folder_is_skipped_and_listed_not_hung_on(tmp_path, alarm):
    from imgarena.data.inspect import inspect_source

    root = write_class_folder(tmp_path / "d", per_class=4)
    fifo = os.path.join(root, "cat", "stream.png")
    os.mkfifo(fifo)
    data = load_data(_cfg(root, tmp_path / "c"))  # automatic size: probes headers too
    assert [(p, r) for p, r in data.bad_files] == [(fifo, "not a regular file (a named pipe)")]
    assert len(data.train) + len(data.val) == 12
    rep = inspect_source(root, cache_dir=str(tmp_path / "c"), workers=1, progress=False)
    assert rep.bad_files == [(fifo, "not a regular file (a named pipe)")]
    # the same guard covers every path the decoder is given (CSV rows, predict inputs)
    with pytest.raises(images.BadImage, match="named pipe"):
        images.load_image(fifo, channels=1, img_size=8)


# ---------------------------------------------------------------- 6. CSV headers and duplicate rows

def _csv(tmp_path, lines, name="labels.csv"):
    write_class_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=4)
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


_ROWS = [f"imgs/{c}/{c}_{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(4)]


@pytest.mark.parametrize("header", ["filename,species", "image_id,breed", "file,class", "Image Path,Label"])
def test_csv_header_of_any_name_is_not_a_phantom_class(tmp_path, header):
    d = load_data(_cfg(_csv(tmp_path, [header] + _ROWS), tmp_path / "c"))
    assert d.classes == ["cat", "dog"] and len(d.train) + len(d.val) == 8 and not d.bad_files


def test_csv_named_columns_in_any_order_and_headerless(tmp_path):
    swapped = ["split,label,path"] + [f"{'val' if i == 0 else 'train'},{c},imgs/{c}/{c}_{i:03d}.png"
                                      for c in ("cat", "dog") for i in range(4)]
    d = load_data(_cfg(_csv(tmp_path, swapped), tmp_path / "c"))
    assert d.classes == ["cat", "dog"] and len(d.val) == 2 and len(d.train) == 6
    d = load_data(_cfg(_csv(tmp_path, _ROWS, "plain.csv"), tmp_path / "c"))  # no header: first row is data
    assert len(d.train) + len(d.val) == 8


def test_csv_duplicate_rows_are_merged_and_conflicts_name_both_rows(tmp_path):
    rows = ["path,label"] + _ROWS + _ROWS[:3] + ["./" + _ROWS[3]]  # the same images listed again
    d = load_data(_cfg(_csv(tmp_path, rows), tmp_path / "c"))
    assert len(d.train) + len(d.val) == 8
    assert not set(d.train.paths) & set(d.val.paths)
    assert any("4 repeated row(s) ignored" in w for w in d.warnings)

    clash = ["path,label"] + _ROWS + ["", "imgs/cat/cat_001.png,dog"]
    with pytest.raises(UserError, match=r"rows 3 and 11: imgs/cat/cat_001.png is labelled both 'cat' and 'dog'"):
        load_data(_cfg(_csv(tmp_path, clash, "clash.csv"), tmp_path / "c"))


# ---------------------------------------------------------------- 7. no code from planted pickles

def _cifar_dir(tmp_path, protocol=2):
    d = tmp_path / "datasets" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        batch = {b"batch_label": b"x", b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(n)], b"filenames": [b"f.png"] * n}
        (d / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 4, b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return d


class _Planted:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # unpickling this creates `target`


class _PlantedShell:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [_Planted, _PlantedShell])
def test_planted_cifar_batch_is_refused_without_running_it(tmp_path, monkeypatch, payload):
    d = _cifar_dir(tmp_path)
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"x": payload(str(marker))}
    (d / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    monkeypatch.setenv("IMGARENA_DATASETS", str(tmp_path / "datasets"))
    with pytest.raises(UserError, match=r"data_batch_3 is not a valid CIFAR-10 python batch \(it references "):
        load_data(_cfg("cifar10", tmp_path / "c"))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_real_format_cifar_batches_still_load(tmp_path, monkeypatch, protocol):
    _cifar_dir(tmp_path, protocol)
    monkeypatch.setenv("IMGARENA_DATASETS", str(tmp_path / "datasets"))
    data = load_data(_cfg("cifar10", tmp_path / "c", val_fraction=0.5))
    assert data.channels == 3 and len(data.test) == 6 and data.classes[9] == "c9"
    assert len(data.train) + len(data.val) == 20


# ---------------------------------------------------------------- 8. bugs are not bad files

def test_bad_files_are_listed_but_a_bug_while_decoding_propagates(tmp_path, monkeypatch):
    root = write_class_folder(tmp_path / "d", per_class=3)
    bad = write_bad_files(os.path.join(root, "cat"))
    d = load_data(_cfg(root, tmp_path / "c", img_size=12, channels=1))
    assert sorted(p for p, _ in d.bad_files) == sorted(bad.values())

    def broken(*args, **kwargs):
        raise TypeError("a bug in the resize code")

    monkeypatch.setattr(images, "resize_image", broken)
    with pytest.raises(TypeError, match="a bug in the resize code"):
        images.load_image(os.path.join(root, "dog", "dog_000.png"), channels=1, img_size=8)
    with pytest.raises(TypeError, match="a bug in the resize code"):
        load_data(_cfg(root, tmp_path / "c2", img_size=8, channels=1))  # a fresh cache: decodes again
    # a real bad file is still a BadImage, not an exception from somewhere inside Pillow
    with pytest.raises(images.BadImage, match="truncated|corrupt"):
        images.load_image(bad["truncated"], channels=1, img_size=8)


# ---------------------------------------------------------------- 9. eval on one class folder

def test_eval_on_a_folder_of_one_known_class(tmp_path, capsys):
    import imgarena
    from imgarena.cli import main

    summary = imgarena.train("sample", model="mlp", epochs=1, img_size=16, subset=200, batch_size=32,
                             out_dir=str(tmp_path / "runs"), name="r", device="cpu", progress=False,
                             cache_dir=str(tmp_path / "cache"))
    with np.load(SAMPLE_FILE) as z:
        classes = [str(c) for c in z["classes"]]
        x = z["x_test"][z["y_test"] == 1][:7]
    new = tmp_path / "new" / classes[1]
    new.mkdir(parents=True)
    for i, img in enumerate(x):
        Image.fromarray(img).save(new / f"{i}.png")
    capsys.readouterr()
    assert main(["eval", summary["run_dir"], str(tmp_path / "new"), "--json", "--cache-dir",
                 str(tmp_path / "cache")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 7 and sum(map(sum, res["confusion_matrix"])) == 7
    support = {r["class"]: r["support"] for r in res["per_class"]}
    assert support[classes[1]] == 7 and sum(support.values()) == 7
    assert set(res["missing_classes"]) == set(classes) - {classes[1]}
    # training still needs two classes
    with pytest.raises(UserError, match="at least 2 class subfolders"):
        load_data(_cfg(tmp_path / "new", tmp_path / "cache"))
