"""`imgarena predict` on real image files: order, schema, probabilities, errors, exact preprocessing, TTA."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgarena.checkpoint import load_model
from imgarena.cli import main
from imgarena.config import PredictConfig
from imgarena.errors import UserError
from imgarena.evaluation.tta import TTA_MODES, num_views, parse_tta, tta_logits
from imgarena.predict import csv_header, expand_inputs, run_predict
from predict_helpers import CLASSES, save_run, write_images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return {"root": root, **write_images(root)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # grayscale, non-default mean/std: a predictor ignoring the checkpoint's preprocessing would differ
    return save_run(tmp_path_factory.mktemp("run"), "mlp", img_size=12, channels=1, mean=[0.3], std=[0.2])


def _reference_probs(run_dir, path) -> np.ndarray:
    """What the checkpoint's preprocessing means, written out with plain PIL + torch (squash resize)."""
    model, meta = load_model(run_dir)
    pre = meta["preprocessing"]
    img = Image.open(path)
    if img.mode == "RGBA":  # transparency shows as white, like image viewers
        la = img.convert("LA")
        img = Image.new("L", img.size, 255)
        img.paste(la.convert("L"), mask=la.getchannel("A"))
    img = img.convert("L").resize((pre["img_size"],) * 2, Image.BILINEAR)
    x = (torch.from_numpy(np.asarray(img, dtype=np.float32)) / 255 - pre["mean"][0]) / pre["std"][0]
    with torch.no_grad():
        return torch.softmax(model(x[None, None]).double(), 1)[0].numpy()


def test_json_rows_sorted_with_errors_and_exact_preprocessing(run, files, tmp_path, capsys):
    out = tmp_path / "preds.json"
    rc = main(["predict", str(run), str(files["root"]), "--format", "json", "--topk", "3", "--out", str(out)])
    assert rc == 1  # two files failed; the rest still got predictions
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == sorted(files["good"] + files["bad"])  # notes.txt skipped, stable order
    for r in rows:
        assert set(r) == {"path", "label", "prob", "topk", "error"}
        if r["path"] in files["bad"]:
            assert r["label"] is None and r["topk"] == [] and r["error"]
            continue
        assert r["error"] is None
        probs = [t["prob"] for t in r["topk"]]
        assert sorted({t["label"] for t in r["topk"]}) == sorted(CLASSES)  # topk 3 of 3 classes: all of them
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == sorted(probs, reverse=True) and r["label"] == r["topk"][0]["label"] and r["prob"] == probs[0]
        ref = _reference_probs(run, r["path"])
        got = np.array([dict((t["label"], t["prob"]) for t in r["topk"])[c] for c in CLASSES])
        np.testing.assert_allclose(got, ref, atol=2e-6)
    assert "2 failed" in capsys.readouterr().err


def test_csv_schema_topk_and_exit_code(run, files, capsys):
    rc = main(["predict", str(run), *files["good"], "--format", "csv", "--topk", "2"])
    assert rc == 0  # nothing failed
    text = capsys.readouterr().out
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["path", "label", "prob", "label_2", "prob_2", "error"] == csv_header(2)
    assert [r[0] for r in rows[1:]] == files["good"]
    for r in rows[1:]:
        assert r[1] in CLASSES and r[3] in CLASSES and r[1] != r[3]
        assert float(r[4]) > 0 and float(r[2]) >= float(r[4]) and float(r[2]) <= 1.0 and r[5] == ""


def test_table_output_names_failures(run, files, capsys):
    assert main(["predict", str(run), str(files["root"] / "corrupt.png"), str(files["good"][0])]) == 1
    out = capsys.readouterr().out
    assert "corrupt.png" in out and "ERROR" in out and any(c in out for c in CLASSES)


def test_globs_folders_and_user_errors(run, files, capsys):
    root = files["root"]
    assert expand_inputs([str(root / "*.png")]) == sorted(p for p in files["good"] + files["bad"]
                                                          if p.endswith(".png") and "/sub/" not in p)
    assert expand_inputs([str(root / "**" / "*.jpg")]) == sorted(p for p in files["good"] + files["bad"] if p.endswith(".jpg"))
    # the same file named twice (directly and through its folder) appears once
    assert expand_inputs([files["good"][0], str(root)]).count(files["good"][0]) == 1
    with pytest.raises(UserError, match="not found"):
        expand_inputs([str(root / "missing.png")])
    with pytest.raises(UserError, match="no image files"):
        expand_inputs([str(root / "*.gif")])
    assert main(["predict", str(run), str(root / "missing.png")]) == 2
    assert main(["predict", str(run), str(root), "--topk", "0"]) == 2
    assert main(["predict", str(root / "nothing"), str(root)]) == 2
    assert "imgarena: error:" in capsys.readouterr().err


def test_batches_and_threads_do_not_change_results(run, files):
    cfg = PredictConfig(checkpoint=str(run), inputs=[str(files["root"])], topk=3, device="cpu")
    one = run_predict(cfg, progress=False)
    cfg.batch_size, cfg.workers = 2, 3
    many = run_predict(cfg, progress=False)
    assert [(r.path, r.error) for r in one] == [(r.path, r.error) for r in many]
    for a, b in zip(one, many):
        assert [c for c, _ in a.topk] == [c for c, _ in b.topk]
        np.testing.assert_allclose([p for _, p in a.topk], [p for _, p in b.topk], atol=1e-6)


def test_tta_averages_the_named_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(tta_logits(model, x, "none"), model(x))
    torch.testing.assert_close(tta_logits(model, x, "flip"), (model(x) + model(x.flip(-1))) / 2)
    for mode in TTA_MODES:
        assert tta_logits(model, x, mode).shape == (2, 4)
    assert [num_views(m) for m in TTA_MODES] == [1, 2, 7, 12]
    # a centre crop of a constant image is the same constant image: crop TTA cannot change its logits
    const = torch.full((1, 3, 8, 8), 0.7)
    torch.testing.assert_close(tta_logits(model, const, "flip-crop"), model(const))
    assert parse_tta(True) == "flip" and parse_tta(None) == "none" and parse_tta(2) == "crop"
    with pytest.raises(UserError, match="unknown TTA mode"):
        parse_tta("rotate")


def test_predict_tta_flag_changes_probabilities_like_tta_logits(run, files, tmp_path):
    base = PredictConfig(checkpoint=str(run), inputs=[files["good"][0]], topk=3, device="cpu")
    plain = run_predict(base, progress=False)[0]
    # `--tta` alone means flip, even right before the paths (argparse hands it the first path)
    out = tmp_path / "tta.json"
    assert main(["predict", str(run), "--tta", files["good"][0], "--format", "json", "--out", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    flipped = run_predict(PredictConfig(**{**base.__dict__, "tta": "flip"}), progress=False)[0]
    assert row["path"] == files["good"][0] and row["topk"][0]["prob"] == pytest.approx(flipped.prob, abs=1e-6)
    model, meta = load_model(run)
    from imgarena.data.images import load_image, normalize

    pre = meta["preprocessing"]
    x = torch.from_numpy(normalize(load_image(files["good"][0], channels=1, img_size=12, resize="squash")[None],
                                   pre["mean"], pre["std"]))
    with torch.no_grad():
        ref = torch.softmax(tta_logits(model, x, "flip").double(), 1)[0].numpy()
    got = dict(flipped.topk)
    np.testing.assert_allclose([got[c] for c in CLASSES], ref, atol=1e-6)
    assert dict(plain.topk) != got
