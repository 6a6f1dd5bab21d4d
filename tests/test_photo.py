"""Photos larger than the training size: store size / centre crop (crop_pct), letterbox, the photo
preset, and one preprocessing from the cache through training, predict and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgarena.config import DataConfig
from imgarena.data import load_data
from imgarena.data.augment import augment_batch, random_resized_crop, rrc_boxes
from imgarena.data.images import PAD_FILL, center_crop, load_image, prepare_pil, store_size, view_box
from imgarena.data.loader import BatchLoader
from imgarena.data.prepare import Split
from imgarena.predict import path_decoder

CLASSES = ("red", "green", "blue")


def _photo_folder(root, per_class: int = 8) -> Path:
    """Non-square RGB photos, 48-64 px, PNG and JPEG: noise with the class's channel raised."""
    rng = np.random.default_rng(0)
    root = Path(root)
    sizes = [(64, 48), (48, 60), (56, 56), (50, 64)]  # (width, height)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            img = rng.integers(0, 110, size=(h, w, 3), dtype=np.uint8)
            img[..., c] += 120
            img[: h // 3, : w // 4] = rng.integers(0, 256, 3, dtype=np.uint8)  # a corner patch: crops differ
            ext = "jpg" if i % 2 else "png"
            Image.fromarray(img).save(root / name / f"{i:02d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    return root


# ---------------------------------------------------------------- geometry

def test_store_size_and_center_crop():
    assert store_size(224, 0.875) == 256 and store_size(32, 0.875) == 36 and store_size(32, 1.0) == 32
    assert store_size(32, None) == 32
    with pytest.raises(ValueError):
        store_size(32, 0)
    a = np.arange(2 * 3 * 7 * 9, dtype=np.uint8).reshape(2, 3, 7, 9)
    assert np.array_equal(center_crop(a, 4), a[:, :, 1:5, 2:6])
    assert np.array_equal(center_crop(a[0], 4), a[0, :, 1:5, 2:6])
    assert center_crop(a[:, :, :7, :7], 7) is not None and center_crop(a, 7).shape == (2, 3, 7, 7)


@pytest.mark.parametrize("channels", [1, 3])
def test_pad_letterboxes_centred_with_the_fill(channels):
    img = Image.new("RGB", (40, 20), (200, 10, 30))  # wide: 40x20 -> 20x10 content on a 20x20 square
    out = prepare_pil(img, channels=channels, img_size=20, resize="pad")
    assert out.shape == (channels, 20, 20)
    inside = out[:, 5:15, :]
    value = np.asarray(img.convert("L" if channels == 1 else "RGB"))[0, 0]
    assert (inside == np.asarray(value, np.uint8).reshape(-1, 1, 1)).all()
    assert (out[:, :5] == PAD_FILL).all() and (out[:, 15:] == PAD_FILL).all()
    tall = prepare_pil(Image.new("L", (10, 30), 7), channels=channels, img_size=15, resize="pad")
    assert (tall[:, :, 5:10] == 7).all() and (tall[:, :, :5] == PAD_FILL).all() and (tall[:, :, 10:] == PAD_FILL).all()
    # where the model's input lies on the original: the bars reach past the image
    assert view_box((40, 20), 20, "pad") == pytest.approx((0.0, -10.0, 40.0, 30.0))
    assert view_box((40, 20), 16, "squash", 0.8) == pytest.approx((4.0, 2.0, 36.0, 18.0))


def test_interpolation_chooses_the_pillow_filter(tmp_path):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (37, 51, 3), dtype=np.uint8))
    got = {m: prepare_pil(img, channels=3, img_size=16, interpolation=m) for m in ("bilinear", "bicubic", "nearest")}
    assert np.array_equal(got["nearest"], np.asarray(img.resize((16, 16), Image.NEAREST)).transpose(2, 0, 1))
    assert np.array_equal(got["bicubic"], np.asarray(img.resize((16, 16), Image.BICUBIC)).transpose(2, 0, 1))
    assert not np.array_equal(got["bilinear"], got["bicubic"])


# ---------------------------------------------------------------- cache + centre crop == the predict path

@pytest.mark.parametrize("resize,interpolation", [("squash", None), ("crop", "bicubic"), ("pad", None)])
def test_predict_decode_is_the_cache_plus_centre_crop_bitwise(tmp_path, resize, interpolation):
    root = _photo_folder(tmp_path / "photos", per_class=3)
    cfg = DataConfig(source=str(root), img_size=32, crop_pct=0.875, resize=resize, interpolation=interpolation,
                     cache_dir=str(tmp_path / "cache"), workers=1, val_fraction=0.34)
    data = load_data(cfg, progress=False)
    assert data.img_size == 32 and data.store_size == 36 and data.train.images.shape[1:] == (3, 36, 36)
    pre = data.preprocessing
    assert pre["crop_pct"] == 0.875 and pre["interpolation"] == (interpolation or "bilinear")
    decode = path_decoder(pre)
    n = 0
    for split in (data.train, data.val):
        for i, path in enumerate(split.paths):
            assert np.array_equal(decode(path), center_crop(split.images[i], 32)), path
            n += 1
    assert n == 9
    # the eval loader feeds exactly those pixels
    x, _ = next(iter(BatchLoader(data.val, 8, shuffle=False, mean=(0.0,) * 3, std=(1 / 255,) * 3, out_size=32)))
    want = np.stack([decode(p) for p in data.val.paths]).astype(np.float32)
    assert np.allclose(x.numpy(), want, atol=1e-3)


def test_explicit_mean_std_replace_the_datas_and_a_wrong_count_is_one_line(tmp_path):
    from imgarena.errors import UserError

    root = _photo_folder(tmp_path / "photos", per_class=3)
    base = dict(source=str(root), img_size=24, cache_dir=str(tmp_path / "cache"), workers=1, val_fraction=0.34)
    d = load_data(DataConfig(**base, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), progress=False)
    assert d.mean == (0.485, 0.456, 0.406) and d.preprocessing["std"] == [0.229, 0.224, 0.225]
    with pytest.raises(UserError, match="--mean/--std.*3-channel"):
        load_data(DataConfig(**base, mean=[0.5], std=[0.5]), progress=False)


def test_builtin_is_stored_at_the_store_size(tmp_path):
    d = load_data(DataConfig(source="sample", crop_pct=0.875, subset=50, cache_dir=str(tmp_path / "c")), progress=False)
    assert d.img_size == 28 and d.store_size == 32 and d.train.images.shape[-1] == 32
    img = Image.fromarray(np.asarray(d.test.images[0])[0])  # not the original, but the same function on both sides
    assert prepare_pil(img, channels=1, img_size=32).shape == (1, 32, 32)


# ---------------------------------------------------------------- the photo preset

def test_rrc_boxes_follow_torchvision_ranges_and_fallback():
    top, left, h, w = rrc_boxes(torch.Generator().manual_seed(0), 4000, 36, 36)
    frac, ratio = h * w / 36**2, w / h
    assert frac.min() >= 0.07 and frac.max() <= 1.0 and frac.min() < 0.1 and frac.max() > 0.9
    assert ratio.min() >= 0.68 and ratio.max() <= 1.47  # 3/4..4/3 up to rounding to whole pixels
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 36).all() and (left + w <= 36).all()
    assert len({(a, b) for a, b in zip(top.tolist(), left.tolist())}) > 300  # positions are drawn too
    # nothing fits a 100x4 strip at 99-100% area within 3/4..4/3: torchvision's centred fallback
    t, l, fh, fw = rrc_boxes(torch.Generator().manual_seed(0), 3, 4, 100, scale=(0.99, 1.0))
    assert fw.tolist() == [5.0] * 3 and fh.tolist() == [4.0] * 3 and l.tolist() == [47.0] * 3 and t.tolist() == [0.0] * 3


def test_random_resized_crop_geometry_is_exact():
    # scale and ratio pinned to 1: the box is the whole square image, so the crop is the image or its mirror
    x = torch.rand(16, 3, 12, 12)
    out = random_resized_crop(x, torch.Generator().manual_seed(0), 12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    same = [(o - a).abs().max() < 1e-5 for o, a in zip(out, x)]
    mirror = [(o - a.flip(-1)).abs().max() < 1e-5 for o, a in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirror)) and 0 < sum(mirror) < 16


def test_photo_preset_is_seeded_sized_per_sample_and_in_range():
    torch.manual_seed(0)
    base = torch.rand(1, 3, 36, 36)
    x = base.repeat(24, 1, 1, 1)
    a = augment_batch(x, "photo", torch.Generator().manual_seed(1), out_size=32)
    b = augment_batch(x, "photo", torch.Generator().manual_seed(1), out_size=32)
    c = augment_batch(x, "photo", torch.Generator().manual_seed(2), out_size=32)
    assert a.shape == (24, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert len({tuple(o.flatten()[:64].round(decimals=4).tolist()) for o in a}) == 24  # a crop per sample
    assert torch.equal(x, base.repeat(24, 1, 1, 1))  # the input is left alone
    # every other preset sees the centre crop first
    none = augment_batch(x, "none", torch.Generator().manual_seed(1), out_size=32)
    assert torch.equal(none, x[:, :, 2:34, 2:34])


def test_loader_photo_resume_is_exact_and_other_presets_take_the_centre(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 3, 36, 36), dtype=np.uint8)
    split = Split(images, np.arange(40) % 4, [str(i) for i in range(40)])
    kw = dict(shuffle=True, seed=5, mean=(0.5,) * 3, std=(0.25,) * 3, out_size=32)
    L = BatchLoader(split, 8, augment="photo", **kw)
    L.set_epoch(2)
    full = list(L)
    L.set_epoch(2, start_step=3)
    resumed = list(L)
    assert len(full) == 5 and len(resumed) == 2 and full[0][0].shape == (8, 3, 32, 32)
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    L.set_epoch(3)
    assert not torch.equal(next(iter(L))[0], full[0][0])
    ev = BatchLoader(split, 40, augment="none", **{**kw, "shuffle": False})
    x, _ = next(iter(ev))
    want = (torch.from_numpy(center_crop(images, 32).astype(np.float32)) / 255 - 0.5) / 0.25
    assert torch.allclose(x, want, atol=1e-6)
    with pytest.raises(ValueError, match="out_size"):
        BatchLoader(split, 8, shuffle=False, out_size=40)


# ---------------------------------------------------------------- a run end to end

def _predict_json(capsys, *args) -> list[dict]:
    from imgarena.cli import main

    assert main(["predict", *map(str, args), "--format", "json", "--uncalibrated", "--topk", "1"]) == 0
    return json.loads(capsys.readouterr().out)


def test_photo_run_predict_and_export_agree_and_old_checkpoints_still_work(tmp_path, capsys):
    from imgarena.checkpoint import load_model, read_metadata, save_checkpoint
    from imgarena.cli import main

    root = _photo_folder(tmp_path / "photos", per_class=8)
    cache = tmp_path / "cache"
    assert main(["train", str(root), "--model", "mlp", "--img-size", "32", "--crop-pct", "0.875", "--augment", "photo",
                 "--epochs", "1", "--batch-size", "8", "--workers", "1", "--cache-dir", str(cache),
                 "--out-dir", str(tmp_path / "runs"), "--name", "p", "--val-fraction", "0.25"]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "p"
    meta = read_metadata(run / "best.safetensors")
    pre = meta["preprocessing"]
    assert pre["crop_pct"] == 0.875 and pre["interpolation"] == "bilinear" and pre["img_size"] == 32

    # the run's own evaluation of its val files: the cached images, centre-cropped by the loader
    cfg = DataConfig(source=str(root), img_size=32, crop_pct=0.875, cache_dir=str(cache), workers=1, val_fraction=0.25)
    data = load_data(cfg, progress=False)
    model, _ = load_model(run, device="cpu")
    x, _ = next(iter(BatchLoader(data.val, 64, shuffle=False, mean=data.mean, std=data.std, out_size=32)))
    with torch.inference_mode():
        own = torch.softmax(model(x).double(), 1).numpy()
    rows = {r["path"]: r for r in _predict_json(capsys, run, *data.val.paths)}
    for i, p in enumerate(data.val.paths):
        k = int(own[i].argmax())
        assert rows[p]["label"] == meta["class_names"][k] and abs(rows[p]["prob"] - own[i, k]) <= 1e-5, p

    # the ONNX export carries crop_pct; its sidecar without the new keys (an older one) still predicts
    onnx = tmp_path / "m.onnx"
    assert main(["export", str(run), "--out", str(onnx), "--dynamic-batch"]) == 0
    capsys.readouterr()
    side_path = tmp_path / "m.onnx.json"
    side = json.loads(side_path.read_text())
    assert side["preprocessing"]["crop_pct"] == 0.875 and side["parity"]["source"] == "the run's split files"
    onnx_rows = {r["path"]: r for r in _predict_json(capsys, onnx, *data.val.paths)}
    assert all(abs(onnx_rows[p]["prob"] - rows[p]["prob"]) <= 1e-4 for p in data.val.paths)
    for key in ("crop_pct", "interpolation"):
        side["preprocessing"].pop(key)
    side_path.write_text(json.dumps(side))
    old_onnx = _predict_json(capsys, onnx, data.val.paths[0])

    # an old-style checkpoint (no crop_pct / interpolation): decoded as before, squashed straight to 32
    old = tmp_path / "old"
    old_pre = {k: v for k, v in pre.items() if k not in ("crop_pct", "interpolation")}
    save_checkpoint(old / "best.safetensors", model, {**meta, "preprocessing": old_pre})
    p0 = data.val.paths[0]
    u8 = load_image(p0, channels=3, img_size=32)
    assert np.array_equal(path_decoder(old_pre)(p0), u8)
    xs = torch.from_numpy((u8[None] / 255.0 - np.array(pre["mean"]).reshape(1, 3, 1, 1))
                          / np.array(pre["std"]).reshape(1, 3, 1, 1)).float()
    with torch.inference_mode():
        want = torch.softmax(model(xs).double(), 1)[0].max().item()
    got = _predict_json(capsys, old, p0)[0]
    assert abs(got["prob"] - want) <= 1e-5
    assert abs(old_onnx[0]["prob"] - want) <= 1e-4
