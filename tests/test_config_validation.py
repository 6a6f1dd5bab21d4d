"""Config values are type- and range-checked once, where a config is built: for the CLI, YAML and the
Python API alike, with messages naming the option as the user wrote it. Output paths are checked
by really writing there (a file in the way, a read-only mount, a full disk)."""

import dataclasses
import os
import subprocess

import pytest
import yaml

from imgarena.config import (BenchConfig, CompareConfig, ConfigValueError, DataConfig, EvalConfig, ExportConfig,
                             PredictConfig, TrainConfig, from_dict, load_yaml)
from imgarena.errors import UserError
from imgarena.paths import check_output_file, ensure_writable_dir


# ---------------------------------------------------------------- types and conversions

@pytest.mark.parametrize("kwargs, field, value", [
    (dict(lr="1e-3"), "lr", 0.001),  # YAML 1.1 reads 1e-3 as a string
    (dict(lr=1), "lr", 1.0),
    (dict(batch_size="64"), "batch_size", 64),
    (dict(epochs=3.0), "epochs", 3),
    (dict(time_budget="5m"), "time_budget", 300.0),
    (dict(time_budget="1h30m"), "time_budget", 5400.0),
    (dict(time_budget=90), "time_budget", 90.0),
    (dict(optimizer="SGD"), "optimizer", "sgd"),
    (dict(class_weights="none"), "class_weights", None),
    (dict(name=2024), "name", "2024"),  # `name: 2024` in YAML
    (dict(device="cuda:1"), "device", "cuda:1"),
])
def test_unambiguous_spellings_are_converted(kwargs, field, value):
    assert getattr(TrainConfig(**kwargs), field) == value


@pytest.mark.parametrize("kwargs, words", [
    (dict(lr="x"), "lr must be a finite number > 0, got 'x'"),
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(lr=float("nan")), "lr must be"),
    (dict(lr=-0.1), "lr must be a finite number > 0"),
    (dict(batch_size="6.5"), "batch_size must be a whole number >= 1"),
    (dict(batch_size=True), "batch_size must be a whole number"),
    (dict(batch_size=[64]), "batch_size must be a whole number"),
    (dict(epochs=0), "epochs must be a whole number >= 1, got 0"),
    (dict(epochs=None), "epochs must be a whole number >= 1, got None"),
    (dict(time_budget="5 minutes"), "time_budget must be a positive duration such as 90s"),
    (dict(time_budget=-5), "time_budget must be a positive duration"),
    (dict(ema="yes"), "ema must be true or false, got 'yes'"),
    (dict(ema=1), "ema must be true or false"),
    (dict(optimizer="lamb"), "optimizer must be one of adamw, adam, sgd, got 'lamb'"),
    (dict(schedule=["cosine"]), "schedule must be one of"),
    (dict(augment="heavy"), "augment must be one of none, flip, light, standard, strong"),
    (dict(amp="fp8"), "amp must be one of auto, bf16, fp16, off"),
    (dict(label_smoothing=1.0), "label_smoothing must be a finite number in [0, 1)"),
    (dict(ema_decay=1.0), "ema_decay must be a finite number in (0, 1)"),
    (dict(class_weights="balanced"), "class_weights must be auto or none"),
    (dict(name="a/b"), "name must be a plain folder name"),
    (dict(name=".."), "name must be a plain folder name"),
    (dict(device="gpu"), "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (dict(model=""), "model must be a non-empty text value"),
    (dict(model_kwargs=3), "model_kwargs must be a mapping of architecture options"),
    (dict(model_kwargs={1: 2}), "model_kwargs must be a mapping"),
    (dict(data="foo"), "data must be a mapping of DataConfig keys"),
    (dict(data={"img_size": "big"}), "data.img_size must be a whole number between 8 and 4096, got 'big'"),
    (dict(data={"img_sz": 3}), "unknown key 'data.img_sz' (did you mean img_size?)"),
    (dict(img_size=4), "img_size must be a whole number between 8 and 4096, got 4"),
])
def test_python_api_values_are_checked_and_named(kwargs, words):
    with pytest.raises(UserError) as e:
        TrainConfig(**kwargs)
    assert isinstance(e.value, ValueError) and words in str(e.value)


def test_every_config_checks_its_fields():
    cases = [
        (lambda: DataConfig(val_fraction=1), "val_fraction must be a finite number in (0, 1), got 1"),
        (lambda: DataConfig(channels=2), "channels must be one of 1, 3, got 2"),
        (lambda: DataConfig(subset=1), "subset must be a whole number >= 2"),
        (lambda: DataConfig(resize="stretch"), "resize must be one of squash, crop"),
        (lambda: DataConfig(workers=-1), "workers must be a whole number >= 0"),
        (lambda: EvalConfig(split="holdout"), "split must be one of auto, test, val, train, all"),
        (lambda: EvalConfig(tta="mirror"), "tta must be one of none, flip, crop, flip-crop"),
        (lambda: EvalConfig(batch_size=0), "batch_size must be a whole number >= 1"),
        (lambda: PredictConfig(topk=0), "topk must be a whole number >= 1"),
        (lambda: PredictConfig(which="first"), "which must be one of best, last"),
        (lambda: PredictConfig(inputs=[""]), "inputs must be a list of non-empty names"),
        (lambda: ExportConfig(opset=9), "opset must be a whole number between 13 and 20, got 9"),
        (lambda: ExportConfig(format="tflite"), "format must be one of onnx, torchscript"),
        (lambda: BenchConfig(batch_sizes="1,x"), "batch_sizes must be a non-empty list of whole numbers >= 1"),
        (lambda: BenchConfig(batch_sizes=[0]), "batch_sizes must be a non-empty list of whole numbers >= 1"),
        (lambda: BenchConfig(modes="train,fast"), "modes must be a non-empty list of names from train, infer"),
        (lambda: BenchConfig(models=[]), "models must be a non-empty list"),
        (lambda: CompareConfig(models=["mlp", ""]), "models must be a non-empty list of non-empty names"),
        (lambda: CompareConfig(models=3), "models must be a non-empty list"),
        (lambda: CompareConfig(train="x"), "train must be a mapping of train options"),
        (lambda: CompareConfig(train={"lr": "fast"}), "train.lr must be a finite number > 0, got 'fast'"),
        (lambda: CompareConfig(train={"learning_rate": 1}), "unknown key 'train.learning_rate'"),
        (lambda: CompareConfig(per_model={"mlp": 3}), "per_model must map each model to a mapping"),
        (lambda: CompareConfig(per_model={"mlp": {"epochs": "two"}}), "per_model.mlp.epochs must be a whole number"),
        (lambda: CompareConfig(recipe="best"), "recipe must be one of same, recommended"),
    ]
    for build, words in cases:
        with pytest.raises(ConfigValueError if "unknown" not in words else UserError) as e:
            build()
        assert words in str(e.value), (words, str(e.value))


def test_lists_and_paths_are_normalised(tmp_path):
    assert CompareConfig(models="mlp, mixer_t4,").models == ["mlp", "mixer_t4"]  # a YAML string, split
    assert BenchConfig(batch_sizes="1,64", modes="infer").batch_sizes == [1, 64]
    assert PredictConfig(inputs="photos/a,b.png").inputs == ["photos/a,b.png"]  # paths are never split
    assert DataConfig(source=tmp_path).source == str(tmp_path)  # a Path becomes the string YAML can save
    assert CompareConfig(train={"lr": "1e-3"}).train == {"lr": 0.001}
    nested = TrainConfig(data={"source": "sample", "subset": "500"})
    assert isinstance(nested.data, DataConfig) and nested.data.subset == 500


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    for cls in (DataConfig, TrainConfig, BenchConfig, CompareConfig, PredictConfig, ExportConfig, EvalConfig):
        cfg = cls()
        again = from_dict(cls, yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg))))
        assert again == cfg, cls.__name__


def test_check_config_catches_fields_changed_after_construction():
    from imgarena.engine.train import check_config

    cfg = TrainConfig()
    cfg.batch_size = "many"
    with pytest.raises(UserError, match="batch_size must be a whole number"):
        check_config(cfg)
    cfg = TrainConfig()
    cfg.data.val_fraction = 2.0
    with pytest.raises(UserError, match="data.val_fraction must be"):
        check_config(cfg)


def test_from_dict_names_the_file_or_the_flag():
    with pytest.raises(UserError, match=r"^batch_size in run.yaml must be a whole number >= 1, got '6x4'$"):
        from_dict(TrainConfig, {"batch_size": "6x4"}, where="run.yaml")
    with pytest.raises(UserError, match=r"^--batch-size must be a whole number >= 1, got 0$"):
        from_dict(TrainConfig, {"batch_size": 0}, where="run.yaml", flags={"batch_size": "--batch-size"})
    with pytest.raises(UserError, match=r"^data.img_size in run.yaml must be"):
        from_dict(TrainConfig, {"data": {"img_size": 3}}, where="run.yaml")
    with pytest.raises(UserError, match=r"unknown key 'data.img_sz' in run.yaml \(did you mean img_size\?\)"):
        from_dict(TrainConfig, {"data": {"img_sz": 3}}, where="run.yaml")


def test_choice_lists_match_the_engine():
    from imgarena import config
    from imgarena.data import images
    from imgarena.data.augment import PRESETS
    from imgarena.engine import checkpoint_eval, evaluate, optim
    from imgarena.evaluation import tta
    from imgarena import export

    assert config.OPTIMIZERS == optim.OPTIMIZERS and config.SCHEDULES == optim.SCHEDULES
    assert config.AMP_MODES == evaluate.AMP_MODES and config.EVAL_SPLITS == checkpoint_eval.EVAL_SPLITS
    assert config.RESIZE_MODES == images.RESIZE_MODES and config.TTA_MODES == tta.TTA_MODES
    assert set(config.AUGMENT_PRESETS) == set(PRESETS)
    assert config.EXPORT_FORMATS == export.EXPORT_FORMATS and config.OPSET_RANGE == export.OPSET_RANGE


def test_cli_choices_come_from_the_config():
    import argparse

    from imgarena import config
    from imgarena.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    train = {a.dest: a.choices for a in sub["train"]._actions}
    assert tuple(train["optimizer"]) == config.OPTIMIZERS and tuple(train["schedule"]) == config.SCHEDULES
    assert tuple(train["amp"]) == config.AMP_MODES and tuple(train["augment"]) == config.AUGMENT_PRESETS
    assert tuple(train["resize"]) == config.RESIZE_MODES
    ev = {a.dest: a.choices for a in sub["eval"]._actions}
    assert tuple(ev["split"]) == config.EVAL_SPLITS and tuple(ev["which"]) == config.CHECKPOINTS


# ---------------------------------------------------------------- YAML files

@pytest.mark.parametrize("content, words", [
    (b"data: foo\n", "data in {f} must be a mapping"),
    (b"model_kwargs: 3\n", "model_kwargs in {f} must be a mapping"),
    (b"train: x\n", "train in {f} must be a mapping"),
    (b"per_model:\n  mlp: 3\n", "per_model.mlp in {f} must be a mapping"),
    (b"- a\n- b\n", "{f} must hold a mapping of option: value, not a list"),
    (b"a: [1, 2\n", "{f} is not valid YAML"),
    (b"1: x\n", "key 1 is not an option name"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "{f} is not a UTF-8 text file"),
    (b"lr: 0.1\x00\n", "{f} is not valid YAML"),
])
def test_bad_yaml_files_are_one_line(tmp_path, content, words):
    f = tmp_path / "run.yaml"
    f.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_yaml(f)
    assert words.format(f=f) in str(e.value) and "\n" not in str(e.value)


def test_yaml_folder_and_unknown_keys(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_yaml(tmp_path)
    os.mkfifo(tmp_path / "pipe.yaml")
    with pytest.raises(UserError, match="pipe.yaml is not a regular file"):  # and returns at once
        load_yaml(tmp_path / "pipe.yaml")
    (tmp_path / "c.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key 'learning_rate' in .*c.yaml"):
        load_yaml(tmp_path / "c.yaml", TrainConfig)


# ---------------------------------------------------------------- output paths

def test_output_dir_checks(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert ensure_writable_dir(tmp_path / "new" / "deep", "--out-dir").is_dir()
    assert os.listdir(tmp_path / "new" / "deep") == []  # the probe file is gone
    with pytest.raises(UserError, match=r"^--out-dir .*afile is a file, not a folder"):
        ensure_writable_dir(afile, "--out-dir")
    with pytest.raises(UserError, match=r"^--cache-dir .*afile/sub: .*afile is a file, not a folder"):
        ensure_writable_dir(afile / "sub", "--cache-dir")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    with pytest.raises(UserError, match="is a broken link"):
        ensure_writable_dir(tmp_path / "dangling", "--out")


def test_output_file_checks(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert check_output_file(afile, "--out") == afile  # an existing file is replaced, fine
    assert check_output_file(tmp_path / "sub" / "x.json", "--json").parent.is_dir()
    with pytest.raises(UserError, match=r"^--out .* is a folder: pass a file path"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(UserError, match=r"^--out .*afile/x.onnx: its folder .*afile is a file"):
        check_output_file(afile / "x.onnx", "--out")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UserError, match="not a regular file"):
        check_output_file(tmp_path / "pipe", "--out")


@pytest.fixture
def mounted(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with those options (root only), unmounted afterwards."""
    mounts = []

    def mount(options):
        d = tmp_path / f"mnt{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        # imgarena's tests run as root (CI and `make test` install Debian packages): a mount that fails is
        # a broken environment, not a reason to skip the real-filesystem check
        assert r.returncode == 0, f"cannot mount a tmpfs ({r.stderr.strip() or r.returncode}): run the tests as root"
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)], check=False)


def test_read_only_and_full_file_systems(mounted):
    ro = mounted("ro,size=64k")
    with pytest.raises(UserError, match=r"^--out-dir .*: cannot write there \(read-only file system\)"):
        ensure_writable_dir(ro / "runs", "--out-dir")
    with pytest.raises(UserError, match=r"read-only file system"):
        ensure_writable_dir(ro, "--cache-dir")  # exists, but nothing can be written into it
    full = mounted("size=64k")
    with open(full / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    with pytest.raises(UserError, match=r"^--out .*: cannot write there \(no space left on the device\)"):
        ensure_writable_dir(full, "--out")
