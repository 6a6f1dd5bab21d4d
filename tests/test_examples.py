"""The seed examples (examples/*.yaml, *.py) and docs/architectures.md must not rot.

Each example config is run for real through the `imgarena` command line, shrunk to one tiny epoch
(a few images, small image size, tiny widths where the example uses B/16), and the result is
checked for what makes it *that* example: the seed's architecture sizes, the stem change, the
random-init fallback. The architecture doc's code links and parameter numbers are checked against
the code.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOC = ROOT / "docs" / "architectures.md"


def _load_example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _imgarena(*argv: str) -> int:
    from imgarena.cli import main

    return main([str(a) for a in argv])


def _results(out: Path) -> dict[str, dict]:
    data = json.loads((out / "results.json").read_text())
    return {r["model"]: r for r in data["models"]}


# ---------------------------------------------------------------- the configs themselves

@pytest.mark.parametrize("name", ["seed000_mixer_vs_vit", "seed003_convnext_stem", "seed003_vs_resnet_vit_swin",
                                  "seed004_mlp_resnet_mobilenet"])
def test_compare_configs_hold_the_seed_settings(name):
    from imgarena.comparison import model_train_config, validate
    from imgarena.config import CompareConfig, from_dict, load_yaml

    raw = load_yaml(EXAMPLES / f"{name}.yaml")
    cfg = from_dict(CompareConfig, raw, where=name)  # unknown keys would raise here
    validate(cfg)  # every model exists and every per-model TrainConfig is valid
    expected = {
        "seed000_mixer_vs_vit": dict(models=["mixer_b16", "vit_b16"], img=224, train={
            "finetune": "two-stage", "optimizer": "adam", "schedule": "step", "augment": "photo"}),
        "seed003_convnext_stem": dict(models=["convnext_atto", "convnext_atto_cifar"], img=32, train={
            "optimizer": "adamw", "weight_decay": 0.004, "label_smoothing": 0.1}),
        "seed003_vs_resnet_vit_swin": dict(models=["convnext_atto", "convnext_atto_cifar", "resnet18", "vit_t4",
                                                   "swin_t_cifar"], img=32, train={
            "optimizer": "adamw", "weight_decay": 0.004, "label_smoothing": 0.1}),
        "seed004_mlp_resnet_mobilenet": dict(models=["mlp", "resnet50", "mobilenetv1"], img=28,
                                             train={"augment": "photo"}),
    }[name]
    assert cfg.models == expected["models"]
    assert cfg.data.img_size == expected["img"]
    for k, v in expected["train"].items():
        assert cfg.train[k] == v, k
    # the pretrained path: which weights, which mode, and the preprocessing they bring (timm's
    # pretrained config, read from timm's registry: nothing is downloaded)
    weights = {"seed000_mixer_vs_vit": {"mixer_b16": ("timm:mixer_b16_224.miil_in21k", [0.0] * 3),
                                        "vit_b16": ("timm:vit_base_patch16_224.augreg_in21k", [0.5] * 3)},
               "seed004_mlp_resnet_mobilenet": {"mlp": (None, None), "resnet50": ("timm", [0.485, 0.456, 0.406]),
                                                "mobilenetv1": ("timm", [0.5] * 3)}}.get(name, {})
    for model, (spec, mean) in weights.items():
        tc = model_train_config(cfg, model, {})
        assert (tc.pretrained, tc.finetune_mode) == (spec, "two-stage" if spec else "full"), model
        assert tc.data.mean == (pytest.approx(mean) if mean else None), model


def test_seed002_config_is_the_seeds_tiny_vit():
    from imgarena.config import TrainConfig, from_dict, load_yaml

    cfg = from_dict(TrainConfig, load_yaml(EXAMPLES / "seed002_tiny_vit.yaml"))
    assert (cfg.data.subset, cfg.data.img_size, cfg.epochs) == (5000, 32, 10)
    assert cfg.model_kwargs == {"patch_size": 8, "embed_dim": 128, "depth": 3, "num_heads": 2, "mlp_dim": 256}


# ---------------------------------------------------------------- one tiny run of each

def test_make_fashion_folder_writes_real_pngs(tmp_path):
    from PIL import Image

    make = _load_example("make_fashion_folder")
    counts = make.make_folder("seed004", str(tmp_path / "shirts"), scale=0.1, source="sample")
    assert counts == {"tshirt": 6, "shirt": 6}
    files = sorted((tmp_path / "shirts").rglob("*.png"))
    assert len(files) == 12
    with Image.open(files[0]) as im:
        assert im.size == (28, 28) and im.mode == "L"
    counts = make.make_folder("seed000", str(tmp_path / "three"), scale=0.01, size=64, source="sample")
    assert counts == {"train/pullover": 6, "val/pullover": 1, "train/coat": 7, "val/coat": 1,
                      "train/shirt": 5, "val/shirt": 1}
    with Image.open(next((tmp_path / "three" / "val" / "coat").glob("*.png"))) as im:
        assert im.size == (64, 64)


def _stand_in_weights(model: str, timm_name: str, folder: Path, **kwargs) -> Path:
    """What `--pretrained timm` would fetch for `model`, offline: the model's own (untrained)
    state_dict as a weights file, with timm's pretrained config of `timm_name` as its config.json
    (timm's registry, no download) — the layout of a hub snapshot copied to a machine without access."""
    import torch
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    from imgarena.models import create_model

    folder.mkdir(parents=True)
    torch.manual_seed(1)
    net = create_model(model, num_classes=5, in_chans=3, **kwargs)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": get_pretrained_cfg(timm_name).to_dict()}))
    return folder / "model.safetensors"


SEED000_TINY = {"mixer_b16": dict(num_blocks=1, hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64),
                "vit_b16": dict(depth=1, embed_dim=32, num_heads=2, mlp_dim=64)}


def test_seed000_fine_tunes_the_pretrained_weights_with_their_preprocessing(tmp_path, capsys):
    """The example's pretrained path end to end, offline: local stand-ins for the two timm weight
    sets (shrunk B/16 widths, at 32 px), each with its timm pretrained config."""
    make = _load_example("make_fashion_folder")
    data = tmp_path / "three"
    make.make_folder("seed000", str(data), scale=0.01, size=32, source="sample")
    files = {"mixer_b16": _stand_in_weights("mixer_b16", "mixer_b16_224.miil_in21k", tmp_path / "mixer", img_size=32,
                                            **SEED000_TINY["mixer_b16"]),
             "vit_b16": _stand_in_weights("vit_b16", "vit_base_patch16_224.augreg_in21k", tmp_path / "vit", img_size=32,
                                          **SEED000_TINY["vit_b16"])}
    seed000 = _load_example("seed000_mixer_vs_vit")
    out = tmp_path / "cmp"
    argv = [str(data), "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--out", str(out), "--quiet"]
    for m, f in files.items():
        argv += ["--set", f"{m}:pretrained={f}", "--set", f"{m}:model_kwargs={json.dumps(SEED000_TINY[m])}"]
    assert seed000.main(argv) == 0
    assert "RANDOM INIT" not in capsys.readouterr().out
    rows = _results(out)
    expect = {"mixer_b16": ([0.0] * 3, [1.0] * 3, 0.875, "bilinear"), "vit_b16": ([0.5] * 3, [0.5] * 3, 0.9, "bicubic")}
    for m, (mean, std, crop, interp) in expect.items():
        assert (rows[m]["status"], rows[m]["finetune"], rows[m]["pretrained"]) == ("ok", "two-stage", str(files[m]))
        run = yaml.safe_load((out / rows[m]["run_dir"] / "config.yaml").read_text())
        d = run["data"]
        assert (d["mean"], d["std"], d["crop_pct"], d["interpolation"]) == (mean, std, crop, interp), m
        assert run["augment"] == "photo" and d["img_size"] == 32


def test_seed000_falls_back_to_random_init_when_weights_are_unavailable(tmp_path, capsys):
    """Unavailable pretrained weights (here: a missing file; offline: timm's hub) -> a clearly
    labelled random-init compare in its own folder, every model trained in full from scratch."""
    from imgarena.cli import build_parser
    from imgarena.cli.compare import build_config
    from imgarena.comparison import compare_dir, model_train_config, validate

    seed000 = _load_example("seed000_mixer_vs_vit")
    out = tmp_path / "cmp"
    argv = seed000.compare_argv([str(tmp_path), "--out", str(out),
                                 "--set", f"mixer_b16:pretrained={tmp_path / 'no-such-weights.safetensors'}"])
    text = capsys.readouterr().out
    assert "RANDOM INIT" in text and "no-such-weights" in text
    cfg = build_config(build_parser().parse_args(argv))
    validate(cfg)  # the fallback is a valid compare: no fine-tune mode left that needs weights
    assert compare_dir(cfg) == Path(f"{out}-random-init")
    for m in cfg.models:
        tc = model_train_config(cfg, m, {})
        assert (tc.pretrained, tc.finetune_mode, tc.optimizer) == (None, "full", "adam"), m
    # with weights that can be had, the config is run as it is
    stand_in = _stand_in_weights("mixer_b16", "mixer_b16_224.miil_in21k", tmp_path / "w", img_size=32,
                                 **SEED000_TINY["mixer_b16"])
    ok = seed000.compare_argv(["--set", f"mixer_b16:pretrained={stand_in}", "--set", "vit_b16:pretrained=null",
                               "--set", "vit_b16:finetune=full"])
    assert "--out" not in ok and "RANDOM INIT" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def gray10(tmp_path_factory):
    """A stand-in for Fashion-MNIST at the seed 002/003 configs' shape (10 classes, grayscale, 32 px)
    small enough that a run's evaluation is not what the test spends its time on: 80 images and no
    test split (the built-in sample's 1,000 test images would be scored by every run, and its 5,000
    images decoded at 32 px first)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("gray10") / "data"
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 56, (32, 32), dtype=np.uint8) + np.uint8(20 * c)  # noise over a class level
            Image.fromarray(img, "L").save(root / f"c{c}" / f"{i}.png")
    return str(root)


def test_seed002_tiny_vit_trains_one_epoch(tmp_path, gray10):
    assert _imgarena("train", gray10, "--config", EXAMPLES / "seed002_tiny_vit.yaml", "--subset", "64",
                     "--epochs", "1", "--out-dir", tmp_path, "--name", "vit") == 0
    summary = json.loads((tmp_path / "vit" / "summary.json").read_text())
    # vit_pytorch's ViT(32, patch 8, dim 128, depth 3, heads 2, mlp 256) for 10 classes, 1 channel:
    # 8,320 patch embedding + 128 + 2,176 position + 3 x 132,480 blocks + 256 norm + 1,290 head.
    assert summary["params"] == 409_610
    assert summary["train_images"] == 64


def _train_each_model(config: Path, out: Path, only=None, per_model=None, **data_overrides) -> dict[str, dict]:
    """One tiny epoch of every model (or those in `only`) of a compare config, through the real engine
    with exactly the TrainConfig `imgarena compare` builds for it (compare's own speed measurements
    are left out: they are what makes a compare of five models slow, and tests/test_compare.py
    covers them). `per_model` options are laid over the config's."""
    from imgarena.comparison import model_train_config, recipe_overrides, validate
    from imgarena.config import CompareConfig, from_dict, load_yaml, to_dict
    from imgarena.data import load_data
    from imgarena.engine.train import run_training

    raw = load_yaml(config)
    raw["data"] = {**raw["data"], **data_overrides}
    raw["per_model"] = {m: {**(raw.get("per_model") or {}).get(m, {}), **(per_model or {}).get(m, {})}
                        for m in {*(raw.get("per_model") or {}), *(per_model or {})}}
    cfg = from_dict(CompareConfig, {**raw, "epochs": 1}, where=config.name)
    validate(cfg)
    loaded, runs = {}, {}
    for m in cfg.models:
        if only is None or m in only:
            tc = model_train_config(cfg, m, recipe_overrides(cfg, m), out)
            key = json.dumps(to_dict(tc.data), sort_keys=True)  # as compare does: once per preprocessing
            data = loaded.setdefault(key, load_data(tc.data, progress=False))
            runs[m] = run_training(tc, data=data, progress=False)
    return runs


def test_seed003_stem_pair_trains_and_the_small_stem_has_4x_the_flops(tmp_path, gray10):
    runs = _train_each_model(EXAMPLES / "seed003_convnext_stem.yaml", tmp_path, source=gray10, subset=40,
                             val_fraction=0.2)
    assert len(runs) == 2 and all(r["epochs_completed"] == 1 for r in runs.values())
    default, small = runs["convnext_atto"], runs["convnext_atto_cifar"]
    # Same network except the stem kernel (4x4 vs 2x2, 1 channel, 40 filters): 480 fewer weights;
    # every stage map is 2x larger per side, so ~4x the FLOPs.
    assert default["params"] - small["params"] == 480
    assert 3.5 < small["flops"] / default["flops"] < 4.5


def test_seed003_resnet_vit_swin_train(tmp_path, gray10):
    # The two ConvNeXts of this config are the stem pair above, with the same recipe.
    runs = _train_each_model(EXAMPLES / "seed003_vs_resnet_vit_swin.yaml", tmp_path, source=gray10, subset=40,
                             val_fraction=0.2, only=("resnet18", "vit_t4", "swin_t_cifar"))
    assert sorted(runs) == ["resnet18", "swin_t_cifar", "vit_t4"]
    assert all(r["epochs_completed"] == 1 for r in runs.values())
    # The shrunk ViT and Swin of the config (per_model model_kwargs) are what was trained.
    vit_cfg = yaml.safe_load((Path(runs["vit_t4"]["run_dir"]) / "config.yaml").read_text())
    assert vit_cfg["model_kwargs"]["embed_dim"] == 128 and vit_cfg["weight_decay"] == 0.004
    assert runs["swin_t_cifar"]["params"] < 6e6  # embed_dim 48, depths 2-2-2-2 (the full swin_t_cifar: 27.5M)


def test_seed004_every_model_trains_and_the_mlp_is_the_seeds_mynet(tmp_path):
    make = _load_example("make_fashion_folder")
    data = tmp_path / "shirts"
    make.make_folder("seed004", str(data), scale=0.15, source="sample")  # 9 + 9 real PNGs
    # offline stand-ins for timm's weights, each with timm's pretrained config (its mean/std, crop)
    weights = {m: {"pretrained": str(_stand_in_weights(m, timm_name, tmp_path / m))}
               for m, timm_name in (("resnet50", "resnet50.a1_in1k"), ("mobilenetv1", "mobilenetv1_100"))}
    runs = _train_each_model(EXAMPLES / "seed004_mlp_resnet_mobilenet.yaml", tmp_path / "runs", source=str(data),
                             per_model=weights)
    assert runs["mlp"]["params"] == 471_002  # 28*28*3 -> 200 -> 2, as seed 004's MyNet
    assert runs["resnet50"]["params"] > 20e6 and 3e6 < runs["mobilenetv1"]["params"] < 4e6
    assert all(r["train_time_s"] > 0 and r["num_classes"] == 2 for r in runs.values())
    cfgs = {m: yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text()) for m, r in runs.items()}
    assert cfgs["resnet50"]["data"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's, from the weights
    assert cfgs["mobilenetv1"]["data"]["mean"] == pytest.approx([0.5] * 3)
    assert cfgs["mlp"]["data"]["mean"] != cfgs["resnet50"]["data"]["mean"]  # MyNet: the photos' own statistics
    assert [cfgs[m]["finetune"] for m in ("mlp", "resnet50", "mobilenetv1")] == [None, "two-stage", "two-stage"]
    assert all(c["data"]["img_size"] == 28 and c["augment"] == "photo" for c in cfgs.values())


# ---------------------------------------------------------------- docs/architectures.md

LINK = re.compile(r"\[`?([^\]`]+)`?\]\((?:\.\./)?(src/[\w/.]+\.py)(?:#[^)]*)?\)")


def _defined_names(path: Path) -> dict[str, set[str]]:
    """Top-level classes/functions/assignments of a module, each class mapped to its members."""
    tree = ast.parse(path.read_text())
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.Assign):
            names.update({t.id: set() for t in node.targets if isinstance(t, ast.Name)})
    return names


def test_architecture_doc_links_name_real_code():
    text = DOC.read_text()
    for path in set(re.findall(r"src/imgarena/[\w/]+\.py", text)):
        assert (ROOT / path).is_file(), path
    links = LINK.findall(text)
    assert len(links) > 40  # every family section links its classes and functions
    for label, path in links:
        if label.endswith(".py"):
            continue  # a link to the file itself
        names = _defined_names(ROOT / path)
        top, _, member = label.partition(".")
        assert top in names, f"{label} is not defined in {path}"
        assert not member or member in names[top], f"{label}: no {member} in class {top} ({path})"
    # The Mixer section names the paper's axes next to our argument names.
    assert "D_S = `tokens_mlp_dim`" in text and "D_C = `channels_mlp_dim`" in text


def _doc_table_counts() -> dict[str, int]:
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+) \|", DOC.read_text(), flags=re.M)
    return {name: int(n.replace(",", "")) for name, n in rows}


@pytest.mark.parametrize("name", ["mixer_b16", "mixer_h14", "vit_b16", "convnext_t", "resnet50", "mobilenetv1",
                                  "mobilenetv2", "swin_t"])
def test_architecture_doc_param_table_matches_the_code(name):
    table = _load_example("param_table")
    assert _doc_table_counts()[name] == table.ours(name)


def test_architecture_doc_walkthrough_numbers():
    """The per-block parameter counts quoted in the shape walk-throughs."""
    from imgarena.models import create_model
    from imgarena.models.flops import count_params

    build = _load_example("param_table")._build  # on the meta device where possible: no memory, no init

    def model(name, num_classes=1000, **kw):
        return build(lambda: create_model(name, num_classes, **kw))

    mixer = model("mixer_b16")
    assert count_params(mixer.blocks[0]) == 4_876_612
    assert count_params(mixer.blocks[0].mlp_tokens) == 151_108
    assert count_params(model("vit_b16").blocks[0]) == 7_087_872
    assert count_params(model("convnext_t").stages[2].blocks[0]) == 1_201_920
    assert count_params(model("resnet50").layer2[0]) == 379_392
    assert count_params(model("mobilenetv2").blocks[2][1]) == 14_848
    assert count_params(model("swin_t").layers[0].blocks[1]) == 112_347
    assert count_params(model("mlp", 2, img_size=28)) == 471_002
    cnn = model("cnn_s", 10, in_chans=1, img_size=28)
    assert count_params(cnn) == 825_066
    assert (count_params(cnn.stages[1]), count_params(cnn.fc)) == (18_432 + 128, 803_072)
