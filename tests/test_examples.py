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
    from imgarena.comparison import validate
    from imgarena.config import CompareConfig, from_dict, load_yaml

    raw = load_yaml(EXAMPLES / f"{name}.yaml")
    cfg = from_dict(CompareConfig, raw, where=name)  # unknown keys would raise here
    validate(cfg)  # every model exists and every per-model TrainConfig is valid
    expected = {
        "seed000_mixer_vs_vit": dict(models=["mixer_b16", "vit_b16"], img=224, train={
            "pretrained": "timm", "optimizer": "adam", "schedule": "step", "augment": "standard"}),
        "seed003_convnext_stem": dict(models=["convnext_atto", "convnext_atto_cifar"], img=32, train={
            "optimizer": "adamw", "weight_decay": 0.004, "label_smoothing": 0.1}),
        "seed003_vs_resnet_vit_swin": dict(models=["convnext_atto", "convnext_atto_cifar", "resnet18", "vit_t4",
                                                   "swin_t_cifar"], img=32, train={
            "optimizer": "adamw", "weight_decay": 0.004, "label_smoothing": 0.1}),
        "seed004_mlp_resnet_mobilenet": dict(models=["mlp", "resnet50", "mobilenetv1"], img=28, train={}),
    }[name]
    assert cfg.models == expected["models"]
    assert cfg.data.img_size == expected["img"]
    for k, v in expected["train"].items():
        assert cfg.train[k] == v, k


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


def test_seed000_falls_back_to_random_init_and_runs(tmp_path, capsys):
    """Unavailable pretrained weights (here: a missing file; offline: timm's hub) -> a clearly
    labelled random-init run in its own folder, end to end."""
    make = _load_example("make_fashion_folder")
    data = tmp_path / "three"
    make.make_folder("seed000", str(data), scale=0.01, size=32, source="sample")
    seed000 = _load_example("seed000_mixer_vs_vit")
    out = tmp_path / "cmp"
    rc = seed000.main([str(data), "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--out", str(out),
                       "--quiet", "--set", f"pretrained={tmp_path / 'no-such-weights.safetensors'}",
                       "--set", "mixer_b16:model_kwargs={num_blocks: 1, hidden_dim: 32, tokens_mlp_dim: 16, "
                                "channels_mlp_dim: 64}",
                       "--set", "vit_b16:model_kwargs={depth: 1, embed_dim: 32, num_heads: 2, mlp_dim: 64}"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM INIT" in text and "no-such-weights" in text
    fallback = Path(f"{out}-random-init")
    assert not out.exists()  # nothing written under the pretrained run's name
    rows = _results(fallback)
    assert [rows[m]["status"] for m in ("mixer_b16", "vit_b16")] == ["ok", "ok"]
    saved = yaml.safe_load((fallback / "compare.yaml").read_text())
    assert saved["train"]["pretrained"] is None and saved["train"]["optimizer"] == "adam"


def test_seed002_tiny_vit_trains_one_epoch(tmp_path):
    assert _imgarena("train", "sample", "--config", EXAMPLES / "seed002_tiny_vit.yaml", "--subset", "64",
                     "--epochs", "1", "--out-dir", tmp_path, "--name", "vit") == 0
    summary = json.loads((tmp_path / "vit" / "summary.json").read_text())
    # vit_pytorch's ViT(32, patch 8, dim 128, depth 3, heads 2, mlp 256) for 10 classes, 1 channel:
    # 8,320 patch embedding + 128 + 2,176 position + 3 x 132,480 blocks + 256 norm + 1,290 head.
    assert summary["params"] == 409_610
    assert summary["train_images"] == 64


def _train_each_model(config: Path, out: Path, only=None, **data_overrides) -> dict[str, dict]:
    """One tiny epoch of every model (or those in `only`) of a compare config, through the real engine
    with exactly the TrainConfig `imgarena compare` builds for it (compare's own speed measurements
    are left out: they are what makes a compare of five models slow, and tests/test_compare.py
    covers them)."""
    from imgarena.comparison import model_train_config, recipe_overrides, validate
    from imgarena.config import CompareConfig, from_dict, load_yaml
    from imgarena.data import load_data
    from imgarena.engine.train import run_training

    raw = load_yaml(config)
    raw["data"] = {**raw["data"], **data_overrides}
    cfg = from_dict(CompareConfig, {**raw, "epochs": 1}, where=config.name)
    validate(cfg)
    data = load_data(cfg.data, progress=False)
    return {m: run_training(model_train_config(cfg, m, recipe_overrides(cfg, m), out), data=data, progress=False)
            for m in cfg.models if only is None or m in only}


def test_seed003_stem_pair_trains_and_the_small_stem_has_4x_the_flops(tmp_path):
    runs = _train_each_model(EXAMPLES / "seed003_convnext_stem.yaml", tmp_path, source="sample", subset=40,
                             val_fraction=0.01)
    assert len(runs) == 2 and all(r["epochs_completed"] == 1 for r in runs.values())
    default, small = runs["convnext_atto"], runs["convnext_atto_cifar"]
    # Same network except the stem kernel (4x4 vs 2x2, 1 channel, 40 filters): 480 fewer weights;
    # every stage map is 2x larger per side, so ~4x the FLOPs.
    assert default["params"] - small["params"] == 480
    assert 3.5 < small["flops"] / default["flops"] < 4.5


def test_seed003_resnet_vit_swin_train(tmp_path):
    # The two ConvNeXts of this config are the stem pair above, with the same recipe.
    runs = _train_each_model(EXAMPLES / "seed003_vs_resnet_vit_swin.yaml", tmp_path, source="sample", subset=40,
                             val_fraction=0.01, only=("resnet18", "vit_t4", "swin_t_cifar"))
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
    runs = _train_each_model(EXAMPLES / "seed004_mlp_resnet_mobilenet.yaml", tmp_path / "runs", source=str(data))
    assert runs["mlp"]["params"] == 471_002  # 28*28*3 -> 200 -> 2, as seed 004's MyNet
    assert runs["resnet50"]["params"] > 20e6 and 3e6 < runs["mobilenetv1"]["params"] < 4e6
    assert all(r["train_time_s"] > 0 and r["num_classes"] == 2 for r in runs.values())


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
