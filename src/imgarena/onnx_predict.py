"""Predict with an exported `.onnx` and its JSON sidecar using only onnxruntime, numpy and Pillow.

`imgarena predict model.onnx PATHS...` lands here before anything imports torch: a deployment box
needs neither PyTorch nor a GPU build of it. The sidecar (`model.onnx.json`, written by
`imgarena export`) carries the class names and the exact preprocessing. Everything but the model
call is the shared pipeline in `imgarena.predict`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from imgarena.config import PredictConfig
from imgarena.data.images import decode_settings, normalize
from imgarena.errors import UserError
from imgarena.evaluation.tta import parse_tta
from imgarena.predict import (PredictionRow, check_options, class_names_of, expand_inputs, make_rows, model_temperature,
                              path_decoder, predict_probs)


def sidecar_path(model_path) -> Path:
    """`model.onnx` -> `model.onnx.json` (a suffix of its own, so it never collides with a checkpoint's .json)."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


def read_sidecar(model_path) -> dict:
    p = Path(model_path)
    if not p.is_file():
        raise UserError(f"{p} not found: pass a .onnx file written by `imgarena export`")
    side = sidecar_path(p)
    if not side.is_file():
        raise UserError(f"{side} not found: keep the JSON written by `imgarena export` beside {p.name} "
                        "(it holds the class names and preprocessing)")
    try:
        meta = json.loads(side.read_text())
        pre = meta["preprocessing"]
        _ = decode_settings(pre), pre["mean"], pre["std"]  # crop_pct / interpolation: absent in older sidecars
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{side} is not an imgarena export sidecar ({e}): re-run `imgarena export`") from None
    return meta


def check_sidecar(model_path, session, meta: dict) -> None:
    """UserError naming the sidecar when it does not describe the model beside it: channels or image
    size against the graph's input shape, class names / num_classes against its output width."""
    side = sidecar_path(model_path)
    pre = meta["preprocessing"]
    problems = []
    shape = list(session.get_inputs()[0].shape)
    if len(shape) == 4:
        c, h, w = shape[1:]
        if isinstance(c, int) and c != int(pre["channels"]):
            problems.append(f"channels {pre['channels']} but the model's input has {c}")
        if all(isinstance(d, int) for d in (h, w)) and (h, w) != (int(pre["img_size"]),) * 2:
            problems.append(f"img_size {pre['img_size']} but the model's input is {h}x{w}")
    names = meta.get("class_names")
    n_out = session.get_outputs()[0].shape[-1]
    if names is not None and (not isinstance(names, list) or not all(isinstance(x, str) for x in names)):
        problems.append("class_names is not a list of names")
        names = None
    counts = (("class names", len(names) if names is not None else None), ("num_classes", meta.get("num_classes")))
    for what, n in counts:
        if n is not None and isinstance(n_out, int) and n != n_out:
            problems.append(f"{what}: {n}, but the model outputs {n_out} logits")
    for key in ("mean", "std"):
        if len(pre[key]) != int(pre["channels"]):
            problems.append(f"{key} has {len(pre[key])} values for {pre['channels']} channels")
    if problems:
        raise UserError(f"{side} does not match {Path(model_path).name}: {'; '.join(problems)}. "
                        "Keep the sidecar `imgarena export` wrote with this file, or re-run `imgarena export`")


def ort_session(model_path, device: str = "auto"):
    """An ONNX Runtime session; honours OMP_NUM_THREADS so shared machines stay shared."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: `pip install onnxruntime` to predict with .onnx files") from None
    opts = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(f"device {device!r}: this onnxruntime has no CUDA provider; use --device cpu or onnxruntime-gpu")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(f"{model_path} is not a loadable ONNX model ({str(e).splitlines()[0]}): re-run `imgarena export`") from None


def onnx_logits_fn(session, preprocessing: dict):
    """uint8 (N, C, H, W) -> logits, normalized exactly as in training. A model exported without
    --dynamic-batch takes one image per call."""
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    mean, std = preprocessing["mean"], preprocessing["std"]

    def fn(u8: np.ndarray) -> np.ndarray:
        x = normalize(u8, mean, std)
        if fixed is None or fixed == len(x):
            return session.run(None, {inp.name: x})[0]
        if fixed != 1:
            raise UserError(f"this ONNX model takes batches of exactly {fixed}: re-export with --dynamic-batch")
        return np.concatenate([session.run(None, {inp.name: x[i:i + 1]})[0] for i in range(len(x))])

    return fn


def predict_onnx(cfg: PredictConfig, *, progress: bool = True) -> list[PredictionRow]:
    check_options(cfg)
    if parse_tta(cfg.tta) != "none":
        raise UserError("--tta needs the PyTorch checkpoint: pass the run folder instead of the .onnx file")
    meta = read_sidecar(cfg.checkpoint)
    paths = expand_inputs(cfg.inputs)
    session = ort_session(cfg.checkpoint, cfg.device)
    check_sidecar(cfg.checkpoint, session, meta)
    fn = onnx_logits_fn(session, meta["preprocessing"])
    results = predict_probs(paths, path_decoder(meta["preprocessing"]), fn, batch_size=cfg.batch_size,
                            workers=cfg.workers, progress=progress,
                            temperature=model_temperature(meta, sidecar_path(cfg.checkpoint), cfg.calibrated))
    return make_rows(paths, results, class_names_of(meta), cfg.topk, cfg.min_prob)
