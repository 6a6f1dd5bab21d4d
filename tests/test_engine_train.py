"""End-to-end training on real PNG folders: overfitting, artifacts, early stopping, time budget,
atomic state writes."""

import csv
import json

import pytest
import torch
import yaml
from _data_files import write_noisy_rgb_folder as write_class_folder
from PIL import Image

from imgarena.checkpoint import load_model, read_metadata
from imgarena.config import DataConfig, TrainConfig, from_dict
from imgarena.engine import state as state_mod
from imgarena.engine.train import run_training
from imgarena.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("imgs") / "data", per_class=14, size=12)


def _cfg(folder, out, **kw):
    base = dict(data=DataConfig(source=str(folder), workers=1), model="mlp", epochs=3, batch_size=8,
                optimizer="adam", lr=3e-3, augment="none", out_dir=str(out), name="run", eval_batch_size=64)
    base.update(kw)
    return TrainConfig(**base)


def test_overfits_and_writes_every_artifact(folder, tmp_path):
    summary = run_training(_cfg(folder, tmp_path, epochs=25, ema=True, ema_decay=0.9, class_weights="auto",
                                clip_grad=5.0, schedule="onecycle"), progress=False)
    run = tmp_path / "run"
    # 100% on the training images, measured afresh from the saved best checkpoint
    from imgarena.data import load_data
    from imgarena.data.loader import BatchLoader
    from imgarena.engine.evaluate import evaluate

    model, meta = load_model(run)
    data = load_data(DataConfig(source=str(folder), workers=1, img_size=meta["preprocessing"]["img_size"],
                                channels=meta["preprocessing"]["channels"]), progress=False)
    loader = BatchLoader(data.train, 64, shuffle=False, mean=meta["preprocessing"]["mean"], std=meta["preprocessing"]["std"])
    assert evaluate(model, loader, num_classes=3, device="cpu")["acc"] == 1.0
    assert summary["best_val_acc"] >= 0.5

    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "best.safetensors", "best.json", "last.safetensors",
                 "last.json", "state.pt", "split.json", "curves.png", "confusion_matrix.png", "per_class.csv",
                 "errors.png", "summary.json"):
        assert (run / name).is_file(), name
    for png in ("curves.png", "confusion_matrix.png", "errors.png"):
        with Image.open(run / png) as im:
            im.verify()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 25 and {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time",
                                "wall_time", "train_img_s"} <= set(rows[0])
    assert "val_top5" not in rows[0]  # only 3 classes
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in jsonl] == list(range(1, 26))
    per_class = list(csv.DictReader((run / "per_class.csv").open()))
    assert [r["class"] for r in per_class[:3]] == ["cat", "dog", "fish"]
    s = json.loads((run / "summary.json").read_text())
    for key in ("best_val_acc", "best_epoch", "train_time_s", "train_img_s", "params", "flops", "peak_memory_mb"):
        assert s[key] is not None, key
    assert s["params"] == sum(p.numel() for p in model.parameters()) and s["flops"] > 0
    assert s["weights"] == "ema" and meta["weights"] == "ema"
    # checkpoint metadata: enough to rebuild and preprocess
    assert meta["class_names"] == ["cat", "dog", "fish"] and meta["model"]["name"] == "mlp"
    assert set(meta["preprocessing"]) == {"img_size", "channels", "resize", "crop_pct", "interpolation", "mean", "std"}
    assert meta["split"]["counts"]["train"] == len(data.train) and "val_acc" in meta["metrics"]
    assert read_metadata(run / "last.safetensors")["epoch"] == 25
    # the resolved config reproduces the run: lr and weight decay are filled in
    cfg = from_dict(TrainConfig, yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.lr == 3e-3 and cfg.weight_decay == 0.0 and cfg.data.img_size == 12 and cfg.resume is False
    assert json.loads((run / "split.json").read_text())["counts"]["val"] == len(data.val)
    assert any((run / "tb").iterdir())  # TensorBoard event file


def test_early_stopping_stops(folder, tmp_path):
    # lr so small that val accuracy can never improve after the first epoch
    s = run_training(_cfg(folder, tmp_path, epochs=20, lr=1e-12, patience=2, schedule="constant"), progress=False)
    assert s["stop_reason"] == "early_stopping"
    assert s["epochs_completed"] == 3 and s["best_epoch"] == 1
    again = _cfg(folder, tmp_path, epochs=20, lr=1e-12, patience=2, schedule="constant", resume=True)
    with pytest.raises(UserError):  # nothing left to resume
        run_training(again, progress=False)
    # killed while writing its final artifacts: resuming writes them without training more
    (tmp_path / "run" / "summary.json").unlink()
    redo = run_training(again, progress=False)
    assert redo["epochs_completed"] == 3 and redo["stop_reason"] == "early_stopping"
    assert redo["best_val_acc"] == s["best_val_acc"] and (tmp_path / "run" / "summary.json").is_file()


def test_time_budget_stops_mid_epoch_and_still_reports(tmp_path):
    budget = 1.0
    s = run_training(TrainConfig(data=DataConfig(source="sample"), model="mlp", epochs=1000, batch_size=2,
                                 time_budget=budget, out_dir=str(tmp_path), name="tb", augment="none",
                                 state_every=0), progress=False)
    assert s["stop_reason"] == "time_budget" and s["epochs_completed"] == 1
    assert s["train_time_s"] < budget + 1.0  # stopped inside the first epoch, not at its end
    rows = [json.loads(r) for r in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["partial"] < 1
    assert (tmp_path / "tb" / "best.safetensors").is_file() and (tmp_path / "tb" / "confusion_matrix.png").is_file()
    assert s["test_acc"] is not None  # the sample has a test split: evaluated with the best checkpoint


def test_state_write_is_atomic_under_crash(folder, tmp_path, monkeypatch):
    run_training(_cfg(folder, tmp_path, epochs=1), progress=False)
    path = tmp_path / "run" / "state.pt"
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        if hasattr(f, "write"):  # atomic_torch_save hands torch.save an open file
            f.write(b"half a state")
        else:
            with open(f, "wb") as fh:
                fh.write(b"half a state")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        state_mod.save_state(tmp_path / "run", {"epoch": 99})
    assert path.read_bytes() == before
    assert state_mod.load_state(tmp_path / "run")["epoch"] == 1
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_bad_options_are_user_errors(folder, tmp_path):
    for kw in (dict(optimizer="lamb"), dict(schedule="poly"), dict(epochs=0), dict(amp="fp8"),
               dict(label_smoothing=1.5), dict(augment="crazy"), dict(name="a/b")):
        with pytest.raises(UserError):
            run_training(_cfg(folder, tmp_path, **kw), progress=False)
    with pytest.raises(UserError, match="unknown model"):
        run_training(_cfg(folder, tmp_path, model="mixr_t4", name="m"), progress=False)
    run_training(_cfg(folder, tmp_path, epochs=1, name="once"), progress=False)
    with pytest.raises(UserError, match="--resume"):  # never silently overwrites a run
        run_training(_cfg(folder, tmp_path, epochs=1, name="once"), progress=False)
