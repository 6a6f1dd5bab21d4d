"""The Python API: `load` a trained run and predict, or `train` / `compare` like the CLI does.

    from imgarena import load, train, compare
    clf = load("runs/rice-mixer_s16-0001")
    clf.predict("grain.jpg").label            # one input -> one Prediction
    clf.predict([pil_img, np_array, tensor])  # a list, a folder, a glob or a 4-D batch -> a list
    clf.model                                 # the plain torch.nn.Module

`train` and `compare` are thin wrappers: keyword options become the same TrainConfig /
CompareConfig the CLI builds, so a run started from Python is reproducible from its config.yaml.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass

import numpy as np

from imgarena.errors import UserError


@dataclass
class Prediction:
    """One image's result: the top-1 `label` and `prob`, and `probs` over every class."""

    label: str | None
    prob: float | None
    probs: np.ndarray | None  # (num_classes,) softmax probabilities, summing to 1
    class_names: list[str]
    source: str | None = None  # the file path, when the input was one
    error: str | None = None  # set (and label None) only with on_error="keep"
    unknown: bool | None = None  # predict(min_prob=P): True when the top probability was below P (label "unknown")

    def topk(self, k: int = 3) -> list[tuple[str, float]]:
        """The k most likely (class name, probability)."""
        from imgarena.predict import topk_pairs

        return [] if self.probs is None else topk_pairs(self.probs, self.class_names, k)

    def as_dict(self, k: int = 3) -> dict:
        return {"source": self.source, "label": self.label, "prob": self.prob,
                "topk": [{"label": c, "prob": p} for c, p in self.topk(k)], "error": self.error,
                **({} if self.unknown is None else {"unknown": self.unknown})}


# ---------------------------------------------------------------- inputs -> uint8 (C, H, W)

def _is_tensor(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """float images in [0, 1] (torchvision's ToTensor convention) or [0, 255]; bool masks; ints."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    floating = np.issubdtype(a.dtype, np.floating)
    a = a.astype(np.float32)
    if floating and a.size and float(np.nanmax(a)) <= 1.0:
        a = a * 255.0
    return np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)


def _hwc(a: np.ndarray, channels_first: bool) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> what PIL.Image.fromarray takes."""
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise ValueError(f"an image array must be 2-D (H, W) or 3-D, got shape {a.shape}")
    chw = a.shape[0] in (1, 3, 4) and (channels_first or a.shape[-1] not in (1, 3, 4))
    if chw:
        a = a.transpose(1, 2, 0)
    if a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot tell the channel axis of an image of shape {a.shape}: use (H, W, C) or (C, H, W) "
                         "with 1, 3 or 4 channels")
    return a[..., 0] if a.shape[-1] == 1 else a


def _array_image(a, channels_first: bool):
    """An image array -> PIL image; shape mistakes raise ValueError here, before any model call."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(_hwc(_to_uint8(np.asarray(a)), channels_first)))


def _split_inputs(x) -> tuple[list, bool]:
    """Flatten the user's input into single images (paths or PIL images); and whether the caller
    gave many (then a list is returned)."""
    if isinstance(x, (list, tuple)):
        return [item for part in x for item in _split_inputs(part)[0]], True
    if isinstance(x, (str, os.PathLike)):
        s = str(x)
        if os.path.isdir(s) or (not os.path.exists(s) and glob.has_magic(s)):
            from imgarena.predict import expand_inputs

            return expand_inputs([s]), True
        if not os.path.isfile(s):
            raise UserError(f"{s} not found: pass an image file, a folder or a glob")
        return [s], False
    if _is_tensor(x):
        a = x.detach().cpu().numpy()
        if a.size == 0:  # an empty batch, whatever its shape: nothing to classify
            return [], True
        if a.ndim == 4:
            return [_array_image(img, True) for img in a], True
        return [_array_image(a, True)], False
    if isinstance(x, np.ndarray):
        if x.size == 0:
            return [], True
        if x.ndim == 4:
            return [_array_image(img, False) for img in x], True
        return [_array_image(x, False)], False
    if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
        return [x], False
    raise TypeError(f"cannot predict on a {type(x).__name__}: pass paths, PIL images, numpy arrays, tensors or lists of them")


def image_decoder(preprocessing: dict):
    """One input item (path or PIL image) -> uint8 (C, H, W), preprocessed exactly like the training
    images (same resize, channel conversion and interpolation)."""
    from imgarena.data.images import decode_settings, load_image, prepare_pil

    kw = decode_settings(preprocessing)

    def decode(item) -> np.ndarray:
        return load_image(item, **kw) if isinstance(item, str) else prepare_pil(item, **kw)

    return decode


# ---------------------------------------------------------------- the classifier

class Classifier:
    """A trained model plus what it needs to classify raw images: class names and preprocessing."""

    def __init__(self, model, meta: dict, logits_fn, *, class_names: list[str], temperature: float | None = None):
        self.model = model  # the plain nn.Module, in eval mode
        self.meta = meta
        self.class_names = class_names
        self.temperature = temperature  # probabilities are softmax(logits / temperature); None: raw softmax
        self.preprocessing = dict(meta["preprocessing"])
        self._logits_fn = logits_fn

    def __repr__(self) -> str:
        return (f"Classifier({self.meta['model']['name']}, {len(self.class_names)} classes, "
                f"{self.preprocessing['img_size']}px x{self.preprocessing['channels']})")

    def predict(self, x, *, batch_size: int = 64, workers: int = 0, on_error: str = "raise",
                min_prob: float | None = None):
        """Classify one image or many: paths, folders, globs, PIL images, numpy arrays (H, W[, C]) or
        (N, H, W, C), tensors (C, H, W) or (N, C, H, W) with values in [0, 1] or [0, 255], or lists of these.
        One image -> a Prediction; a list, folder, glob or 4-D batch -> a list of them (an empty
        list or an empty array -> []).
        on_error: "raise" (UserError naming the file) or "keep" (a Prediction with .error set).
        min_prob: label "unknown" (and .unknown True) when the top probability is below it.
        """
        from imgarena.calibration import check_min_prob
        from imgarena.predict import UNKNOWN, predict_probs

        min_prob = check_min_prob(min_prob, "min_prob")
        if on_error not in ("raise", "keep"):
            raise ValueError(f"on_error must be 'raise' or 'keep', got {on_error!r}")
        items, many = _split_inputs(x)
        if not items:
            return []
        results = predict_probs(items, image_decoder(self.preprocessing), self._logits_fn, batch_size=batch_size,
                                workers=workers, progress=False, temperature=self.temperature)
        out = []
        for item, (probs, err) in zip(items, results):
            source = item if isinstance(item, str) else None
            if err is not None:
                if on_error == "raise":
                    raise UserError(f"{source or 'input image'}: {err}")
                out.append(Prediction(None, None, None, self.class_names, source, err))
                continue
            i = int(np.argmax(probs))
            unsure = None if min_prob is None else float(probs[i]) < min_prob
            out.append(Prediction(UNKNOWN if unsure else self.class_names[i], float(probs[i]), probs, self.class_names,
                                  source, unknown=unsure))
        return out if many else out[0]


def load(path, *, device: str = "auto", tta: str = "none", which: str = "best",
         num_classes: int | None = None, amp: str = "auto", calibrated: bool = True) -> Classifier:
    """A Classifier from a run folder or .safetensors checkpoint.

    `calibrated` (default): probabilities use the temperature fitted on val at the end of training;
    False gives the raw softmax.
    `num_classes` other than the checkpoint's replaces the head with a fresh one (to fine-tune on
    another class count); class names then become "0".."n-1".
    """
    from imgarena.predict import class_names_of, load_torch_predictor, model_temperature

    model, meta, fn = load_torch_predictor(path, device=device, amp=amp, tta=tta, which=which, num_classes=num_classes)
    names = class_names_of(meta)
    temperature = model_temperature(meta, path, calibrated)
    if num_classes is not None and num_classes != len(names):
        names = [str(i) for i in range(num_classes)]
        temperature = None  # a fresh head: the stored temperature was fitted for the old one
    return Classifier(model, meta, fn, class_names=names, temperature=temperature)


# ---------------------------------------------------------------- train / compare

def _data_config(data, data_options: dict):
    from imgarena.config import DataConfig, from_dict, to_dict

    if isinstance(data, DataConfig):
        base = to_dict(data)
    elif isinstance(data, dict):
        base = dict(data)
    elif isinstance(data, (str, os.PathLike)):
        base = {"source": os.fspath(data)}
    else:
        raise UserError(f"data must be a folder, CSV, built-in name, DataConfig or PreparedData, not a {type(data).__name__}")
    base.update(data_options)
    return from_dict(DataConfig, base)


def _split_options(options: dict, cls) -> tuple[dict, dict, dict]:
    """(options for cls, options for DataConfig, the rest)."""
    from imgarena.config import DataConfig

    own = {f.name for f in dataclasses.fields(cls)} - {"data"}
    data_keys = {f.name for f in dataclasses.fields(DataConfig)} - {"source"} - own
    mine = {k: v for k, v in options.items() if k in own}
    data = {k: v for k, v in options.items() if k in data_keys}
    rest = {k: v for k, v in options.items() if k not in own and k not in data_keys}
    return mine, data, rest


def _prepared(data):
    """A PreparedData passed straight in (already loaded) rather than a source to load."""
    return data if hasattr(data, "split_record") and hasattr(data, "train") else None


def train(data="sample", model: str = "mixer_t4", *, progress: bool = True, **options) -> dict:
    """Train `model` on `data` (a folder, CSV, built-in name, DataConfig or PreparedData); options are
    TrainConfig / DataConfig fields (epochs=5, lr=1e-3, img_size=32, subset=5000, time_budget="5m" ...).
    Returns the run summary, including "run_dir"."""
    from imgarena.config import TrainConfig, from_dict
    from imgarena.engine.train import run_training
    from imgarena.paths import ensure_writable_dir

    mine, data_opts, rest = _split_options(options, TrainConfig)
    _reject_unknown(rest, TrainConfig)
    prepared = _prepared(data)
    source = prepared.source if prepared is not None else data
    cfg = from_dict(TrainConfig, {**mine, "model": model, "data": _data_config(source, data_opts)})
    ensure_writable_dir(cfg.out_dir, "out_dir")
    if prepared is None:
        ensure_writable_dir(cfg.data.cache_dir, "cache_dir")
    return run_training(cfg, data=prepared, progress=progress)


def compare(data="sample", models=None, *, progress: bool = True, **options) -> dict:
    """Train several models under identical conditions and report; options are CompareConfig fields
    (epochs, time_budget, recipe, baseline, out ...), DataConfig fields, and any other TrainConfig
    field (lr=..., augment=...) which applies to every model."""
    from imgarena.comparison import run_compare
    from imgarena.config import CompareConfig, TrainConfig, from_dict
    from imgarena.paths import ensure_writable_dir

    mine, data_opts, rest = _split_options(options, CompareConfig)
    _reject_unknown(rest, TrainConfig, also=CompareConfig)
    if models is not None:
        mine["models"] = models  # a list, or "a,b" (CompareConfig splits and checks it)
    if rest:
        mine["train"] = {**mine.get("train", {}), **rest}
    cfg = from_dict(CompareConfig, {**mine, "data": _data_config(data, data_opts)})
    ensure_writable_dir(cfg.data.cache_dir, "cache_dir")
    if cfg.out is not None:
        ensure_writable_dir(cfg.out, "out")
    return run_compare(cfg, progress=progress)


def _reject_unknown(rest: dict, cls, also=None) -> None:
    from imgarena.config import DataConfig
    from imgarena.errors import closest_matches

    known = {f.name for c in (cls, DataConfig, also) if c is not None for f in dataclasses.fields(c)}
    bad = sorted(k for k in rest if k not in known)
    if bad:
        hint = closest_matches(bad[0], known)
        raise UserError(f"unknown option {bad[0]!r}" + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
