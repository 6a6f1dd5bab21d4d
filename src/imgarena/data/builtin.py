"""Built-in datasets: `sample` (embedded Fashion-MNIST subset), `fashion-mnist`, `cifar10`.

Local copies are preferred (Debian's /usr/share/datasets, $IMGARENA_DATASETS, the cache folder);
otherwise torchvision downloads them into `<cache_dir>/datasets`.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgarena.errors import UserError

BUILTINS = ("sample", "fashion-mnist", "cifar10")
FASHION_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle_boot"]
SAMPLE_FILE = Path(__file__).parent / "sample" / "fashion_mnist_sample.npz"
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class Builtin:
    """A built-in dataset in memory: parts[name] = (uint8 (N, C, H, W), int64 (N,))."""

    name: str
    classes: list[str]
    parts: dict[str, tuple[np.ndarray, np.ndarray]]
    files: list[str]  # where it was read from (part of the cache key)


def read_idx(path) -> np.ndarray:
    """Read an idx file (optionally .gz): the format of MNIST / Fashion-MNIST."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4).astype(np.int64)
    arr = np.frombuffer(data, dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: idx header says {tuple(dims)} but holds {arr.size} values (truncated?)")
    return arr.reshape(tuple(dims))


def _find(dirs, names) -> Path | None:
    for d in dirs:
        if d and all((Path(d) / n).exists() or (Path(d) / (n + ".gz")).exists() for n in names):
            return Path(d)
    return None


def _idx_path(d: Path, name: str) -> Path:
    return d / name if (d / name).exists() else d / (name + ".gz")


def read_fashion_dir(d) -> Builtin:
    d = Path(d)
    parts, files = {}, []
    for split, (img_name, lab_name) in _FMNIST_FILES.items():
        ip, lp = _idx_path(d, img_name), _idx_path(d, lab_name)
        x, y = read_idx(ip), read_idx(lp).astype(np.int64)
        parts[split] = (np.ascontiguousarray(x[:, None]), y)
        files += [str(ip), str(lp)]
    return Builtin("fashion-mnist", list(FASHION_CLASSES), parts, files)


def _local_dirs(cache_dir: str, *names: str) -> list[str]:
    roots = [os.environ.get("IMGARENA_DATASETS"), "/usr/share/datasets", os.path.join(cache_dir, "datasets")]
    return [os.path.join(r, n) for r in roots if r for n in names]


def _local_or_download(name: str, names: list[str], dirs: list[str], download, hint: str, root: str) -> Path:
    """The first of `dirs` holding all `names`; else `download(root)` (torchvision) and look again."""
    found = _find(dirs, names)
    if found is None:
        try:
            download(root)
            found = _find(dirs, names)
            if found is None:
                raise FileNotFoundError(names[0])
        except Exception as e:
            raise UserError(f"{name} not found locally (looked in {', '.join(dirs[:2])}) and the download failed "
                            f"({type(e).__name__}): {hint}") from None
    return found


def _download_fashion(root: str) -> None:
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(root, train=train, download=True)


def _download_cifar(root: str) -> None:
    from torchvision.datasets import CIFAR10

    CIFAR10(root, train=True, download=True)


def load_fashion_mnist(cache_dir: str) -> Builtin:
    names = [n for pair in _FMNIST_FILES.values() for n in pair]
    dirs = _local_dirs(cache_dir, "fashion-mnist", "FashionMNIST/raw")
    return read_fashion_dir(_local_or_download(
        "fashion-mnist", names, dirs, _download_fashion,
        "install Debian's dataset-fashion-mnist or copy the idx files to one of those folders",
        os.path.join(cache_dir, "datasets")))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 python batches contain: dicts, lists, bytes, numbers and plain
    numpy arrays. Any other global (os.system, builtins.eval, ...) is refused
    before it is looked up, so a planted batch file cannot run code."""

    def find_class(self, module, name):
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR-10 batch never contains")
        return allowed()


def _numpy_core(name: str):
    def get():
        try:
            from numpy import _core as core  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy import core
        mod, attr = name.split(".")
        return getattr(getattr(core, mod), attr)

    return get


def _codecs_encode():
    import _codecs

    return _codecs.encode


# The globals numpy arrays pickle to. The originals (Python 2, numpy 1) reference numpy.core; numpy 2
# writes numpy._core. Python 3 writes bytes in protocol 2 as _codecs.encode(str, "latin1"), and
# protocol 5 arrays as _frombuffer(buffer, dtype, shape, order): both only build data.
_CIFAR_GLOBALS = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _numpy_core("multiarray._reconstruct")
       for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numpy_core("numeric._frombuffer") for core in ("core", "_core")},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


def load_cifar_batch(path) -> dict:
    """One CIFAR-10 python batch (a pickled dict), read with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise UserError(f"{path} is not a valid CIFAR-10 python batch ({e}): refusing to load it; delete the "
                        "folder and download the official cifar-10-python.tar.gz again") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a valid CIFAR-10 python batch (holds a {type(obj).__name__}, not a dict)")
    return obj


def read_cifar_dir(d) -> Builtin:
    d = Path(d)

    def field(b: dict, key: bytes, path: Path):
        if key not in b:
            raise UserError(f"{path} is not a valid CIFAR-10 python batch (no {key.decode()!r} entry)")
        return b[key]

    parts, files = {}, []
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for n in names:
            b = load_cifar_batch(d / n)
            data, labels = field(b, b"data", d / n), field(b, b"labels", d / n)
            try:
                xs.append(np.asarray(data, np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(labels, np.int64).reshape(-1))
            except (ValueError, TypeError) as e:  # wrong shape or element types
                raise UserError(f"{d / n} is not a valid CIFAR-10 python batch ({e})") from None
            if len(xs[-1]) != len(ys[-1]):
                raise UserError(f"{d / n} is not a valid CIFAR-10 python batch ({len(xs[-1])} images but "
                                f"{len(ys[-1])} labels)")
            files.append(str(d / n))
        parts[split] = (np.concatenate(xs), np.concatenate(ys))
    meta = load_cifar_batch(d / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in field(meta, b"label_names", d / "batches.meta")]
    return Builtin("cifar10", classes, parts, files)


def load_cifar10(cache_dir: str) -> Builtin:
    names = ["data_batch_1", "test_batch", "batches.meta"]
    dirs = _local_dirs(cache_dir, "cifar10/cifar-10-batches-py", "cifar-10-batches-py", "cifar10")
    return read_cifar_dir(_local_or_download(
        "cifar10", names, dirs, _download_cifar,
        "put the python batches (cifar-10-batches-py) in one of those folders", os.path.join(cache_dir, "datasets")))


def load_sample() -> Builtin:
    with np.load(SAMPLE_FILE) as z:
        parts = {s: (np.ascontiguousarray(z[f"x_{s}"][:, None]), z[f"y_{s}"].astype(np.int64))
                 for s in ("train", "test")}
        classes = [str(c) for c in z["classes"]]
    return Builtin("sample", classes, parts, [str(SAMPLE_FILE)])


def load_builtin(name: str, cache_dir: str) -> Builtin:
    if name == "sample":
        return load_sample()
    if name == "fashion-mnist":
        return load_fashion_mnist(cache_dir)
    if name == "cifar10":
        return load_cifar10(cache_dir)
    raise UserError(f"unknown built-in dataset {name!r}: choose one of {', '.join(BUILTINS)}")


def _write_pngs(out_root: str, start: int, chunk: list) -> int:
    from PIL import Image

    for arr, rel in chunk:
        img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
        img.save(os.path.join(out_root, rel), compress_level=1)
    return len(chunk)


class _PngWriter:
    def __init__(self, out_root: str):
        self.out_root = out_root

    def __call__(self, start, chunk):
        return _write_pngs(self.out_root, start, chunk)


def write_image_folder(b: Builtin, out: str, *, workers: int = 0, progress: bool = True) -> dict[str, int]:
    """Write `b` as OUT/<split>/<class>/<index>.png (a layout `load_data` reads back); counts per split."""
    from imgarena.data.parallel import map_chunks

    items = []
    for split, (x, y) in b.parts.items():
        for c in b.classes:
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
        items += [(x[i], os.path.join(split, b.classes[int(y[i])], f"{i:05d}.png")) for i in range(len(y))]
    for _ in map_chunks(_PngWriter(out), items, workers=workers, progress=progress, desc="writing PNGs"):
        pass
    return {split: len(y) for split, (_, y) in b.parts.items()}
