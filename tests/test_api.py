"""The Python API: `imgarena.load(...).predict` on paths, PIL images, numpy arrays, tensors and lists;
`imgarena.train` / `imgarena.compare` as thin wrappers over the CLI's configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgarena
from imgarena.errors import UserError
from predict_helpers import CLASSES, save_run, write_images


@pytest.fixture(scope="module")
def clf_and_files(tmp_path_factory):
    run = save_run(tmp_path_factory.mktemp("run"), "mlp", img_size=16, channels=3)
    files = write_images(tmp_path_factory.mktemp("imgs"))
    return imgarena.load(run, device="cpu"), files, run


def test_load_exposes_model_names_and_preprocessing(clf_and_files):
    clf, _, _ = clf_and_files
    assert isinstance(clf.model, torch.nn.Module) and not clf.model.training
    assert clf.class_names == CLASSES
    assert clf.preprocessing == {"img_size": 16, "channels": 3, "resize": "squash", "mean": [0.4, 0.5, 0.6],
                                 "std": [0.2, 0.25, 0.3]}
    assert "mlp" in repr(clf)


def test_every_input_kind_gives_the_same_answer_for_the_same_image(clf_and_files):
    clf, files, _ = clf_and_files
    path = files["good"][0]  # a 24x20 RGB PNG
    by_path = clf.predict(path)
    assert by_path.label in CLASSES and by_path.source == path
    assert by_path.probs.shape == (3,) and by_path.probs.sum() == pytest.approx(1.0, abs=1e-6)
    assert by_path.prob == pytest.approx(by_path.probs.max()) and by_path.topk(2)[0] == (by_path.label, by_path.prob)

    pil = Image.open(path)
    hwc = np.array(pil)  # (H, W, 3) uint8
    chw_float = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255  # torchvision ToTensor convention
    for x in (pil, hwc, hwc.astype(np.float32) / 255, chw_float, chw_float * 255):
        p = clf.predict(x)
        assert p.label == by_path.label and p.source is None
        np.testing.assert_allclose(p.probs, by_path.probs, atol=1e-6)

    many = clf.predict([path, pil, hwc, chw_float])
    assert isinstance(many, list) and len(many) == 4
    for p in many:
        np.testing.assert_allclose(p.probs, by_path.probs, atol=1e-6)
    batch = clf.predict(torch.stack([chw_float, chw_float.flip(-1)]))  # (N, C, H, W)
    assert len(batch) == 2 and np.allclose(batch[0].probs, by_path.probs, atol=1e-6)
    assert clf.predict(np.stack([hwc, hwc]))[1].label == by_path.label  # (N, H, W, C)
    gray = clf.predict(np.asarray(pil.convert("L")))  # (H, W) grayscale becomes 3 channels
    assert gray.probs.shape == (3,)


def test_folders_errors_and_bad_inputs(clf_and_files):
    clf, files, _ = clf_and_files
    with pytest.raises(UserError, match="corrupt.png"):
        clf.predict(files["bad"][0])
    kept = clf.predict(str(Path(files["good"][0]).parent), on_error="keep")
    assert [p.source for p in kept] == sorted(files["good"] + files["bad"])
    assert {p.source for p in kept if p.error} == set(files["bad"]) and all(p.label is None for p in kept if p.error)
    with pytest.raises(UserError, match="not found"):
        clf.predict("/nonexistent/x.png")
    with pytest.raises(TypeError, match="cannot predict"):
        clf.predict(42)
    with pytest.raises(ValueError, match="channel axis"):
        clf.predict(np.zeros((5, 7, 9), np.uint8))


def test_load_with_another_class_count(clf_and_files):
    _, files, run = clf_and_files
    clf5 = imgarena.load(run, device="cpu", num_classes=5)
    p = clf5.predict(files["good"][0])
    assert clf5.class_names == ["0", "1", "2", "3", "4"] and p.probs.shape == (5,)
    assert clf5.model.get_classifier().out_features == 5


def test_train_then_load_and_predict(tmp_path):
    from _data_files import write_noisy_rgb_folder as write_class_folder

    data = write_class_folder(tmp_path / "data", per_class=6, size=16)
    summary = imgarena.train(str(data), model="mlp", epochs=1, batch_size=8, img_size=16, out_dir=str(tmp_path / "runs"),
                             name="api", val_fraction=0.34, device="cpu", progress=False)
    clf = imgarena.load(summary["run_dir"], device="cpu")
    assert clf.class_names == ["cat", "dog", "fish"]
    preds = clf.predict(str(data))
    assert len(preds) == 18 and all(p.label in clf.class_names for p in preds)
    with pytest.raises(UserError, match="unknown option 'epoch'"):
        imgarena.train(str(data), model="mlp", epoch=1)
    with pytest.raises(UserError, match="unknown option"):
        imgarena.compare(str(data), models=["mlp"], not_an_option=1)


def test_compare_wrapper_builds_the_clis_config(tmp_path):
    import yaml
    from _data_files import write_noisy_rgb_folder as write_class_folder

    data = write_class_folder(tmp_path / "data", per_class=6, size=16)
    import imgarena.comparison  # noqa: F401  importing the implementation must not hide the function
    res = imgarena.compare(str(data), models="mlp,mlp_deep", epochs=1, batch_size=8, img_size=16, val_fraction=0.34,
                           lr=0.01, out=str(tmp_path / "cmp"), device="cpu", progress=False)
    assert [m["model"] for m in res["models"]] == ["mlp", "mlp_deep"] and res["state"] == "complete"
    saved = yaml.safe_load((tmp_path / "cmp" / "compare.yaml").read_text())
    # CompareConfig fields stay top-level, DataConfig ones go to data, other TrainConfig ones to train
    assert saved["epochs"] == 1 and saved["data"]["img_size"] == 16 and saved["data"]["val_fraction"] == 0.34
    assert saved["train"] == {"lr": 0.01}


def test_api_options_are_checked_before_any_work(tmp_path):
    """`imgarena.train(lr="x")` is the CLI's `--lr x`: a UserError naming lr, not a TypeError from the optimizer."""
    out = tmp_path / "runs"
    with pytest.raises(UserError, match=r"^lr must be a finite number > 0, got 'x'$"):
        imgarena.train("sample", model="mlp", lr="x", out_dir=str(out))
    with pytest.raises(UserError, match=r"^img_size must be a whole number between 8 and 4096"):
        imgarena.train("sample", model="mlp", img_size="big", out_dir=str(out))  # named as the caller wrote it
    with pytest.raises(UserError, match=r"^val_fraction must be a finite number in \(0, 1\)"):
        imgarena.train("sample", model="mlp", val_fraction=1.5, out_dir=str(out))
    with pytest.raises(UserError, match=r"^ema must be true or false"):
        imgarena.train("sample", model="mlp", ema="yes", out_dir=str(out))
    with pytest.raises(UserError, match=r"^models must be a non-empty list"):
        imgarena.compare("sample", models=3, out=str(tmp_path / "cmp"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"^out_dir .*afile is a file, not a folder"):
        imgarena.train("sample", model="mlp", epochs=1, out_dir=str(tmp_path / "afile"))
    assert not out.exists()  # nothing was started


def test_empty_batches_give_empty_lists(clf_and_files):
    clf, _, _ = clf_and_files
    assert clf.predict([]) == []
    assert clf.predict(np.empty((0, 16, 16, 3), np.uint8)) == []
    assert clf.predict(np.empty((0, 28, 28))) == []  # (N, H, W) with N = 0: still nothing to classify
    assert clf.predict(torch.empty(0, 3, 16, 16)) == []
