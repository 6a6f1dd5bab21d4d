"""`imgarena train` / `imgarena eval` command lines: option layering, user errors, eval reports."""

import dataclasses
import json
import shutil

import pytest
import yaml
from _data_files import write_noisy_rgb_folder as write_class_folder

from imgarena.cli import build_parser, main
from imgarena.cli.train import config_from_args
from imgarena.config import TrainConfig


def _cfg(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_train_config_field_is_an_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        flag = {"data": "DATA", "img_size": "--img-size", "resume": "--resume"}.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in help_text, f.name


def test_layering_recipe_file_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": "mixer_t4", "lr": 0.5, "epochs": 7, "data": {"source": "sample", "subset": 100}}))
    c = _cfg(["--config", str(cfg_file), "--lr", "0.1", "--img-size", "32", "--recipe", "recommended"])
    assert c.model == "mixer_t4" and c.lr == 0.1 and c.epochs == 7  # flag > file > recipe
    assert c.data.source == "sample" and c.data.subset == 100 and c.data.img_size == 32
    assert c.optimizer == "adamw" and c.label_smoothing > 0  # from the Mixer recipe, not in the file
    c = _cfg(["sample", "--model", "mlp", "--time-budget", "2m", "--model-kwargs", "{hidden: [32]}",
              "--no-ema", "--class-weights", "none", "--channels-last"])
    assert c.time_budget == 120.0 and c.epochs == 100_000  # budget alone: train until it is spent
    assert c.model_kwargs == {"hidden": [32]} and c.ema is False and c.class_weights is None and c.channels_last
    assert _cfg(["sample", "--time-budget", "90s", "--epochs", "4"]).epochs == 4


@pytest.mark.parametrize("argv, words", [
    (["sample", "--time-budget", "5 minutes"], "duration"),
    (["sample", "--model-kwargs", "depth"], "YAML mapping"),
    (["--resume", "nowhere"], "not a run folder"),
    ([], "no data"),
])
def test_user_errors_exit_2(argv, words, capsys, tmp_path):
    assert main(["train", *argv, "--out-dir", str(tmp_path)]) == 2
    assert words in capsys.readouterr().err


def test_unknown_yaml_key_is_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    assert main(["train", "sample", "--config", str(bad)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_train_resume_and_eval_with_unknown_class(tmp_path, capsys):
    data = write_class_folder(tmp_path / "data", per_class=12, size=12)
    out = tmp_path / "runs"
    common = ["--model", "mlp", "--batch-size", "8", "--augment", "none", "--out-dir", str(out), "--workers", "1"]
    assert main(["train", str(data), "--epochs", "2", "--name", "r", *common]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "run folder:" in printed
    # a finished run cannot be resumed as is; a larger --epochs continues it
    assert main(["train", "--resume", str(out / "r")]) == 2
    assert main(["train", "--resume", str(out / "r"), "--epochs", "3"]) == 0
    assert len((out / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    assert yaml.safe_load((out / "r" / "config.yaml").read_text())["epochs"] == 3
    capsys.readouterr()

    # held-out folder: two known classes plus one the model never saw
    test = write_class_folder(tmp_path / "test", classes=("cat", "dog", "zebra"), per_class=5, size=20)
    shutil.rmtree(test / "zebra")
    write_class_folder(tmp_path / "test", classes=("zebra",), per_class=3, size=20)
    assert main(["eval", str(out / "r"), str(test), "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 10 and res["unknown_classes"] == {"zebra": 3}
    assert {u["class"] for u in res["unknown_images"]} == {"zebra"} and res["missing_classes"] == ["fish"]
    assert [r["class"] for r in res["per_class"]] == ["cat", "dog", "fish"]
    assert sum(map(sum, res["confusion_matrix"])) == 10
    assert res["preprocessing"]["img_size"] == 12  # 20 px images resized to the checkpoint's size

    assert main(["eval", str(out / "r"), str(test), "--out", str(tmp_path / "ev"), "--tta", "flip"]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "zebra" in text and "precision" in text
    for name in ("eval.json", "per_class.csv", "confusion_matrix.png", "errors.png"):
        assert (tmp_path / "ev" / name).is_file()
    assert main(["eval", str(out / "r"), str(test), "--split", "test"]) == 2  # no test split there
    capsys.readouterr()

    # one image per class: too few for a val split, and eval needs none
    single = write_class_folder(tmp_path / "single", classes=("cat", "dog"), per_class=1, size=12)
    assert main(["eval", str(out / "r"), str(single), "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 2 and sum(map(sum, res["confusion_matrix"])) == 2
    # training on it still needs a val split, and says so in one line
    assert main(["train", str(single), "--epochs", "1", "--name", "s", *common]) == 2
    assert "no usable val images" in capsys.readouterr().err
