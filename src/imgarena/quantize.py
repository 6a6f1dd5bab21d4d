"""`imgarena export --format onnx --quantize int8`: an int8 copy of the exported ONNX model, made with
onnxruntime's quantization and verified against the fp32 file.

Static quantization (QDQ, per-channel weights) is calibrated on training images of the run's own
data, decoded exactly as training and `predict` decode them; when it fails (an op it cannot
handle) dynamic quantization (weights only) is used instead, and the sidecar says which. The
check: top-1 agreement and accuracy of fp32 vs int8 on the run's validation split, file sizes and
batch-1 / batch-64 latency (median of several onnxruntime calls).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

from imgarena.errors import UserError

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 200
VERIFY_MAX_IMAGES = 10_000  # a val split beyond this is sampled (evenly) for the accuracy check
LATENCY_RUNS = {1: 30, 64: 10}


def quantized_path(fp32_path) -> Path:
    p = Path(fp32_path)
    return p.with_name(p.stem + "-int8" + p.suffix)


@dataclasses.dataclass
class RunImages:
    """uint8 images of a run's data: a training sample (calibration) and the val split (verification)."""

    calib: np.ndarray
    calib_source: str
    val: np.ndarray | None
    val_labels: np.ndarray | None
    val_source: str


def run_images(ckpt: Path, meta: dict, fallback: np.ndarray, fallback_source: str, *, seed: int = 0) -> RunImages:
    """The run's training and val images through its config.yaml (the same cached, split data
    training used); without a config.yaml (a bare checkpoint) the parity images stand in for both."""
    from imgarena.config import TrainConfig, from_dict, load_yaml
    from imgarena.data.images import center_crop

    cfg_path = ckpt.parent / "config.yaml"
    if not cfg_path.is_file():
        log.warning("%s not found: calibrating int8 on %s, no accuracy check", cfg_path, fallback_source)
        return RunImages(fallback, fallback_source, None, None, fallback_source)
    from imgarena.data import load_data
    from imgarena.data.prepare import with_preprocessing

    tc = from_dict(TrainConfig, load_yaml(cfg_path, TrainConfig), where=str(cfg_path))
    pre = meta["preprocessing"]
    dc = with_preprocessing(tc.data, pre)
    size = int(pre["img_size"])
    try:
        data = load_data(dc, progress=False)
    except UserError as e:
        raise UserError(f"--quantize needs the run's data to calibrate on ({cfg_path}: {e})") from None
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data.train), size=min(CALIBRATION_IMAGES, len(data.train)), replace=False))
    # the eval view (centre crop of the stored images), what predict and the exported model see
    calib = np.stack([center_crop(data.train.images[i], size) for i in idx])
    names = [str(c) for c in meta["class_names"]]
    if [str(c) for c in data.classes] != names:
        log.warning("%s: the data's classes differ from the checkpoint's; no accuracy check", dc.source)
        return RunImages(calib, f"{len(calib)} training images of {data.source}", None, None, fallback_source)
    n = len(data.val)
    vidx = np.arange(n) if n <= VERIFY_MAX_IMAGES else np.linspace(0, n - 1, VERIFY_MAX_IMAGES).astype(np.int64)
    val = np.stack([center_crop(data.val.images[i], size) for i in vidx])
    labels = np.asarray(data.val.labels, dtype=np.int64)[vidx]
    return RunImages(calib, f"{len(calib)} training images of {data.source}", val, labels,
                     f"{len(val)} val images of {data.source}")


def _batches(session, preprocessing: dict, u8: np.ndarray, batch: int = 32):
    from imgarena.data.images import normalize

    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or batch
    for s in range(0, len(u8), step):
        x = normalize(u8[s:s + step], preprocessing["mean"], preprocessing["std"])
        if fixed is None or len(x) == fixed:
            yield {inp.name: x}


def quantize_int8(fp32: Path, out: Path, preprocessing: dict, calib_u8: np.ndarray) -> str:
    """Write `out`; returns the method used ("static (QDQ, per-channel)", ... or "dynamic")."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
    except ImportError:
        raise UserError("--quantize needs onnxruntime with its quantization tools: pip install onnxruntime onnx") from None
    from imgarena.checkpoint import atomic_write
    from imgarena.onnx_predict import ort_session

    session = ort_session(fp32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(list(_batches(session, preprocessing, calib_u8)))

        def get_next(self):
            return next(self.it, None)

    src = str(fp32)
    pre_done = out.with_name("." + out.name + ".pre.onnx")
    try:  # shape inference + graph cleanup first, as onnxruntime recommends; optional
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32), str(pre_done), skip_symbolic_shape=True)
        src = str(pre_done)
    except Exception as e:
        log.info("quantization pre-processing skipped: %s", e)
    try:
        for per_channel in (True, False):
            try:
                atomic_write(out, lambda tmp, pc=per_channel: quantize_static(
                    src, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=pc,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8))
                ort_session(out)  # it must load, or it is no use
                return f"static (QDQ, {'per-channel' if per_channel else 'per-tensor'} int8 weights, uint8 activations)"
            except Exception as e:  # onnxruntime raises many types here; the next method is the answer
                log.info("static quantization (per_channel=%s) failed: %s", per_channel, str(e).splitlines()[:1])
        atomic_write(out, lambda tmp: quantize_dynamic(src, tmp, weight_type=QuantType.QInt8))
        ort_session(out)
        return "dynamic (int8 weights; static calibration did not apply)"
    finally:
        pre_done.unlink(missing_ok=True)


def _latency_ms(session, preprocessing: dict, u8: np.ndarray, batch: int) -> float | None:
    from imgarena.data.images import normalize

    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    if fixed is not None and fixed != batch:
        return None
    reps = -(-batch // max(len(u8), 1))
    x = normalize(np.concatenate([u8] * reps)[:batch], preprocessing["mean"], preprocessing["std"])
    feed = {inp.name: x}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(LATENCY_RUNS.get(batch, 10)):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 4)


def _logits(session, preprocessing: dict, u8: np.ndarray) -> np.ndarray:
    from imgarena.onnx_predict import onnx_logits_fn

    fn = onnx_logits_fn(session, preprocessing)
    return np.concatenate([fn(u8[s:s + 256]) for s in range(0, len(u8), 256)])


def quantize_and_verify(fp32: Path, preprocessing: dict, images: RunImages, *, max_acc_drop: float) -> dict:
    """Quantize, then compare with fp32: the sidecar's "quantization" block (with "ok")."""
    from imgarena.onnx_predict import ort_session

    out = quantized_path(fp32)
    method = quantize_int8(fp32, out, preprocessing, images.calib)
    s32, s8 = ort_session(fp32), ort_session(out)
    check = images.val if images.val is not None else images.calib
    l32, l8 = _logits(s32, preprocessing, check), _logits(s8, preprocessing, check)
    agree = float((l32.argmax(1) == l8.argmax(1)).mean()) if len(check) else 1.0
    q = {"method": method, "file": out.name, "calibration_images": images.calib_source, "verified_on": images.val_source,
         "n_images": int(len(check)), "top1_agreement": agree, "acc_fp32": None, "acc_int8": None, "acc_drop_points": None,
         "max_acc_drop_points": max_acc_drop,
         "size_mb": {"fp32": round(os.path.getsize(fp32) / 1e6, 4), "int8": round(os.path.getsize(out) / 1e6, 4)},
         "latency_ms": {}}
    if images.val_labels is not None:
        a32 = float((l32.argmax(1) == images.val_labels).mean())
        a8 = float((l8.argmax(1) == images.val_labels).mean())
        q.update(acc_fp32=a32, acc_int8=a8, acc_drop_points=round((a32 - a8) * 100, 4))
    for b in (1, 64):
        q["latency_ms"][f"batch{b}"] = {"fp32": _latency_ms(s32, preprocessing, check, b),
                                        "int8": _latency_ms(s8, preprocessing, check, b)}
    q["ok"] = q["acc_drop_points"] is None or q["acc_drop_points"] <= max_acc_drop
    return q


def format_quantization(q: dict) -> str:
    lat = "; ".join(f"{k}: {v['fp32']} -> {v['int8']} ms" for k, v in q["latency_ms"].items() if v["fp32"] is not None)
    acc = ("no accuracy check (no labelled val split)" if q["acc_fp32"] is None else
           f"accuracy {q['acc_fp32']:.2%} -> {q['acc_int8']:.2%} ({-q['acc_drop_points']:+.2f} points, "
           f"tolerance -{q['max_acc_drop_points']:g})")
    verdict = "OK" if q["ok"] else (f"FAILED: the int8 model loses {q['acc_drop_points']:.2f} accuracy points, more than "
                                    f"--max-acc-drop {q['max_acc_drop_points']:g} (use the fp32 file, or --force)")
    return (f"int8 {q['file']} ({q['method']}), calibrated on {q['calibration_images']}\n"
            f"  size {q['size_mb']['fp32']:.2f} MB -> {q['size_mb']['int8']:.2f} MB; latency (median) {lat}\n"
            f"  on {q['verified_on']}: top-1 agrees with fp32 on {q['top1_agreement']:.2%}; {acc}: {verdict}")
