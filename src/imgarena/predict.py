"""Classify image files with a trained checkpoint: `imgarena predict RUN PATHS...`.

The pipeline is shared with the torch-free ONNX path (`imgarena.onnx_predict`):
1. expand files, folders (recursive) and globs into one sorted list, so output order is stable;
2. decode a few batches ahead in a thread pool (Pillow releases the GIL while decoding/resizing),
   with exactly the checkpoint's preprocessing (`imgarena.data.images.load_image` + `normalize`,
   the functions training used);
3. run the model on whole batches, softmax, top-k.
A file that cannot be decoded gets a row with its error; the rest go on.

This module imports torch only inside the PyTorch-path functions, so the ONNX path can reuse the
rest of it without torch installed.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from imgarena.config import PredictConfig
from imgarena.data.images import BadImage, decode_settings, is_image_file, load_image, normalize
from imgarena.data.scan import walk_images
from imgarena.errors import UserError

FORMATS = ("table", "csv", "json")
PROGRESS_MIN_ITEMS = 256  # smaller inputs finish before a bar would be useful
PREFETCH_BATCHES = 2  # batches decoded ahead of the model
UNKNOWN = "unknown"  # the label of a row whose top probability is below --min-prob


@dataclass
class PredictionRow:
    """One input file's result: top-k (class name, probability), most likely first, or its error."""

    path: str
    topk: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    min_prob: float | None = None  # --min-prob: below it the label is "unknown" (topk keeps the real classes)

    @property
    def unknown(self) -> bool:
        return bool(self.topk) and self.min_prob is not None and self.topk[0][1] < self.min_prob

    @property
    def label(self) -> str | None:
        if self.unknown:
            return UNKNOWN
        return self.topk[0][0] if self.topk else None

    @property
    def prob(self) -> float | None:
        return self.topk[0][1] if self.topk else None

    def as_dict(self) -> dict:
        d = {
            "path": self.path,
            "label": self.label,
            "prob": None if self.prob is None else round(self.prob, 6),
            "topk": [{"label": c, "prob": round(p, 6)} for c, p in self.topk],
            "error": self.error,
        }
        if self.min_prob is not None:  # only with a threshold: rows without one keep their old shape
            d["unknown"] = self.unknown
        return d


# ---------------------------------------------------------------- inputs

def is_onnx(path) -> bool:
    return str(path).lower().endswith(".onnx")


def expand_inputs(inputs) -> list[str]:
    """Files, folders (recursive, image extensions only) and glob patterns -> sorted unique paths.

    A file named explicitly is kept whatever its extension (it gets an error row if it is not an
    image); a folder or glob contributes only image files.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: set[str] = set()
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            files.update(walk_images(item)[0])
        elif os.path.isfile(item):
            files.add(item)
        elif glob.has_magic(item):
            for m in glob.glob(item, recursive=True):
                if os.path.isdir(m):
                    files.update(walk_images(m)[0])
                elif is_image_file(m):
                    files.add(m)
        else:
            raise UserError(f"{item} not found: pass image files, folders or glob patterns (quote globs)")
    if not files:
        raise UserError(f"no image files found in {', '.join(map(str, inputs))}: "
                        "supported extensions are .jpg .jpeg .png .bmp .gif .webp .tif .tiff")
    return sorted(files)


def path_decoder(preprocessing: dict) -> Callable[[str], np.ndarray]:
    """Decode one file to uint8 (C, H, W) with a checkpoint's preprocessing: resized to the store
    size, then the centre img_size crop (crop_pct, interpolation; old checkpoints' defaults when absent)."""
    kw = decode_settings(preprocessing)
    return lambda path: load_image(path, **kw)


# ---------------------------------------------------------------- the batched pipeline

def default_workers(workers: int = 0) -> int:
    return workers if workers and workers > 0 else max(1, min(8, os.cpu_count() or 1))


def _decode_chunk(decode, items) -> list[tuple[np.ndarray | None, str | None]]:
    out = []
    for it in items:
        try:
            out.append((decode(it), None))
        except BadImage as e:
            out.append((None, str(e)))
        except Exception as e:  # one odd file must not stop thousands of others
            out.append((None, f"{type(e).__name__}: {e}"))
    return out


def decoded_batches(items, decode, *, batch_size: int, workers: int) -> Iterator[list]:
    """Yield, per batch of `items`, a list of (array, None) or (None, error), in input order.

    Each batch is split into one chunk per worker (one future per chunk, not per image: futures
    cost about as much as decoding a thumbnail), and PREFETCH_BATCHES batches are decoded ahead.
    """
    n = len(items)
    starts = iter(range(0, n, batch_size))
    per = max(1, -(-batch_size // workers))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgarena-decode") as pool:
        pending: deque = deque()

        def submit_next() -> None:
            s = next(starts, None)
            if s is not None:
                batch = items[s:s + batch_size]
                pending.append([pool.submit(_decode_chunk, decode, batch[i:i + per]) for i in range(0, len(batch), per)])

        for _ in range(PREFETCH_BATCHES + 1):
            submit_next()
        while pending:
            futures = pending.popleft()
            submit_next()
            yield [r for f in futures for r in f.result()]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (probabilities that really sum to 1), returned as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled or total < PROGRESS_MIN_ITEMS or os.environ.get("IMGARENA_PROGRESS", "1") == "0":
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the ONNX-only install may lack tqdm: no bar then
        return None
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def predict_probs(items, decode, logits_fn, *, batch_size: int = 64, workers: int = 0,
                  progress: bool = True, desc: str = "predict",
                  temperature: float | None = None) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """(probabilities (num_classes,), None) or (None, error) for each item, in input order.

    `decode(item) -> uint8 (C, H, W)`; `logits_fn(uint8 (N, C, H, W)) -> logits (N, K)`;
    probabilities are softmax(logits / temperature) (calibrated, see imgarena.calibration).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    bar = _progress_bar(len(items), progress, desc)
    try:
        for batch in decoded_batches(items, decode, batch_size=batch_size, workers=default_workers(workers)):
            good = [a for a, _ in batch if a is not None]
            probs = iter(softmax(scale_logits(logits_fn(np.stack(good)), temperature)) if good else ())
            for arr, err in batch:
                yield (next(probs), None) if arr is not None else (None, err)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def scale_logits(logits: np.ndarray, temperature: float | None) -> np.ndarray:
    return np.asarray(logits, dtype=np.float64) / temperature if temperature else logits


def model_temperature(meta: dict, source, calibrated: bool = True) -> float | None:
    """The stored calibration temperature when `calibrated`, else None (raw softmax)."""
    from imgarena.calibration import temperature_of

    return temperature_of(meta, source) if calibrated else None


def topk_pairs(probs: np.ndarray, class_names: list[str], k: int) -> list[tuple[str, float]]:
    """The k most likely (class name, probability), ties broken by class index (stable)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(class_names[i], float(probs[i])) for i in order]


def make_rows(paths, results, class_names, topk: int, min_prob: float | None = None) -> list[PredictionRow]:
    return [PredictionRow(p, topk_pairs(pr, class_names, topk), min_prob=min_prob) if err is None
            else PredictionRow(p, error=err) for p, (pr, err) in zip(paths, results)]


def class_names_of(meta: dict) -> list[str]:
    n = int(meta.get("num_classes") or len(meta.get("class_names") or []))
    names = list(meta.get("class_names") or [])
    return names if len(names) == n else [str(i) for i in range(n)]


def check_options(cfg: PredictConfig) -> None:
    if cfg.topk < 1:
        raise UserError(f"--topk must be at least 1, got {cfg.topk}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if not cfg.inputs:
        raise UserError("nothing to predict: pass image files, folders or glob patterns after the checkpoint")


# ---------------------------------------------------------------- the PyTorch path

def torch_logits_fn(model, preprocessing: dict, device, *, tta: str = "none", amp: str = "auto"):
    """uint8 (N, C, H, W) numpy -> logits numpy, normalized exactly as in training, with optional TTA."""
    import torch

    from imgarena.engine.evaluate import autocast
    from imgarena.config import AMP_MODES
    from imgarena.engine.evaluate import resolve_amp
    from imgarena.evaluation.tta import parse_tta, tta_logits

    tta = parse_tta(tta)
    if amp not in AMP_MODES:
        raise UserError(f"amp {amp!r}: use one of {', '.join(AMP_MODES)}")
    amp_dtype = resolve_amp(amp, device)
    mean, std = preprocessing["mean"], preprocessing["std"]
    interpolation = decode_settings(preprocessing)["interpolation"]  # TTA crops are resized back with it
    cuda = device.type == "cuda"

    def fn(u8: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalize(u8, mean, std))
        if cuda:
            x = x.pin_memory().to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device, amp_dtype):
            logits = tta_logits(model, x, tta, interpolation=interpolation)
        return logits.float().cpu().numpy()

    return fn


def load_torch_predictor(checkpoint, *, device="auto", amp="auto", tta="none", which="best", num_classes=None):
    """(model, meta, logits_fn) for a run folder or .safetensors checkpoint."""
    from imgarena.checkpoint import load_model
    from imgarena.engine.distributed import resolve_device

    dev = resolve_device(device)
    model, meta = load_model(checkpoint, which=which, device=dev, num_classes=num_classes)
    if dev.type == "cuda":
        import torch

        model = model.to(memory_format=torch.channels_last)
    return model, meta, torch_logits_fn(model, meta["preprocessing"], dev, tta=tta, amp=amp)


def predict_torch(cfg: PredictConfig, *, progress: bool = True) -> list[PredictionRow]:
    check_options(cfg)
    paths = expand_inputs(cfg.inputs)
    _, meta, logits_fn = load_torch_predictor(cfg.checkpoint, device=cfg.device, amp=cfg.amp, tta=cfg.tta, which=cfg.which)
    results = predict_probs(paths, path_decoder(meta["preprocessing"]), logits_fn, batch_size=cfg.batch_size,
                            workers=cfg.workers, progress=progress,
                            temperature=model_temperature(meta, cfg.checkpoint, cfg.calibrated))
    return make_rows(paths, results, class_names_of(meta), cfg.topk, cfg.min_prob)


def run_predict(cfg: PredictConfig, *, progress: bool = True) -> list[PredictionRow]:
    """Rows for every input file; an exported .onnx goes through the torch-free ONNX Runtime path."""
    if is_onnx(cfg.checkpoint):
        from imgarena.onnx_predict import predict_onnx

        return predict_onnx(cfg, progress=progress)
    return predict_torch(cfg, progress=progress)


# ---------------------------------------------------------------- output

def format_rows(rows: list[PredictionRow], fmt: str, topk: int | None = None) -> str:
    """Render rows as an aligned table, CSV (path,label,prob,label_2,prob_2,...,error) or a JSON list.

    CSV has `topk` label/prob pairs; by default as many as the longest row has.
    """
    if topk is None:
        topk = max([len(r.topk) for r in rows] + [1])
    if fmt == "json":
        return "[\n" + ",\n".join("  " + json.dumps(r.as_dict()) for r in rows) + "\n]\n" if rows else "[]\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(csv_header(topk))
        for r in rows:
            cells = [r.path]
            for i in range(topk):
                name = r.label if i == 0 else r.topk[i][0] if i < len(r.topk) else ""  # "unknown" below --min-prob
                cells += [name, f"{r.topk[i][1]:.6f}"] if i < len(r.topk) else ["", ""]
            w.writerow(cells + [r.error or ""])
        return buf.getvalue()
    if fmt == "table":
        return _table(rows)
    raise UserError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def csv_header(topk: int) -> list[str]:
    cols = ["path", "label", "prob"]
    for i in range(2, topk + 1):
        cols += [f"label_{i}", f"prob_{i}"]
    return cols + ["error"]


def _table(rows: list[PredictionRow]) -> str:
    width = min(60, max([len("path")] + [len(r.path) for r in rows]))
    lines = [f"{'path':<{width}}  prediction"]
    for r in rows:
        path = r.path if len(r.path) <= width else "..." + r.path[-(width - 3):]
        if r.error is not None:
            lines.append(f"{path:<{width}}  ERROR: {r.error}")
        else:
            guess = f"{UNKNOWN} (below {r.min_prob:g}): " if r.unknown else ""
            lines.append(f"{path:<{width}}  {guess}" + "   ".join(f"{c} {p:.3f}" for c, p in r.topk))
    return "\n".join(lines) + "\n"
