"""--pretrained sources and the preprocessing they bring: a timm model's own weights in a local file
with its hub config.json, an earlier imgarena run, timm's (offline) pretrained configs, and the
errors for weights that do not fit, each as one line through the real CLI."""

from __future__ import annotations

import hashlib
import shutil
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models._hub import save_for_hf
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer as TimmViT

import imgarena
from imgarena.checkpoint import load_model, read_metadata
from imgarena.config import DataConfig, TrainConfig
from imgarena.engine.preprocessing import check_prepared, resolve_data_config
from imgarena.errors import UserError
from imgarena.models import create_model
from imgarena.models.pretrained import pretrained_preprocessing, pretrained_record, resolve_source

SRC = str(Path(imgarena.__file__).parents[1])
TIMM_ARCH = "test_efficientnet"  # timm's own tiny test model: ImageNet mean/std, bicubic, crop_pct 0.95


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """`imgarena ARGS` through the CLI's own entry point, in this process (torch is imported once)."""
    from imgarena.cli import main

    def run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return _Result(rc, out.out, out.err)

    return run


def _subprocess_cli(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": SRC, "IMGARENA_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "imgarena", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "warning" not in ln]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """RGB photos (40 px, bigger than the 32 px training size) of 3 classes told apart by colour."""
    root = tmp_path_factory.mktemp("photos") / "data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 120, size=(40, 40, 3), dtype=np.uint8)
            img[..., c] += 110
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """timm's own state_dict() and its pretrained config, saved by timm in its hub layout
    (model.safetensors + config.json)."""
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_ARCH).eval()
    folder = tmp_path_factory.mktemp("hub")
    save_for_hf(ref, str(folder), safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    return ref, folder / "model.safetensors", cfg


def test_timm_file_with_config_sets_the_run_preprocessing_and_predict_and_onnx_apply_it(tmp_path, photos, timm_weights,
                                                                                         cli):
    _, weights, cfg = timm_weights
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.95 and cfg["mean"] != [0.5] * 3
    r = cli("train", photos, "--model", f"timm/{TIMM_ARCH}", "--pretrained", weights, "--img-size", 32,
            "--epochs", 1, "--batch-size", 8, "--lr", 0.05, "--out-dir", tmp_path / "runs", "--name", "ft",
            "--device", "cpu", "--augment", "none", "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "ft"
    data_cfg = yaml.safe_load((run / "config.yaml").read_text())["data"]
    want = {"img_size": 32, "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"],
            "mean": cfg["mean"], "std": cfg["std"]}
    assert {k: data_cfg[k] for k in want} == want  # resolved, so resume and eval reproduce them
    meta = read_metadata(run / "best.safetensors")
    assert {k: meta["preprocessing"][k] for k in want} == want and meta["preprocessing"]["channels"] == 3
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    record = {"source": str(weights), "kind": "file", "name": str(weights), "sha256": sha}
    assert meta["pretrained"] == record
    assert json.loads((run / "summary.json").read_text())["pretrained"] == record

    # timm's own eval transform with the same config: shorter-side resize to floor(32 / 0.95) = 33, centre crop
    from timm.data import create_transform

    tf = create_transform(input_size=(3, 32, 32), interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"],
                          crop_mode="center", mean=cfg["mean"], std=cfg["std"])
    image = photos / "green" / "003.png"
    x = tf(Image.open(image).convert("RGB"))[None]
    model, _ = load_model(run)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)[0].numpy()
        # the same image as the folder's own statistics would have normalised it: the check can tell
        pixels = x * torch.tensor(cfg["std"]).view(1, 3, 1, 1) + torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        x_own = (pixels - 0.5) / 0.25
        other = torch.softmax(model(x_own), -1)[0].numpy()
    names = meta["class_names"]
    assert np.abs(probs - other).max() > 2e-4  # a fresh head after one epoch: small, but 10x the tolerance

    def decoded(preprocessing):  # what predict feeds the model, from a checkpoint's or an export's record
        from imgarena.data.images import normalize
        from imgarena.predict import path_decoder

        return torch.from_numpy(normalize(path_decoder(preprocessing)(str(image)), preprocessing["mean"],
                                          preprocessing["std"]))[None]

    assert (decoded(meta["preprocessing"]) - x).abs().max() < 1e-5  # the same pixels as timm's transform

    def predicted(source, run=cli):
        r = run("predict", source, image, "--format", "json", "--topk", 3, "--uncalibrated", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout)[0]
        return np.array([{t["label"]: t["prob"] for t in row["topk"]}[n] for n in names])

    assert np.abs(predicted(run) - probs).max() < 2e-5
    r = cli("export", run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "m.onnx.json").read_text())["preprocessing"]
    assert {k: side[k] for k in want} == want
    assert (decoded(side) - x).abs().max() < 1e-5
    # in a process of its own, torch-free: the sidecar alone carries the preprocessing
    assert np.abs(predicted(tmp_path / "m.onnx", run=_subprocess_cli) - probs).max() < 2e-5


def test_run_folder_gives_its_backbone_architecture_and_preprocessing(tmp_path, photos):
    src = imgarena.train(str(photos), model="cnn_s", model_kwargs={"hidden": 48}, epochs=1, batch_size=8,
                         img_size=24, augment="none", device="cpu", out_dir=str(tmp_path / "runs"), name="src",
                         progress=False)
    run = Path(src["run_dir"])
    sd = load_file(str(run / "best.safetensors"))
    torch.manual_seed(0)
    model = create_model("cnn_s", num_classes=2, pretrained=str(run))  # its hidden=48, no option given
    head = {"head.weight", "head.bias"}
    own = model.state_dict()
    assert set(own) == set(sd) and own["head.weight"].shape[0] == 2
    assert all(torch.equal(own[k], sd[k]) for k in own if k not in head)
    torch.manual_seed(0)
    fresh = create_model("cnn_s", num_classes=2, hidden=48, img_size=24)  # the run's size, inherited above
    assert torch.equal(own["head.weight"], fresh.state_dict()["head.weight"])  # the new model's own init
    # Same class count: still a fresh head (a run's head knows its classes, not the new ones).
    torch.manual_seed(1)
    same = create_model("cnn_s", num_classes=3, pretrained=str(run / "last.safetensors"))
    assert not torch.equal(same.state_dict()["head.weight"], sd["head.weight"])

    pre = read_metadata(run / "best.safetensors")["preprocessing"]
    cfg = TrainConfig(data=DataConfig(source=str(photos)), model="cnn_s", pretrained=str(run))
    d = resolve_data_config(cfg)
    assert (d.img_size, d.channels, d.mean, d.std) == (24, 3, pre["mean"], pre["std"])

    # Through training: the record names the checkpoint, config.yaml the inherited architecture.
    two = photos.parent / "two"
    for c in ("red", "blue"):
        (two / c).mkdir(parents=True, exist_ok=True)
        for f in (photos / c).iterdir():
            (two / c / f.name).write_bytes(f.read_bytes())
    s = imgarena.train(str(two), model="cnn_s", pretrained=str(run), epochs=1, batch_size=8, augment="none",
                       device="cpu", out_dir=str(tmp_path / "runs"), name="ft", progress=False)
    best = run / "best.safetensors"
    assert s["pretrained"] == {"source": str(run), "kind": "run", "name": str(best),
                               "sha256": hashlib.sha256(best.read_bytes()).hexdigest()}
    resolved = yaml.safe_load((Path(s["run_dir"]) / "config.yaml").read_text())
    assert resolved["model_kwargs"]["hidden"] == 48 and resolved["data"]["mean"] == pre["mean"]
    assert resolved["data"]["img_size"] == 24

    # Resuming needs neither the source nor its preprocessing again: config.yaml and state.pt hold them.
    shutil.rmtree(run)
    more = imgarena.train(str(two), model="cnn_s", pretrained=str(run), epochs=2, batch_size=8, augment="none",
                          device="cpu", out_dir=str(tmp_path / "runs"), name="ft", resume=True, progress=False)
    assert more["epochs_completed"] == 2 and more["pretrained"] == s["pretrained"]


def _timm_mixer(**kw):
    return MlpMixer(img_size=32, patch_size=4, num_blocks=6, embed_dim=128, mlp_ratio=(0.5, 4.0), **kw)


def test_errors_through_the_cli_are_one_line(tmp_path, photos, cli):
    narrow = MlpMixer(img_size=32, patch_size=4, num_blocks=6, embed_dim=96, mlp_ratio=(0.5, 4.0))
    save_file(narrow.state_dict(), str(tmp_path / "narrow.safetensors"))
    save_file(_timm_mixer().state_dict(), str(tmp_path / "mixer32.safetensors"))
    common = ("--epochs", 1, "--device", "cpu", "--out-dir", tmp_path / "runs", "--cache-dir", tmp_path / "cache")
    # the weights of another architecture: the tensor and both shapes
    r = cli("train", photos, "--model", "mixer_t4", "--pretrained", tmp_path / "narrow.safetensors",
            "--img-size", 32, *common)
    _one_line_error(r, "stem.proj.weight has shape (96, 3, 4, 4) but mixer_t4 needs (128, 3, 4, 4)")
    # Mixer's token-mixing weights are tied to the image size they were trained at
    r = cli("train", photos, "--model", "mixer_t4", "--pretrained", tmp_path / "mixer32.safetensors",
            "--img-size", 28, *common)
    _one_line_error(r, "mlp_tokens.fc1.weight has shape (64, 64) but mixer_t4 needs (64, 49)", "--img-size")
    # a run folder of another family, refused before any image is decoded
    run = tmp_path / "cnnrun"
    from imgarena.checkpoint import save_checkpoint

    cnn = create_model("cnn_s", num_classes=3, img_size=24)
    save_checkpoint(run / "best.safetensors", cnn, {
        "model": {"name": "cnn_s", "kwargs": cnn.model_kwargs}, "num_classes": 3, "class_names": ["a", "b", "c"],
        "preprocessing": {"img_size": 24, "channels": 3, "resize": "squash", "mean": [0.5] * 3, "std": [0.25] * 3}})
    fresh_cache = tmp_path / "cache2"
    r = cli("train", photos, "--model", "mixer_t4", "--pretrained", run, "--cache-dir", fresh_cache,
            "--out-dir", tmp_path / "runs")
    _one_line_error(r, f"{run} holds cnn_s weights but --model is mixer_t4: pass --model cnn_s")
    assert not [f for f in fresh_cache.rglob("*") if f.is_file()]  # nothing decoded, nothing cached


def test_other_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        pretrained_preprocessing(str(tmp_path / "nope.safetensors"), "vit_t4")
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(UserError, match="cannot read pretrained weights"):
        create_model("vit_t4", num_classes=3, pretrained=str(tmp_path / "notes.pth"))
    # tensors, but not this model's
    torch.save({"lr": torch.tensor(0.1), "epoch": torch.tensor(3)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match=r"does not match vit_t4: the model's \S+ \(.*\) is missing"):
        create_model("vit_t4", num_classes=3, pretrained=str(tmp_path / "state.pt"))
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="is not a state dict"):
        create_model("vit_t4", num_classes=3, pretrained=str(tmp_path / "list.pt"))
    # a position embedding of a non-square grid (a 32x16 ViT) cannot be resized to a square one
    vit = TimmViT(img_size=(32, 16), patch_size=4, embed_dim=192, depth=6, num_heads=3)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(UserError, match=r"pos_embed has shape \(1, 33, 192\).*\(1, 65, 192\).*not two square grids"):
        create_model("vit_t4", num_classes=3, pretrained=str(tmp_path / "vit.safetensors"))
    with pytest.raises(UserError, match=r"timm's vit_tiny_patch16_224 weights do not fit --model mixer_b16 .*"
                                        r"pass --model vit_ti16"):
        resolve_source("timm:vit_tiny_patch16_224.augreg_in21k", "mixer_b16")
    with pytest.raises(UserError, match="no weights tagged 'mixer_b16_224.bogus'.*mixer_b16_224.miil_in21k"):
        resolve_source("timm:mixer_b16_224.bogus", "mixer_b16")


def test_timm_configs_offline_tags_and_channel_adaptation(monkeypatch, tmp_path, caplog):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)  # none of this may reach the network
    # seed 000's exact weights, by tag or by timm's old name
    for spec in ("timm:mixer_b16_224.miil_in21k", "timm:mixer_b16_224_miil_in21k"):
        assert pretrained_preprocessing(spec, "mixer_b16") == {
            "img_size": 224, "channels": 3, "crop_pct": 0.875, "interpolation": "bilinear",
            "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "resize": "crop"}
        assert pretrained_record(spec, "mixer_b16") == {"source": spec, "kind": "timm",
                                                        "name": "mixer_b16_224.miil_in21k", "sha256": None}
    pre = pretrained_preprocessing("timm", "resnet50")  # the default tag's config
    assert (pre["img_size"], pre["crop_pct"], pre["interpolation"]) == (224, 0.95, "bicubic")

    # user settings win; 3-channel statistics averaged for --channels 1 (timm's rule)
    cfg = TrainConfig(data=DataConfig(source="sample", channels=1, crop_pct=1.0), model="resnet50", pretrained="timm")
    d = resolve_data_config(cfg)
    assert (d.img_size, d.channels, d.crop_pct, d.interpolation) == (224, 1, 1.0, "bicubic")
    assert d.mean == pytest.approx([np.mean(pre["mean"])]) and d.std == pytest.approx([np.mean(pre["std"])])
    cfg = TrainConfig(data=DataConfig(source="sample", mean=[0.3], std=[0.2]), img_size=64, model="resnet50",
                      pretrained="timm")
    d = resolve_data_config(cfg)
    assert (d.img_size, d.channels, d.mean, d.std) == (64, 3, [0.3], [0.2])

    # a file without a config: nothing from it, one warning saying how to set the statistics
    mixer = _timm_mixer()
    save_file(mixer.state_dict(), str(tmp_path / "bare.safetensors"))
    cfg = TrainConfig(data=DataConfig(source="sample"), model="mixer_t4", pretrained=str(tmp_path / "bare.safetensors"),
                      augment="photo")
    with caplog.at_level(logging.WARNING, logger="imgarena"):
        d = resolve_data_config(cfg)
    assert (d.img_size, d.channels, d.mean, d.interpolation, d.crop_pct) == (None, None, None, None, 0.875)
    warned = [r.getMessage() for r in caplog.records if "without its preprocessing" in r.getMessage()]
    assert len(warned) == 1 and "--mean/--std" in warned[0]
    # a sidecar <file>.json with the keys directly (no pretrained_cfg wrapper)
    (tmp_path / "bare.safetensors.json").write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.3, 0.3],
                                                                "input_size": [3, 32, 32]}))
    d = resolve_data_config(cfg)
    assert (d.img_size, d.channels, d.mean, d.crop_pct) == (32, 3, [0.1, 0.2, 0.3], 0.875)
    (tmp_path / "bare.safetensors.json").write_text(json.dumps({"crop_pct": 1.5}))
    with pytest.raises(UserError, match=r"bare.safetensors.json: crop_pct 1.5 must be a fraction"):
        resolve_data_config(cfg)


def test_prepared_data_is_checked_not_reloaded(tmp_path):
    from imgarena.data import load_data

    data = load_data(DataConfig(source="sample", img_size=16, subset=60, cache_dir=str(tmp_path)), progress=False)
    mixer = _timm_mixer()
    save_file(mixer.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "w.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    cfg = TrainConfig(data=DataConfig(source="sample", img_size=16), model="mixer_t4",
                      pretrained=str(tmp_path / "w.safetensors"))
    d = check_prepared(data, cfg)  # the weights' statistics differ from the loaded data's: a warning, the data's kept
    assert d.mean == pytest.approx(list(data.mean)) and d.channels == data.channels == 1
    with pytest.raises(UserError, match="the prepared data has img_size 16 but the run asks for 32"):
        check_prepared(data, TrainConfig(data=DataConfig(source="sample", img_size=32), model="mlp"))
