"""`imgarena export`: a run's best checkpoint as ONNX or TorchScript, verified against PyTorch.

Beside the model goes `<file>.json` (class names, img_size, channels, resize, crop_pct,
interpolation, mean/std) so the exported file can be used without imgarena's training code
(`imgarena predict model.onnx ...` needs only onnxruntime, numpy and Pillow). Parity is checked on real images, the first that apply:
--check-images, the run's own split files, the embedded sample, and only then random inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imgarena import __version__
from imgarena.checkpoint import atomic_write, atomic_write_text, load_model, resolve_checkpoint
from imgarena.config import ExportConfig
from imgarena.data.images import BadImage, decode_settings, is_image_file, normalize, prepare_pil
from imgarena.errors import UserError
from imgarena.model_card import read_summary, write_model_card
from imgarena.onnx_predict import onnx_logits_fn, ort_session, sidecar_path
from imgarena.predict import class_names_of, expand_inputs, path_decoder

from imgarena.config import EXPORT_FORMATS  # noqa: E402,F401  (one copy of the choice list)
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET_RANGE = (13, 20)  # 13: the oldest with every op our families use; 20: torch's TorchScript-based exporter's newest
PARITY_ATOL = 1e-4  # max |logit difference| allowed between the export and PyTorch
CHECK_IMAGES = 16


@dataclass
class Parity:
    """How the exported model compares with PyTorch on `n_images` inputs from `source`."""

    n_images: int
    source: str
    max_abs_diff: float
    top1_agree: int
    ok: bool


@dataclass
class ExportResult:
    path: str
    sidecar: str
    format: str
    parity: Parity
    quantization: dict | None = None  # --quantize int8: the check of <name>-int8.onnx against fp32
    model_card: str | None = None  # README.md written beside the export

    @property
    def ok(self) -> bool:
        """Parity holds and, when quantized, the int8 accuracy drop is within tolerance."""
        return self.parity.ok and (self.quantization is None or self.quantization["ok"])

    def summary(self) -> str:
        from imgarena.quantize import format_quantization

        p = self.parity
        size_mb = os.path.getsize(self.path) / 1e6
        verdict = "OK" if p.ok else f"FAILED (needs max |diff| <= {PARITY_ATOL:g} and every top-1 equal)"
        text = (f"exported {self.path} ({size_mb:.2f} MB) with {Path(self.sidecar).name} (class names, preprocessing)\n"
                f"parity vs PyTorch on {p.n_images} images from {p.source}: max |logit diff| {p.max_abs_diff:.2e} "
                f"(tolerance {PARITY_ATOL:g}), top-1 agrees {p.top1_agree}/{p.n_images}: {verdict}")
        if self.quantization is not None:
            text += "\n" + format_quantization(self.quantization)
        if self.model_card:
            text += f"\nmodel card: {self.model_card}"
        return text


# ---------------------------------------------------------------- parity images

def _split_files(ckpt: Path, meta: dict) -> list[str]:
    """Image paths recorded in the run's split (split.json beside the checkpoint, or meta['split']),
    validation/test files first. Built-in datasets record ids, not files: those yield nothing."""
    record = meta.get("split")
    for cand in (ckpt.parent / "split.json", ckpt.parent.parent / "split.json"):
        if not record and cand.is_file():
            try:
                record = json.loads(cand.read_text())
            except ValueError:
                record = None
    if not isinstance(record, dict):
        return []
    roots = [str(v) for k, v in record.items() if k in ("root", "source") and isinstance(v, str)]
    first, rest = [], []

    def walk(node, preferred: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, preferred or any(s in str(k).lower() for s in ("val", "test")))
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, preferred)
        elif isinstance(node, str) and is_image_file(node):
            for cand in [node] + [os.path.join(r, node) for r in roots]:
                if os.path.isfile(cand):
                    (first if preferred else rest).append(cand)
                    break

    walk(record, False)
    return first + rest


def _decode_some(paths, preprocessing: dict, limit: int) -> list[np.ndarray]:
    decode, out = path_decoder(preprocessing), []
    for p in paths:
        try:
            out.append(decode(p))
        except BadImage:
            continue
        if len(out) >= limit:
            break
    return out


def _sample_images(preprocessing: dict, limit: int) -> list[np.ndarray]:
    """Images from the embedded Fashion-MNIST sample, preprocessed as the checkpoint's inputs are."""
    from PIL import Image

    from imgarena.data.builtin import load_sample

    x = load_sample().parts["test"][0][:limit]  # uint8 (N, 1, 28, 28)
    kw = decode_settings(preprocessing)
    return [prepare_pil(Image.fromarray(a[0], "L"), **kw) for a in x]


def parity_images(cfg: ExportConfig, ckpt: Path, meta: dict) -> tuple[np.ndarray, str]:
    """uint8 (N, C, H, W) images to compare on, and where they came from."""
    pre = meta["preprocessing"]
    if cfg.check_images:
        imgs = _decode_some(expand_inputs(cfg.check_images), pre, CHECK_IMAGES)
        if not imgs:
            raise UserError(f"none of --check-images {' '.join(cfg.check_images)} could be decoded: pass real image files")
        return np.stack(imgs), "--check-images"
    imgs = _decode_some(_split_files(ckpt, meta), pre, CHECK_IMAGES)
    if imgs:
        return np.stack(imgs), "the run's split files"
    try:
        imgs = _sample_images(pre, CHECK_IMAGES)
    except Exception:  # the sample is a convenience; random inputs still check the graph
        imgs = []
    if imgs:
        return np.stack(imgs), "the embedded sample"
    c, s = int(pre["channels"]), int(pre["img_size"])
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(CHECK_IMAGES, c, s, s), dtype=np.uint8), "random inputs"


# ---------------------------------------------------------------- exporters

@contextlib.contextmanager
def _quiet():
    """The TorchScript-based exporters warn about their own deprecation; users can do nothing about it."""
    import torch

    with warnings.catch_warnings():
        for cat in (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", cat)
        yield


def export_onnx(model, example, path: Path, *, dynamic_batch: bool, opset: int) -> None:
    import torch

    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None

    def write(tmp):
        with _quiet():
            # dynamo=False: the torch.export-based exporter needs onnxscript, which we do not depend on.
            torch.onnx.export(model, (example,), tmp, dynamo=False, input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamic_axes=axes, do_constant_folding=True)

    atomic_write(path, write)


def export_torchscript(model, example, path: Path) -> None:
    import torch

    with _quiet():
        traced = torch.jit.trace(model, example, check_trace=False)
    atomic_write(path, lambda tmp: traced.save(tmp))


def _exported_logits(fmt: str, path: Path, meta: dict, x_u8: np.ndarray) -> np.ndarray:
    """Logits of the file just written, run the way a user would run it."""
    if fmt == "onnx":
        return onnx_logits_fn(ort_session(path), meta["preprocessing"])(x_u8)
    import torch

    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")
    x = torch.from_numpy(normalize(x_u8, meta["preprocessing"]["mean"], meta["preprocessing"]["std"]))
    with torch.inference_mode():
        # the whole batch and a batch of one: tracing must not have baked in the batch size
        return np.concatenate([loaded(x[:-1]).numpy(), loaded(x[-1:]).numpy()]) if len(x) > 1 else loaded(x).numpy()


def compare_logits(ref: np.ndarray, got: np.ndarray, n: int, source: str) -> Parity:
    diff = float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max()) if ref.size else 0.0
    agree = int((ref.argmax(1) == got.argmax(1)).sum())
    return Parity(n, source, diff, agree, ok=bool(diff <= PARITY_ATOL and agree == n and got.shape == ref.shape))


# ---------------------------------------------------------------- the command

def check_export_options(cfg: ExportConfig) -> None:
    if cfg.format not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {cfg.format!r}: use {' or '.join(EXPORT_FORMATS)}")
    lo, hi = OPSET_RANGE
    if not lo <= int(cfg.opset) <= hi:
        raise UserError(f"--opset {cfg.opset} is not supported: use {lo}..{hi} (default 17)")
    if cfg.quantize and cfg.format != "onnx":
        raise UserError(f"--quantize {cfg.quantize} needs --format onnx (onnxruntime quantizes ONNX graphs)")


def default_out(ckpt: Path, model_name: str, fmt: str) -> Path:
    """<run>/export/<model><suffix>: outside the run folder's own files, so nothing is overwritten."""
    return ckpt.parent / "export" / (model_name.replace("/", "_") + SUFFIX[fmt])


def run_export(cfg: ExportConfig) -> ExportResult:
    """Export, write the sidecar, verify against PyTorch. The result says whether parity holds."""
    import torch

    check_export_options(cfg)
    if cfg.quantize:  # batch-64 latency and calibration batches need it; the fp32 file gets it too
        cfg = dataclasses.replace(cfg, dynamic_batch=True)
    ckpt = resolve_checkpoint(cfg.checkpoint, cfg.which)
    model, meta = load_model(ckpt, device="cpu")
    model = model.float().eval()
    pre = meta["preprocessing"]
    out = Path(cfg.out) if cfg.out else default_out(ckpt, meta["model"]["name"], cfg.format)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: pass a file name such as {out / ('model' + SUFFIX[cfg.format])}")

    x_u8, source = parity_images(cfg, ckpt, meta)
    x = torch.from_numpy(normalize(x_u8, pre["mean"], pre["std"]))
    # Tracing sees a batch of 2 when the batch must stay dynamic (a batch of 1 can fold it to a constant).
    example = x[:2] if (cfg.dynamic_batch or cfg.format == "torchscript") and len(x) >= 2 else x[:1]
    with torch.inference_mode():
        ref = model(x).float().numpy()
    with torch.no_grad():
        if cfg.format == "onnx":
            export_onnx(model, example, out, dynamic_batch=cfg.dynamic_batch, opset=int(cfg.opset))
        else:
            export_torchscript(model, example, out)

    parity = compare_logits(ref, _exported_logits(cfg.format, out, meta, x_u8), len(x_u8), source)
    side = sidecar_path(out)
    sidecar = {
        "format": cfg.format,
        "file": out.name,
        "model": meta["model"],
        "num_classes": meta["num_classes"],
        "class_names": class_names_of(meta),
        # every decode setting spelled out (old checkpoints' defaults filled in): the sidecar is the
        # whole recipe for a deployment that has only onnxruntime, numpy and Pillow
        "preprocessing": {**decode_settings(pre), "mean": list(pre["mean"]), "std": list(pre["std"])},
        "input": {"name": "input", "shape": ["batch" if cfg.dynamic_batch or cfg.format == "torchscript" else 1,
                                             pre["channels"], pre["img_size"], pre["img_size"]],
                  "dtype": "float32", "layout": "NCHW, normalized: (pixel / 255 - mean) / std"},
        "output": {"name": "logits", "note": "probabilities: softmax(logits / calibration.temperature), or plain "
                                             "softmax when calibration is null"},
        "calibration": meta.get("calibration"),
        "opset": int(cfg.opset) if cfg.format == "onnx" else None,
        "source_checkpoint": str(ckpt),
        "parity": asdict(parity),
        "imgarena_version": __version__,
    }
    atomic_write_text(side, json.dumps(sidecar, indent=2) + "\n")
    files = [out.name]
    quant = None
    if cfg.quantize and parity.ok:
        from imgarena.quantize import quantize_and_verify, quantized_path, run_images

        quant = quantize_and_verify(out, pre, run_images(ckpt, meta, x_u8, source), max_acc_drop=cfg.max_acc_drop)
        # parity (vs PyTorch) is the fp32 file's; the int8 file's own check against fp32 is "quantization"
        q_side = {**sidecar, "file": quant["file"], "parity": {**asdict(parity), "of": out.name}, "quantization": quant}
        atomic_write_text(sidecar_path(quantized_path(out)), json.dumps(q_side, indent=2) + "\n")
        files.append(quant["file"])
        sidecar = q_side
    summary = read_summary(ckpt)
    card = write_model_card(out.parent, sidecar, meta, summary, files=files)
    return ExportResult(str(out), str(side), cfg.format, parity, quant, str(card))
