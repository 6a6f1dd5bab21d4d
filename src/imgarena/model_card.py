"""The README.md model card `imgarena export` writes into every export folder, in Hugging Face's
layout (YAML front matter, then model details, data, metrics, preprocessing, calibration, use and
limits, and how to call it), from the checkpoint metadata, the export sidecar and the run's
summary.json when the run folder is known."""

from __future__ import annotations

import json
import math
from pathlib import Path


def wilson_interval(acc: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of an accuracy measured on n images."""
    if not n:
        return None
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def read_summary(ckpt: Path) -> dict | None:
    for cand in (ckpt.parent / "summary.json", ckpt.parent.parent / "summary.json"):
        if cand.is_file():
            try:
                out = json.loads(cand.read_text())
            except ValueError:
                return None
            return out if isinstance(out, dict) else None
    return None


def _yaml_str(s) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML scalar


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def render(sidecar: dict, meta: dict, summary: dict | None, *, files: list[str]) -> str:
    """The model card's text."""
    model = sidecar["model"]["name"]
    names = sidecar["class_names"]
    pre = sidecar["preprocessing"]
    cal = sidecar.get("calibration") or meta.get("calibration") or {}
    summary = summary or {}
    metrics = meta.get("metrics") or {}
    val_acc = summary.get("best_val_acc", metrics.get("val_acc"))
    n_val = summary.get("val_images")
    main = files[0]
    onnx_main = next((f for f in files if f.endswith(".onnx")), None)

    results = []
    if val_acc is not None:
        ci = wilson_interval(float(val_acc), int(n_val)) if n_val else None
        results.append(("accuracy", "validation", float(val_acc), ci, n_val))
    if summary.get("test_acc") is not None:
        n = summary.get("test_images")
        results.append(("accuracy", "test", float(summary["test_acc"]),
                        wilson_interval(float(summary["test_acc"]), int(n)) if n else None, n))

    fm = ["---", "library_name: imgarena", "pipeline_tag: image-classification",
          "tags:", "- image-classification", "- imgarena", f"- {model}"]
    if sidecar.get("format"):
        fm.append(f"- {sidecar['format']}")
    if sidecar.get("quantization"):
        fm.append("- int8")
    if results:
        fm += ["metrics:", "- accuracy", "model-index:", f"- name: {_yaml_str(model)}", "  results:",
               "  - task:", "      type: image-classification", "    dataset:",
               f"      name: {_yaml_str(summary.get('source', 'training data'))}",
               f"      type: {_yaml_str(summary.get('source', 'custom'))}", "    metrics:"]
        for kind, split, value, _, _ in results:
            fm += [f"    - type: {kind}", f"      value: {value:.6f}", f"      name: {split} accuracy"]
    fm.append("---")

    lines = fm + ["", f"# {model} image classifier ({len(names)} classes)", "",
                  f"Trained with [imgarena](https://pypi.org/project/imgarena/) {sidecar.get('imgarena_version', '')} "
                  f"and exported as {', '.join(f'`{f}`' for f in files)}.", "",
                  "## Model details", "",
                  f"- **Architecture:** `{model}`" + (f" with `{json.dumps(sidecar['model'].get('kwargs'))}`"
                                                        if sidecar["model"].get("kwargs") else ""),
                  f"- **Weights origin:** {_origin(meta, summary)}",
                  f"- **Source checkpoint:** `{sidecar.get('source_checkpoint', '')}`",
                  f"- **Format:** {sidecar.get('format')}" + (f", opset {sidecar['opset']}" if sidecar.get("opset") else ""),
                  f"- **Input:** {sidecar['input']['shape']} float32, {sidecar['input']['layout']}",
                  "- **Output:** logits, one per class"]
    if summary.get("params"):
        lines.append(f"- **Parameters:** {summary['params']:,}")
    q = sidecar.get("quantization")
    if q:
        lines.append(f"- **Quantization:** `{q['file']}`: {q['method']}; size {q['size_mb']['fp32']} MB -> "
                     f"{q['size_mb']['int8']} MB; top-1 agreement with fp32 {q['top1_agreement']:.2%}"
                     + (f"; accuracy {_pct(q['acc_fp32'])} -> {_pct(q['acc_int8'])}" if q.get("acc_fp32") is not None else ""))

    lines += ["", "## Training data", ""]
    if summary:
        lines += [f"- **Source:** `{summary.get('source')}`",
                  f"- **Split:** {summary.get('train_images')} training images, {summary.get('val_images')} validation images"
                  + (f", {summary.get('test_images')} test images" if summary.get("test_images") else ""),
                  f"- **Training:** {summary.get('epochs_completed')} epochs, optimizer {summary.get('optimizer')}, "
                  f"schedule {summary.get('schedule')}, batch size {summary.get('batch_size')}, best epoch {summary.get('best_epoch')}"]
    else:
        lines.append("The run folder (summary.json) was not found beside the checkpoint: data details unknown.")

    lines += ["", "## Classes", "", "| index | class |", "|---:|---|"] + [f"| {i} | {n} |" for i, n in enumerate(names)]

    lines += ["", "## Metrics", ""]
    if results:
        lines += ["| metric | split | value | 95% CI (Wilson) | images |", "|---|---|---:|---|---:|"]
        for kind, split, value, ci, n in results:
            lines.append(f"| {kind} | {split} | {value:.2%} | "
                         + (f"{ci[0]:.2%} - {ci[1]:.2%}" if ci else "unknown") + f" | {n or '-'} |")
        if summary.get("val_macro_f1") is not None:
            lines.append(f"\nMacro F1 (validation): {summary['val_macro_f1']:.3f}.")
    else:
        lines.append("No metrics recorded.")

    lines += ["", "## Preprocessing", "",
              f"Resize to {pre['img_size']}x{pre['img_size']} ({pre.get('resize', 'squash')}), {pre['channels']} channel(s), "
              f"then `(pixel / 255 - mean) / std` with mean `{pre['mean']}` and std `{pre['std']}`, NCHW float32. "
              "`imgarena predict` and `imgarena serve` do this for you from the JSON sidecar."]

    lines += ["", "## Calibration", ""]
    if cal.get("temperature"):
        lines.append(f"Temperature scaling fitted on the {cal.get('fit_on', 'val')} split ({cal.get('n', '?')} images): "
                     f"T = {cal['temperature']:.4f}; calibrated probabilities are `softmax(logits / T)` "
                     "(what `imgarena predict`, `serve` and the Python API return by default). Expected calibration "
                     f"error {cal.get('ece_before', float('nan')):.4f} before, {cal.get('ece_after', float('nan')):.4f} after.")
    else:
        lines.append("No calibration was stored: probabilities are the plain softmax of the logits.")

    lines += ["", "## Intended use and limits", "",
              f"Classifying images into exactly these {len(names)} classes, on images like the training data "
              "(same kind of camera, framing and resolution). The model always answers with one of its classes: an "
              "image of anything else still gets a label, so use `--min-prob P` (pick P from the accuracy-vs-coverage "
              "table `imgarena eval` prints) to label low-confidence images \"unknown\". Validation accuracy was measured "
              "on a split of the same source and is an optimistic estimate for other data: check it with "
              "`imgarena eval` on new labelled images before relying on it.",
              "", "## How to use", "", "Command line:", "", "```bash",
              f"imgarena predict {main} photos/ --topk 3",
              f"imgarena predict {main} photos/ --min-prob 0.6 --format json",
              "```", "", "HTTP:", "", "```bash",
              f"imgarena serve {main} --port 8000",
              "curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?topk=3&min_prob=0.6'",
              "```", "", "Python:", "", "```python"]
    if onnx_main:
        lines += ["import json", "import numpy as np, onnxruntime as ort", "from PIL import Image", "",
                  f"side = json.load(open({onnx_main + '.json'!r}))", "pre = side['preprocessing']",
                  f"sess = ort.InferenceSession({onnx_main!r})",
                  "img = Image.open('photo.jpg').convert('RGB' if pre['channels'] == 3 else 'L')",
                  "img = img.resize((pre['img_size'], pre['img_size']), Image.BILINEAR)  # resize 'squash'",
                  "x = np.asarray(img, np.float32).reshape(pre['img_size'], pre['img_size'], -1) / 255",
                  "x = ((x - pre['mean']) / pre['std']).transpose(2, 0, 1)[None].astype(np.float32)",
                  "logits = sess.run(None, {'input': x})[0][0]",
                  "t = (side.get('calibration') or {}).get('temperature') or 1.0",
                  "p = np.exp((logits - logits.max()) / t); p /= p.sum()",
                  "print(side['class_names'][int(p.argmax())], float(p.max()))", "```", "",
                  "or, with imgarena installed (same preprocessing as training, exactly):", "", "```python"]
    lines += ["from imgarena.predict import run_predict", "from imgarena.config import PredictConfig", "",
              f"rows = run_predict(PredictConfig(checkpoint={main!r}, inputs=['photo.jpg'], min_prob=0.6))",
              "print(rows[0].label, rows[0].topk)", "```", ""]
    src = sidecar.get("source_checkpoint")
    if src:
        lines += [f"From the PyTorch run folder: `imgarena.load({str(Path(src).parent)!r}).predict('photo.jpg')`.", ""]
    return "\n".join(lines)


def _origin(meta: dict, summary: dict) -> str:
    pretrained = (meta.get("train_config") or {}).get("pretrained")
    out = (f"initialised from pretrained weights ({pretrained}), then fine-tuned with imgarena" if pretrained
           else "trained from scratch with imgarena (random initialisation, no external weights)")
    if (meta.get("weights") or summary.get("weights")) == "ema":
        out += "; the exported weights are the exponential moving average"
    return out


def write_model_card(folder, sidecar: dict, meta: dict, summary: dict | None, *, files: list[str]) -> Path:
    from imgarena.checkpoint import atomic_write_text

    path = Path(folder) / "README.md"
    try:
        mine = path.read_text(errors="replace").startswith("---\nlibrary_name: imgarena")
    except FileNotFoundError:
        mine = True
    if not mine:  # a README of the user's own: never overwrite it
        path = Path(folder) / f"{files[0]}.README.md"
    atomic_write_text(path, render(sidecar, meta, summary, files=files))
    return path
