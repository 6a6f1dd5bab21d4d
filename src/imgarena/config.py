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
    time_budget: float | None = None  # seconds of training; stops after the epoch that crosses it
    batch_size: int = 128
    lr: float | None = None  # None: the optimizer's default scaled linearly by batch_size / 256
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
    augment: str = "light"  # none | light | standard | strong
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
