"""`imgarena export --quantize int8`: onnxruntime static quantization calibrated on the run's training
images, checked against the fp32 export on the run's val split, with the tolerance deciding the exit code."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import imgarena
    from imgarena.cli import main

    root = tmp_path_factory.mktemp("quant")
    mp = pytest.MonkeyPatch()  # the session's cache (conftest), before its function-scoped fixture runs
    mp.setenv("IMGARENA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    summary = imgarena.train("sample", model="cnn_s", epochs=2, batch_size=32, img_size=16, subset=400, device="cpu",
                             out_dir=str(root / "runs"), progress=False)
    run = Path(summary["run_dir"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", str(run), "--quantize", "int8", "--max-acc-drop", "100"])
    yield run, summary, subprocess.CompletedProcess([], rc, buf.getvalue(), "")
    mp.undo()


def test_int8_export_is_checked_against_fp32_on_val(exported):
    run, summary, out = exported
    assert out.returncode == 0, out.stdout + out.stderr
    fp32, int8 = run / "export" / "cnn_s.onnx", run / "export" / "cnn_s-int8.onnx"
    assert fp32.is_file() and int8.is_file()
    side = json.loads((run / "export" / "cnn_s-int8.onnx.json").read_text())
    q = side["quantization"]
    assert side["file"] == "cnn_s-int8.onnx" and q["file"] == "cnn_s-int8.onnx"
    assert q["method"].startswith("static (QDQ")  # conv + linear: static applies
    assert "200 training images of sample" == q["calibration_images"]
    assert q["n_images"] == summary["val_images"] and "val images" in q["verified_on"]
    assert q["size_mb"]["int8"] < 0.5 * q["size_mb"]["fp32"]
    assert abs(q["size_mb"]["int8"] - int8.stat().st_size / 1e6) < 1e-3
    assert 0.8 <= q["top1_agreement"] <= 1
    assert q["acc_fp32"] == pytest.approx(summary["best_val_acc"], abs=1e-6)  # the same val split as training
    assert q["acc_drop_points"] == pytest.approx((q["acc_fp32"] - q["acc_int8"]) * 100, abs=1e-3)
    for b in ("batch1", "batch64"):
        assert q["latency_ms"][b]["fp32"] > 0 and q["latency_ms"][b]["int8"] > 0
    assert "int8 cnn_s-int8.onnx (static" in out.stdout and "top-1 agrees with fp32" in out.stdout
    # the fp32 sidecar and the int8 one describe the same preprocessing and classes
    side32 = json.loads((run / "export" / "cnn_s.onnx.json").read_text())
    assert side32["preprocessing"] == side["preprocessing"] and side32["class_names"] == side["class_names"]


def test_int8_model_predicts_like_fp32(exported, tmp_path):
    from imgarena.config import PredictConfig
    from imgarena.data.builtin import load_sample
    from imgarena.predict import run_predict

    run, _, _ = exported
    x = load_sample().parts["test"][0][:32]
    paths = []
    for i, a in enumerate(x):
        Image.fromarray(a[0], "L").save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    r32 = run_predict(PredictConfig(checkpoint=str(run / "export" / "cnn_s.onnx"), inputs=paths), progress=False)
    r8 = run_predict(PredictConfig(checkpoint=str(run / "export" / "cnn_s-int8.onnx"), inputs=paths), progress=False)
    agree = np.mean([a.topk[0][0] == b.topk[0][0] for a, b in zip(r32, r8)])
    assert agree >= 0.75


def test_accuracy_drop_over_the_tolerance_exits_1_unless_forced(exported, capsys):
    from imgarena.cli import main

    run, _, first = exported
    assert ": OK" in first.stdout  # --max-acc-drop 100
    drop = json.loads((run / "export" / "cnn_s-int8.onnx.json").read_text())["quantization"]["acc_drop_points"]
    tol = drop - 0.01  # just under this model's own drop (deterministic: same data, same calibration images)
    if tol < 0:  # int8 lost nothing here, so no tolerance can be exceeded: the strictest one must pass
        assert main(["export", str(run), "--quantize", "int8", "--max-acc-drop", "0"]) == 0
        assert ": OK" in capsys.readouterr().out
        return
    args = ["export", str(run), "--quantize", "int8", "--max-acc-drop", f"{tol:.4f}"]
    assert main(args) == 1
    assert re.search(r"FAILED: the int8 model loses [\d.]+ accuracy points, more than --max-acc-drop",
                     capsys.readouterr().out)
    assert main([*args, "--force"]) == 0
    assert "FAILED" in capsys.readouterr().out  # still reported as such


def test_quantize_needs_onnx(exported, capsys):
    from imgarena.cli import main

    run, _, _ = exported
    assert main(["export", str(run), "--format", "torchscript", "--quantize", "int8"]) == 2
    assert "--quantize int8 needs --format onnx" in capsys.readouterr().err
