"""Temperature scaling at the end of training, calibrated probabilities in predict / API / ONNX,
--min-prob "unknown" rows, and the accuracy-vs-coverage table of `imgarena eval`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgarena import calibration
from imgarena.config import PredictConfig

# ---------------------------------------------------------------- the maths, on synthetic data


def _overconfident(n=4000, k=5, seed=0, scale=4.0):
    """Logits whose true temperature is `scale`: labels are drawn from softmax(z), the model says softmax(scale*z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    p = calibration.scaled_probs(z, None)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1).clip(0, k - 1)  # one draw from each row's distribution
    return z * scale, y


def test_fit_temperature_recovers_the_true_temperature_and_lowers_nll():
    logits, y = _overconfident()
    t = calibration.fit_temperature(logits, y)
    assert 3.3 < t < 4.8  # the logits were sharpened 4x
    assert calibration.nll(logits, y, t) < calibration.nll(logits, y, 1.0)
    before = calibration.ece(calibration.scaled_probs(logits, None), y)
    after = calibration.ece(calibration.scaled_probs(logits, t), y)
    assert after < before / 3
    # log(probs) stands in for the logits: same temperature
    t2 = calibration.fit_temperature(calibration.log_probs(calibration.scaled_probs(logits, None)), y)
    assert abs(t2 - t) < 1e-2


def test_ece_bins_and_coverage_table():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    bins = calibration.reliability_bins(probs, y, bins=10)
    assert sum(b["count"] for b in bins) == 4
    # |acc - conf| per row's bin: 0.9->1 (0.1), 0.8->0 (0.8), 0.6->1 (0.4), 0.7->1 (0.3)
    assert calibration.ece(probs, y, bins=10) == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)
    table = {r["threshold"]: r for r in calibration.coverage_table(probs, y, thresholds=(0.0, 0.65, 0.85, 0.95))}
    assert table[0.0]["coverage"] == 1 and table[0.0]["accuracy"] == 0.75
    assert table[0.65]["kept"] == 3 and table[0.65]["accuracy"] == pytest.approx(2 / 3)
    assert table[0.85]["kept"] == 1 and table[0.85]["accuracy"] == 1.0
    assert table[0.95]["kept"] == 0 and table[0.95]["accuracy"] is None
    assert calibration.threshold_for_coverage(probs, 0.5) == pytest.approx(0.8)


def test_calibrate_run_keeps_the_weights_bitwise_and_stores_the_block(tmp_path):
    from predict_helpers import save_run
    from safetensors.torch import load_file

    run = save_run(tmp_path / "run")
    before = load_file(str(run / "best.safetensors"))
    logits, y = _overconfident(n=500, k=3)
    out = calibration.calibrate_run(run, calibration.scaled_probs(logits, None), y, test=(calibration.scaled_probs(logits, None), y))
    after = load_file(str(run / "best.safetensors"))
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and before[k].numpy().tobytes() == after[k].numpy().tobytes() for k in before)
    meta = json.loads((run / "best.json").read_text())
    cal = meta["calibration"]
    assert cal["fit_on"] == "val" and cal["n"] == 500 and cal["temperature"] == out["temperature"] > 2
    assert cal["ece_after"] < cal["ece_before"] and cal["nll_after"] <= cal["nll_before"]
    assert meta["class_names"] == ["cat", "dog", "eel"]  # the rest of the metadata is kept
    assert (run / "reliability.png").stat().st_size > 1000


# ---------------------------------------------------------------- a real, overconfident run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An mlp trained long on few images without label smoothing: it ends up overconfident."""
    import imgarena

    root = tmp_path_factory.mktemp("calib")
    mp = pytest.MonkeyPatch()  # the session's cache (conftest), before its function-scoped fixture runs
    mp.setenv("IMGARENA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    summary = imgarena.train("sample", model="mlp", epochs=25, batch_size=32, img_size=16, subset=300, lr=3e-3,
                             label_smoothing=0.0, augment="none", device="cpu", out_dir=str(root / "runs"),
                             progress=False)
    yield Path(summary["run_dir"]), summary
    mp.undo()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from imgarena.data.builtin import load_sample

    root = tmp_path_factory.mktemp("imgs")
    x = load_sample().parts["test"][0]
    paths = []
    for i in range(24):
        p = root / f"s{i:02d}.png"
        Image.fromarray(x[i][0], "L").save(p)
        paths.append(str(p))
    return paths


def test_training_fits_a_temperature_that_helps_on_held_out_data(run):
    run_dir, summary = run
    assert summary["temperature"] > 1  # overconfident: probabilities get softened
    assert summary["ece_after"] < summary["ece_before"]
    assert summary["test_ece_after"] < summary["test_ece_before"]  # the sample's own test part, never fitted on
    meta = json.loads((run_dir / "best.json").read_text())
    assert meta["calibration"]["nll_after"] <= meta["calibration"]["nll_before"]
    assert json.loads((run_dir / "summary.json").read_text())["temperature"] == summary["temperature"]
    assert (run_dir / "reliability.png").is_file()


def test_predict_api_and_onnx_return_calibrated_probabilities(run, images, tmp_path):
    import imgarena
    from imgarena.config import ExportConfig
    from imgarena.export import run_export
    from imgarena.predict import run_predict

    run_dir, summary = run
    t = summary["temperature"]
    cal, raw = imgarena.load(run_dir, device="cpu"), imgarena.load(run_dir, device="cpu", calibrated=False)
    assert cal.temperature == pytest.approx(t) and raw.temperature is None
    pc = np.stack([p.probs for p in cal.predict(images)])
    pr = np.stack([p.probs for p in raw.predict(images)])
    np.testing.assert_allclose(pc, calibration.recalibrate(pr, t), atol=1e-5)
    assert pc.max(1).mean() < pr.max(1).mean()  # softened
    assert (pc.argmax(1) == pr.argmax(1)).all()  # same labels

    rows = run_predict(PredictConfig(checkpoint=str(run_dir), inputs=images, topk=10, device="cpu"), progress=False)
    np.testing.assert_allclose([r.prob for r in rows], pc.max(1), atol=1e-5)

    res = run_export(ExportConfig(checkpoint=str(run_dir), dynamic_batch=True, out=str(tmp_path / "m.onnx")))
    assert res.parity.ok
    side = json.loads(Path(res.sidecar).read_text())
    assert side["calibration"]["temperature"] == pytest.approx(t)
    onnx_rows = run_predict(PredictConfig(checkpoint=res.path, inputs=images, topk=10), progress=False)
    np.testing.assert_allclose([r.prob for r in onnx_rows], pc.max(1), atol=1e-4)
    onnx_raw = run_predict(PredictConfig(checkpoint=res.path, inputs=images, calibrated=False), progress=False)
    np.testing.assert_allclose([r.prob for r in onnx_raw], pr.max(1), atol=1e-4)


def test_min_prob_labels_unsure_rows_unknown_and_keeps_the_topk(run, images):
    import imgarena
    from imgarena.predict import format_rows, run_predict

    run_dir, _ = run
    plain = run_predict(PredictConfig(checkpoint=str(run_dir), inputs=images, device="cpu"), progress=False)
    probs = np.array([r.prob for r in plain])
    p = float(np.median(probs))
    rows = run_predict(PredictConfig(checkpoint=str(run_dir), inputs=images, device="cpu", min_prob=p), progress=False)
    unknown = [r for r in rows if r.unknown]
    assert 0 < len(unknown) < len(rows) and len(unknown) == int((probs < p).sum())
    for r, ref in zip(rows, plain):
        assert r.topk == ref.topk  # what it would have been stays visible
        assert r.label == ("unknown" if r.prob < p else ref.label)
        d = r.as_dict()
        assert d["unknown"] is (r.prob < p) and d["label"] == r.label
    assert "unknown" not in plain[0].as_dict()  # no threshold: rows keep their old shape
    csv_text = format_rows(rows, "csv")
    assert sum(line.split(",")[1] == "unknown" for line in csv_text.splitlines()[1:]) == len(unknown)
    assert "unknown (below" in format_rows(rows, "table")

    preds = imgarena.load(run_dir, device="cpu").predict(images, min_prob=p)
    assert [q.label for q in preds] == [r.label for r in rows]
    assert all(q.unknown == (q.prob < p) for q in preds)
    with pytest.raises(ValueError, match="min_prob"):
        imgarena.load(run_dir, device="cpu").predict(images, min_prob=1.5)

    out = subprocess.run([sys.executable, "-m", "imgarena", "predict", str(run_dir), *images[:6], "--min-prob", "1.0",
                          "--format", "json", "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert all(r["unknown"] and r["label"] == "unknown" and r["topk"][0]["label"] != "unknown" for r in js)
    assert "6 unknown" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "imgarena", "predict", str(run_dir), images[0], "--min-prob", "2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "min_prob" in bad.stderr.replace("-", "_") and "Traceback" not in bad.stderr


def test_eval_prints_the_accuracy_vs_coverage_table(run):
    run_dir, summary = run
    out = subprocess.run([sys.executable, "-m", "imgarena", "eval", str(run_dir), "sample", "--device", "cpu", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    cov = res["coverage"]
    assert cov[0]["threshold"] == 0 and cov[0]["coverage"] == 1 and cov[0]["accuracy"] == pytest.approx(res["acc"])
    covs = [r["coverage"] for r in cov]
    assert covs == sorted(covs, reverse=True)
    assert res["calibration"]["temperature"] == pytest.approx(summary["temperature"])
    assert res["calibration"]["ece"] < res["calibration"]["ece_uncalibrated"]
    from imgarena.engine.checkpoint_eval import format_eval

    text = format_eval(res)  # what `imgarena eval` prints without --json
    assert "accuracy vs coverage" in text and "min-prob  coverage  accuracy" in text
    assert f"temperature {summary['temperature']:.3f}" in text


def test_serve_backend_rows_honour_min_prob(run, images):
    from imgarena.serve.backend import load_backend
    from imgarena.serve.uploads import decode_upload

    run_dir, summary = run
    b = load_backend(str(run_dir), device="cpu")
    assert b.temperature == pytest.approx(summary["temperature"])
    arrs = np.stack([decode_upload(Path(p).read_bytes(), b.preprocessing, max_pixels=10**6) for p in images])
    probs = b.probabilities(b.logits_fn(arrs))
    p = float(np.median(probs.max(1)))
    rows = b.rows([Path(x).name for x in images], probs, 3, p)
    assert [r.as_dict()["unknown"] for r in rows] == list(probs.max(1) < p)


def test_compare_report_shows_ece_before_and_after(tmp_path, run):
    from imgarena import report

    run_dir, summary = run
    rel = tmp_path / "runs" / "mlp"
    rel.mkdir(parents=True)
    (rel / "reliability.png").write_bytes((run_dir / "reliability.png").read_bytes())
    model = {"model": "mlp", "status": "ok", "runs": 1, "runs_planned": 1, "acc_mean": 0.5, "run_dir": "runs/mlp",
             "ece_before": summary["ece_before"], "ece_after": summary["ece_after"], "temperature": summary["temperature"]}
    results = {"config": {"data": {"source": "sample"}}, "models": [model], "runs": [dict(model)], "pairwise": [],
               "state": "complete"}
    page = report.write_report(tmp_path, results).read_text()
    assert f"{summary['ece_before']:.3f} → {summary['ece_after']:.3f}" in page
    assert "reliability diagrams" in page
    md = (tmp_path / "report.md").read_text()
    assert "ECE before" in md and "runs/mlp/reliability.png" in md
    assert "ece_before" in (tmp_path / "models.csv").read_text().splitlines()[0]


def test_min_prob_chosen_on_val_rejects_classes_the_model_never_saw(tmp_path):
    """cnn_s trained on 8 of the sample's 10 classes (Bag and Shirt held out): the threshold that keeps
    80% of the val images labels most held-out images "unknown" and keeps most known test images."""
    import imgarena

    src = tmp_path / "sample"
    got = subprocess.run([sys.executable, "-m", "imgarena", "data", "get", "sample", "--out", str(src)],
                         capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    held_out = ("Bag", "Shirt")
    data = tmp_path / "eight"
    for part in ("train", "test"):
        for cls in sorted((src / part).iterdir()):
            if cls.name not in held_out:
                (data / part).mkdir(parents=True, exist_ok=True)
                cls.rename(data / part / cls.name)
    summary = imgarena.train(str(data), model="cnn_s", epochs=6, batch_size=64, img_size=16, augment="none",
                             device="cpu", out_dir=str(tmp_path / "runs"), progress=False)
    assert len(summary["classes"]) == 8
    run = Path(summary["run_dir"])
    val = [str(data / p) for p in json.loads((run / "split.json").read_text())["splits"]["val"]]
    clf = imgarena.load(run, device="cpu")
    p = calibration.threshold_for_coverage(np.stack([q.probs for q in clf.predict(val)]), 0.8)
    known = clf.predict(str(data / "test"), min_prob=p)
    unseen = clf.predict([str(f) for c in held_out for f in sorted((src / "test" / c).glob("*.png"))], min_prob=p)
    kept = np.mean([not q.unknown for q in known])
    rejected = np.mean([q.unknown for q in unseen])
    print(f"min_prob {p:.3f}: known test images kept {kept:.1%}, held-out images rejected {rejected:.1%}")
    assert kept > 0.7 and rejected > 0.6


def test_serve_min_prob_default_and_per_request(run, images, tmp_path):
    from serve_helpers import Server

    run_dir, _ = run
    plain = imgarena_predict(run_dir, images[:4])
    p = float(np.median([r.prob for r in plain]))
    srv = Server([run_dir, "--device", "cpu", "--min-prob", f"{p:.6f}"], tmp_path)
    try:
        files = [(Path(f).name, Path(f).read_bytes(), "image/png") for f in images[:4]]
        status, _, data = srv.predict(files)
        assert status == 200, data
        want = [r.prob < float(f"{p:.6f}") for r in plain]
        assert [r["unknown"] for r in data["rows"]] == want and any(want) and not all(want)
        assert [r["label"] == "unknown" for r in data["rows"]] == want
        status, _, data = srv.predict(files, query="?min_prob=0")  # a request may lower it
        assert status == 200 and not any(r["unknown"] for r in data["rows"])
        status, _, data = srv.predict(files, query="?min_prob=1.5")
        assert status == 400 and "min_prob" in data["error"]
    finally:
        srv.stop()


def imgarena_predict(run_dir, paths):
    from imgarena.predict import run_predict

    return run_predict(PredictConfig(checkpoint=str(run_dir), inputs=list(paths), device="cpu"), progress=False)
