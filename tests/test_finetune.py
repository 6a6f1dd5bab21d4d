"""Fine-tune modes on real runs: a linear probe never touches the backbone (weights and buffers)
and trains on features computed once; two-stage trains the backbone only after the freeze
epochs and resumes exactly across the switch; the feature store is reused until an image or the
weights change."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _data_files import write_noisy_rgb_folder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import imgarena
from imgarena.checkpoint import load_model, read_metadata
from imgarena.config import DataConfig
from imgarena.data import load_data
from imgarena.data.loader import BatchLoader
from imgarena.engine.evaluate import evaluate
from imgarena.engine.features import FeatureStore, forward_rows, pooled

# 3 classes x 24 noisy 16 px RGB images: 54 train / 18 val
FAST = dict(img_size=16, val_fraction=0.25, batch_size=16, eval_batch_size=64, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The image folder and a pretrained source: an imgarena run of cnn_s trained for 1 epoch on it."""
    root = tmp_path_factory.mktemp("ft")
    data = write_noisy_rgb_folder(root / "data", per_class=24, size=16)
    cache = str(root / "cache")
    pre = imgarena.train(str(data), "cnn_s", epochs=1, out_dir=str(root / "runs"), name="pre", cache_dir=cache, **FAST)
    return {"root": root, "data": str(data), "cache": cache, "pre": pre["run_dir"]}


def _run(world, name, data=None, **kw):
    opts = {**FAST, "pretrained": world["pre"], **kw}
    return imgarena.train(data or world["data"], "cnn_s", out_dir=str(world["root"] / "runs"), name=name,
                          cache_dir=world["cache"], **opts)


def _backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_backbone_stays_in_eval_mode_and_keeps_the_head_training():
    from imgarena.models import create_model

    torch.manual_seed(0)
    m = create_model("vit_t7", num_classes=3, depth=2, embed_dim=32, num_heads=2, mlp_dim=64, drop_rate=0.5,
                     proj_drop_rate=0.3, drop_path_rate=0.3, distilled=True)
    x = torch.randn(4, 1 if m.in_chans == 1 else 3, 28, 28)
    m.eval()
    with torch.no_grad():
        ref = pooled(m)(x)
    m.freeze_backbone()
    m.train()  # what the training loop calls every epoch
    head = {id(p) for p in m.get_classifier().parameters()}
    assert len(head) == 4  # the class head and DeiT's distillation head train together
    assert all(p.requires_grad == (id(p) in head) for p in m.parameters())
    assert m.head.training and m.head_dist.training and not m.blocks[1].drop_path1.training
    assert not any(mod.training for name, mod in m.named_modules() if name.startswith(("blocks", "patch_embed", "fc_norm", "head_drop")))
    with torch.no_grad():
        assert torch.equal(pooled(m)(x), ref)  # no dropout, no drop path in the backbone
    m.freeze_backbone(False)
    assert all(mod.training for mod in m.modules()) and all(p.requires_grad for p in m.parameters())

    cnn = create_model("cnn_s", num_classes=3, img_size=16)
    buffers = {k: v.clone() for k, v in cnn.state_dict().items()}
    cnn.freeze_backbone()
    cnn.train()
    cnn(torch.randn(8, 3, 16, 16)).sum().backward()  # a training step's forward + backward
    assert _same(cnn.state_dict(), buffers)  # BatchNorm running statistics untouched
    assert cnn.head.weight.grad is not None and cnn.fc.weight.grad is None


FAMILIES = [("cnn_s", {}), ("mlp_deep", {}), ("mixer_t4", {"num_blocks": 1}), ("vit_t4", {"depth": 1, "embed_dim": 24, "mlp_dim": 48}),
            ("resnet18_cifar", {"layers": (1, 1, 1, 1), "widths": (8, 8, 16, 16)}),
            ("mobilenetv2_cifar", {"width": 0.25}), ("convnext_atto_cifar", {"depths": (1, 1, 1, 1)}),
            ("swin_t_cifar", {"depths": (1, 1, 1, 1), "embed_dim": 12, "num_heads": (1, 1, 1, 1)}),
            ("timm/test_resnet", {}), ("timm/test_vit", {})]


@pytest.mark.parametrize("name,kw", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_keeps_the_head_contract_and_freezes(name, kw):
    from imgarena.models import create_model
    from imgarena.models._base import backbone_modules, layer_ids

    torch.manual_seed(0)
    m = create_model(name, num_classes=3, img_size=32, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m.get_classifier()(pooled(m)(x)), m(x), atol=1e-5)
    ids = layer_ids(m)
    head = {n for n, p in m.named_parameters() if any(p is q for q in m.get_classifier().parameters())}
    assert {ids[n] for n in head} == {max(ids.values())} and max(ids.values()) >= 2  # stem/blocks below the head
    m.freeze_backbone()
    m.train()
    assert {n for n, p in m.named_parameters() if p.requires_grad} == head
    assert backbone_modules(m) and not any(mod.training for mod in backbone_modules(m))
    assert all(mod.training for mod in m.get_classifier().modules())


def test_linear_probe_trains_the_head_on_features_computed_once(world):
    pre = load_file(os.path.join(world["pre"], "best.safetensors"))
    first = _run(world, "lin1", finetune="linear", epochs=2, augment="flip")
    ft = first["finetune"]
    assert ft["mode"] == "linear" and ft["features_computed"] == 72 and ft["features_reused"] == 0
    [store] = ft["feature_files"]
    before = os.stat(store)
    run = world["root"] / "runs" / "lin1"
    best = load_file(run / "best.safetensors")
    assert _same(_backbone(best), _backbone(pre))  # every backbone tensor and buffer, bitwise
    assert not torch.equal(best["head.weight"], pre["head.weight"])
    groups = json.loads((run / "param_groups.json").read_text())
    assert [g["name"] for g in groups["groups"]] == ["head", "head_no_decay"]
    assert sorted(n for g in groups["groups"] for n in g["param_names"]) == ["head.bias", "head.weight"]

    # the saved model is the whole model (backbone + trained head): scored on the images it gets the
    # accuracy the head had on the stored features
    model, _ = load_model(run, which="best")
    data = load_data(DataConfig(source=world["data"], img_size=16, val_fraction=0.25, cache_dir=world["cache"]),
                     progress=False)
    ev = evaluate(model, BatchLoader(data.val, 64, shuffle=False, mean=data.mean, std=data.std), num_classes=3,
                  device="cpu")
    assert ev["acc"] == pytest.approx(first["best_val_acc"])

    second = _run(world, "lin2", finetune="linear", epochs=2, augment="flip")
    assert second["finetune"]["features_computed"] == 0 and second["finetune"]["features_reused"] == 72
    after = os.stat(store)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    rows = [[json.loads(r) for r in (world["root"] / "runs" / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("lin1", "lin2")]
    assert [r["val_loss"] for r in rows[0]] == [r["val_loss"] for r in rows[1]]


def test_linear_with_mixup_trains_the_frozen_model_on_images_without_touching_it(world):
    pre = load_file(os.path.join(world["pre"], "best.safetensors"))
    s = _run(world, "linmix", finetune="linear", epochs=1, mixup=0.4, augment="light")
    assert "features_computed" not in s["finetune"]  # mixup mixes images: no stored features
    last = load_file(world["root"] / "runs" / "linmix" / "last.safetensors")
    assert _same(_backbone(last), _backbone(pre))  # BatchNorm statistics included, though it ran in train()
    assert not torch.equal(last["head.weight"], pre["head.weight"])


def test_features_follow_the_weights_and_the_images(world, tmp_path):
    # the pretrained run's weights file changed (one tensor scaled): its features are computed anew
    source = tmp_path / "pre_copy"
    shutil.copytree(world["pre"], source)
    for name in ("best.safetensors", "last.safetensors"):
        with safe_open(str(source / name), framework="pt") as f:
            meta = f.metadata()
        sd = load_file(source / name)
        sd["stages.0.0.conv.weight"] = sd["stages.0.0.conv.weight"] * 1.01
        save_file(sd, str(source / name), metadata=meta)
    new_w = _run(world, "new_w", finetune="linear", epochs=1, pretrained=str(source))
    assert new_w["finetune"]["features_computed"] == 72

    # one image file rewritten: a new pixel cache entry, so every feature is computed again
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    one = _run(world, "img1", data=str(data), finetune="linear", epochs=1)
    assert one["finetune"]["features_computed"] == 72
    path = data / "cat" / "000.png"
    arr = np.asarray(Image.open(path)).copy()
    arr[:4] = 255 - arr[:4]
    Image.fromarray(arr).save(path)
    two = _run(world, "img2", data=str(data), finetune="linear", epochs=1)
    assert two["finetune"]["features_computed"] == 72
    assert two["finetune"]["feature_files"] != one["finetune"]["feature_files"]


def test_feature_store_is_self_verifying_and_views_are_per_row(world, tmp_path, caplog):
    from imgarena.models import create_model

    torch.manual_seed(0)
    m = create_model("cnn_s", num_classes=3, img_size=16).eval()
    images = np.random.default_rng(0).integers(0, 255, (10, 3, 20, 20), dtype=np.uint8)
    kw = dict(img_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", batch_size=4)
    center = forward_rows(pooled(m), images, np.arange(10), **kw)
    with torch.no_grad():  # the eval view: the centre 16 px crop of the 20 px stored image
        x = (torch.from_numpy(images[:, :, 2:18, 2:18]).float() / 255 - 0.5) / 0.25
        assert np.allclose(center, pooled(m)(x).numpy(), atol=1e-5)
    # an augmented view of a row does not depend on the rows computed with it
    a = forward_rows(pooled(m), images, np.arange(10), augment="photo", seed=3, view=1, **kw)
    b = forward_rows(pooled(m), images, np.array([7, 2]), augment="photo", seed=3, view=1, **kw)
    c = forward_rows(pooled(m), images, np.array([7]), augment="photo", seed=3, view=2, **kw)
    assert np.allclose(a[[7, 2]], b, atol=1e-6) and not np.allclose(b[0], c[0], atol=1e-3)

    store = FeatureStore(tmp_path, {"kind": "test"})
    calls = []

    def compute(rows):
        calls.append(rows.tolist())
        return center[rows]

    assert np.array_equal(store.get_or_compute([3, 1, 3], compute), center[[3, 1, 3]])
    assert np.array_equal(store.get_or_compute([5, 1], compute), center[[5, 1]])
    assert calls == [[1, 3], [5]] and store.reused == 1 and store.computed == 1
    blob = bytearray(open(store.path, "rb").read())
    blob[-5] ^= 0xFF  # one flipped bit in the values
    open(store.path, "wb").write(bytes(blob))
    with caplog.at_level("WARNING"):
        assert np.array_equal(store.get_or_compute([1, 3, 5], compute), center[[1, 3, 5]])
    assert "damaged" in caplog.text and calls[-1] == [1, 3, 5]
    size = os.path.getsize(store.path)
    with open(store.path, "r+b") as f:
        f.truncate(size // 2)  # a torn write
    assert np.array_equal(store.get_or_compute([1], compute), center[[1]]) and calls[-1] == [1]
    assert os.path.getsize(store.path) < size  # rewritten with what this call needed


def _cli(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", IMGARENA_PROGRESS="0", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "imgarena", "train", *args], env=env, capture_output=True, text=True,
                          timeout=240)


def test_two_stage_trains_the_backbone_after_the_freeze_and_resumes_exactly(world):
    pre = load_file(os.path.join(world["pre"], "best.safetensors"))
    runs = world["root"] / "runs"
    common = [world["data"], "--model", "cnn_s", "--pretrained", world["pre"], "--epochs", "2", "--freeze-epochs", "1",
              "--img-size", "16", "--val-fraction", "0.25", "--batch-size", "16", "--layer-decay", "0.5",
              "--augment", "light", "--lr", "0.001", "--state-every", "1", "--cache-dir", world["cache"],
              "--out-dir", str(runs), "--workers", "1"]
    full = _cli(common + ["--name", "two_full"])
    assert full.returncode == 0, full.stderr
    assert "backbone unfrozen" in full.stdout and "param groups" in full.stdout
    summary = json.loads((runs / "two_full" / "summary.json").read_text())
    assert summary["finetune"]["mode"] == "two-stage" and summary["finetune"]["layer_decay"] == 0.5
    groups = {g["name"]: g for g in json.loads((runs / "two_full" / "param_groups.json").read_text())["groups"]}
    # cnn_s layers: stage 0, stage 1, fc (+ its BatchNorm), head 3; layer i at lr x 0.1 x 0.5 ** (3 - i)
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["layer_2"]["lr"] == pytest.approx(5e-5)
    assert groups["layer_0"]["lr"] == pytest.approx(1.25e-5) and groups["layer_0"]["layer_id"] == 0
    final = load_file(runs / "two_full" / "last.safetensors")
    assert not torch.equal(final["stages.0.0.conv.weight"], pre["stages.0.0.conv.weight"])  # trained in epoch 2

    # 54 images / 16 = 3 steps per epoch (the last batch is dropped); killed after step 4, in epoch 2
    killed = _cli(common + ["--name", "two_cut"], {"IMGARENA_TEST_KILL_AT_STEP": "4"})
    assert killed.returncode == -9, killed.stderr
    cut = runs / "two_cut"
    assert read_metadata(cut / "last.safetensors")["epoch"] == 1
    after_one = load_file(cut / "last.safetensors")
    assert _same(_backbone(after_one), _backbone(pre))  # epoch 1 trained the head only
    assert not torch.equal(after_one["head.weight"], pre["head.weight"])
    state = torch.load(cut / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 4
    assert not torch.equal(state["model"]["stages.0.0.conv.weight"], pre["stages.0.0.conv.weight"])

    resumed = _cli(["--resume", str(cut)])
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last.safetensors", "best.safetensors"):
        assert _same(load_file(runs / "two_full" / name), load_file(cut / name)), name
    rows = [[json.loads(r) for r in (runs / d / "metrics.jsonl").read_text().splitlines()] for d in ("two_full", "two_cut")]
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
