"""Typed configs. The CLI converts argparse results into these once; everything else takes them.

Every config round-trips through a plain dict / YAML (`to_dict`, `from_dict`, `save_yaml`,
`load_yaml`) so a run folder's `config.yaml` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from imgarena.errors import UserError

# --augment presets (imgarena.data.augment implements them; defined here so the CLI needs no torch).
AUGMENT_PRESETS = ("none", "flip", "light", "standard", "strong")


def default_cache_dir() -> str:
    return os.environ.get("IMGARENA_CACHE", str(Path.home() / ".cache" / "imgarena"))


@dataclass
class DataConfig:
    source: str = "sample"  # folder, CSV file, or built-in name: sample | fashion-mnist | cifar10
    img_size: int | None = None  # None: the images' own size when they all share one, else 224
    resize: str = "squash"  # squash (resize to a square, as the seeds do) | crop (shorter side + centre crop)
    channels: int | None = None  # None: 1 when every image is grayscale, else 3
    val_fraction: float = 0.1  # used only when the source has no val split
    split_seed: int = 0
    subset: int | None = None  # keep at most this many training images (stratified), e.g. 5000
    cache_dir: str = field(default_factory=default_cache_dir)
    workers: int = 0  # cache-building processes; 0 = all cores


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _resolve(tp):
    return typing.get_type_hints(tp)


def from_dict(cls, d: dict | None, *, where: str = "config"):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    d = dict(d or {})
    hints = _resolve(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        from imgarena.errors import closest_matches

        hint = closest_matches(unknown[0], names)
        raise UserError(
            f"{where}: unknown key {unknown[0]!r}"
            + (f" (did you mean {', '.join(hint)}?)" if hint else f"; known keys: {', '.join(sorted(names))}")
        )
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = from_dict(tp, v, where=f"{where}.{k}")
        kwargs[k] = v
    return cls(**kwargs)


def save_yaml(obj, path) -> None:
    import yaml

    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def load_yaml(path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}): fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of option: value")
    return data


@dataclass
class TrainConfig:
    """Everything `imgarena train` needs; saved as the run's `config.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: str = "mixer_t4"
    model_kwargs: dict = field(default_factory=dict)  # architecture overrides, e.g. {depth: 3}
    pretrained: str | None = None  # "timm" or a path to timm-format weights
    epochs: int = 10
    time_budget: float | None = None  # seconds of training; stops mid-epoch when spent, then evaluates
    batch_size: int = 128
    lr: float | None = None  # None: the optimizer's default scaled by batch_size * accum_steps / 256
    optimizer: str = "adamw"  # adamw | adam | sgd
    weight_decay: float | None = None  # None: 0.05 for adamw, 0 for adam, 5e-4 for sgd
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | step | onecycle | constant
    warmup_epochs: float = 0.0
    step_size: int = 7  # step schedule: decay every step_size epochs (seed 000: StepLR(7, 0.1))
    gamma: float = 0.1
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha); 0 disables
    cutmix: float = 0.0
    augment: str = "light"  # one of AUGMENT_PRESETS
    drop_path: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    clip_grad: float | None = None
    accum_steps: int = 1
    img_size: int | None = None  # shortcut for data.img_size
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    patience: int | None = None  # early stopping on val accuracy
    class_weights: str | None = None  # None | auto
    out_dir: str = "runs"
    name: str | None = None  # run folder name; default <model>-<timestamp>
    eval_batch_size: int = 256
    deterministic: bool = False
    state_every: int = 200  # also save resumable state.pt every N optimizer steps (0: epoch ends only)
    resume: bool = False  # continue out_dir/name from its state.pt (`imgarena train --resume runs/NAME`)


@dataclass
class BenchConfig:
    """What `imgarena bench` measures: speed on random inputs, no data involved."""

    models: list[str] = field(default_factory=lambda: ["mixer_t4", "vit_t4"])
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    modes: list[str] = field(default_factory=lambda: ["train", "infer"])
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    channels_last: bool = False
    warmup: int = 3  # untimed calls before timing
    repeats: int = 10  # timed calls; median, min and p95 are reported


@dataclass
class CompareConfig:
    """Everything `imgarena compare` needs; saved as the compare folder's `compare.yaml`.

    Every model gets the same data, split, seed, augmentation and budget; `imgarena.compare`
    builds each model's TrainConfig from this one config.
    """

    data: DataConfig = field(default_factory=DataConfig)
    models: list[str] = field(default_factory=lambda: ["mixer_t4", "vit_t4"])
    recipe: str = "same"  # same (one recipe for all) | recommended (each family's optimisation settings)
    epochs: int | None = None  # None: 10, or as many as fit when time_budget is set
    time_budget: float | None = None  # seconds of training per model
    batch_size: int = 128
    baseline: str | None = None  # speeds are also reported relative to this model
    out: str | None = None  # the compare folder; None: runs/compare-<data source name>
    seed: int = 0
    device: str = "auto"
    train: dict = field(default_factory=dict)  # TrainConfig options for every model, e.g. {lr: 0.001}
    per_model: dict = field(default_factory=dict)  # {model: {TrainConfig options}} for one model only


@dataclass
class PredictConfig:
    """What `imgarena predict` / `imgarena.load(...).predict` need."""

    checkpoint: str = ""  # run folder, .safetensors checkpoint, or an exported .onnx
    inputs: list[str] = field(default_factory=list)  # files, folders (recursive) and globs
    topk: int = 3
    tta: str = "none"  # none | flip | crop | flip-crop (imgarena.evaluation.tta)
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    workers: int = 0  # decoding threads; 0 = min(8, cores)
    which: str = "best"  # best | last checkpoint of a run folder


@dataclass
class ExportConfig:
    """What `imgarena export` needs."""

    checkpoint: str = ""  # run folder or .safetensors checkpoint
    format: str = "onnx"  # onnx | torchscript
    out: str | None = None  # None: <run>/export/<model>.onnx (or .pt)
    dynamic_batch: bool = False
    opset: int = 17
    check_images: list[str] = field(default_factory=list)  # parity images; default: the run's own
    which: str = "best"


@dataclass
class EvalConfig:
    """What `imgarena eval` needs. Image size, channels, resize, mean and std come from the checkpoint."""

    checkpoint: str = ""  # run folder or .safetensors checkpoint
    data: DataConfig = field(default_factory=DataConfig)  # source (+ cache_dir, workers) of the images to score
    which: str = "best"  # best | last checkpoint of a run folder
    split: str = "auto"  # auto (test when the data has one, else every image) | test | val | train | all
    batch_size: int = 256
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    tta: str = "none"  # none | flip | crop | flip-crop (imgarena.evaluation.tta)
    out: str | None = None  # also write eval.json, per_class.csv, confusion_matrix.png, errors.png here
