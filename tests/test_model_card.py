"""Every export folder gets a README.md model card (Hugging Face layout) whose calling snippets work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import imgarena
    from imgarena.config import ExportConfig
    from imgarena.export import run_export

    root = tmp_path_factory.mktemp("card")
    mp = pytest.MonkeyPatch()  # the session's cache (conftest), before its function-scoped fixture runs
    mp.setenv("IMGARENA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    summary = imgarena.train("sample", model="mlp", epochs=2, img_size=16, subset=300, device="cpu",
                             out_dir=str(root / "runs"), progress=False)
    run = Path(summary["run_dir"])
    res = run_export(ExportConfig(checkpoint=str(run), dynamic_batch=True))
    yield run, summary, res
    mp.undo()


def test_export_writes_a_model_card_with_classes_metrics_and_calibration(exported):
    run, summary, res = exported
    card = run / "export" / "README.md"
    assert res.model_card == str(card) and card.is_file()
    text = card.read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "imgarena" and "image-classification" in front["tags"]
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(summary["best_val_acc"])
    for name in summary["classes"]:
        assert f"| {name} |" in text
    for section in ("## Model details", "## Training data", "## Classes", "## Metrics", "## Preprocessing",
                    "## Calibration", "## Intended use and limits", "## How to use"):
        assert section in text
    assert f"{summary['train_images']} training images, {summary['val_images']} validation images" in text
    assert f"| accuracy | validation | {summary['best_val_acc']:.2%} |" in text
    assert re.search(r"\| accuracy \| validation \| [\d.]+% \| [\d.]+% - [\d.]+% \|", text)  # with its CI
    assert f"T = {summary['temperature']:.4f}" in text
    assert "imgarena predict mlp.onnx" in text and "curl -F file=@photo.jpg" in text and "imgarena serve mlp.onnx" in text
    assert "trained from scratch" in text


def test_the_cards_python_snippet_gives_what_predict_gives(exported, tmp_path):
    from imgarena.config import PredictConfig
    from imgarena.data.builtin import load_sample
    from imgarena.predict import run_predict

    run, _, res = exported
    text = (run / "export" / "README.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[0]
    img = tmp_path / "photo.png"
    Image.fromarray(load_sample().parts["test"][0][3][0], "L").save(img)
    out = subprocess.run([sys.executable, "-c", snippet.replace("'photo.jpg'", repr(str(img)))],
                         cwd=run / "export", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    label, prob = out.stdout.split()
    row = run_predict(PredictConfig(checkpoint=res.path, inputs=[str(img)]), progress=False)[0]
    assert label == row.label and float(prob) == pytest.approx(row.prob, abs=1e-4)


def test_a_readme_of_the_users_own_is_never_overwritten(exported, tmp_path):
    from imgarena.config import ExportConfig
    from imgarena.export import run_export

    run, _, _ = exported
    (tmp_path / "README.md").write_text("my notes\n")
    res = run_export(ExportConfig(checkpoint=str(run), out=str(tmp_path / "m.onnx")))
    assert (tmp_path / "README.md").read_text() == "my notes\n"
    assert res.model_card == str(tmp_path / "m.onnx.README.md")
    assert "library_name: imgarena" in Path(res.model_card).read_text()
    assert json.loads(Path(res.sidecar).read_text())["file"] == "m.onnx"
